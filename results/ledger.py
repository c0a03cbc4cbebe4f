"""results/evaluations.jsonl: one line for every time a test split was scored.

The first evaluation is the one to report. A later one run with other choice options (another
ensemble size, calibration or threshold), or on a model that changed since (a search resumed
after it was evaluated), could keep whichever the test split favoured, and its test figures
would no longer be an unbiased estimate; the ledger keeps every look on record so that the
report, and anyone reading the run folder, can tell.

The ledger belongs to the test split, not to the run: it is kept in the cache location under
the split's fingerprint (its test slices by content), and the run's results/ mirrors it. So a
new search on the same test split, a copied run, or a run whose results/ was deleted continues
the count rather than starting a fresh one. An evaluation's line is written before the test
split is read and completed after it is scored, so an evaluation that stops half-way still
counts. `ctscan predict` and `ctscan explain` on files of an evaluated test split add a line
of their own (kind "predict" or "explain"): a look at test images, though not a scoring.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime, timezone
from pathlib import Path

from data_utils import runfolder
from data_utils.cache import default_cache_dir
from data_utils.split import slice_key
from results.model_folder import package_versions

EVALUATIONS = "evaluations.jsonl"  # in results/
TEST_LEDGERS = "test-ledgers"  # in the cache location: one ledger per test split
# Options that change what is scored.
CHOICE_OPTIONS = ("ensemble", "calibrate", "threshold", "patient_aggregate")
EVALUATE = "evaluate"  # an entry's kind; entries before 0.4 have none and are all evaluations


def test_split_fingerprint(split_json: dict) -> str:
    """The sha256 of split.json's test slices' content keys, sorted, so that paths, order and
    the run do not matter."""
    keys = sorted(f"{sha256}:{frame}" for sha256, frame in
                  (slice_key(e) for e in split_json["files"] if e["split"] == "test"))
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]


def test_split_ledgers(split_json: dict, cache_dir: str | Path | None) -> list[str]:
    """Where the ledger of split.json's test split is kept, named by its fingerprint: in the
    cache location (a folder or a bucket), and also in this machine's default one, so that an
    evaluation with another --cache-dir still finds the looks made here."""
    name = f"{test_split_fingerprint(split_json)}.jsonl"
    locations = [str(cache_dir) if cache_dir else "", str(default_cache_dir())]
    return [runfolder.join(location, TEST_LEDGERS, name)
            for location in dict.fromkeys(filter(None, locations))]


def test_split_record(split_json: dict, ledger: str, run: str) -> dict:
    """What an export keeps of its test split, so that predict and explain can tell its files:
    the fingerprint, the sha256 of each test file (content hashes, which name no patient), the
    ledger evaluation wrote and the run's name."""
    return {"fingerprint": test_split_fingerprint(split_json), "ledger": ledger, "run": run,
            "sha256": sorted({e["sha256"] for e in split_json["files"] if e["split"] == "test"})}


def earlier_evaluations(run_dir: str, split_ledgers: list[str]) -> list[dict]:
    """Every earlier look at this run's test split, oldest first: the run's own ledger and the
    test split's, each look once (its completed line over its opening one)."""
    looks: dict[tuple, dict] = {}
    run_ledger = runfolder.join(run_dir, runfolder.RESULTS, EVALUATIONS)
    for entry in [entry for location in [run_ledger, *split_ledgers]
                  for entry in read_ledger(location)]:
        key = entry.get("id") or (entry["time"], entry.get("run"),
                                  json.dumps(entry["options"], sort_keys=True))
        if key not in looks or entry.get("test") is not None:
            looks[key] = entry
    return sorted(looks.values(), key=lambda e: e["time"])


def scorings(entries: list[dict]) -> list[dict]:
    """The entries that scored the test split (not predict's or explain's looks)."""
    return [e for e in entries if e.get("kind", EVALUATE) == EVALUATE]


def read_ledger(location: str) -> list[dict]:
    """The evaluations a ledger file lists, oldest first; none when there is no file. A line
    that is not such a record stops here, in one line naming the file: read before the test
    split is, so a damaged ledger never lets an evaluation go uncounted."""
    text = runfolder.read_text(location) or ""
    entries = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        entry = runfolder.parse_json(line, location)
        if not isinstance(entry, dict) or not {"time", "options"} <= set(entry):
            raise runfolder.StorageError(
                f"{location}: line {number} is not a record of an evaluation (time, options); "
                "was it edited or cut short? It counts every look at the test split: restore "
                "it before evaluating again")
        entries.append(entry)
    return entries


def model_state(run_dir: str) -> str:
    """A fingerprint of the checkpoints a run's evaluation can choose from (best.json's and
    every trial's in trials.json): a resumed search that trained on, or added trials, changes
    it, so an evaluation after that is told apart from one of the same model."""
    best = runfolder.read_json(runfolder.join(run_dir, runfolder.BEST)) or {}
    trials = runfolder.read_json(runfolder.join(run_dir, runfolder.TRIALS)) or []
    checkpoints = sorted({(best.get("trial_id"), best.get("checkpoint")),
                          *((t["trial_id"], t.get("checkpoint")) for t in trials)},
                         key=str)
    return hashlib.sha256(json.dumps(checkpoints).encode()).hexdigest()[:16]


def opening_entry(options: dict, run: str, model: str) -> dict:
    """An evaluation's line as written before the test split is read: when, which run (its
    name), with which options, ctscan and model (`model_state`); "test" stays null until
    `completed_entry` fills it, so a line left so is an evaluation that stopped half-way."""
    return {"id": uuid.uuid4().hex[:16], "run": run,
            "time": datetime.now(timezone.utc).isoformat(timespec="seconds"), "kind": EVALUATE,
            "ctscan": package_versions()["ctscan"], "options": options,
            "model": model, "members": None, "test": None}


def completed_entry(opening: dict, metrics: dict) -> dict:
    """The opening line with the members scored (trial id: weight) and the headline test
    metrics."""
    return {**opening,
            "members": {m["trial_id"]: m.get("weight", 1.0)
                        for m in metrics["ensemble"]["members"]},
            "test": {name: m["value"] for name, m in metrics["test"]["metrics"].items()}}


def record(ledgers: list[str | Path], entries: list[dict]) -> None:
    """Write the whole ledger to each location (the test split's and the run's mirror):
    atomically in a folder, as one upload to a bucket."""
    text = "".join(json.dumps(entry) + "\n" for entry in entries)
    for location in ledgers:
        runfolder.write_text(location, text)


def with_other_choices(earlier: list[dict], options: dict, model: str | None = None
                       ) -> list[dict]:
    """The earlier evaluations whose choice options differ from `options`, or whose model
    (`model_state`) differs from `model`: each could have been chosen for its test figures."""
    return [e for e in scorings(earlier)
            if any(e["options"].get(k) != options.get(k) for k in CHOICE_OPTIONS)
            or changed_model(e, model)]


def changed_model(entry: dict, model: str | None) -> bool:
    """Whether an earlier evaluation scored another model than `model` (unknown before 0.4)."""
    return bool(model and entry.get("model") and entry["model"] != model)


def describe_options(options: dict) -> str:
    """The choice options as the flags that set them: --ensemble 5 --calibrate --threshold 0.5."""
    flags = [f"--ensemble {options.get('ensemble')}"]
    if options.get("calibrate"):
        flags.append("--calibrate")
    if options.get("threshold") is not None:
        threshold = options["threshold"]
        flags.append(f"--threshold {threshold:g}" if isinstance(threshold, (int, float))
                     else f"--threshold {threshold}")
    if options.get("patient_aggregate", "mean") != "mean":
        flags.append(f"--patient-aggregate {options['patient_aggregate']}")
    return " ".join(flags)


def describe_look(entry: dict, evaluation: dict | None = None) -> str:
    """An earlier look in a few words: when, with which flags, and what set it apart from
    `evaluation` (metrics.json's "evaluations": this one's run and model)."""
    kind = entry.get("kind", EVALUATE)
    if kind != EVALUATE:
        return f"{entry['time']} `ctscan {kind}` on {entry.get('files', '?')} of its files"
    evaluation = evaluation or {}
    other_run = entry.get("run") and evaluation.get("run") and entry["run"] != evaluation["run"]
    notes = [note for note, applies in (
        (f"in another run, {entry.get('run')}, on the same test split", other_run),
        ("a model that has changed since: the search was resumed or its checkpoints replaced",
         not other_run and changed_model(entry, evaluation.get("model"))),
        ("stopped before it finished scoring", entry.get("test") is None and "model" in entry))
        if applies]
    return (f"{entry['time']} with `{describe_options(entry['options'])}`"
            + (f" ({'; '.join(notes)})" if notes else ""))


def record_test_look(config: dict, files: list[Path], kind: str) -> str | None:
    """For `ctscan predict` or `explain` with an exported model: if any of `files` is in the
    test split the model was scored on (config.json's test_split), add a line of `kind` to
    that split's ledger and return a one-line notice; else None. The ledger is the one
    evaluation wrote, or, where that cannot be written here (a model copied to another machine),
    the one in this machine's cache location."""
    split = config.get("test_split")
    if not split:  # exported before 0.4
        return None
    test_files = set(split["sha256"])
    hits = sum(hashlib.sha256(path.read_bytes()).hexdigest() in test_files
               for path in files if path.is_file())
    if not hits:
        return None
    entry = {"id": uuid.uuid4().hex[:16],
             "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "run": split.get("run"), "kind": kind, "ctscan": package_versions()["ctscan"],
             "options": {}, "files": hits}
    here = runfolder.join(str(default_cache_dir()), TEST_LEDGERS,
                          f"{split['fingerprint']}.jsonl")
    for ledger in dict.fromkeys([split["ledger"], here]):
        try:
            entries = read_ledger(ledger)
            record([ledger], [*entries, entry])
        except (OSError, runfolder.StorageError):
            continue
        scored = len(scorings(entries))
        return (f"ctscan: notice: {hits} of these files are in the test split this model was "
                f"scored on ({scored} time{'s' if scored != 1 else ''}); this look is recorded "
                f"in {ledger}")
    return (f"ctscan: notice: {hits} of these files are in the test split this model was scored "
            "on; this look could not be recorded (no ledger could be written)")
