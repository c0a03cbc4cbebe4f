#!/usr/bin/env bash
# GPU check for the training loop: resnet50 at 224 px on generated demo data, bf16 autocast,
# channels_last, the whole uint8 dataset resident on the GPU. Prints training images/s, peak GPU
# memory and what on-device augmentation costs per training step. Takes 2-3 minutes.
# Needs python3 with torch, torchvision, numpy and pillow, plus scikit-learn, tqdm and pyyaml
# (the training loop's own imports); not ray, optuna or imagehash. Usage: bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
PYTHONPATH=. PYTHONUNBUFFERED=1 python3 bench/gpu_check.py "$@"
