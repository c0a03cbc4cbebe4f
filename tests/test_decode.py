import io
import struct
import zlib

import numpy as np
import pytest
from conftest import smooth_image
from PIL import Image

from data_utils.decode import decode_image


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="TIFF" if img.mode == "I" else "PNG")  # PNG cannot hold 32-bit "I"
    return buf.getvalue()


@pytest.fixture
def gray() -> np.ndarray:
    return smooth_image(np.random.default_rng(7), 40)


def _as_mode(gray: np.ndarray, mode: str) -> Image.Image:
    img = Image.fromarray(gray)
    if mode == "I;16":  # 16-bit PNGs hold v * 257 for an 8-bit value v
        return Image.fromarray(gray.astype(np.uint16) * 257)
    if mode == "RGBA":
        rgba = img.convert("RGBA")
        rgba.putalpha(255)
        return rgba
    return img.convert(mode)


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16", "I"])
def test_every_mode_decodes_to_the_same_pixels(gray, mode):
    """The file's mode must not leak into pixels (RGB vs RGBA follows the label in real data)."""
    img = _as_mode(gray, mode)
    assert img.mode == mode
    expected = decode_image(_png(Image.fromarray(gray)), 40).pixels
    got = decode_image(_png(img), 40)
    assert got.mode == mode
    assert got.pixels.dtype == np.uint8 and got.pixels.shape == (40, 40)
    if mode == "P":  # a 256-colour palette of a grayscale picture is exact up to quantisation
        assert np.abs(got.pixels.astype(int) - expected).max() <= 8
    else:
        np.testing.assert_array_equal(got.pixels, expected)


def test_translucent_alpha_is_dropped_not_composited(gray):
    rgba = Image.fromarray(gray).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full_like(gray, 30)))
    np.testing.assert_array_equal(decode_image(_png(rgba), 40).pixels,
                                  decode_image(_png(Image.fromarray(gray)), 40).pixels)


def test_one_bit_images_decode_to_0_and_255():
    bits = Image.fromarray(np.indices((16, 16)).sum(0) % 2 == 0)
    assert bits.mode == "1"
    assert set(np.unique(decode_image(_png(bits), 16).pixels)) == {0, 255}


def test_pad_keeps_aspect_ratio_and_stretch_fills():
    wide = Image.fromarray(np.full((50, 100), 200, np.uint8))
    padded = decode_image(_png(wide), 64, "pad").pixels
    rows = np.flatnonzero(padded.max(1) > 0)
    assert padded.shape == (64, 64)
    assert (rows.min(), rows.max()) == (16, 47)  # 32 rows of image, 16 black above and below
    assert (padded[:16] == 0).all() and (padded[48:] == 0).all()
    assert (decode_image(_png(wide), 64, "stretch").pixels == 200).all()


def _bomb_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"this is not an image", "cannot identify image"),
    (_bomb_header(20000, 20000), "decompression bomb"),  # 400 Mpx: Pillow's error
    (_bomb_header(10000, 10000), "decompression bomb"),  # 100 Mpx: Pillow only warns; we refuse
])
def test_bad_bytes_raise_with_a_reason(data, reason):
    with pytest.raises(Exception, match=reason):
        decode_image(data, 32)


def test_truncated_and_corrupt_png_raise(gray):
    good = _png(Image.fromarray(gray))
    with pytest.raises(OSError):
        decode_image(good[: len(good) // 2], 32)
    corrupt = bytearray(good)
    corrupt[60:80] = b"\xff" * 20  # inside the first IDAT chunk: its CRC no longer matches
    with pytest.raises((OSError, SyntaxError)):
        decode_image(bytes(corrupt), 32)
