"""Latency per slice of an exported model on this CPU: onnxruntime (model.onnx) against torch
(the state_dict, as `ctscan predict` runs it), same weights, same uint8 input.

    python bench/onnx_latency.py [--arch resnet18] [--image-size 224]

Prints milliseconds per slice at batch 1 (one slice at a time, as a viewer asks) and at batch
32 (a folder), the median of several timed runs after a warm-up, and the ratio torch / ONNX.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ctmodels import predict_proba
from results.export import export_model
from results.model_folder import load_exported, onnx_predictor
from tuning.config import make_config


def per_slice_ms(predict, images: np.ndarray, repeats: int) -> float:
    predict(images)  # warm-up: lazy initialisation, allocator, kernels' first call
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        predict(images)
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times) / len(images)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", default="resnet18", help="architecture (default: resnet18)")
    p.add_argument("--image-size", type=int, default=224, help="slice size (default: 224)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs per case (default: 7)")
    args = p.parse_args()
    config = make_config({"arch": args.arch, "image_size": args.image_size})
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = export_model(Path(tmp) / "model", [(config.description().build(), config)],
                                 ("non-COVID", "COVID"), 0.5, {})
        model, description, _ = load_exported(model_dir)
        onnx = onnx_predictor(model_dir)

        def torch_predict(images: np.ndarray) -> np.ndarray:
            return predict_proba(model, torch.from_numpy(images), description).numpy()

        rng = np.random.default_rng(0)
        print(f"{args.arch} at {args.image_size} px on {os.cpu_count()} CPU cores, torch "
              f"{torch.get_num_threads()} threads; load average "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        for batch in (1, 32):
            images = rng.integers(0, 256, (batch, args.image_size, args.image_size), np.uint8)
            assert np.abs(onnx(images) - torch_predict(images)).max() < 1e-4
            ms_torch = per_slice_ms(torch_predict, images, args.repeats)
            ms_onnx = per_slice_ms(onnx, images, args.repeats)
            print(f"batch {batch:>2}: torch {ms_torch:7.2f} ms/slice, onnxruntime "
                  f"{ms_onnx:7.2f} ms/slice; torch / onnxruntime = {ms_torch / ms_onnx:.2f}")


if __name__ == "__main__":
    main()
