"""The `ctscan` command line."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from data_utils.cache import default_cache_dir, load_dataset
from data_utils.decode import RESIZE_MODES
from data_utils.demo import make_demo_data
from data_utils.doctor import format_report, inspect_dataset
from data_utils.sources import DataError
from data_utils.split import GROUP_BY, split_counts, split_dataset, write_split
from tuning.config import ConfigError, load_config, save_config
from tuning.monitor import tensorboard_reporter
from tuning.train import train_trial, trial_data

DEMO_DATA = Path("runs/demo-data")
# Small enough to learn something in about a minute on a 2-core CPU.
DEMO_CONFIG = ["image_size=64", "epochs=8", "batch_size=32", "lr=2e-3", "aug_strength=0.3",
               "patience=4"]


def _source_options(data_required: bool = True) -> argparse.ArgumentParser:
    """Where the dataset is and how to read its labels."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("data", type=Path, nargs=None if data_required else "?",
                   help="folder with one sub-folder per class (e.g. COVID/, non-COVID/), "
                        "or a CSV manifest with columns path,label[,group]")
    p.add_argument("--positive-class", metavar="NAME",
                   help="class that label 1 means (default: the class named covid/positive)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"where decoded datasets are cached (default: {default_cache_dir()}, "
                        "or $CTSCAN_CACHE_DIR); never inside the data folder")
    return p


def _decode_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--image-size", type=int, default=224,
                   help="decoded images are SIZE x SIZE grayscale (default: 224)")
    p.add_argument("--resize", choices=RESIZE_MODES, default="pad",
                   help="keep aspect ratio and pad with black (default), or stretch")
    return p


def _split_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--ratios", type=float, nargs=3, default=[0.7, 0.2, 0.1],
                   metavar=("TRAIN", "VAL", "TEST"), help="split fractions (default: 0.7 0.2 0.1)")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split (default: 0)")
    p.add_argument("--group-by", choices=GROUP_BY, default="duplicates",
                   help="keep related slices in one split: near-identical images (default), "
                        "the manifest's group column (patient id), or only byte-identical files")
    return p


def prepare_split(args: argparse.Namespace, image_size: int, resize: str, out: Path):
    """Load (cached) and split the dataset, write out/split.json and print the counts."""
    ds = load_dataset(args.data, image_size, resize, args.cache_dir, args.positive_class)
    split = split_dataset(ds, tuple(args.ratios), args.split_seed, args.group_by)
    write_split(split, ds, out / "split.json")
    print(f"{len(ds)} images ({len(ds.skipped)} skipped), {split.groups.max() + 1} groups "
          f"(--group-by {args.group_by}), split seed {args.split_seed}")
    for name, counts in split_counts(split, ds).items():
        print(f"  {name:<5} " + "  ".join(f"{c}: {n}" for c, n in counts.items()))
    print(f"wrote {out / 'split.json'}")
    return ds, split


def cmd_inspect(args: argparse.Namespace) -> int:
    ds = load_dataset(args.data, args.image_size, args.resize, args.cache_dir,
                      args.positive_class)
    report = inspect_dataset(ds)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    prepare_split(args, args.image_size, args.resize, args.out)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    if args.demo:
        if args.data is None:
            args.data = DEMO_DATA
        if not args.data.exists():
            make_demo_data(args.data)
            print(f"generated demo data in {args.data}")
    elif args.data is None:
        raise DataError("train needs DATA (a folder or manifest), or --demo")
    config = load_config(args.config, [*(DEMO_CONFIG if args.demo else []), *args.overrides])
    out = args.out or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    if (out / "config.yaml").exists() and load_config(out / "config.yaml") != config:
        raise DataError(f"{out} holds a run with a different config; pick another --out")
    ds, split = prepare_split(args, config.image_size, config.resize, out)
    save_config(config, out / "config.yaml")
    data = trial_data(ds, split)
    del ds  # the test images are not needed, nor kept, while training
    report = tensorboard_reporter(out / "tensorboard", config,
                                  torch.from_numpy(data.train_images),
                                  torch.from_numpy(data.train_labels))
    print(f"training {config.arch} on {len(data.train_labels)} images, validating on "
          f"{len(data.val_labels)}; watch with: tensorboard --logdir {out}")

    def report_and_print(metrics: dict) -> None:
        report(metrics)
        print(f"epoch {metrics['epoch']:>3}  train loss {metrics['train_loss']:.4f}  "
              f"val loss {metrics['val_loss']:.4f}  val AUC {metrics['val_auc']:.4f}  "
              f"val acc {metrics['val_accuracy']:.3f}  {metrics['images_per_sec']:.0f} img/s")

    best = train_trial(config, data, out, report_and_print, progress=True)
    print(f"best epoch {best['epoch']}: val AUC {best['val_auc']:.4f}, val accuracy "
          f"{best['val_accuracy']:.3f}, val F1 {best['val_f1']:.3f}, val loss "
          f"{best['val_loss']:.4f}\ncheckpoint: {out / 'best.pt'}")
    return 0


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    out = make_demo_data(args.dir, args.n_per_class, args.size, args.seed)
    print(f"wrote {2 * args.n_per_class} demo CT slices to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctscan", description="Find, prove and ship a CT-scan COVID-19 classifier.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    source, decode, splitting = _source_options(), _decode_options(), _split_options()

    p = commands.add_parser("inspect", parents=[source, decode], help="dataset doctor: counts, "
                            "modes, sizes, unreadable files, duplicates and label shortcuts")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_inspect)

    p = commands.add_parser("split", parents=[source, decode, splitting],
                            help="decode (cached) and write a leakage-free RUN/split.json")
    p.add_argument("--out", type=Path, required=True, help="run folder to write split.json into")
    p.set_defaults(func=cmd_split)

    p = commands.add_parser("train", parents=[_source_options(data_required=False), splitting],
                            help="train one config without Ray: checkpoints, TensorBoard, metrics")
    p.add_argument("--config", type=Path, help="YAML file of training config keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set lr=3e-4 --set head=[256] "
                        "(repeatable; applied after --config)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/train-TIMESTAMP); "
                   "rerunning with the same --out resumes from its last checkpoint")
    p.add_argument("--demo", action="store_true",
                   help=f"train on generated demo data ({DEMO_DATA}, made if absent) with a "
                        "small CPU-friendly config")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser("make-demo-data", help="generate CT-like demo slices (Kaggle layout)")
    p.add_argument("dir", type=Path, help="new folder to create")
    p.add_argument("--n-per-class", type=int, default=300, help="slices per class (default: 300)")
    p.add_argument("--size", type=int, default=256, help="largest slice side in px (default: 256)")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    p.set_defaults(func=cmd_make_demo_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ConfigError, FileExistsError) as e:
        print(f"ctscan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
