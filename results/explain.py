"""Grad-CAM heatmaps: which regions of a slice pushed the positive-class logit up.

Selvaraju et al. 2017: weight each channel of the last convolutional stage (`layer4`) by its
spatially averaged gradient of the logit, sum, ReLU, upsample to the input size.
"""

from __future__ import annotations

import re
import sys
import textwrap
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ctmodels import Ensemble, normalize
from data_utils.errors import UsageError
from data_utils.files import atomic_write
from data_utils.identity import load_key
from data_utils.runfolder import refuse_writes_inside
from data_utils.sources import Sample, unlabelled_slices
from results.model_folder import load_exported
from results.predict import decode_batches, expand_paths


def gradcam(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    """Grad-CAM of the positive logit: float [B, 1, S, S] input -> float32 [B, S, S] in [0, 1]."""
    return _gradcam(model, x)[0]


def _gradcam(model: nn.Module, x: torch.Tensor) -> tuple[np.ndarray, torch.Tensor]:
    """(maps [B, S, S], logits [B]) from one forward and one backward pass; for an ensemble the
    mean of its members' maps, beside its own logits."""
    if isinstance(model, Ensemble):
        maps = np.mean([_gradcam(member, x)[0] for member in model.members], axis=0)
        with torch.no_grad():
            return maps, model.eval()(x).squeeze(1)
    model.eval()  # BatchNorm in train mode would mix the images of the batch
    captured: list[torch.Tensor] = []
    hook = model.layer4.register_forward_hook(lambda _m, _i, out: captured.append(out))
    try:
        with torch.enable_grad():
            # The input requires grad so activations do too, even when every weight is frozen.
            logits = model(x.detach().clone().requires_grad_(True)).squeeze(1)
            # Eval mode keeps the images independent, so one backward of the sum gives each
            # image's own gradient; autograd.grad leaves the parameters' .grad untouched.
            (grads,) = torch.autograd.grad(logits.sum(), captured[0])
    finally:
        hook.remove()
    acts = captured[0].detach()
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * acts).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False).squeeze(1)
    low = cam.amin(dim=(1, 2), keepdim=True)
    high = cam.amax(dim=(1, 2), keepdim=True)
    cam = (cam - low) / (high - low).clamp_min(1e-7)  # a flat map (no evidence) stays all 0
    return cam.cpu().numpy().astype(np.float32), logits.detach()


def explain_paths(model_dir: Path, paths: list[Path], out_dir: Path,
                  batch_size: int = 16, show_paths: bool = False) -> tuple[list[Path], int]:
    """Write `<stem>_gradcam.png` per readable image into out_dir, and for a DICOM series or
    NIfTI volume one for its slice of highest probability (the one that most raises the
    series' score); returns the written paths and how many images or series failed.

    Unreadable files are skipped with a warning on stderr. out_dir may not be an input file's
    folder or lie inside an input folder (a rerun would read the heatmaps as inputs).
    """
    out_dir = Path(out_dir)
    files = expand_paths(paths)
    _check_out_dir(out_dir, [Path(p) for p in paths], files)
    model, description, config = load_exported(model_dir)
    samples, skipped = unlabelled_slices(files, load_key(),
                                         config.get("data", {}).get("slices", "all"), show_paths)
    failed = len(skipped)
    for s in skipped:
        print(f"warning: skipped {s.path}: {s.reason}", file=sys.stderr)
    # Per 2-D image its overlay, per series its slice of highest probability, in input order.
    chosen: dict[object, tuple[Sample, np.ndarray, np.ndarray, float]] = {}
    for batch in decode_batches(samples, config, batch_size):
        for sample, _, error in batch:
            if error is not None:
                print(f"warning: skipped {sample.rel}: {error}", file=sys.stderr)
                failed += sample.series is None
        ok = [(sample, pixels) for sample, pixels, _ in batch if pixels is not None]
        if not ok:
            continue
        pixels = np.stack([p for _, p in ok])
        x = normalize(torch.from_numpy(pixels), description.mean, description.std)
        maps, logits = _gradcam(model, x)
        for (sample, image), cam, prob in zip(ok, maps, torch.sigmoid(logits).tolist(),
                                              strict=True):
            key = sample.series or len(chosen)  # a 2-D image: an entry of its own
            if key not in chosen or prob > chosen[key][3]:
                chosen[key] = (sample, image, cam, prob)
    return _write_overlays([(s.rel, image, cam, prob) for s, image, cam, prob in chosen.values()],
                           config, out_dir), failed


def explain_slices(model_dir: Path, images: np.ndarray, names: list[str], out_dir: Path
                   ) -> list[Path]:
    """Overlays for slices already decoded (uint8 [N, S, S], as the dataset cache holds them),
    named after `names` (their paths in the dataset): how the report shows test slices, which a
    DICOM or NIfTI slice's stand-in name could not be read back from."""
    if len(images) == 0:
        return []
    model, description, config = load_exported(model_dir)
    maps, logits = _gradcam(model, normalize(torch.from_numpy(np.asarray(images)),
                                             description.mean, description.std))
    return _write_overlays(list(zip(names, images, maps, torch.sigmoid(logits).tolist(),
                                    strict=True)), config, out_dir)


SLICE_NAME = re.compile(r"(.+)#(\d+)")  # a volume's slice K, as data_utils.sources names it


def _write_overlays(items: list[tuple[str, np.ndarray, np.ndarray, float]], config: dict,
                    out_dir: Path) -> list[Path]:
    """One `<stem>_gradcam.png` per (name, image, cam, probability), titled with the name, the
    call and the probability; a slice K of a file says so."""
    negative, positive = config["class_names"]
    written: list[Path] = []
    used: set[str] = set()
    for name, image, cam, prob in items:
        label = positive if prob >= config["threshold"] else negative
        # A volume's slice is named FILE#K; a "#" elsewhere in a name is the name's own.
        file, frame = match.groups() if (match := SLICE_NAME.fullmatch(name)) else (name, None)
        where = f"slice {frame} of " if frame else ""
        file_name = Path(file).name
        target = out_dir / _unique_name(file_name.removesuffix(".gz").rsplit(".", 1)[0], used)
        # The whole name, wrapped, however long: the title is the only place it is shown.
        title = textwrap.fill(f"{where}{file_name}", 48, break_on_hyphens=False)
        _write_overlay(target, image, cam, f"{title}\n{label}  p({positive})={prob:.3f}")
        written.append(target)
    return written


def _check_out_dir(out_dir: Path, inputs: list[Path], files: list[Path]) -> None:
    refuse_writes_inside(inputs, {"--out": out_dir})
    out = out_dir.resolve()
    for f in files:
        if out == f.resolve().parent:
            raise UsageError(f"--out {out_dir} holds input {f}; a rerun would read the heatmaps "
                             "as inputs, choose another folder")


def _unique_name(stem: str, used: set[str]) -> str:
    # Folders are expanded recursively, so COVID/1.png and non-COVID/1.png must not collide.
    name, n = f"{stem}_gradcam.png", 1
    while name in used:
        n += 1
        name = f"{stem}_{n}_gradcam.png"
    used.add(name)
    return name


def _write_overlay(path: Path, image: np.ndarray, cam: np.ndarray, title: str) -> None:
    # Imported here: matplotlib takes seconds to import and only this function needs it.
    # A bare Figure (no pyplot) needs no GUI backend and keeps no global state between images.
    from matplotlib.figure import Figure

    band = 0.2 * (title.count("\n") + 1)  # inches of title above the 4-inch image
    fig = Figure(figsize=(4, 4 + band), dpi=100)
    ax = fig.add_axes((0, 0, 1, 4 / (4 + band)))
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1, interpolation="bilinear")
    ax.set_axis_off()
    # parse_math off: a "$" in a file name is text, not the start of a formula.
    fig.text(0.5, 1 - band / 2 / (4 + band), title, ha="center", va="center", fontsize=9,
             parse_math=False)
    with atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", facecolor="white")
