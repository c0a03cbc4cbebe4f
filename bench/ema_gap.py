"""Does an EMA of the weights make the val pick hold up on test? The recipe with ema off and on.

The winner of a search is the epoch with the best val AUC; when that epoch is a spike, its test
AUC falls short. For several seeds, train the recipe with `ema: false` and `ema: true` on demo
data and compare the best val AUC with the test AUC of that same checkpoint.

    python bench/ema_gap.py [--seeds 4] [--epochs 8] [--image-size 64]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np
from search_vs_baseline import score_checkpoint

from data_utils.cache import load_dataset
from data_utils.demo import make_demo_data
from data_utils.split import split_dataset
from tuning.config import make_config
from tuning.train import train_trial, trial_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=4, help="training seeds per setting (default: 4)")
    p.add_argument("--epochs", type=int, default=8, help="epochs per run (default: 8)")
    p.add_argument("--image-size", type=int, default=64, help="image size (default: 64)")
    args = p.parse_args()
    rows = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = make_demo_data(tmp / "data", n_per_class=300, size=128)
        ds = load_dataset(root, args.image_size, cache_dir=tmp / "cache", progress=False)
        split = split_dataset(ds)
        for seed in range(args.seeds):
            for ema in (False, True):
                config = make_config({"image_size": args.image_size, "epochs": args.epochs,
                                      "seed": seed, "ema": ema, "num_workers": os.cpu_count()})
                out = tmp / f"seed{seed}-ema{ema}"
                best = train_trial(config, trial_data(ds, split), out)
                test = score_checkpoint(out / "best.pt", config, ds, split)
                rows[ema].append((best["val_auc"], test["roc_auc"], best["epoch"]))
                print(f"seed {seed} ema {ema!s:<5}: best val AUC {best['val_auc']:.4f} at epoch "
                      f"{best['epoch']}, test AUC {test['roc_auc']:.4f}", flush=True)
    print(f"demo data, {len(ds)} images at {args.image_size} px, test split "
          f"{len(split.indices('test'))}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for ema, runs in rows.items():
        val, test, _ = np.array(runs).T
        print(f"ema {ema!s:<5}: mean best val AUC {val.mean():.4f}, mean test AUC "
              f"{test.mean():.4f}, mean val - test gap {np.mean(val - test):+.4f} "
              f"(seeds {args.seeds})")


if __name__ == "__main__":
    main()
