"""Properties of decode_image over generated images and bytes (Hypothesis).

Whatever a file holds, decoding returns a uint8 [S, S] array or raises an error that the cache
records as the file's skip reason; it never returns anything else and never fails in a way the
cache would mistake for a passing problem (out of memory, an OS error) and retry forever.
"""

import io

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from helpers import png_bytes, png_with_sbit, tiff_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from data_utils.cache import transient_failure
from data_utils.decode import _decode_with_pillow, _plain_gray_png, decode_failure, decode_image

# Small and few: the whole file runs in a few seconds; the full suite is near its time budget.
FAST = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])
SHAPES = hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=12)
# The refusals decode_image makes on purpose for well-formed files.
REFUSALS = ("constant image: every pixel is ", "float image holds ")


@st.composite
def encoded_images(draw) -> tuple[bytes, np.ndarray]:
    """(file bytes, the stored samples without alpha) in one of the layouts a CT set may use."""
    kind = draw(st.sampled_from(["L", "RGB", "RGBA", "I;16", "I;16 sBIT", "int32", "F"]))
    if kind in ("RGB", "RGBA"):
        shape = draw(SHAPES)
        pixels = draw(hnp.arrays(np.uint8, (*shape, len(kind))))
        return png_bytes(Image.fromarray(pixels, kind)), pixels[..., :3]
    if kind == "L":
        pixels = draw(hnp.arrays(np.uint8, SHAPES))
        return png_bytes(Image.fromarray(pixels)), pixels
    if kind.startswith("I;16"):
        pixels = draw(hnp.arrays(np.uint16, SHAPES))
        if kind == "I;16":
            return png_bytes(Image.fromarray(pixels)), pixels
        # 0 and 17 are impossible sBIT values, which must be ignored, not trusted
        return png_with_sbit(pixels, draw(st.integers(0, 17))), pixels
    if kind == "int32":
        pixels = draw(hnp.arrays(np.int32, SHAPES))
        return tiff_bytes(pixels, 32, draw(st.sampled_from([1, 2]))), pixels
    in_range = st.floats(0, 1, width=32)
    anything = st.floats(-2, 2, width=32) | st.sampled_from([np.nan, np.inf, -np.inf])
    pixels = draw(hnp.arrays(np.float32, SHAPES, elements=draw(st.sampled_from([in_range,
                                                                                anything]))))
    return png_bytes(Image.fromarray(pixels)), pixels


def _assert_decoded(data: bytes, size: int, resize: str) -> bool:
    """True if decoded, False if refused; anything else fails the test."""
    try:
        decoded = decode_image(data, size, resize)
    except Exception as e:  # noqa: BLE001 - the property is about which exceptions happen
        assert not transient_failure(e), f"{type(e).__name__}: {e}"
        assert str(e), f"{type(e).__name__} without a message is no skip reason"
        return False
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (size, size)
    assert decoded.bits in ("HU", "float") or decoded.bits in range(1, 33)
    return True


@FAST
@given(encoded_images(), st.sampled_from([8, 13]), st.sampled_from(["pad", "stretch"]))
def test_any_image_decodes_to_uint8_or_is_refused_for_what_it_holds(encoded, size, resize):
    data, samples = encoded
    pixels = samples.reshape(len(samples), -1, samples.shape[-1] if samples.ndim == 3 else 1)
    constant = (pixels == pixels[0, 0]).all()  # False for NaN, refused as non-finite instead
    try:
        decoded = decode_image(data, size, resize)
    except ValueError as e:  # any other exception from a well-formed file fails the test
        assert str(e).startswith(REFUSALS), e
        assert constant or not str(e).startswith(REFUSALS[0])
        assert samples.dtype == np.float32 or not str(e).startswith(REFUSALS[1])
        return
    assert not constant
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (size, size)


@FAST
@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_crash_differently(data):
    _assert_decoded(data, 8, "pad")


@st.composite
def damaged_files(draw) -> bytes:
    """A valid small PNG or TIFF with a few bytes overwritten and maybe cut short."""
    pixels = draw(hnp.arrays(np.uint8, SHAPES))
    if draw(st.booleans()):
        data = bytearray(png_bytes(Image.fromarray(pixels)))
    else:
        data = bytearray(tiff_bytes(pixels.astype(np.uint16), 16))
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[: draw(st.integers(1, len(data)))])


@pytest.mark.filterwarnings("ignore:(Corrupt EXIF|Tag data|Possibly corrupt):UserWarning")
@FAST
@given(damaged_files())
def test_damaged_files_never_crash_differently(data):
    _assert_decoded(data, 8, "stretch")


def _outcome(decode, data: bytes) -> tuple:
    """What a decoder made of the bytes: every field of Decoded, or the error it raised."""
    try:
        d = decode(data, 13, "pad")
    except Exception as e:  # noqa: BLE001 - the property compares whatever happens
        return decode_failure(e)
    return d.pixels.tobytes(), d.mode, d.width, d.height, d.bits, d.peak


@pytest.mark.filterwarnings("ignore:(Corrupt EXIF|Tag data|Possibly corrupt):UserWarning")
@FAST
@given(encoded_images() | damaged_files().map(lambda data: (data, None)))
def test_libpng_and_pillow_decode_every_file_alike(encoded):
    """decode_image reads plain gray PNGs with libpng and all else with Pillow: either way, a
    file yields what Pillow alone made of it before, down to the error it raises."""
    data, _ = encoded
    assert _outcome(decode_image, data) == _outcome(_decode_with_pillow, data)


def test_the_generated_files_reach_libpng():
    """Guards the property above: the 8- and 16-bit gray files it draws take the libpng path."""
    pixels = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert _plain_gray_png(png_bytes(Image.fromarray(pixels))) == (3, 2, 8)
    assert _plain_gray_png(png_with_sbit(pixels.astype(np.uint16) * 257, 12)) == (3, 2, 16)


def _as(pixels: np.ndarray, layout: str) -> bytes:
    img = Image.fromarray(pixels)
    if layout == "I;16":  # 8-bit v stored as v * 257 fills 16 bits exactly
        return png_bytes(Image.fromarray(pixels.astype(np.uint16) * 257))
    if layout == "I;16 sBIT 8":  # v * 257 is also v << 8 | v, the PNG spec's bit replication
        return png_with_sbit(pixels.astype(np.uint16) * 257, 8)
    if layout == "RGBA":
        img = img.convert("RGBA")
        img.putalpha(255)
        return png_bytes(img)
    return png_bytes(img.convert(layout))


@pytest.mark.parametrize("layout", ["LA", "RGB", "RGBA", "I;16", "I;16 sBIT 8"])
@FAST
@given(pixels=hnp.arrays(np.uint8, SHAPES))
def test_one_picture_in_another_layout_decodes_identically(layout, pixels):
    if (pixels == pixels.flat[0]).all():
        return  # refused in every layout alike, which the test above checks
    expected = decode_image(png_bytes(Image.fromarray(pixels)), 11).pixels
    np.testing.assert_array_equal(decode_image(_as(pixels, layout), 11).pixels, expected)


def test_the_generated_files_open_as_the_modes_they_claim():
    """Guards the strategies: a Pillow upgrade that opened them otherwise would test less."""
    pixels = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert Image.open(io.BytesIO(_as(pixels, "I;16 sBIT 8"))).mode == "I;16"
    assert Image.open(io.BytesIO(tiff_bytes(pixels.astype(np.int32), 32, 2))).mode == "I"
    assert Image.open(io.BytesIO(png_bytes(Image.fromarray(pixels.astype(np.float32))))).mode == "F"
