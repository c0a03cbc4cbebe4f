"""Decode any image Pillow reads into one square 8-bit grayscale array.

The real SARS-CoV-2 CT set stores every COVID slice as RGB or RGBA and every non-COVID slice as
RGBA, so channel layout and alpha correlate with the label. Everything here funnels into luminance
only: an L, RGB, RGBA or palette copy of one picture decodes to the same array.

Pixels wider than 8 bits are scaled by what the file declares, never by what a slice happens to
hold, so every slice of a scan gets the same scale:
- unsigned integers: the full range of their significant bits becomes 0..255. The bits are the
  PNG's sBIT chunk when present (the samples are shifted right to undo the encoder's scaling, as
  the PNG spec says), else TIFF's BitsPerSample, else the container (16-bit PNG: 0..65535);
- signed integers are read as Hounsfield units in the window -1024..3071 (see HU_WINDOW);
- floats must be finite and within 0..1 (0 black, 1 white); others are refused, not stretched.
An image whose every pixel holds the same value carries no picture and is refused too.

The common case, a grayscale 8- or 16-bit PNG (COVIDx CT's slices, most CT exports), is read with
libpng through imagecodecs, which returns the same samples as Pillow in 15-23% less time;
everything else, and any PNG libpng refuses, goes through Pillow.
"""

from __future__ import annotations

import functools
import io
import re
import struct
import warnings
import zlib
from dataclasses import dataclass

import imagecodecs
import numpy as np
from PIL import Image, ImageOps

RESIZE_MODES = ("pad", "stretch")
# Pillow names the in-memory file it was handed: `<_io.BytesIO object at 0x7f...>`.
_OBJECT_ADDRESS = re.compile(r"\s*<[\w.]+ object at 0x[0-9a-fA-F]+>")
# Modes whose pixels are integers or floats wider than 8 bits; Pillow's convert("L") clips them.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
# A signed integer slice is a CT in Hounsfield units: no scanner writes negative raw values. A
# 12-bit CT stores HU + 1024 in 0..4095, so this window makes a slice exported as signed HU
# decode exactly like the same slice exported as unsigned 12-bit, whatever either one holds.
HU_WINDOW = (-1024, 3071)
_TIFF_BITS_PER_SAMPLE, _TIFF_SAMPLE_FORMAT, _TIFF_UNSIGNED = 258, 339, 1
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_GRAY = 0  # IHDR colour type
# The chunks of a PNG that libpng and Pillow read to the same samples: no palette, no
# transparency, no animation, and no orientation, which Pillow takes from eXIf and from the
# text chunks below (ImageOps.exif_transpose); a file with any other chunk goes through Pillow.
_PLAIN_PNG_CHUNKS = {b"IHDR", b"IDAT", b"IEND", b"sBIT", b"gAMA", b"cHRM", b"sRGB", b"iCCP",
                     b"pHYs", b"tIME", b"tEXt", b"zTXt", b"iTXt"}
_PNG_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt"}
_ORIENTATION_KEYWORDS = {b"Raw profile type exif", b"XML:com.adobe.xmp"}


@dataclass(frozen=True)
class Decoded:
    pixels: np.ndarray  # uint8 [size, size]
    mode: str  # as stored in the file, for the dataset doctor
    width: int
    height: int
    # The scale the pixels were read with: the bit depth whose full range became 0..255 (1, 8,
    # 12, 16, 32...), "HU" for signed integers (HU_WINDOW) or "float" (0..1).
    bits: int | str
    # The largest raw sample of a file read as 16 bits: a 12-bit scan saved in a 16-bit PNG
    # without sBIT stays below 4096, and decodes nearly black (the dataset doctor warns).
    peak: int | None = None


def decode_image(data: bytes, size: int, resize: str = "pad") -> Decoded:
    """Decode file bytes; raises on anything unreadable (the caller records the reason)."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    if not data:
        raise ValueError("empty file (0 bytes)")
    return _decode_gray_png(data, size, resize) or _decode_with_pillow(data, size, resize)


def _decode_with_pillow(data: bytes, size: int, resize: str) -> Decoded:
    with warnings.catch_warnings():
        # Pillow only warns between 1x and 2x MAX_IMAGE_PIXELS; a CT slice that large is an attack
        # or a mistake either way.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            mode, (width, height) = img.mode, img.size
            img.load()
            bits, shift = _depth_of(img, data)
            _, peak = _refuse_constant(img)
            gray = _to_gray(ImageOps.exif_transpose(img), bits, shift)
    return Decoded(fit_square(gray, size, resize), mode, width, height, bits,
                   peak if bits == 16 else None)


def _decode_gray_png(data: bytes, size: int, resize: str) -> Decoded | None:
    """A plain grayscale 8- or 16-bit PNG (see _plain_gray_png) read by libpng, as Pillow would
    read it: same samples, bit-depth rules, refusals and Decoded fields. None for any other file,
    and for one libpng refuses, so that Pillow decodes it or says why not, in its own words."""
    header = _plain_gray_png(data)
    if header is None:
        return None
    width, height, depth = header
    try:
        samples = imagecodecs.png_decode(data)
    except Exception:  # noqa: BLE001 - whatever libpng refuses, Pillow is asked next
        return None
    if samples.shape != (height, width):
        return None
    low, high = int(samples.min()), int(samples.max())
    if low == high:
        raise ValueError(f"constant image: every pixel is {low}")
    if depth == 8:
        return Decoded(fit_square(Image.fromarray(samples), size, resize), "L", width, height, 8)
    significant = _png_significant_bits(data)
    bits = significant or 16
    gray = _unsigned_to_uint8(samples, bits, 16 - bits)
    return Decoded(fit_square(Image.fromarray(gray), size, resize), "I;16", width, height, bits,
                   high if bits == 16 else None)


def _plain_gray_png(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, bit depth) of a grayscale, non-interlaced 8- or 16-bit PNG that holds only
    _PLAIN_PNG_CHUNKS, whose chunks other than IDAT pass their CRC (Pillow refuses a file where
    they do not) and whose size Pillow would not take for a decompression bomb; else None."""
    if not data.startswith(_PNG_SIGNATURE + b"\x00\x00\x00\x0dIHDR") or len(data) < 33:
        return None
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
    if colour != _PNG_GRAY or depth not in (8, 16) or interlace:
        return None
    if Image.MAX_IMAGE_PIXELS is not None and width * height > Image.MAX_IMAGE_PIXELS:
        return None
    pos = len(_PNG_SIGNATURE)
    while pos + 12 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if kind not in _PLAIN_PNG_CHUNKS or end > len(data):
            return None
        if kind != b"IDAT":
            body = data[pos + 4 : end - 4]
            if zlib.crc32(body) != struct.unpack(">I", data[end - 4 : end])[0]:
                return None
            if kind in _PNG_TEXT_CHUNKS and body[4:].split(b"\0", 1)[0] in _ORIENTATION_KEYWORDS:
                return None
        if kind == b"IEND":
            return width, height, depth
        pos = end
    return None


def _depth_of(img: Image.Image, data: bytes) -> tuple[int | str, int]:
    """(Decoded.bits, how far to shift samples right before scaling), from the file alone."""
    if img.mode == "1":
        return 1, 0
    if img.mode == "F":
        return "float", 0
    if img.mode == "I":  # 32-bit signed in Pillow; only a TIFF can say its samples are unsigned
        if img.format == "TIFF" and _tiff_tag(img, _TIFF_SAMPLE_FORMAT, 1) == _TIFF_UNSIGNED:
            return _tiff_bits(img, 32), 0
        return "HU", 0
    if img.mode in _WIDE_MODES:  # the unsigned 16-bit containers
        if img.format == "PNG" and (significant := _png_significant_bits(data)):
            return significant, 16 - significant
        if img.format == "TIFF":  # e.g. 12: Pillow unpacks 12-bit samples unscaled, 0..4095
            return _tiff_bits(img, 16), 0
        return 16, 0
    return 8, 0  # Pillow has already scaled 1-, 2- and 4-bit PNG gray and palettes to 8 bits


def _tiff_tag(img: Image.Image, tag: int, default: int) -> int:
    value = getattr(img, "tag_v2", {}).get(tag, default)
    return int(value[0] if isinstance(value, tuple) else value)


def _tiff_bits(img: Image.Image, container: int) -> int:
    bits = _tiff_tag(img, _TIFF_BITS_PER_SAMPLE, container)
    return bits if 1 <= bits <= container else container


def _png_significant_bits(data: bytes) -> int | None:
    """The gray sample's sBIT value, which Pillow does not expose; None when absent or invalid."""
    pos = 8  # after the signature
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        if kind in (b"IDAT", b"IEND"):  # sBIT must come before the image data
            return None
        if kind == b"sBIT" and length >= 1:
            bits = data[pos + 8]
            return bits if 1 <= bits <= 16 else None  # like libpng, ignore an impossible sBIT
        pos += 12 + length
    return None


def _to_gray(img: Image.Image, bits: int | str, shift: int) -> Image.Image:
    """8-bit luminance; alpha is dropped (not composited) so RGB and opaque RGBA agree exactly."""
    if img.mode == "L":
        return img
    if img.mode == "F":
        return Image.fromarray(_float_to_uint8(np.asarray(img)))
    if bits == "HU":
        return Image.fromarray(linear_to_uint8(np.asarray(img), *HU_WINDOW))
    if img.mode in _WIDE_MODES:
        return Image.fromarray(_unsigned_to_uint8(np.asarray(img), int(bits), shift))
    # Pillow's RGB->L weights sum to exactly 1 in fixed point, so gray RGB maps to the same L.
    return img.convert("RGB").convert("L")


def _unsigned_to_uint8(samples: np.ndarray, bits: int, shift: int) -> np.ndarray:
    """Unsigned samples shifted right by `shift`, their full `bits` range onto 0..255."""
    if samples.dtype.kind == "u" and samples.dtype.itemsize == 2:
        return np.take(_sixteen_bit_table(bits, shift), samples)
    # int64 holds unsigned 32-bit samples, which Pillow's signed "I" shows as negative.
    return linear_to_uint8(samples.astype(np.int64) % (1 << 32) >> shift, 0, 2**bits - 1)


@functools.cache
def _sixteen_bit_table(bits: int, shift: int) -> np.ndarray:
    """What _unsigned_to_uint8 makes of each of the 65,536 16-bit samples: looking a slice up in
    it takes a quarter of the time of the arithmetic, with the same result by construction."""
    return _unsigned_to_uint8(np.arange(1 << 16, dtype=np.int64), bits, shift)


def _refuse_non_finite(a: np.ndarray) -> None:
    if not np.isfinite(a).all():
        raise ValueError("float image holds NaN/inf")


def _refuse_constant(img: Image.Image) -> tuple[float, float]:
    """A blank slice (all air, all padding) would teach the model nothing but its label; returns
    the first colour band's range. A float image must be finite first."""
    if img.mode == "F":
        _refuse_non_finite(np.asarray(img))
    extrema = img.getextrema()
    if not isinstance(extrema[0], tuple):
        extrema = (extrema,)
    colour = [band for band, name in zip(extrema, img.getbands(), strict=True)
              if name not in ("A", "a")]
    if all(low == high for low, high in colour):
        value = colour[0][0] if len(colour) == 1 else tuple(low for low, _ in colour)
        raise ValueError(f"constant image: every pixel is {value}")
    return colour[0]


def _float_to_uint8(a: np.ndarray) -> np.ndarray:
    # Stretching each slice to its own min..max would give every slice of a scan its own scale.
    low, high = float(a.min()), float(a.max())
    if low < 0 or high > 1:
        raise ValueError(f"float image holds values outside 0..1 (min {low:g}, max {high:g}); "
                         "save it as 8- or 16-bit integers")
    return linear_to_uint8(a, 0, 1)


def linear_to_uint8(a: np.ndarray, low: float, high: float) -> np.ndarray:
    """low..high onto 0..255, clipping outside."""
    scaled = (a.astype(np.float64) - low) * (255 / (high - low))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def fit_square(img: Image.Image, size: int, resize: str) -> np.ndarray:
    if resize == "stretch":
        return np.asarray(img.resize((size, size), Image.Resampling.BILINEAR))
    scale = size / max(img.size)
    w, h = max(1, round(img.width * scale)), max(1, round(img.height * scale))
    canvas = np.zeros((size, size), np.uint8)  # pad with 0, which is air in a CT slice
    top, left = (size - h) // 2, (size - w) // 2
    canvas[top : top + h, left : left + w] = img.resize((w, h), Image.Resampling.BILINEAR)
    return canvas


def decode_failure(e: Exception) -> str:
    """Why a file did not decode, as `Type: message` on one line that reads the same on every
    run (no object addresses), so two runs' skip lists can be compared."""
    lines = str(e).strip().splitlines()
    message = _OBJECT_ADDRESS.sub("", lines[0]) if lines else ""
    return f"{type(e).__name__}: {message}" if message else type(e).__name__
