"""The `ctscan` command line."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from data_utils import runfolder
from data_utils.cache import (
    CLUSTER_CACHE,
    CTDataset,
    ShardRunner,
    default_cache_dir,
    load_dataset,
)
from data_utils.decode import RESIZE_MODES
from data_utils.errors import RunFolderError, UsageError, UserError
from data_utils.identity import KEY_FILE_ENV, default_key_file, use_key_file
from data_utils.runfolder import refuse_writes_inside
from data_utils.split import (
    DEFAULT_GROUP_BY,
    DEFAULT_RATIOS,
    GROUP_BY,
    UNIT_CAVEATS,
    Split,
    describe_split,
    load_and_split,
    split_changes,
    split_record,
    write_split,
)
from data_utils.volumes import DEFAULT_WINDOW, parse_slices, parse_window
from results.aggregate import AGGREGATES, CHOOSE_AGGREGATE
from tuning.config import PRECISIONS, RANGES, Interval, TrainConfig, load_config, save_config
from tuning.records import RESUME_EVERY_LOCAL, RESUME_EVERY_REMOTE, SearchOptions
from tuning.space import CPU_SPACE, DEFAULT_SPACE, DEMO_SPACE, load_space

# Ray, TensorBoard and the training loop take seconds to import: each command imports what it
# needs, so `ctscan predict` and every --help stay quick, and only `tune` imports Ray.

DEMO_DATA = Path("runs/demo-data")
# Small enough to learn something in about a minute on a 2-core CPU.
DEMO_CONFIG = ["image_size=64", "epochs=8", "batch_size=32", "lr=2e-3", "aug_strength=0.3",
               "patience=4"]
DEMO_SEARCH = {"num_samples": 8, "max_epochs": 6, "image_size": 64, "search_space": DEMO_SPACE}
DEFAULT_TRIALS, DEFAULT_TRIALS_IN_BUDGET = SearchOptions.num_samples, 32
DURATION_UNITS = {"s": 1, "m": 60, "h": 3600}
PRECISION_HELP = ("bf16 autocast or fp32; auto is bf16 on CUDA and on CPUs with bf16 instructions "
                  "(AVX512-BF16, AMX), else fp32; the head and loss, so every metric, stay fp32")


def duration(text: str) -> float:
    """'90s', '30m', '1.5h' or plain seconds, as seconds."""
    number, unit = (text[:-1], text[-1]) if text[-1:] in DURATION_UNITS else (text, "s")
    try:
        seconds = float(number) * DURATION_UNITS[unit]
    except ValueError:
        seconds = math.nan
    if not seconds > 0 or math.isinf(seconds):
        raise argparse.ArgumentTypeError(f"expected a positive duration like 90s, 30m or 2h, "
                                         f"got {text!r}")
    return seconds


def number(kind: type, interval: Interval) -> Callable[[str], float]:
    """An argparse type: an int or float within `interval`, refused otherwise (never replaced by
    a default)."""
    noun = "an integer" if kind is int else "a number"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = math.nan
        if not interval.holds(value):
            raise argparse.ArgumentTypeError(f"expected {noun} in {interval}, got {text!r}")
        return value

    return parse


positive_int = number(int, Interval(1, math.inf))
fixed_threshold = number(float, Interval(0, 1, high_closed=True))


def threshold_rule(text: str) -> float | str:
    """--threshold: a fixed threshold, or "sensitivity:S" with S in (0, 1]."""
    if not text.startswith("sensitivity:"):
        return fixed_threshold(text)
    target = text.removeprefix("sensitivity:")
    fixed_threshold(target)  # the same range, the same message
    return f"sensitivity:{float(target):g}"
# Fewer resamples leave a handful in each 2.5% tail: an "interval" that may exclude its own
# point estimate.
MIN_BOOTSTRAP = 200
seed = number(int, RANGES["seed"])
image_size = number(int, RANGES["image_size"])


def _source_options(data_required: bool = True) -> argparse.ArgumentParser:
    """Where the dataset is and how to read its labels."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("data", type=Path, nargs=None if data_required else "?",
                   help="folder with one sub-folder per class (e.g. COVID/, non-COVID/), "
                        "or a CSV manifest with columns path,label[,group]")
    p.add_argument("--positive-class", metavar="NAME",
                   help="class that label 1 means (default: the class named covid/positive)")
    p.add_argument("--cache-dir", default=None, metavar="FOLDER_OR_URI",
                   help=f"where decoded datasets are cached (default: {default_cache_dir()}, "
                        "or $CTSCAN_CACHE_DIR; `tune` on a cluster of several machines: "
                        f"{CLUSTER_CACHE}/ in --storage-path): a folder, never inside the data "
                        "folder, or a bucket (s3://BUCKET/PATH) from which each node fetches "
                        "its copy")
    p.add_argument("--window", type=_argument(parse_window), default=DEFAULT_WINDOW,
                   metavar="CENTER,WIDTH",
                   help="HU window of DICOM and NIfTI slices onto 0..255 (default: lung, "
                        f"{DEFAULT_WINDOW[0]:g},{DEFAULT_WINDOW[1]:g})")
    p.add_argument("--slices", type=_argument(parse_slices), default="all", metavar="RULE",
                   help="which slices of each DICOM series / NIfTI volume to use: all, every:K, "
                        "central:FRACTION (e.g. central:0.6) or max:N spread evenly, so long "
                        "scans do not outweigh short ones (default: %(default)s)")
    return p


def _key_options() -> argparse.ArgumentParser:
    """Which pseudonym key names DICOM and NIfTI files (data_utils.identity)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--key-file", type=Path, metavar="FILE",
                   help="the pseudonym key that names patients, series and slices in what "
                        f"ctscan writes (default: ${KEY_FILE_ENV}, else {default_key_file()}, "
                        "made on first use); a run can only be resumed or evaluated with the "
                        "key it was made with")
    return p


def _argument(parse: Callable[[str], object]) -> Callable[[str], object]:
    """An argparse type from a parser that raises ValueError with its own message."""
    def checked(text: str) -> object:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from e

    return checked


def _decode_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--image-size", type=image_size, default=TrainConfig.image_size,
                   help="decoded images are SIZE x SIZE grayscale (default: %(default)s)")
    p.add_argument("--resize", choices=RESIZE_MODES, default=TrainConfig.resize,
                   help="keep aspect ratio and pad with black, or stretch (default: "
                        "%(default)s)")
    return p


def _split_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--ratios", type=number(float, Interval(0, 1, high_closed=True)), nargs=3,
                   default=list(DEFAULT_RATIOS), metavar=("TRAIN", "VAL", "TEST"),
                   help=f"split fractions (default: {' '.join(map(str, DEFAULT_RATIOS))})")
    p.add_argument("--split-seed", type=seed, default=0, help="seed of the split (default: 0)")
    p.add_argument("--group-by", choices=GROUP_BY, default=DEFAULT_GROUP_BY,
                   help="keep related slices in one split: by every ID the data carry "
                        "(patient: DICOM PatientID, study and series, a NIfTI file, a "
                        "manifest's group column), by near-identity (duplicates), or only "
                        "byte-identical files (none); auto: IDs, and near-identity for slices "
                        "without one (default: %(default)s)")
    return p


def load_and_print_split(data: Path, image_size: int, resize: str, split_options: dict,
                         cache_dir: str | None = None, recorded: dict | None = None,
                         where: str = "the run",
                         decode: ShardRunner | None = None) -> tuple[CTDataset, Split]:
    ds, split = load_and_split(data, image_size, resize, split_options, cache_dir, recorded,
                               where, decode)
    print(describe_split(split, ds))
    return ds, split


def _cache_dir(args: argparse.Namespace) -> dict[str, Path]:
    """The cache folder by the name of where it came from, for the write guard's message."""
    if args.cache_dir:
        return {"--cache-dir": args.cache_dir}
    if os.environ.get("CTSCAN_CACHE_DIR"):
        return {"CTSCAN_CACHE_DIR": default_cache_dir()}
    return {"the cache folder": default_cache_dir()}


def _evaluation_options() -> argparse.ArgumentParser:
    """What evaluation may make of a search's best trials (chosen on val, before the test) and
    how it states its uncertainty."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--ensemble", type=positive_int, default=5, metavar="K",
                   help="weigh the best K trials' probabilities by ensemble selection "
                        "(Caruana's, minimising val log-loss) (default: 5; 1 = the best trial "
                        "alone)")
    p.add_argument("--calibrate", action="store_true",
                   help="fit a temperature on val so the probabilities match observed "
                        "frequencies; applied in the export (default: off)")
    p.add_argument("--patient-aggregate", choices=[*AGGREGATES, CHOOSE_AGGREGATE],
                   default="mean",
                   help="how a patient's (series', volume's) slice probabilities become one: "
                        "fixed in advance (mean, top25: the top quarter's mean, max), or "
                        "choose: the best on val by ROC AUC, reported beside what slice count "
                        "alone reaches (default: %(default)s)")
    p.add_argument("--bootstrap", type=number(int, Interval(MIN_BOOTSTRAP, math.inf)),
                   default=1000,
                   help="bootstrap resamples for the test metrics' confidence intervals, at "
                        f"least {MIN_BOOTSTRAP} (default: %(default)s)")
    return p


def _split_options_of(args: argparse.Namespace) -> dict:
    """How the data are read and split: what split.json and search.json record."""
    return {"ratios": args.ratios, "seed": args.split_seed, "group_by": args.group_by,
            "positive_class": args.positive_class, "window": list(args.window),
            "slices": args.slices}


def cmd_inspect(args: argparse.Namespace) -> int:
    from data_utils.doctor import format_report, inspect_dataset

    refuse_writes_inside([args.data], _cache_dir(args))
    ds = load_dataset(args.data, args.image_size, args.resize, args.cache_dir,
                      args.positive_class, window=args.window, slices=args.slices)
    report = inspect_dataset(ds)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_split(args: argparse.Namespace) -> int:
    refuse_writes_inside([args.data], {**_cache_dir(args), "--out": args.out})
    ds, split = load_and_print_split(args.data, args.image_size, args.resize,
                                     _split_options_of(args), args.cache_dir)
    write_split(split, ds, args.out / runfolder.SPLIT)
    print(f"wrote {args.out / runfolder.SPLIT}")
    return 0


def _demo_data(args: argparse.Namespace, command: str) -> None:
    """With --demo and no DATA, use (and if needed generate) the demo dataset."""
    if args.demo:
        args.data = args.data or DEMO_DATA
        if not args.data.exists():
            from data_utils.demo import make_demo_data

            make_demo_data(args.data)
            print(f"generated demo data in {args.data}")
    elif args.data is None:
        raise UsageError(f"{command} needs DATA (a folder or manifest), or --demo")


def _default_space(args: argparse.Namespace) -> Path:
    """The demo space with --demo, else the GPU or CPU space as the Ray cluster has GPUs."""
    from tuning.cluster import default_space, start_ray

    if args.demo:
        return DEMO_SPACE
    start_ray(args.address)
    space = default_space()
    if space == CPU_SPACE:
        print(f"no GPU in the Ray cluster: searching the CPU space {CPU_SPACE} (ResNet-18/34); "
              "give --search-space to choose another")
    return space


def _run_name(name: str) -> str:
    """A run name is one folder name: with a `/` or `..` the run folder would land elsewhere than
    under --storage-path, where nothing checked it."""
    if not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise UsageError(f"--name {name!r} must be a single folder name (no '/', not '.' or "
                         "'..'); choose where runs go with --storage-path")
    return name


def _search_options(args: argparse.Namespace) -> SearchOptions:
    demo = DEMO_SEARCH if args.demo else {}
    max_epochs = args.max_epochs or demo.get("max_epochs", SearchOptions.max_epochs)
    default_trials = DEFAULT_TRIALS_IN_BUDGET if args.time_budget else DEFAULT_TRIALS
    return SearchOptions(
        data=str(args.data.resolve()),
        num_samples=args.num_samples or demo.get("num_samples", default_trials),
        max_epochs=max_epochs, time_budget_s=args.time_budget,
        scheduler=args.scheduler, grace_period=args.grace_period,
        reduction_factor=args.reduction_factor,
        cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
        max_concurrent=args.max_concurrent, max_failures=args.max_failures,
        checkpoint_every=args.checkpoint_every,
        storage_path=runfolder.join(args.storage_path), seed=args.seed,
        search_space=str(args.search_space or _default_space(args)),
        base_config={"image_size": args.image_size or demo.get("image_size",
                                                                TrainConfig.image_size),
                     "weights": args.weights, "resize": args.resize, "epochs": max_epochs,
                     "seed": args.seed, "precision": args.precision},
        split=_split_options_of(args),
        **({"name": _run_name(args.name)} if args.name is not None else {}),
    )


def cmd_tune(args: argparse.Namespace) -> int:
    import ray  # ray takes seconds to import; only this command needs it

    from tuning.records import SearchFailed

    # A Ray the caller started (a notebook, a test session) is left running; one this command
    # started is shut down, also after an error, so a caller in the same process can start Ray
    # afresh.
    joined = ray.is_initialized()
    try:
        return _tune(args, joined)
    except SearchFailed as e:  # the input was fine; the search itself produced nothing
        print(f"ctscan: search failed: {e}", file=sys.stderr)
        return 1
    finally:
        if not joined:
            ray.shutdown()


def _tune(args: argparse.Namespace, joined: bool) -> int:
    import ray

    from ctmodels import check_weights
    from tuning.cluster import cache_location, check_shared_storage, decode_on_cluster, start_ray
    from tuning.records import load_options, prepare_run
    from tuning.search import run_search, search_started
    from tuning.train import trial_data

    if args.resume:
        if args.resume == "NAME" and not args.name:
            raise UsageError("--resume needs --name NAME (with --storage-path) or a RUN_DIR")
        run_dir = (args.resume if args.resume != "NAME"
                   else runfolder.join(args.storage_path, _run_name(args.name)))
        options = load_options(run_dir)
        check_shared_storage(args.address, options.storage_path)
        restore = search_started(options.run_dir)
        print(f"resuming search {options.name} from {options.run_dir}" if restore else
              f"search {options.name} in {options.run_dir} never started a trial: starting it")
        _warn_if_evaluated(options.run_dir)
    else:
        _demo_data(args, "tune")
        options = _search_options(args)
        check_shared_storage(args.address, options.storage_path)
        space = load_space(options.search_space, options.base_config)  # before any decoding
        # --weights, on this machine only: a cluster's workers may hold files this machine lacks.
        # A space's own weights values fail just their trials.
        if not args.address:
            config = options.trial_config({})
            check_weights(config.description(), config.weights,
                          space.values_of("arch", options.base_config))
        restore = False
        if runfolder.exists(runfolder.join(options.run_dir, runfolder.SEARCH)):
            if search_started(options.run_dir):
                raise RunFolderError(f"{options.run_dir} already holds a search; continue it "
                                     f"with --resume {options.run_dir}, or pick another --name")
            print(f"{options.run_dir} holds a search that never started a trial: starting this "
                  "one there instead")
    config = options.trial_config({})
    refuse_writes_inside([Path(options.data)], {**_cache_dir(args),
                                                "--storage-path": options.storage_path})
    # A resumed search goes on with the split it recorded (also one an older rule made).
    recorded = (runfolder.read_json(runfolder.join(options.run_dir, runfolder.SPLIT))
                if args.resume else None)
    # Ray first: the cluster's cores decode the dataset, each shard where it is decoded.
    start_ray(args.address)
    cache = cache_location(args.cache_dir, options.storage_path)
    ds, split = load_and_print_split(Path(options.data), config.image_size, config.resize,
                                     options.split, cache, recorded, options.run_dir,
                                     decode_on_cluster)
    prepare_run(options, ds, split, resume=bool(args.resume))
    data = trial_data(ds, split)  # rows and where the cache is: never the pixels
    budget = (f" or {options.time_budget_s:.0f} s, whichever ends first"
              if options.time_budget_s else "")
    from tuning.monitor import start_tensorboard, tensorboard_url

    print(f"search {options.name}: {options.num_samples} trials{budget}, up to "
          f"{options.max_epochs} epochs each, results in {options.run_dir}\n"
          f"watch it with: tensorboard --logdir {options.run_dir}\n"
          f"  and open {tensorboard_url()} (unsmoothed curves of the trials' runs)")
    if args.tensorboard:
        print(start_tensorboard(options.run_dir))
    best = run_search(options, data, resume=restore)
    if not joined:  # its memory and cores go to the evaluation
        ray.shutdown()
    print(f"best trial {best['trial_id']} (epoch {best['best_epoch']}): "
          f"val AUC {best['val_metrics']['val_auc']:.4f}, val accuracy "
          f"{best['val_metrics']['val_accuracy']:.3f}; {best['trials']} trials, "
          f"{best['trials_stopped_early']} stopped early, {best['errored_trials']} failed, "
          f"{best['trials_ended_by_budget']} still running when the time budget ended"
          f"{'; the time budget ended the search' if best['budget_reached'] else ''}\n"
          f"  config: {json.dumps(best['searched'])}\n"
          f"  checkpoint: {runfolder.in_run(options.run_dir, best['checkpoint'])}\n"
          f"  summary: {runfolder.join(options.run_dir, runfolder.BEST)}")
    from results.pipeline import report_run

    print_results(options.run_dir, report_run(options.run_dir, resamples=args.bootstrap,
                                              cache_dir=cache, ensemble=args.ensemble,
                                              calibrate=args.calibrate,
                                              aggregate=args.patient_aggregate))
    return 0


def _warn_if_evaluated(run_dir: str) -> None:
    """Resuming a search whose test split was scored changes the model after a look at the test
    figures: say so before it starts (its next evaluation records the change)."""
    from results.ledger import EVALUATIONS, read_ledger, scorings

    count = len(scorings(read_ledger(runfolder.join(run_dir, runfolder.RESULTS, EVALUATIONS))))
    if count:
        print(f"ctscan: warning: the test split of {run_dir} was scored {count} time"
              f"{'s' if count > 1 else ''}; resuming changes the model after that, and its next "
              "evaluation is recorded as one of a changed model: report the first",
              file=sys.stderr)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from results.pipeline import report_run
    from tuning.records import load_options

    refuse_writes_inside([Path(load_options(args.run_dir).data)], _cache_dir(args))
    out = report_run(args.run_dir, args.threshold, args.bootstrap, args.seed, args.cache_dir,
                     ensemble=args.ensemble, calibrate=args.calibrate,
                     aggregate=args.patient_aggregate)
    print_results(args.run_dir, out)
    return 0


def print_results(run_dir: str, out: Path) -> None:
    """The headline of results/metrics.json and where everything is."""
    metrics = json.loads((out / runfolder.METRICS).read_text(encoding="utf-8"))
    test, threshold = metrics["test"], metrics["threshold"]
    how = ("fixed by --threshold" if threshold["method"] == "fixed" else
           f"sensitivity {threshold['target']:g} on val, a target set by --threshold"
           if threshold["method"] == "sensitivity" else f"{threshold['method']}, chosen on val")
    print(f"test split: {test['n']} images never used for training or model selection; "
          f"threshold {threshold['value']:.3f} ({how})")
    _print_choice(metrics)
    _print_metrics(test["metrics"])
    _print_paired(metrics.get("compared"))
    if "patient" in metrics:  # the split's groups are patients (or volumes, studies...)
        from results.wording import SINGULAR

        patient = metrics["patient"]
        units = patient.get("unit", "patients")
        aggregate = ("fixed in advance" if patient.get("chosen_by") == "fixed"
                     else f"chosen on val {units}")
        print(f"per {SINGULAR[units]}: {patient['test']['n']} test {units}; "
              f"{patient['aggregate']} of their slices' probabilities ({aggregate}), threshold "
              f"{patient['threshold']['value']:.3f} ("
              + ("fixed by --threshold" if patient["threshold"]["method"] == "fixed"
                 else f"chosen on val {units}") + ")")
        counted = patient.get("slice_count_auc")
        if counted:
            print(f"  slice count alone reaches ROC AUC {counted['val']:.3f} on val {units}, "
                  f"{counted['test']:.3f} on test {units}: a choice of aggregate can reward it")
        if units != "patients":
            print(f"  note: {UNIT_CAVEATS[units]}")
        _print_metrics(patient["test"]["metrics"])
    if metrics.get("calibration_not_applied"):
        print(f"--calibrate: no temperature applied, since {metrics['calibration_not_applied']}")
    elif metrics.get("temperature_ci95"):
        low, high = metrics["temperature_ci95"]
        asked = metrics.get("evaluations", {}).get("options", {}).get("calibrate")
        whose = "--calibrate" if asked else "the ensemble's, as its members are calibrated"
        print(f"temperature {metrics['temperature']:.3g} ({whose}, fitted on val; 95% interval "
              f"over resamples of val: {low:.3g} to {high:.3g})")
    _print_earlier_evaluations(metrics.get("evaluations"))
    report, export = f"{runfolder.RESULTS}/{runfolder.REPORT}", runfolder.EXPORT
    page = f"{runfolder.RESULTS}/{runfolder.REPORT_HTML}"
    if runfolder.is_uri(run_dir):  # out is this machine's copy of the bucket's results/
        print(f"report: {runfolder.join(run_dir, report)} (copy: {out / runfolder.REPORT})\n"
              f"report.html: {runfolder.join(run_dir, page)} "
              f"(copy: {out / runfolder.REPORT_HTML})\n"
              f"exported model: {runfolder.join(run_dir, export)} (copy: {out.parent / export})")
    else:
        print(f"report: {out / runfolder.REPORT}\nreport.html: {out / runfolder.REPORT_HTML}\n"
              f"exported model: {out.parent / export}")
    from tuning.monitor import tensorboard_url

    print(f"tensorboard --logdir {run_dir}\n  and open {tensorboard_url()} (trials marked with "
          "their ensemble weight, status and epochs in HPARAMS)")


def _print_choice(metrics: dict) -> None:
    """Which model was exported, with its weights, and why (chosen on val)."""
    ensemble = metrics.get("ensemble")
    if not ensemble:  # evaluated by ctscan 0.1
        return
    members = ensemble["members"]
    if len(members) > 1:
        weights = ", ".join(f"{m['trial_id']} {m['weight']:.2f}" for m in members)
        print(f"exported: the weighted ensemble of {len(members)} trials ({weights})")
    else:
        print(f"exported: trial {members[0]['trial_id']} alone")
    if "why" in ensemble and ensemble["candidates"] > 1:
        print(f"  chosen on val: {ensemble['why']}")


def _print_paired(compared: dict | None) -> None:
    """The exported model minus the one it is compared with, on the same test resamples."""
    if not compared or "paired" not in compared:
        return
    # Runs evaluated before the role was recorded compared with the best trial or a mean.
    name = compared.get("role", "the best trial alone" if compared["k"] == 1
                        else f"the ensemble of {compared['k']} trials")
    paired = compared["paired"]
    differences = ", ".join(
        f"{key} {paired[key]['value']:+.3f} ({paired[key]['ci95'][0]:+.3f} to "
        f"{paired[key]['ci95'][1]:+.3f})" for key in ("roc_auc", "accuracy", "brier"))
    print(f"exported minus {name}, paired 95% CIs: {differences}")


def _print_earlier_evaluations(evaluations: dict | None) -> None:
    """One line when the test split was scored before; a warning when with other choices."""
    from results.ledger import describe_look, with_other_choices

    if not evaluations or evaluations["count"] == 1:
        return
    model = evaluations.get("model")
    other = with_other_choices(evaluations["earlier"], evaluations.get("options", {}), model)
    if not other:
        print(f"evaluation {evaluations['count']} of this test split, with the same choices "
              "and model as before (results/evaluations.jsonl)")
        return
    looks = "; ".join(describe_look(e, evaluations) for e in other)
    print(f"ctscan: warning: this test split was scored before with other choices or another "
          f"model ({looks}); report the first evaluation: a later one may keep what the test "
          "split favoured", file=sys.stderr)


def _print_metrics(metrics: dict) -> None:
    for name, m in metrics.items():
        print(f"  {name:<12} {m['value']:.3f}  (95% CI {m['ci95'][0]:.3f}-{m['ci95'][1]:.3f})")


def cmd_export(args: argparse.Namespace) -> int:
    from results.pipeline import export_run
    from tuning.records import load_options

    refuse_writes_inside([Path(load_options(args.run_dir).data)], {"--out": args.out})
    print(f"exported to {export_run(args.run_dir, args.out)}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """One line per image; exit code 1 if any image failed, else 0."""
    from results.model_folder import read_config
    from results.predict import predict_paths, write_predictions_csv

    if args.csv is not None and args.csv.is_dir():
        raise UsageError(f"--csv {args.csv} is a folder; give a file name such as "
                         f"{args.csv / 'predictions.csv'}")
    refuse_writes_inside(args.paths, {"--csv": args.csv})
    with runfolder.local_path(args.model_dir) as model_dir:
        rows = predict_paths(model_dir, args.paths, per_slice=args.per_slice,
                             show_paths=args.show_paths)
        config = read_config(model_dir)
    _note_test_look(config, args.paths, "predict")
    positive = config["class_names"][1]
    for r in rows:
        if r["error"] is None:
            series = "" if r["slices"] is None else f"\t{r['slices']} slices"
            print(f"{r['path']}\t{r['prob']:.4f}\t{r['label']}{series}")
        else:
            print(f"{r['path']}\tERROR\t{r['error']}")
    if args.csv is not None:
        write_predictions_csv(rows, args.csv, positive)
        print(f"wrote {args.csv}", file=sys.stderr)  # stdout stays one line per image
    return 1 if any(r["error"] is not None for r in rows) else 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Exit code 1 if any image could not be explained, as for predict."""
    from results.explain import explain_paths
    from results.model_folder import read_config

    with runfolder.local_path(args.model_dir) as model_dir:
        written, failed = explain_paths(model_dir, args.paths, args.out,
                                        show_paths=args.show_paths)
        config = read_config(model_dir)
    _note_test_look(config, args.paths, "explain")
    print(f"wrote {len(written)} Grad-CAM overlays to {args.out}")
    return 0 if written and not failed else 1


def _note_test_look(config: dict, paths: list[Path], kind: str) -> None:
    """A look at test-split files through the exported model goes on its ledger, with a notice."""
    from results.ledger import record_test_look
    from results.predict import expand_paths

    notice = record_test_look(config, expand_paths(paths), kind)
    if notice:
        print(notice, file=sys.stderr)


def cmd_locate(args: argparse.Namespace) -> int:
    """Exit code 1 if a name asked for is not among the files."""
    from data_utils.identity import file_pseudonym, load_key, pseudonym_of_name
    from data_utils.volumes import volume_kind
    from results.predict import expand_paths

    key = load_key()
    files = {file_pseudonym(p, key): p for p in expand_paths(args.paths)
             if volume_kind(p) is not None}
    if not args.names:
        for name, path in files.items():
            print(f"{name}\t{path}")
        return 0
    missing = 0
    for name in args.names:
        path = files.get(pseudonym_of_name(name) or "")
        missing += path is None
        print(f"{name}\t{path or 'not found under the paths given, or made with another key'}")
    return 1 if missing else 0


def cmd_train(args: argparse.Namespace) -> int:
    import torch

    from ctmodels import check_weights
    from tuning.monitor import tensorboard_reporter
    from tuning.train import check_device, train_trial, trial_data

    _demo_data(args, "train")
    precision = [f"precision={args.precision}"] if args.precision else []
    config = load_config(args.config,
                         [*(DEMO_CONFIG if args.demo else []), *args.overrides, *precision])
    check_device(config.device)
    check_weights(config.description(), config.weights)
    out = args.out or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")
    refuse_writes_inside([args.data], {**_cache_dir(args), "--out": out})
    saved_config = out / runfolder.CONFIG
    if saved_config.exists() and load_config(saved_config) != config:
        raise RunFolderError(f"{out} holds a run with a different config; pick another --out")
    recorded = runfolder.read_json(str(out / runfolder.SPLIT))
    ds, split = load_and_print_split(args.data, config.image_size, config.resize,
                                     _split_options_of(args), args.cache_dir, recorded, str(out))
    # A run resumed on another split would validate and test on former training images.
    changed = recorded and split_changes(recorded, split_record(split, ds))
    if changed:
        raise RunFolderError(f"{out} was trained on another split of the data ({changed}); "
                             "pick another --out, or restore the data and options it used")
    if recorded is None:  # a resumed run keeps the split.json it was trained on
        write_split(split, ds, out / runfolder.SPLIT)
    save_config(config, saved_config)
    data = trial_data(ds, split)
    del ds  # the test images are not needed, nor kept, while training
    report = tensorboard_reporter(out / runfolder.TENSORBOARD, config,
                                  torch.from_numpy(data.first_train_images(64)),
                                  torch.from_numpy(data.train_labels[:64]))
    print(f"training {config.arch} on {len(data.train_labels)} images, validating on "
          f"{len(data.val_labels)}; watch with: tensorboard --logdir {out}")

    def report_and_print(metrics: dict, history: list[dict], saved: list[str]) -> None:
        report(metrics, history, saved)
        print(f"epoch {metrics['epoch']:>3}  train loss {metrics['train_loss']:.4f}  "
              f"val loss {metrics['val_loss']:.4f}  val AUC {metrics['val_auc']:.4f}  "
              f"val acc {metrics['val_accuracy']:.3f}  {metrics['images_per_sec']:.0f} img/s")

    best = train_trial(config, data, out, report_and_print, progress=True)
    print(f"best epoch {best['epoch']}: val AUC {best['val_auc']:.4f}, val accuracy "
          f"{best['val_accuracy']:.3f}, val F1 {best['val_f1']:.3f}, val loss "
          f"{best['val_loss']:.4f}\ncheckpoint: {out / runfolder.BEST_CHECKPOINT}")
    return 0


def cmd_make_demo_data(args: argparse.Namespace) -> int:
    from data_utils.demo import make_demo_data

    out = make_demo_data(args.dir, args.n_per_class, args.size, args.seed, format=args.format)
    print(f"wrote {2 * args.n_per_class} demo CT slices to {out}"
          f"{'' if args.format == 'png' else f' as {args.format}'}")
    return 0


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one `ctscan: error: ...` line every other error is (its
    usage block stays with --help); the subcommands' parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        print(f"ctscan: error: {' '.join(message.split())} (see {self.prog} --help)",
              file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="ctscan", description="Find, prove and ship a CT-scan COVID-19 classifier.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    source, decode, splitting = _source_options(), _decode_options(), _split_options()
    keying = _key_options()
    evaluating = _evaluation_options()
    showing = argparse.ArgumentParser(add_help=False)
    showing.add_argument("--show-paths", action="store_true",
                         help="name DICOM and NIfTI files by their paths, which may hold "
                              "patient names or IDs (default: by stand-ins, as everywhere else)")

    p = commands.add_parser("inspect", parents=[source, decode, keying],
                            help="dataset doctor: counts, modes, sizes, unreadable files, "
                                 "duplicates and label shortcuts")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=cmd_inspect)

    p = commands.add_parser("split", parents=[source, decode, splitting, keying],
                            help="decode (cached) and write a leakage-free RUN/split.json")
    p.add_argument("--out", type=Path, required=True, help="run folder to write split.json into")
    p.set_defaults(func=cmd_split)

    p = commands.add_parser("train", parents=[_source_options(data_required=False), splitting,
                                              keying],
                            help="train one config without Ray: checkpoints, TensorBoard, metrics")
    p.add_argument("--config", type=Path, help="YAML file of training config keys")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set lr=3e-4 --set head=[256] "
                        "(repeatable; applied after --config)")
    p.add_argument("--out", type=Path, help="run folder (default: runs/train-TIMESTAMP); "
                   "rerunning with the same --out resumes from its last checkpoint")
    p.add_argument("--precision", choices=PRECISIONS,
                   help=f"as --set precision=..., applied last: {PRECISION_HELP} (default: "
                        "the config's, auto unless set)")
    p.add_argument("--demo", action="store_true",
                   help=f"train on generated demo data ({DEMO_DATA}, made if absent) with a "
                        "small CPU-friendly config")
    p.set_defaults(func=cmd_train)

    p = commands.add_parser(
        "tune", parents=[_source_options(data_required=False), splitting, evaluating, keying],
        help="search configs with Ray Tune (Optuna TPE + ASHA) on this machine or a Ray cluster")
    p.add_argument("--demo", action="store_true",
                   help=f"small CPU search on generated demo data ({DEMO_DATA}, made if absent): "
                        "resnet18/34 at 64 px, 8 trials of up to 6 epochs")
    p.add_argument("--search-space", type=Path,
                   help=f"YAML search space (default: {DEFAULT_SPACE.name} where Ray has GPUs, "
                        f"else {CPU_SPACE.name}; both in {DEFAULT_SPACE.parent}, documented "
                        "inside)")
    p.add_argument("--num-samples", type=positive_int,
                   help=f"number of trials; with --time-budget, at most this many (default: "
                        f"{DEFAULT_TRIALS}, {DEFAULT_TRIALS_IN_BUDGET} with a budget; demo 8)")
    p.add_argument("--time-budget", type=duration, metavar="DURATION",
                   help="stop the search after this long, e.g. 90s, 30m, 2h, then score and "
                        "export its best trial as usual (default: no limit)")
    p.add_argument("--max-epochs", type=positive_int,
                   help="epochs of a trial that is never stopped early (default: "
                        f"{SearchOptions.max_epochs}; demo 6)")
    p.add_argument("--scheduler", choices=("asha", "fifo"), default=SearchOptions.scheduler,
                   help="asha (default) stops weak trials early; fifo trains every trial fully")
    p.add_argument("--grace-period", type=positive_int, default=SearchOptions.grace_period,
                   help="epochs every trial gets before ASHA may stop it (default: %(default)s)")
    p.add_argument("--reduction-factor", type=number(int, Interval(2, math.inf)),
                   default=SearchOptions.reduction_factor,
                   help="ASHA keeps the top 1/FACTOR of trials at each rung (default: "
                        "%(default)s)")
    p.add_argument("--cpus-per-trial", type=number(float, Interval(0, math.inf, False)),
                   default=SearchOptions.cpus_per_trial,
                   help="CPUs reserved per trial; also its torch threads (default: %(default)g)")
    p.add_argument("--gpus-per-trial", type=number(float, Interval(0, math.inf)),
                   default=SearchOptions.gpus_per_trial,
                   help="GPUs per trial; fractions pack trials, 0.25 = 4 per GPU (default: "
                        "%(default)g)")
    p.add_argument("--max-concurrent", type=positive_int, default=SearchOptions.max_concurrent,
                   help="trials running at once, at most (default: %(default)s)")
    p.add_argument("--max-failures", type=number(int, Interval(0, math.inf)),
                   default=SearchOptions.max_failures,
                   help="retries of a crashed trial, from its last checkpoint (default: "
                        "%(default)s)")
    p.add_argument("--checkpoint-every", type=positive_int, metavar="N",
                   help="save a trial's resume state (weights and optimizer) every N epochs; a "
                        "crash repeats at most N-1 epochs. The best weights are saved whenever "
                        f"val AUC improves (default: {RESUME_EVERY_LOCAL} on this machine's disk, "
                        f"{RESUME_EVERY_REMOTE} in a bucket)")
    p.add_argument("--storage-path", default=SearchOptions.storage_path,
                   help="where runs live: a folder (default: runs/), or on a cluster of "
                        "several machines an s3:// or gs:// URI or a folder every node mounts "
                        "(checked with --address)")
    p.add_argument("--name", help="run name (default: tune-TIMESTAMP); the run folder is "
                   "STORAGE_PATH/NAME")
    p.add_argument("--seed", type=seed, default=SearchOptions.seed,
                   help="seed of TPE and of every trial (default: %(default)s)")
    p.add_argument("--address", help="join a running Ray cluster: 'auto' or ray://HOST:10001 "
                   "(default: start Ray on this machine)")
    p.add_argument("--resume", nargs="?", const="NAME", metavar="RUN_DIR",
                   help="continue an interrupted search: --resume RUN_DIR (a path or URI, from "
                        "any working directory), or --resume --name NAME [--storage-path ...]")
    p.add_argument("--image-size", type=image_size,
                   help=f"image size of every trial (default: {TrainConfig.image_size}; demo "
                        f"{DEMO_SEARCH['image_size']})")
    p.add_argument("--resize", choices=RESIZE_MODES, default=TrainConfig.resize,
                   help="pad or stretch (default: %(default)s)")
    p.add_argument("--weights", default=TrainConfig.weights,
                   help="initial weights of every trial: none, imagenet, or a path (default: "
                        "%(default)s)")
    p.add_argument("--precision", choices=PRECISIONS, default=TrainConfig.precision,
                   help=f"precision of every trial: {PRECISION_HELP} (default: %(default)s)")
    p.add_argument("--tensorboard", action="store_true",
                   help="also start TensorBoard on the run folder, on a free port, and print "
                        "its URL (it keeps running after the search)")
    p.set_defaults(func=cmd_tune)

    p = commands.add_parser("evaluate", parents=[evaluating, keying],
                            help="score a search's best trial (or top-k ensemble) once on the "
                                 "test split: metrics with 95%% CIs, plots, report, export")
    p.add_argument("run_dir", help="the search's run folder (STORAGE_PATH/NAME), a local path or "
                   "a URI like s3://BUCKET/runs/NAME; results/ and export/ are written into it")
    p.add_argument("--threshold", type=threshold_rule, metavar="T|sensitivity:S",
                   help="the decision threshold: a fixed T in (0, 1], or sensitivity:S, the "
                        "highest threshold reaching sensitivity S on val, a target set in "
                        "advance (default: maximise Youden's J on val)")
    p.add_argument("--seed", type=seed, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--cache-dir", metavar="FOLDER_OR_URI",
                   help="decoded-dataset cache, a folder or a bucket (default: as for tune; give "
                        "a cluster search's, e.g. s3://BUCKET/RUNS/ctscan-cache, to reuse it)")
    p.set_defaults(func=cmd_evaluate)

    p = commands.add_parser("export", help="write the evaluated winner: state_dict, TorchScript, "
                            "config.json/.yaml, model card")
    p.add_argument("run_dir", help="an evaluated search's run folder, local or a URI")
    p.add_argument("--out", type=Path, required=True, help="folder to export into")
    p.set_defaults(func=cmd_export)

    p = commands.add_parser("predict", parents=[keying, showing], help="probability of the "
                            "positive class per image, and per DICOM series or NIfTI volume")
    p.add_argument("model_dir", help="an exported model folder (RUN_DIR/export), local or in a "
                   "bucket (s3://..., gs://...)")
    p.add_argument("paths", type=Path, nargs="+",
                   help="images, DICOM files, NIfTI volumes, or folders of them")
    p.add_argument("--csv", type=Path, help="also write the predictions to this CSV file")
    p.add_argument("--per-slice", action="store_true",
                   help="after a DICOM series' or NIfTI volume's line, one line per slice "
                        "(default: the series' aggregate only)")
    p.set_defaults(func=cmd_predict)

    p = commands.add_parser("explain", parents=[keying, showing], help="Grad-CAM heatmaps over "
                            "the slices (where the model looked)")
    p.add_argument("model_dir", help="an exported model folder (RUN_DIR/export), local or in a "
                   "bucket (s3://..., gs://...)")
    p.add_argument("paths", type=Path, nargs="+", help="images or folders of images")
    p.add_argument("--out", type=Path, required=True, help="folder for the overlay PNGs")
    p.set_defaults(func=cmd_explain)

    p = commands.add_parser("locate", parents=[keying], help="which file a stand-in name "
                            "(slice-..., volume-..., file-...) that ctscan wrote stands for; "
                            "only on a machine holding the pseudonym key")
    p.add_argument("paths", type=Path, nargs="+",
                   help="the data folder(s) or files the names were written for")
    p.add_argument("--name", dest="names", action="append", metavar="NAME",
                   help="a name to look up: a path from split.json, a report or predict's "
                        "output, or its last part; repeatable (default: list every DICOM and "
                        "NIfTI file with its name)")
    p.set_defaults(func=cmd_locate)

    p = commands.add_parser("make-demo-data", help="generate CT-like demo patients (Kaggle "
                            "layout: PNG, DICOM or NIfTI)")
    p.add_argument("dir", type=Path, help="new folder to create")
    p.add_argument("--n-per-class", type=positive_int, default=300,
                   help="slices per class (default: 300)")
    p.add_argument("--size", type=number(int, Interval(32, 4096, high_closed=True)), default=256,
                   help="largest slice side in px (default: 256)")
    p.add_argument("--seed", type=seed, default=0, help="generator seed (default: 0)")
    p.add_argument("--format", choices=("png", "dicom", "nifti"), default="png",
                   help="PNG slices with a manifest.csv, one DICOM CT series per patient "
                        "(int16 HU, real UIDs), or one NIfTI volume per patient "
                        "(default: %(default)s)")
    p.set_defaults(func=cmd_make_demo_data)
    return parser


def _window_values_joined(argv: list[str]) -> list[str]:
    """`--window -600,1500` as `--window=-600,1500`: argparse takes a value that starts with
    "-" and is not a plain number for an option."""
    out: list[str] = []
    for arg in argv:
        if out and out[-1] == "--window" and arg.startswith("-"):
            out[-1] = f"--window={arg}"
        else:
            out.append(arg)
    return out


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_window_values_joined(sys.argv[1:] if argv is None
                                                           else argv))
    try:
        try:
            if getattr(args, "key_file", None):
                use_key_file(args.key_file)
            return args.func(args)
        except Exception as e:
            # Ctrl-C inside a library's cleanup (torch.save closing its zip writer) surfaces as
            # the error that cleanup raised next; the interruption is what happened.
            if isinstance(e.__context__, KeyboardInterrupt):
                raise e.__context__ from None
            raise
    except UserError as e:
        # One line, whatever a quoted library message held: scripts read the last line.
        print(f"ctscan: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except OSError as e:  # a path given or implied: missing, a file not a folder, not writable...
        where = f"{e.filename}: " if e.filename else ""
        print(f"ctscan: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Checkpoints and run files are written whole, so what was running can be resumed.
        print("ctscan: interrupted", file=sys.stderr)
        return 130

