"""Decode any image Pillow reads into one square 8-bit grayscale array.

The real SARS-CoV-2 CT set stores every COVID slice as RGB or RGBA and every non-COVID slice as
RGBA, so channel layout and alpha correlate with the label. Everything here funnels into luminance
only: an L, RGB, RGBA or palette copy of one picture decodes to the same array.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("pad", "stretch")
# Modes whose pixels are integers or floats wider than 8 bits; Pillow's convert("L") clips them.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 [size, size]
    mode: str  # as stored in the file, for the dataset doctor
    width: int
    height: int


def decode_image(data: bytes, size: int, resize: str = "pad") -> Decoded:
    """Decode file bytes; raises on anything unreadable (the caller records the reason)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if not data:
        raise ValueError("empty file (0 bytes)")
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; a CT slice that large is an attack
        # or a mistake either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            mode, (width, height) = img.mode, img.size
            img.load()
            gray = to_gray(ImageOps.exif_transpose(img))
    return Decoded(_fit_square(gray, size, resize), mode, width, height)


def to_gray(img: Image.Image) -> Image.Image:
    """8-bit luminance; alpha is dropped (not composited) so RGB and opaque RGBA agree exactly."""
    if img.mode == "L":
        return img
    if img.mode in _WIDE_MODES:
        return Image.fromarray(_wide_to_uint8(np.asarray(img)))
    # Pillow's RGB->L weights sum to exactly 1 in fixed point, so gray RGB maps to the same L.
    return img.convert("RGB").convert("L")


def _wide_to_uint8(a: np.ndarray) -> np.ndarray:
    """16-bit PNGs hold 0..65535; 'I' files written from 8-bit data hold 0..255."""
    a = a.astype(np.float64)
    if a.min() >= 0 and a.max() <= 255:
        return a.round().astype(np.uint8)
    if a.min() >= 0 and a.max() <= 65535:
        return (a / 257).round().astype(np.uint8)
    # e.g. Hounsfield units in a signed or float image: stretch to the full 8-bit range
    return ((a - a.min()) / np.ptp(a) * 255).round().astype(np.uint8)


def _fit_square(img: Image.Image, size: int, resize: str) -> np.ndarray:
    if resize == "stretch":
        return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    scale = size / max(img.size)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = np.zeros((size, size), np.uint8)  # pad with 0, which is air in a CT slice
    top, left = (size - h) // 2, (size - w) // 2
    canvas[top : top + h, left : left + w] = img.resize((w, h), Image.Resampling.BILINEAR)
    return canvas

