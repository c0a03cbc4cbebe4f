"""Procedurally generated CT-like axial slices for trying ctscan without the real dataset.

The output mimics the Kaggle SARS-CoV-2 CT-scan layout (``COVID/`` and ``non-COVID/`` folders of
grayscale PNGs) plus a ``manifest.csv`` naming the patient each slice belongs to. Slices come in
runs of consecutive, near-identical slices per patient, like the real data, so that a split which
ignores patients leaks; and the positive class differs only by lesions inside the lungs, with the
global intensity budget matched, so that a model cannot win on image brightness alone.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ("COVID", "non-COVID")
_PREFIX = {"COVID": "covid", "non-COVID": "noncovid"}
_MIN_SLICES, _MAX_SLICES = 4, 10


@dataclass(frozen=True)
class RenderedSlice:
    image: np.ndarray  # uint8 (H, W)
    lung_mask: np.ndarray  # bool (H, W)
    lesion_mask: np.ndarray  # bool (H, W); all False for negatives


def make_demo_data(out_dir: Path, n_per_class: int = 300, size: int = 256, seed: int = 0) -> Path:
    """Write a demo dataset in the Kaggle layout and return out_dir.

    Creates ``out_dir/COVID/*.png``, ``out_dir/non-COVID/*.png`` and ``out_dir/manifest.csv``
    (columns ``path,label,group``). The same arguments always give byte-identical files.
    Raises FileExistsError if out_dir exists and is not an empty directory.
    """
    out_dir = Path(out_dir)
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    if size < 32:
        raise ValueError(f"size must be >= 32, got {size}")
    _refuse_existing(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)

    # Built next to out_dir so the final rename stays on one filesystem and is atomic: a reader
    # never sees a half-written dataset, and a crash leaves only a dot-prefixed temp folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        rows = []
        for class_idx, label in enumerate(CLASSES):
            (tmp / label).mkdir()
            # One independent stream per class and per patient, so the dataset does not depend
            # on generation order and adding patients to one class leaves the other unchanged.
            plan_rng = np.random.default_rng([seed, class_idx])
            runs = _plan_runs(plan_rng, n_per_class)
            width = max(3, len(str(len(runs) - 1)))
            for p, n_slices in enumerate(runs):
                group = f"{_PREFIX[label]}-p{p:0{width}d}"
                rng = np.random.default_rng([seed, class_idx, p + 1])
                slices = _render_patient(rng, label == "COVID", n_slices, size)
                for s, sl in enumerate(slices):
                    rel = f"{label}/{group}-s{s:02d}.png"
                    Image.fromarray(sl.image).save(tmp / rel, format="PNG")
                    rows.append((rel, label, group))
        with open(tmp / "manifest.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(("path", "label", "group"))
            writer.writerows(rows)
        os.chmod(tmp, 0o755)  # mkdtemp makes it owner-only; the dataset is not secret
        _refuse_existing(out_dir)  # it may have appeared while we were rendering
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above); rename cannot replace a directory portably
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _refuse_existing(out_dir: Path) -> None:
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"refusing to overwrite non-empty directory: {out_dir}")
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"refusing to overwrite existing file: {out_dir}")


def _plan_runs(rng: np.random.Generator, n_total: int) -> list[int]:
    """Split n_total slices into per-patient runs of _MIN_SLICES.._MAX_SLICES slices."""
    runs = []
    left = n_total
    while left > 0:
        n = int(rng.integers(_MIN_SLICES, _MAX_SLICES + 1))
        # Avoid a tiny final patient; fold the remainder into this one when it still fits.
        if left - n < _MIN_SLICES and left <= _MAX_SLICES:
            n = left
        runs.append(min(n, left))
        left -= runs[-1]
    return runs


def _render_patient(
    rng: np.random.Generator, positive: bool, n_slices: int, size: int
) -> list[RenderedSlice]:
    """Render n_slices consecutive axial slices of one synthetic patient.

    Everything label-independent is drawn identically for both classes, including the lesion
    parameters: positives paint the lesions, negatives spend the same intensity on denser lungs
    (as in a scan taken at poor inspiration), so global brightness carries no label signal.
    """
    # Image size is drawn first and identically for both classes: size must not leak the label.
    h = int(rng.integers(int(0.8 * size), size + 1))
    w = int(rng.integers(int(0.8 * size), size + 1))
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    px = min(h, w) / 256.0  # structures are specified in pixels at 256 and scaled from there

    # --- body, spine, table: static over a short run of slices ---
    bcx = w / 2 + rng.normal(0, 0.02) * w
    bcy = h / 2 + rng.normal(0, 0.02) * h - 0.03 * h
    bax = rng.uniform(0.38, 0.46) * w
    bay = rng.uniform(0.27, 0.34) * h
    tissue = rng.uniform(140, 185)
    fat = tissue - rng.uniform(25, 45)
    fat_frac = rng.uniform(0.04, 0.11)
    rho, theta = _polar(xx, yy, bcx, bcy, bax, bay)
    outline = 1 + _wobble(rng, theta, 0.02)
    outline -= 0.08 * np.clip(np.sin(theta), 0, None) ** 4  # flatter back, as when lying supine
    body = _soft_inside(outline - rho, 0.01)
    muscle = _soft_inside(outline * (1 - fat_frac) - rho, 0.01)
    base = body * (fat + (tissue - fat) * muscle)

    # Vertebra: bright cortical ring around a less bright body, spinal canal behind it.
    vr = rng.uniform(0.085, 0.11) * bax
    vcx, vcy = bcx + rng.normal(0, 2) * px, bcy + 0.7 * bay
    d_vert = np.hypot(xx - vcx, yy - vcy)
    base = np.where(d_vert < vr, 185 + 50 * (d_vert > 0.8 * vr), base)
    d_canal = np.hypot(xx - vcx, yy - (vcy + 1.45 * vr))
    base = np.where(d_canal < 0.45 * vr, tissue - 50, base)
    # Descending aorta, left of the spine (patient's left is image right).
    d_aorta = np.hypot(xx - (vcx + 1.2 * vr), yy - (vcy - 1.3 * vr))
    base = np.where(d_aorta < 0.75 * vr, tissue + 15, base)

    # Ribs: bright dots just inside the fat layer, skipping the front of the chest.
    n_ribs = int(rng.integers(5, 9))
    ang = np.concatenate(
        [rng.uniform(0.15, 1.35, n_ribs), np.pi - rng.uniform(0.15, 1.35, n_ribs)]
    ) + rng.normal(0, 0.05)
    r_rib = 1 - fat_frac - rng.uniform(0.03, 0.07)
    ribs = _splat((h, w), bcy + r_rib * bay * np.sin(ang), bcx + r_rib * bax * np.cos(ang),
                  np.full(ang.size, 900.0 * px * px))
    base += _blur(ribs, 1.8 * px)

    # Patient table: a curved bright band below the back, clear of the body.
    table_y = bcy + bay * (1 + rng.uniform(0.05, 0.12)) + 0.002 * (xx - bcx) ** 2 / px
    table = (np.abs(yy - table_y) < 2.5 * px) & (np.abs(xx - bcx) < 0.9 * w / 2)
    base = np.where(table & (body < 0.5), 150.0, base)

    # --- lungs: shape, vessels and lesions evolve smoothly with the slice position z ---
    z0, dz = rng.uniform(0.15, 0.75), rng.uniform(0.015, 0.03)
    lung_level = rng.uniform(15, 40)
    lungs = []
    for side in (-1, 1):
        lungs.append(
            {
                "side": side,
                "cx": bcx + side * rng.uniform(0.42, 0.5) * bax,
                "cy": bcy - rng.uniform(0.0, 0.08) * bay,
                "ax": rng.uniform(0.30, 0.37) * bax,
                "ay": rng.uniform(0.58, 0.7) * bay,
                "wob": (rng.uniform(0.01, 0.05, 3), rng.uniform(0, 2 * np.pi, 3)),
                # Vessels in lung-normalised coordinates, drifting as z changes so that
                # neighbouring slices differ by a pixel or two.
                "vessels": _sample_vessels(rng),
            }
        )
    gain = rng.uniform(0.9, 1.1)  # scanner calibration differs between patients
    noise_sd = rng.uniform(5, 14)
    lesions = _sample_lesions(rng, n_slices, dz)
    fields = [_smooth_field(rng, (h, w), 10) for _ in range(2)]

    slices = []
    for i in range(n_slices):
        z = z0 + i * dz
        lung_soft = np.zeros((h, w), np.float32)
        lung_mask = np.zeros((h, w), bool)
        lung_add = np.zeros((h, w), np.float32)
        lesion_add = np.zeros((h, w), np.float32)
        lesion_mask = np.zeros((h, w), bool)
        # Lungs are widest mid-chest and shrink towards apex and base.
        grow = 0.82 + 0.18 * np.sin(np.pi * z)
        # Mottling of the haze shifts slowly between slices: rotate between two fixed fields.
        a = 0.8 * i * dz / 0.03
        mottle = np.cos(a) * fields[0] + np.sin(a) * fields[1]
        for k, lung in enumerate(lungs):
            ax, ay = lung["ax"] * grow, lung["ay"] * grow
            lr, lt = _polar(xx, yy, lung["cx"], lung["cy"], ax, ay)
            amp, phase = lung["wob"]
            edge = 1 + sum(amp[j] * np.cos((j + 2) * lt + phase[j] + z) for j in range(3))
            # Medial side flattened by the mediastinum.
            edge -= 0.18 * np.clip(-lung["side"] * np.cos(lt), 0, None) ** 3
            lung_soft = np.maximum(lung_soft, _soft_inside(edge - lr, 0.02))
            lung_mask |= lr < edge

            u, v, wt, length, orient = lung["vessels"]
            # Vessels cross the slice plane obliquely, so they drift along their own direction.
            vu = u + 1.5 * (z - z0) * np.cos(orient)
            vv = v + 1.5 * (z - z0) * np.sin(orient)
            n_pts = 4
            t = np.linspace(-0.5, 0.5, n_pts)[:, None]
            pu = vu + t * length * np.cos(orient)
            pv = vv + t * length * np.sin(orient)
            lung_add += _blur(
                _splat((h, w), lung["cy"] + pv.ravel() * ay, lung["cx"] + pu.ravel() * ax,
                       np.tile(wt * px * px / n_pts, n_pts)),
                1.1 * px,
            )

            for les in lesions:
                if les["lung"] != k:
                    continue
                zr = 1 - ((i - les["zc"]) / les["zr"]) ** 2
                if zr <= 0:
                    continue
                r = les["r"] * np.sqrt(zr)
                lcx, lcy = lung["cx"] + les["u"] * ax, lung["cy"] + les["v"] * ay
                d, _ = _polar(xx, yy, lcx, lcy, r * ax * les["aspect"], r * ay)
                blob = _soft_inside(1 - d, les["soft"])
                texture = np.clip(1 + les["mottle"] * mottle, 0.2, 2.0)
                # max, not sum: overlapping patches merge instead of stacking into bright spots.
                lesion_add = np.maximum(lesion_add, les["amp"] * blob * texture)
                lesion_mask |= blob > 0.5

        lesion_mask &= lung_mask
        lesion_add *= lung_soft
        lung_value = lung_level + lung_add
        if positive:
            lung_value = lung_value + lesion_add
        else:
            # Same intensity budget, spread over the lungs with the gravity-dependent gradient
            # real scans show (back of the lungs denser), instead of focal patches.
            back = np.clip((yy - bcy) / bay + 1, 0.2, 2.0) * lung_soft
            lung_value = lung_value + back * (lesion_add.sum() / max(back.sum(), 1.0))
            lesion_mask[:] = False
        img = base * (1 - lung_soft) + lung_value * lung_soft
        img = gain * img + noise_sd * rng.standard_normal((h, w), dtype=np.float32)
        img = _blur(img, 0.7 * px)
        image = np.clip(np.rint(img), 0, 255).astype(np.uint8)
        slices.append(RenderedSlice(image, lung_mask, lesion_mask))
    return slices


def _sample_vessels(rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    n = int(rng.integers(25, 60))
    # Denser towards the centre (hilum), where the big vessels and bronchi branch.
    r = 0.92 * rng.uniform(0, 1, n) ** 0.7
    a = rng.uniform(0, 2 * np.pi, n)
    weight = rng.uniform(250, 600, n) * rng.choice([1.0, 2.5], n, p=[0.8, 0.2])
    length = rng.choice([0.0, 1.0], n, p=[0.65, 0.35]) * rng.uniform(0.05, 0.18, n)
    return r * np.cos(a), r * np.sin(a), weight, length, rng.uniform(0, 2 * np.pi, n)


def _sample_lesions(rng: np.random.Generator, n_slices: int, dz: float) -> list[dict]:
    """Lesions as ellipsoids in (lung-normalised x, y, slice index) so they persist over slices."""
    lesions = []
    for j in range(int(rng.integers(1, 7))):
        ggo = rng.uniform() < 0.7
        # COVID findings favour the periphery and the back of the lungs.
        rad = rng.uniform(0.35, 0.75)
        ang = rng.uniform(-0.2 * np.pi, 1.2 * np.pi)
        lesions.append(
            {
                "lung": int(rng.integers(0, 2)),
                "u": rad * np.cos(ang),
                "v": rad * np.sin(ang),
                "r": rng.uniform(0.15, 0.4),
                "aspect": rng.uniform(0.7, 1.4),
                # The first lesion spans the whole run so every positive slice shows a finding.
                "zc": (n_slices - 1) / 2 if j == 0 else rng.uniform(-2, n_slices + 1),
                "zr": (n_slices + 2) if j == 0 else rng.uniform(2, 8),
                "soft": rng.uniform(0.12, 0.3) if ggo else rng.uniform(0.04, 0.08),
                "amp": rng.uniform(30, 70) if ggo else rng.uniform(80, 120),
                "mottle": rng.uniform(0.2, 0.5) if ggo else 0.1,
            }
        )
    return lesions


def _polar(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float
) -> tuple[np.ndarray, np.ndarray]:
    """Elliptical radius (1 on the ellipse) and angle of every pixel."""
    dx, dy = (xx - cx) / ax, (yy - cy) / ay
    return np.hypot(dx, dy), np.arctan2(dy, dx)


def _wobble(rng: np.random.Generator, theta: np.ndarray, amount: float) -> np.ndarray:
    amps = rng.uniform(0, amount, 3)
    phases = rng.uniform(0, 2 * np.pi, 3)
    return sum(a * np.cos((k + 2) * theta + p) for k, (a, p) in enumerate(zip(amps, phases)))


def _soft_inside(signed: np.ndarray, width: float) -> np.ndarray:
    """~1 where signed > 0, ~0 where < 0, with a logistic edge (anti-aliasing, soft haze)."""
    return (0.5 + 0.5 * np.tanh(signed / (2 * width))).astype(np.float32)


def _splat(shape: tuple[int, int], ys: np.ndarray, xs: np.ndarray, weights: np.ndarray):
    """Deposit point weights on a grid; blurring the result draws many blobs at one blur's cost."""
    h, w = shape
    iy, ix = np.rint(ys).astype(int), np.rint(xs).astype(int)
    ok = (iy >= 0) & (iy < h) & (ix >= 0) & (ix < w)
    flat = np.bincount(iy[ok] * w + ix[ok], weights=weights[ok], minlength=h * w)
    return flat.reshape(h, w).astype(np.float32)


def _blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur with edge padding (numpy only)."""
    radius = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2).astype(np.float32)
    k /= k.sum()
    h, w = img.shape
    p = np.pad(img, radius, mode="edge")
    rows = sum(k[i] * p[:, i : i + w] for i in range(k.size))
    return sum(k[i] * rows[i : i + h, :] for i in range(k.size))


def _smooth_field(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean, unit-sd low-frequency noise: a coarse random grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    up = np.asarray(Image.fromarray(coarse).resize(shape[::-1], Image.BICUBIC))
    return (up - up.mean()) / (up.std() + 1e-6)
