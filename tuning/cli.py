"""The `ctscan` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from data_utils.cache import default_cache_dir, load_dataset
from data_utils.decode import RESIZE_MODES
from data_utils.demo import make_demo_data
from data_utils.doctor import format_report, inspect_dataset
from data_utils.sources import DataError
from data_utils.split import GROUP_BY, split_counts, split_dataset, write_split


def _data_options() -> argparse.ArgumentParser:
    """Options shared by every command that reads a dataset."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("data", type=Path,
                   help="folder with one sub-folder per class (e.g. COVID/, non-COVID/), "
                        "or a CSV manifest with columns path,label[,group]")
    p.add_argument("--positive-class", metavar="NAME",
                   help="class that label 1 means (default: the class named covid/positive)")
    p.add_argument("--image-size", type=int, default=224,
                   help="decoded images are SIZE x SIZE grayscale (default: 224)")
    p.add_argument("--resize", choices=RESIZE_MODES, default="pad",
                   help="keep aspect ratio and pad with black (default), or stretch")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help=f"where decoded datasets are cached (default: {default_cache_dir()}, "
                        "or $CTSCAN_CACHE_DIR); never inside the data folder")
    return p


def _load(args: argparse.Namespace):
    return load_dataset(args.data, args.image_size, args.resize, args.cache_dir,
                        args.positive_class)


def cmd_inspect(args: argparse.Namespace) -> int:
    report = inspect_dataset(_load(args))
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    ds = _load(args)
    split = split_dataset(ds, tuple(args.ratios), args.seed, args.group_by)
    path = args.out / "split.json"
    write_split(split, ds, path)
    print(f"{len(ds)} images ({len(ds.skipped)} skipped), {split.groups.max() + 1} groups "
          f"(--group-by {args.group_by}), seed {args.seed}")
    for name, counts in split_counts(split, ds).items():
        print(f"  {name:<5} " + "  ".join(f"{c}: {n}" for c, n in counts.items()))
    print(f"wrote {path}")
    return 0


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    out = make_demo_data(args.dir, args.n_per_class, args.size, args.seed)
    print(f"wrote {2 * args.n_per_class} demo CT slices to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctscan", description="Find, prove and ship a CT-scan COVID-19 classifier.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    data = _data_options()

    p = commands.add_parser("inspect", parents=[data], help="dataset doctor: counts, modes, "
                            "sizes, unreadable files, duplicates and label shortcuts")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_inspect)

    p = commands.add_parser("split", parents=[data],
                            help="decode (cached) and write a leakage-free RUN/split.json")
    p.add_argument("--out", type=Path, required=True, help="run folder to write split.json into")
    p.add_argument("--ratios", type=float, nargs=3, default=[0.7, 0.2, 0.1],
                   metavar=("TRAIN", "VAL", "TEST"), help="split fractions (default: 0.7 0.2 0.1)")
    p.add_argument("--seed", type=int, default=0, help="split seed (default: 0)")
    p.add_argument("--group-by", choices=GROUP_BY, default="duplicates",
                   help="keep related slices in one split: near-identical images (default), "
                        "the manifest's group column (patient id), or only byte-identical files")
    p.set_defaults(func=cmd_split)

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
    except (DataError, FileExistsError) as e:
        print(f"ctscan: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
