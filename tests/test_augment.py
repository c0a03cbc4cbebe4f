import math

import pytest
import torch
import torch.nn.functional as F

from ctmodels import NORM_MEAN, NORM_STD, normalize
from data_utils.augment import (
    AugmentRanges,
    affine_matrices,
    augment_batch,
    batch_sizes,
    random_matrices,
    train_batches,
    warp,
)

NONE = AugmentRanges(0.0, 0.0, 0.0, 0.0, 0.0, horizontal_flip=False)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def one(angle=0.0, shift_x=0.0, shift_y=0.0, shear=0.0, zoom=1.0, flip=False, h=65, w=65):
    """Matrix for a single forced transform (odd sizes put the centre on a pixel)."""
    t = torch.tensor
    return affine_matrices(
        t([angle]), t([shift_x]), t([shift_y]), t([shear]), t([zoom]), t([flip]), h, w
    )


def dot(h: int, w: int, row: int, col: int) -> torch.Tensor:
    img = torch.zeros(1, 1, h, w)
    img[0, 0, row, col] = 1.0
    return img


def peak(img: torch.Tensor) -> tuple[int, int]:
    flat = int(img.flatten().argmax())
    return divmod(flat, img.shape[-1])


# --- strength -----------------------------------------------------------------------------------


def test_strength_zero_is_exact_identity():
    x = torch.rand(4, 1, 32, 32)
    out = augment_batch(x, 0.0, seeded())
    assert out is x
    assert torch.equal(out, x)


@pytest.mark.parametrize("strength", [-0.01, 1.01, math.nan])
def test_strength_out_of_range_raises(strength):
    with pytest.raises(ValueError, match="strength"):
        augment_batch(torch.rand(2, 1, 8, 8), strength)
    with pytest.raises(ValueError, match="strength"):
        next(train_batches(torch.zeros(2, 8, 8, dtype=torch.uint8), torch.zeros(2), 2, strength,
                           NORM_MEAN, NORM_STD))


def test_rejects_non_float_batch():
    with pytest.raises(ValueError, match="float"):
        augment_batch(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), 1.0)


# --- randomness ---------------------------------------------------------------------------------


def test_deterministic_under_seed_and_seed_dependent():
    x = torch.rand(6, 1, 40, 48)
    a = augment_batch(x, 1.0, seeded(1))
    b = augment_batch(x, 1.0, seeded(1))
    c = augment_batch(x, 1.0, seeded(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_each_sample_gets_its_own_transform():
    x = torch.rand(1, 1, 40, 40).expand(8, 1, 40, 40).contiguous()
    out = augment_batch(x, 1.0, seeded())
    for i in range(8):
        for j in range(i + 1, 8):
            assert not torch.allclose(out[i], out[j]), (i, j)


def test_draws_stay_within_ranges_scaled_by_strength():
    h, w = 50, 80
    for strength in (1.0, 0.5):
        only_shift = AugmentRanges(0.0, 0.1, 0.2, 0.0, 0.0, horizontal_flip=False)
        theta = random_matrices(4000, h, w, strength, seeded(), only_shift)
        assert torch.allclose(theta[:, :, :2], torch.eye(2).expand(4000, 2, 2))
        shift_px = -theta[:, :, 2] * torch.tensor([w / 2, h / 2])  # content moves opposite to grid
        bound = torch.tensor([0.1 * w, 0.2 * h]) * strength
        assert (shift_px.abs() <= bound + 1e-4).all()
        assert (shift_px.abs().amax(0) > 0.95 * bound).all()  # and the range is actually used

        only_rot = AugmentRanges(15.0, 0.0, 0.0, 0.0, 0.0, horizontal_flip=False)
        theta = random_matrices(4000, h, h, strength, seeded(), only_rot)
        angle = torch.rad2deg(torch.atan2(theta[:, 1, 0], theta[:, 0, 0]))
        assert angle.abs().max() <= 15.0 * strength + 1e-4
        assert angle.abs().max() > 0.95 * 15.0 * strength

        only_zoom = AugmentRanges(0.0, 0.0, 0.0, 0.0, 0.1, horizontal_flip=False)
        theta = random_matrices(4000, h, h, strength, seeded(), only_zoom)
        zoom = 1 / theta[:, 0, 0]
        assert torch.allclose(theta[:, 0, 0], theta[:, 1, 1])
        assert (zoom - 1).abs().max() <= 0.1 * strength + 1e-4


def test_flip_probability_is_half_strength():
    only_flip = AugmentRanges(0.0, 0.0, 0.0, 0.0, 0.0, horizontal_flip=True)
    for strength, expected in [(1.0, 0.5), (0.5, 0.25)]:
        theta = random_matrices(4000, 16, 16, strength, seeded(), only_flip)
        flipped = (theta[:, 0, 0] < 0).float().mean().item()
        assert abs(flipped - expected) < 0.03
    assert (random_matrices(100, 16, 16, 1.0, seeded(), NONE)[:, 0, 0] == 1).all()


# --- geometry of each parameter -----------------------------------------------------------------


def test_warp_matches_affine_grid():
    theta = random_matrices(5, 30, 52, 1.0, seeded())
    x = torch.rand(5, 2, 30, 52)
    grid = F.affine_grid(theta, (5, 2, 30, 52), align_corners=False)
    ref = F.grid_sample(x, grid, align_corners=False)
    assert torch.allclose(warp(x, theta), ref, atol=1e-4)


def test_chunked_batch_equals_one_pass():
    x = torch.rand(21, 1, 24, 24)  # several CPU chunks plus a partial one
    theta = random_matrices(21, 24, 24, 1.0, seeded(3))
    assert torch.allclose(augment_batch(x, 1.0, seeded(3)), warp(x, theta), atol=1e-6)


def test_pure_shift_moves_dot_by_pixels():
    h, w = 48, 80  # non-square: shifts stay in pixels on both axes
    out = warp(dot(h, w, 20, 30), one(shift_x=7, shift_y=-5, h=h, w=w))
    assert peak(out) == (15, 37)
    assert out.max().item() == pytest.approx(1.0, abs=1e-4)


def test_pure_flip_mirrors():
    x = torch.rand(3, 1, 33, 40)
    theta = one(flip=True, h=33, w=40).expand(3, 2, 3)
    assert torch.allclose(warp(x, theta), x.flip(-1), atol=1e-4)


def test_pure_rotation_by_90_matches_rot90():
    x = torch.rand(2, 1, 65, 65)
    out = warp(x, one(angle=90.0).expand(2, 2, 3))
    assert torch.allclose(
        out[..., 1:-1, 1:-1], torch.rot90(x, 1, (-2, -1))[..., 1:-1, 1:-1], atol=1e-4
    )


def test_rotation_keeps_pixels_square_on_non_square_images():
    # a dot 20 px right of the centre ends up 20 px above it after a 90 degree turn
    h, w = 49, 81
    out = warp(dot(h, w, 24, 60), one(angle=90.0, h=h, w=w))
    assert peak(out) == (4, 40)


def test_pure_zoom_scales_extent():
    img = torch.zeros(1, 1, 65, 65)
    img[..., 22:43, 22:43] = 1.0  # 21 px square around the centre pixel 32
    for zoom, side in [(1.5, 31.5), (0.5, 10.5)]:
        out = warp(img, one(zoom=zoom))
        extent = out[0, 0, 32].sum().item()  # covered width along the centre row
        assert extent == pytest.approx(side, abs=0.6)


def test_pure_shear_slides_rows_by_tan():
    # 45 degrees: a row 10 px below the centre slides 10 px right, the centre row stays
    out = warp(dot(65, 65, 42, 20) + dot(65, 65, 32, 20), one(shear=45.0))
    assert out[0, 0, 42, 30].item() == pytest.approx(1.0, abs=1e-4)
    assert out[0, 0, 32, 20].item() == pytest.approx(1.0, abs=1e-4)


def test_fill_is_zero():
    out = warp(torch.ones(1, 1, 33, 33), one(shift_x=10, h=33, w=33))
    assert torch.allclose(out[..., :10], torch.zeros(1), atol=1e-4)
    assert torch.allclose(out[..., 11:], torch.ones(1), atol=1e-5)


# --- dtype / device -----------------------------------------------------------------------------

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keeps_shape_dtype_device(device, dtype):
    x = torch.rand(3, 1, 20, 28, dtype=dtype, device=device)
    out = augment_batch(x, 0.7, torch.Generator(device=device).manual_seed(0))
    assert out.shape == x.shape
    assert out.dtype == dtype
    assert out.device == x.device


# --- train_batches ------------------------------------------------------------------------------


def numbered_dataset(n: int, size: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Image i is filled with the value i, so a batch tells which images it holds."""
    images = torch.arange(n, dtype=torch.uint8)[:, None, None].expand(n, size, size).contiguous()
    return images, torch.arange(n) * 10


def pixel_value(batch: torch.Tensor) -> torch.Tensor:
    """Recover the uint8 value at each image's centre pixel, undoing the normalisation."""
    c = batch.shape[-1] // 2
    return (batch[:, 0, c, c] * NORM_STD + NORM_MEAN) * 255


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("strength", [0.0, 1.0])
def test_train_batches_cover_each_index_once(device, strength):
    images, labels = numbered_dataset(45)
    images, labels = images.to(device), labels.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    # > one CPU chunk each
    batches = list(train_batches(images, labels, 20, strength, NORM_MEAN, NORM_STD, gen))
    assert [len(x) for x, _ in batches] == [20, 20, 5]  # last partial batch kept
    seen = []
    for x, y in batches:
        assert x.shape[1:] == (1, 24, 24)
        assert x.dtype == torch.float32
        assert x.device == images.device
        assert y.device == images.device
        index = pixel_value(x).round().long()
        assert torch.allclose(pixel_value(x), index.float(), atol=1e-3)
        assert torch.equal(y, labels[index])  # labels stay with their images
        seen += index.tolist()
    assert sorted(seen) == list(range(45))
    assert seen != list(range(45))  # shuffled


def test_a_last_batch_of_one_joins_the_batch_before_so_no_image_is_left_out():
    assert batch_sizes(41, 20) == [20, 21] and batch_sizes(40, 20) == [20, 20]
    assert batch_sizes(3, 2) == [3] and batch_sizes(2, 4) == [2]
    images, labels = numbered_dataset(41)
    gen = torch.Generator().manual_seed(0)
    batches = list(train_batches(images, labels, 20, 0.0, NORM_MEAN, NORM_STD, gen))
    assert [len(x) for x, _ in batches] == [20, 21]
    seen = torch.cat([pixel_value(x).round().long() for x, _ in batches])
    assert sorted(seen.tolist()) == list(range(41))


def test_train_batches_normalisation_and_air():
    images, labels = numbered_dataset(5)
    images[:, :4] = 0  # a band of air
    images[:, 4:] = 200
    ((x, _),) = list(train_batches(images, labels, 5, 0.0, NORM_MEAN, NORM_STD, seeded()))
    assert torch.allclose(x[:, :, 4:], torch.tensor((200 / 255 - NORM_MEAN) / NORM_STD))
    assert torch.allclose(x[:, :, :4], torch.tensor(-NORM_MEAN / NORM_STD))
    # all five images are equal, so order is moot
    assert torch.equal(normalize(images, NORM_MEAN, NORM_STD), x)
    # warping pulls in air from outside the image, which normalises like air inside it
    zero = torch.zeros(4, 24, 24, dtype=torch.uint8)
    ((x, _),) = list(train_batches(zero, torch.zeros(4), 4, 1.0, NORM_MEAN, NORM_STD, seeded()))
    assert torch.allclose(x, torch.tensor(-NORM_MEAN / NORM_STD))


def test_train_batches_deterministic():
    images = torch.randint(0, 256, (10, 24, 24), dtype=torch.uint8)
    labels = torch.arange(10)
    a = [x for x, _ in train_batches(images, labels, 4, 1.0, NORM_MEAN, NORM_STD, seeded(5))]
    b = [x for x, _ in train_batches(images, labels, 4, 1.0, NORM_MEAN, NORM_STD, seeded(5))]
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_train_batches_rejects_bad_input():
    images = torch.zeros(4, 8, 8, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        next(train_batches(images.float(), torch.zeros(4), 2, 1.0, NORM_MEAN, NORM_STD))
    with pytest.raises(ValueError, match="labels"):
        next(train_batches(images, torch.zeros(3), 2, 1.0, NORM_MEAN, NORM_STD))
    with pytest.raises(ValueError, match="batch_size"):
        next(train_batches(images, torch.zeros(4), 0, 1.0, NORM_MEAN, NORM_STD))
