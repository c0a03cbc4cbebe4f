import re
import struct
import zlib

import imagecodecs
import numpy as np
import pytest
from helpers import png_bytes, png_chunk, png_with_sbit, smooth_image, tiff_bytes
from PIL import Image

from data_utils.decode import (
    Decoded,
    _decode_with_pillow,
    _plain_gray_png,
    decode_failure,
    decode_image,
)


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


@pytest.mark.parametrize("mode", ["L", "LA", "RGB", "RGBA", "P", "I;16"])
def test_every_mode_decodes_to_the_same_pixels(gray, mode):
    """The file's mode must not leak into pixels (RGB vs RGBA follows the label in real data).

    Signed 32-bit "I" is not among them: it is read as Hounsfield units, whatever it holds.
    """
    img = _as_mode(gray, mode)
    assert img.mode == mode
    expected = decode_image(png_bytes(Image.fromarray(gray)), 40).pixels
    got = decode_image(png_bytes(img), 40)
    assert got.mode == mode
    assert got.pixels.dtype == np.uint8 and got.pixels.shape == (40, 40)
    if mode == "P":  # a 256-colour palette of a grayscale picture is exact up to quantisation
        assert np.abs(got.pixels.astype(int) - expected).max() <= 8
    else:
        np.testing.assert_array_equal(got.pixels, expected)


def test_translucent_alpha_is_dropped_not_composited(gray):
    rgba = Image.fromarray(gray).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.full_like(gray, 30)))
    np.testing.assert_array_equal(decode_image(png_bytes(rgba), 40).pixels,
                                  decode_image(png_bytes(Image.fromarray(gray)), 40).pixels)


def test_one_bit_images_decode_to_0_and_255():
    bits = Image.fromarray(np.indices((16, 16)).sum(0) % 2 == 0)
    assert bits.mode == "1"
    assert set(np.unique(decode_image(png_bytes(bits), 16).pixels)) == {0, 255}


def test_pad_keeps_aspect_ratio_and_stretch_fills():
    pixels = np.full((50, 100), 200, np.uint8)
    pixels[:, 0] = 201  # one column apart: a constant image would be refused
    wide = Image.fromarray(pixels)
    padded = decode_image(png_bytes(wide), 64, "pad").pixels
    rows = np.flatnonzero(padded.max(1) > 0)
    assert padded.shape == (64, 64)
    assert (rows.min(), rows.max()) == (16, 47)  # 32 rows of image, 16 black above and below
    assert (padded[:16] == 0).all() and (padded[48:] == 0).all()
    assert (decode_image(png_bytes(wide), 64, "stretch").pixels >= 200).all()


def _ramp(bits: int) -> np.ndarray:
    """Every value of a bit depth (up to 12 bits), as a 64 x 64 image: decoded at 64 px, each
    pixel maps to one output pixel and no resampling mixes values."""
    return np.resize(np.arange(2**bits), (64, 64))


def _expected(values: np.ndarray, top: int) -> np.ndarray:
    return np.round(values * 255 / top).astype(np.uint8)


def test_12_bit_png_with_sbit_spans_the_full_8_bit_range():
    """As the PNG spec asks, the encoder scaled 12-bit samples to 16 bits by bit replication and
    recorded 12 in sBIT; shifting right by 4 recovers them."""
    values = _ramp(12)
    decoded = decode_image(png_with_sbit(values << 4 | values >> 8, 12), 64)
    assert decoded.bits == 12
    np.testing.assert_array_equal(decoded.pixels, _expected(values, 4095))
    assert (decoded.pixels.min(), decoded.pixels.max()) == (0, 255)


def test_12_bit_tiff_spans_the_full_8_bit_range():
    values = _ramp(12)
    decoded = decode_image(tiff_bytes(values, 12), 64)
    assert decoded.bits == 12
    np.testing.assert_array_equal(decoded.pixels, _expected(values, 4095))


@pytest.mark.parametrize("encode, bits, top", [
    (lambda v: png_bytes(Image.fromarray(v.astype(np.uint16))), 16, 65535),
    (lambda v: tiff_bytes(v, 16), 16, 65535),
    (lambda v: png_with_sbit(v << 4, 12), 12, 4095),
    (lambda v: tiff_bytes(v, 12), 12, 4095),
    (lambda v: tiff_bytes(v, 32), 32, 2**32 - 1),
])
def test_slices_of_one_scan_share_one_scale(encode, bits, top):
    """A dim slice and a bright one: the same stored value decodes to the same 8-bit value."""
    rng = np.random.default_rng(3)
    dim = rng.integers(0, 1000, (64, 64))
    bright = rng.integers(0, 4096, (64, 64))
    dim[0, :10] = bright[0, :10] = np.arange(0, 1000, 100)  # values both slices hold
    first, second = decode_image(encode(dim), 64), decode_image(encode(bright), 64)
    assert first.bits == second.bits == bits
    np.testing.assert_array_equal(first.pixels[0, :10], second.pixels[0, :10])
    np.testing.assert_array_equal(first.pixels, _expected(dim, top))
    np.testing.assert_array_equal(second.pixels, _expected(bright, top))


@pytest.mark.parametrize("bits", [16, 32])
def test_signed_integers_are_read_as_hounsfield_units(bits):
    """-1024..3071 HU onto 0..255, beyond clipped: the same as its unsigned 12-bit export."""
    hu = np.resize(np.arange(-1500, 3500, 5), (40, 40))
    decoded = decode_image(tiff_bytes(hu, bits, sample_format=2), 40)
    assert decoded.bits == "HU"
    np.testing.assert_array_equal(decoded.pixels, _expected(np.clip(hu + 1024, 0, 4095), 4095))
    unsigned_12_bit = decode_image(tiff_bytes(np.clip(hu + 1024, 0, 4095), 12), 40).pixels
    np.testing.assert_array_equal(decoded.pixels, unsigned_12_bit)


def test_pillow_signed_i_image_is_read_as_hounsfield_units(gray):
    decoded = decode_image(png_bytes(Image.fromarray(gray).convert("I")), 40)
    assert decoded.mode == "I" and decoded.bits == "HU"
    hu_window = Image.fromarray(_expected(gray.astype(int) + 1024, 4095))
    np.testing.assert_array_equal(decoded.pixels, decode_image(png_bytes(hu_window), 40).pixels)


def test_float_images_in_0_to_1_scale_by_255_and_others_are_refused():
    values = np.resize(np.linspace(0, 1, 256, dtype=np.float32), (16, 16))
    decoded = decode_image(png_bytes(Image.fromarray(values)), 16)
    assert decoded.mode == "F" and decoded.bits == "float"
    np.testing.assert_array_equal(decoded.pixels, np.round(values.astype(np.float64) * 255))
    for bad, reason in [(np.nan, "NaN/inf"), (np.inf, "NaN/inf"), (-0.5, "outside 0..1"),
                        (300.0, r"outside 0..1 \(min 0, max 300\)")]:
        values[3, 4] = bad
        with pytest.raises(ValueError, match=reason):
            decode_image(png_bytes(Image.fromarray(values)), 16)


def _translucent(value: int) -> Image.Image:
    rgba = Image.new("RGBA", (8, 8), (value, value, value, 255))
    rgba.putalpha(Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)))
    return rgba


@pytest.mark.parametrize("img, value", [
    (Image.new("L", (8, 8), 0), "0"),
    (Image.new("RGB", (8, 8), (10, 20, 30)), r"\(10, 20, 30\)"),
    (_translucent(7), r"\(7, 7, 7\)"),  # alpha is dropped, so only the colour counts
    (Image.fromarray(np.full((8, 8), 4095, np.uint16)), "4095"),
    (Image.fromarray(np.full((8, 8), 0.5, np.float32)), "0.5"),
    (Image.new("1", (8, 8), 1), "255"),
])
def test_constant_images_are_refused_naming_the_value(img, value):
    with pytest.raises(ValueError, match=f"constant image: every pixel is {value}$"):
        decode_image(png_bytes(img), 8)


def _bomb_header(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge image."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr)
            + png_chunk(b"IDAT", zlib.compress(b"\0" * 64)) + png_chunk(b"IEND", b""))


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
    good = png_bytes(Image.fromarray(gray))
    with pytest.raises(OSError):
        decode_image(good[: len(good) // 2], 32)
    corrupt = bytearray(good)
    corrupt[60:80] = b"\xff" * 20  # inside the first IDAT chunk: its CRC no longer matches
    with pytest.raises((OSError, SyntaxError)):
        decode_image(bytes(corrupt), 32)


def test_a_decode_failure_reads_the_same_on_every_run():
    reasons = set()
    for _ in range(2):
        try:
            decode_image(b"not an image at all", 32)
        except Exception as e:  # noqa: BLE001 - whatever Pillow raises
            reasons.add(decode_failure(e))
    [reason] = reasons
    assert reason == "UnidentifiedImageError: cannot identify image file"


def _same_as_pillow(data: bytes) -> Decoded:
    """decode_image's result, checked field by field against Pillow's reading of the file."""
    decoded, pillows = decode_image(data, 32), _decode_with_pillow(data, 32, "pad")
    np.testing.assert_array_equal(decoded.pixels, pillows.pixels)
    assert (decoded.mode, decoded.width, decoded.height, decoded.bits, decoded.peak) == (
        pillows.mode, pillows.width, pillows.height, pillows.bits, pillows.peak)
    return decoded


def _with_chunks(png: bytes, *chunks: bytes) -> bytes:
    return png[:33] + b"".join(chunks) + png[33:]  # after the signature and IHDR


def _split_idat(png: bytes, size: int) -> bytes:
    """The same PNG with its image data in IDAT chunks of `size` bytes, as libpng writes them."""
    start = png.index(b"IDAT") - 4
    end = png.index(b"IEND") - 4
    stream = b"".join(png[i + 8 : i + 8 + struct.unpack(">I", png[i : i + 4])[0]]
                      for i in _chunk_offsets(png[start:end], start))
    return png[:start] + b"".join(png_chunk(b"IDAT", stream[i : i + size])
                                  for i in range(0, len(stream), size)) + png[end:]


def _chunk_offsets(chunks: bytes, base: int) -> list[int]:
    offsets, pos = [], 0
    while pos < len(chunks):
        offsets.append(base + pos)
        pos += 12 + struct.unpack(">I", chunks[pos : pos + 4])[0]
    return offsets


@pytest.mark.parametrize("variant", ["8-bit", "16-bit", "16-bit sBIT 12", "ancillary chunks",
                                     "many IDATs", "libpng's own 8-bit", "libpng's own 16-bit"])
def test_plain_gray_pngs_are_read_by_libpng_exactly_as_by_pillow(gray, variant):
    wide = gray.astype(np.uint16) * 257 ^ np.arange(gray.size, dtype=np.uint16).reshape(
        gray.shape) % 16  # the low bits vary, as a scanner's noise does
    data = {
        "8-bit": lambda: png_bytes(Image.fromarray(gray)),
        "16-bit": lambda: png_bytes(Image.fromarray(wide)),
        "16-bit sBIT 12": lambda: png_with_sbit(wide >> 4 << 4, 12),
        "ancillary chunks": lambda: _with_chunks(
            png_bytes(Image.fromarray(gray)), png_chunk(b"gAMA", struct.pack(">I", 45455)),
            png_chunk(b"pHYs", struct.pack(">IIB", 2835, 2835, 1)),
            png_chunk(b"tEXt", b"Software\0a CT exporter")),
        "many IDATs": lambda: _split_idat(png_bytes(Image.fromarray(gray)), 97),
        "libpng's own 8-bit": lambda: imagecodecs.png_encode(gray),
        "libpng's own 16-bit": lambda: imagecodecs.png_encode(wide),
    }[variant]()
    assert _plain_gray_png(data) is not None, "the file should take the libpng path"
    decoded = _same_as_pillow(data)
    assert decoded.bits == (12 if "sBIT" in variant else 16 if "16" in variant else 8)


def _xmp_orientation(orientation: int) -> bytes:
    xmp = (f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/'
           f'02/22-rdf-syntax-ns#"><rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" '
           f'tiff:Orientation="{orientation}"/></rdf:RDF></x:xmpmeta>')
    return png_chunk(b"iTXt", b"XML:com.adobe.xmp\0\0\0\0\0" + xmp.encode())


def _exif_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return png_chunk(b"eXIf", exif.tobytes())


@pytest.mark.parametrize("variant, why", [
    ("eXIf orientation", "Pillow turns the slice upright"),
    ("XMP orientation", "Pillow turns the slice upright"),
    ("tRNS", "transparency"),
    ("RGB", "colour"),
    ("bad sBIT CRC", "Pillow refuses a damaged header chunk"),
    ("bad IDAT CRC", "libpng refuses it; Pillow reads it"),
])
def test_other_pngs_go_through_pillow(gray, variant, why):
    plain = png_bytes(Image.fromarray(gray))
    data = {
        "eXIf orientation": lambda: _with_chunks(plain, _exif_orientation(6)),
        "XMP orientation": lambda: _with_chunks(plain, _xmp_orientation(6)),
        "tRNS": lambda: _with_chunks(plain, png_chunk(b"tRNS", struct.pack(">H", 0))),
        "RGB": lambda: png_bytes(Image.fromarray(gray).convert("RGB")),
        "bad sBIT CRC": lambda: _with_chunks(png_bytes(Image.fromarray(gray.astype(np.uint16))),
                                             png_chunk(b"sBIT", b"\x0c")[:-1] + b"\0"),
        "bad IDAT CRC": lambda: plain[: plain.index(b"IEND") - 8] + b"\0\0\0\0"
                                + plain[plain.index(b"IEND") - 4 :],
    }[variant]()
    if variant != "bad IDAT CRC":  # its header is plain; libpng refuses it while decoding
        assert _plain_gray_png(data) is None, why
    try:
        expected = _decode_with_pillow(data, 32, "pad")
    except Exception as e:  # noqa: BLE001 - then decode_image must fail with Pillow's words
        with pytest.raises(type(e), match=re.escape(decode_failure(e).split(": ", 1)[1])):
            decode_image(data, 32)
        return
    decoded = _same_as_pillow(data)
    np.testing.assert_array_equal(decoded.pixels, expected.pixels)
    if "orientation" in variant:  # turned a quarter, which libpng alone would not do
        np.testing.assert_array_equal(decode_image(data, len(gray)).pixels, np.rot90(gray, -1))
