"""Does `ctscan tune` beat one hand-picked recipe, given five times that recipe's training time?

1. Train the documented recipe (TrainConfig's defaults) once with train_trial, on both CPU
   cores, and note its wall time T.
2. Run `ctscan tune DATA --time-budget 5T` as a user would (the CPU space, no --search-space).
3. Score both on the same test split the same way: test ROC AUC, and accuracy at the threshold
   that maximises Youden's J on val.

On the real sample (../shared/data/sarscov2-ct-sample) at 96 px; on demo data when it is absent.

    python bench/search_vs_baseline.py [--data DIR] [--image-size 96] [--max-epochs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from data_utils.cache import load_dataset
from data_utils.demo import make_demo_data
from data_utils.split import split_dataset
from results.evaluate import load_checkpoint_model, val_then_test
from results.metrics import binary_metrics
from tuning.config import make_config
from tuning.train import train_trial, trial_data

SAMPLE = Path(__file__).resolve().parents[1].parent / "shared/data/sarscov2-ct-sample"


def score_checkpoint(checkpoint: Path, ds, split) -> dict:
    """Test metrics at the threshold chosen on val, as `ctscan evaluate` scores one trial."""
    member = load_checkpoint_model(str(checkpoint))
    scored = val_then_test([member], ds, split.indices("val"), split.indices("test"))
    return binary_metrics(scored["y_test"], scored["prob_test"], scored["threshold"]["value"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="dataset (default: the real sample, else demo data)")
    p.add_argument("--image-size", type=int, default=96, help="image size (default: 96)")
    p.add_argument("--max-epochs", type=int, default=10,
                   help="epochs of the recipe and of a full trial (default: 10)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = args.data or (SAMPLE if (SAMPLE / "COVID").is_dir()
                             else make_demo_data(tmp / "demo", n_per_class=300, size=128))
        cache = tmp / "cache"
        ds = load_dataset(data, args.image_size, cache_dir=cache, progress=False)
        split = split_dataset(ds)  # ctscan tune's defaults: 70/20/10, seed 0, near-duplicates
        config = make_config({"image_size": args.image_size, "epochs": args.max_epochs,
                              "num_workers": os.cpu_count()})
        started = time.perf_counter()
        best = train_trial(config, trial_data(ds, split), tmp / "baseline")
        recipe_s = time.perf_counter() - started
        baseline = score_checkpoint(tmp / "baseline" / "best.pt", ds, split)

        budget = 5 * recipe_s
        command = [sys.executable, "-m", "ctscan", "tune", str(data),
                   "--image-size", str(args.image_size), "--max-epochs", str(args.max_epochs),
                   "--time-budget", f"{budget:.0f}s", "--storage-path", str(tmp / "runs"),
                   "--name", "search", "--cache-dir", str(cache)]
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        search_s = time.perf_counter() - started
        run = tmp / "runs" / "search"
        split_json = json.loads((run / "split.json").read_text())
        assert sorted(e["path"] for e in split_json["files"] if e["split"] == "test") == sorted(
            ds.paths[i] for i in split.indices("test")), "the search split the data differently"
        found = json.loads((run / "best.json").read_text())
        trials = json.loads((run / "trials.json").read_text())
        first = min(trials, key=lambda t: t["number"])
        test = {k: v["value"] for k, v in
                json.loads((run / "results" / "metrics.json").read_text())["test"]["metrics"]
                .items()}

    print(f"data: {data} at {args.image_size} px, {len(ds)} images, "
          f"test split {len(split.indices('test'))}; load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"baseline (the recipe, {os.cpu_count()} threads): {recipe_s:.0f} s, best val AUC "
          f"{best['val_auc']:.4f}; test AUC {baseline['roc_auc']:.4f}, test accuracy "
          f"{baseline['accuracy']:.4f}")
    print(f"search (budget {budget:.0f} s, took {search_s:.0f} s with scoring): "
          f"{found['trials']} trials, {found['trials_stopped_early']} stopped early, "
          f"{found['trials_ended_by_budget']} ended by the budget, "
          f"budget reached: {found['budget_reached']}; best val AUC "
          f"{found['val_metrics']['val_auc']:.4f} ({json.dumps(found['searched'])})")
    print(f"search's first trial (the recipe, 1 thread): best val AUC {first['val_auc']:.4f}, "
          f"{first['epochs']} epochs, {first['status']}")
    print(f"search: test AUC {test['roc_auc']:.4f}, test accuracy {test['accuracy']:.4f}")
    print(f"search - baseline test AUC: {test['roc_auc'] - baseline['roc_auc']:+.4f}")


if __name__ == "__main__":
    main()
