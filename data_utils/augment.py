"""Keras-style random affine augmentation as one batched resampling pass, on the batch's device.

Each sample gets its own rotation, shift, shear, zoom and horizontal flip, composed into one 2x3
matrix and applied with a single bilinear `grid_sample` (zero fill = air). The training loop calls
`train_batches`, which gathers, converts, augments and normalises each batch with a few tensor ops
on the training device, from a dataset that sits there or, when too big for it, on the host.

Speed: on a CPU the pipeline builds its own sampling grid (`warp`, cheaper than affine_grid),
works in cache-sized chunks of a few images and reuses its scratch buffers; each of these choices
was measured to pay when it was made. On CUDA the whole batch goes in one pass.
`bench/data_pipeline.py` measures the whole pipeline today against an ImageFolder baseline.

Geometry convention (used by `affine_matrices` and the tests): pixel coordinates are x to the
right and y down, measured from the image centre. The *forward* transform maps an input pixel to
where its content lands in the output:

    p_out = R(angle) @ Shear(shear) @ zoom * Flip @ p_in + (shift_x, shift_y)

A positive angle turns the content counter-clockwise on screen (like `torch.rot90` and
torchvision), a positive shift moves it right/down, zoom > 1 enlarges it, and the shear moves
each row sideways by tan(shear) times its distance from the centre.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AugmentRanges:
    """Keras ImageDataGenerator ranges at aug_strength 1; each draw is uniform in [-r, r].

    Zoom is isotropic (one scale for both axes, as in torchvision's RandomAffine), whereas Keras
    draws the x and y zoom independently; shear slides rows sideways (an x-shear by the angle).
    """

    rotation_range: float = 15.0  # degrees
    width_shift_range: float = 0.1  # fraction of width
    height_shift_range: float = 0.1  # fraction of height
    shear_range: float = 10.0  # degrees (Keras's unit)
    zoom_range: float = 0.1  # scale drawn from [1 - z, 1 + z]
    horizontal_flip: bool = True  # mirrored with probability 0.5 * strength


def affine_matrices(
    angle: torch.Tensor,
    shift_x: torch.Tensor,
    shift_y: torch.Tensor,
    shear: torch.Tensor,
    zoom: torch.Tensor,
    flip: torch.Tensor,
    height: int,
    width: int,
) -> torch.Tensor:
    """`F.affine_grid` matrices [B, 2, 3] (align_corners=False) for forward transforms [B].

    Angles and shear in degrees, shifts in pixels, flip as bool; see the module doc for signs.
    """
    a, k = torch.deg2rad(angle), torch.tan(torch.deg2rad(shear))
    c, s = torch.cos(a), torch.sin(a)
    f = 1.0 - 2.0 * flip.to(angle.dtype)  # -1 mirrors x
    # grid_sample needs the inverse map (output pixel -> input pixel):
    # Flip @ zoom^-1 @ Shear^-1 @ R^-1, written out so no batched matrix inverse is needed.
    m00, m01 = f * (c - k * s) / zoom, f * (-s - k * c) / zoom
    m10, m11 = s / zoom, c / zoom
    # affine_grid works in [-1, 1] coordinates; scale so pixels stay square on non-square images.
    sx, sy = 2.0 / width, 2.0 / height
    theta = torch.stack(
        [
            m00,
            m01 * sx / sy,
            -(m00 * shift_x + m01 * shift_y) * sx,
            m10 * sy / sx,
            m11,
            -(m10 * shift_x + m11 * shift_y) * sy,
        ],
        dim=-1,
    )
    return theta.view(-1, 2, 3)


def random_matrices(
    batch: int,
    height: int,
    width: int,
    strength: float,
    generator: torch.Generator | None = None,
    ranges: AugmentRanges = AugmentRanges(),
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Float32 matrices [B, 2, 3] for one random transform per sample, ranges times `strength`."""
    # One draw for all parameters keeps the stream (and so determinism) independent of the ranges.
    u = torch.rand(batch, 6, generator=generator, device=device)
    sym = (2.0 * u[:, :5] - 1.0) * strength  # uniform in [-strength, strength]
    flip_p = 0.5 * strength if ranges.horizontal_flip else 0.0
    return affine_matrices(
        angle=sym[:, 0] * ranges.rotation_range,
        shift_x=sym[:, 1] * (ranges.width_shift_range * width),
        shift_y=sym[:, 2] * (ranges.height_shift_range * height),
        shear=sym[:, 3] * ranges.shear_range,
        zoom=1.0 + sym[:, 4] * ranges.zoom_range,
        flip=u[:, 5] < flip_p,
        height=height,
        width=width,
    )


def warp(
    images: torch.Tensor, theta: torch.Tensor, grid: torch.Tensor | None = None
) -> torch.Tensor:
    """Resample [B, C, H, W] with per-sample matrices: bilinear, zero fill, align_corners=False.

    Equivalent to `grid_sample(images, affine_grid(theta))`. `grid` is an optional [B, H, W, 2]
    scratch buffer to fill instead of allocating one.
    """
    b, _, h, w = images.shape
    if grid is None:
        grid = images.new_empty(b, h, w, 2)
    xs = _pixel_centres(w, images)
    ys = _pixel_centres(h, images)
    # affine_grid materialises a [B, H, W, 3] base grid and a bmm, which costs several times the
    # resampling itself on CPU. Each grid coordinate is a row term plus a column term; writing one
    # coordinate at a time keeps the inner loop long (W) instead of 2 wide.
    for k in range(2):
        along_x = theta[:, k, 0, None] * xs + theta[:, k, 2, None]  # [B, W]
        along_y = theta[:, k, 1, None] * ys  # [B, H]
        torch.add(along_x[:, None, :], along_y[:, :, None], out=grid[..., k])
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _pixel_centres(n: int, like: torch.Tensor) -> torch.Tensor:
    """Pixel centres in affine_grid's [-1, 1] coordinates (align_corners=False)."""
    return torch.arange(n, device=like.device, dtype=like.dtype).mul_(2 / n).add_(1 / n - 1)


_CPU_CHUNK = 8


def _chunk_size(device: torch.device, batch: int) -> int:
    # On CPU the float copy, grid and output of a whole batch (~50 MB at 64 x 224 px) spill out of
    # the caches and resampling becomes memory-bound; 8 images at a time (~6 MB) stay cached and
    # run faster (about twice as fast when measured). A GPU wants one big launch instead.
    return batch if device.type == "cuda" else min(batch, _CPU_CHUNK)


def _check_strength(strength: float) -> None:
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")


def augment_batch(
    images: torch.Tensor,
    strength: float,
    generator: torch.Generator | None = None,
    ranges: AugmentRanges = AugmentRanges(),
) -> torch.Tensor:
    """Randomly transform each image of a float [B, C, H, W] batch; same shape, dtype and device.

    Strength 0 returns `images` itself (no copy, no resampling). The fill value is 0, so apply this
    before any normalisation that moves air away from 0 (as `train_batches` does).
    """
    _check_strength(strength)
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"expected a float [B, C, H, W] tensor, got {images.dtype} {images.shape}")
    if strength == 0:
        return images
    b, _, h, w = images.shape
    theta = random_matrices(b, h, w, strength, generator, ranges, images.device)
    theta = theta.to(images.dtype)
    chunk = _chunk_size(images.device, b)
    grid = images.new_empty(chunk, h, w, 2)
    out = torch.empty_like(images)
    for s in range(0, b, chunk):
        k = min(chunk, b - s)
        out[s : s + k] = warp(images[s : s + k], theta[s : s + k], grid[:k])
    return out


def train_batches(
    images: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int,
    strength: float,
    mean: float,
    std: float,
    generator: torch.Generator | None = None,
    ranges: AugmentRanges = AugmentRanges(),
    device: torch.device | None = None,
    rows: torch.Tensor | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One shuffled, augmented epoch over a uint8 [N, H, W] dataset: images[rows], or all the
    images without `rows` (a trial's rows of a memory-mapped cache, gathered batch by batch).

    Yields (float32 [B, 1, H, W], labels [B]), each batch a new tensor, scaled to [0, 1] and
    normalised to (x - mean) / std: the model description's input normalisation, as
    `ctmodels.normalize` applies it. The last batch is kept even when partial, so every image is
    seen exactly once per epoch: on a small CT set dropping it would discard a noticeable share
    of the slices. A last batch of one image joins the one before it (batch_sizes), as
    BatchNorm cannot train on a batch of one.

    Batches are built on `device`, where `generator` lives and drives both the order and the
    transforms. With `device` None the dataset lives there too (`images.device`). Given a device,
    the images stay where they are (the host, for a dataset too big for the GPU) and each batch's
    pixels are gathered there and copied over; the batches are the same either way.
    """
    _check_strength(strength)
    if images.dtype != torch.uint8 or images.dim() != 3:
        raise ValueError(f"expected uint8 [N, H, W] images, got {images.dtype} {images.shape}")
    n = images.shape[0] if rows is None else len(rows)
    if labels.shape[0] != n:
        raise ValueError(f"{n} images but {labels.shape[0]} labels")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    # The normalisation fused into the augmentation: (x / 255 - mean) / std == x * scale + offset.
    # The scale is applied while converting from uint8 (one pass) and the offset after warping,
    # so grid_sample's zero fill is still air.
    scale, offset = 1.0 / (255.0 * std), -mean / std
    h, w = images.shape[1:]
    on_host = device is not None
    device = images.device if device is None else torch.device(device)
    labels = labels.to(device)  # once per epoch, not per batch
    # On `device` wherever the images are, so that keeping them on the host changes no draw.
    order = torch.randperm(n, generator=generator, device=device)
    # Scratch reused by every chunk: malloc tends to mmap fresh allocations of this size, so each
    # one is page-faulted anew (reusing even the small uint8 gather buffer measured ~30% faster).
    chunk = _chunk_size(device, batch_size)
    pixels = torch.empty(chunk, h, w, dtype=torch.uint8, device=device)
    floats = torch.empty(chunk, 1, h, w, device=device)
    grid = torch.empty(chunk, h, w, 2, device=device)
    # The host path fetches the order once per epoch (one sync), not once per batch.
    host_order = order.to(images.device)
    if rows is not None:
        host_order = rows.to(images.device)[host_order]
    sizes = batch_sizes(n, batch_size)
    for idx, where in zip(order.split(sizes), host_order.split(sizes), strict=True):
        theta = random_matrices(len(idx), h, w, strength, generator, ranges, device)
        source = images
        if on_host:
            source, where = _copy_rows(images, where, device), torch.arange(len(idx), device=device)
        out = torch.empty(len(idx), 1, h, w, device=device)
        for s in range(0, len(idx), chunk):
            part = where[s : s + chunk]
            k = len(part)
            torch.index_select(source, 0, part, out=pixels[:k])
            x = torch.mul(pixels[:k].unsqueeze(1), scale, out=floats[:k])
            if strength > 0:
                x = warp(x, theta[s : s + k], grid[:k])
            torch.add(x, offset, out=out[s : s + k])
        yield out, labels[idx]


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """The sizes of an epoch's batches over n images: full batches, then the rest, which when it
    is a single image joins the last full batch instead."""
    sizes = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    if len(sizes) > 1 and sizes[-1] == 1:
        last = sizes.pop()
        sizes[-1] += last
    return sizes


def _copy_rows(images: torch.Tensor, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
    """images[rows] on `device`. For a GPU they are gathered straight into pinned memory, so the
    copy can run asynchronously and the host copies each image once, not twice as
    `images[rows].pin_memory()` would; the caching host allocator does not reuse that buffer
    before the copy has read it."""
    batch = images.new_empty((len(rows), *images.shape[1:]), pin_memory=device.type == "cuda")
    torch.index_select(images, 0, rows, out=batch)
    return batch.to(device, non_blocking=True)
