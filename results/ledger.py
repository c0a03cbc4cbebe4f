"""results/evaluations.jsonl: one line for every time a test split was scored.

The first evaluation is the one to report. A later one run with other choice options (another
ensemble size, calibration or threshold) could keep whichever the test split favoured, and its
test figures would no longer be an unbiased estimate; the ledger keeps every look on record so
that the report, and anyone reading the run folder, can tell.

The ledger belongs to the test split, not to the run: it is kept in the cache location under
the split's fingerprint (its test slices by content), and the run's results/ mirrors it. So a
new search on the same test split, a copied run, or a run whose results/ was deleted continues
the count rather than starting a fresh one.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

from data_utils import runfolder
from data_utils.cache import default_cache_dir
from data_utils.split import slice_key
from results.export import package_versions

EVALUATIONS = "evaluations.jsonl"  # in results/
TEST_LEDGERS = "test-ledgers"  # in the cache location: one ledger per test split
# Options that change what is scored.
CHOICE_OPTIONS = ("ensemble", "calibrate", "threshold", "patient_aggregate")


def test_split_ledger(split_json: dict, cache_dir: str | Path | None) -> str:
    """Where the ledger of split.json's test split is: in the cache location (a folder or a
    bucket), named by the sha256 of its test slices' content keys, sorted, so that paths,
    order and the run do not matter."""
    keys = sorted(f"{sha256}:{frame}" for sha256, frame in
                  (slice_key(e) for e in split_json["files"] if e["split"] == "test"))
    fingerprint = hashlib.sha256("\n".join(keys).encode()).hexdigest()[:20]
    location = str(cache_dir) if cache_dir else str(default_cache_dir())
    return runfolder.join(location, TEST_LEDGERS, f"{fingerprint}.jsonl")


def earlier_evaluations(run_dir: str, split_ledger: str | None) -> list[dict]:
    """Every earlier look at this run's test split, oldest first: the run's own ledger and the
    test split's (when known), each evaluation once."""
    seen, entries = set(), []
    for entry in [*read_ledger(runfolder.join(run_dir, runfolder.RESULTS, EVALUATIONS)),
                  *(read_ledger(split_ledger) if split_ledger else [])]:
        key = (entry["time"], entry.get("run"), json.dumps(entry["options"], sort_keys=True))
        if key not in seen:
            seen.add(key)
            entries.append(entry)
    return sorted(entries, key=lambda e: e["time"])


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


def ledger_entry(metrics: dict, options: dict, run: str) -> dict:
    """This evaluation's line: when, which run (its name), with which options and ctscan, the
    members scored (trial id: weight) and the headline test metrics."""
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "run": run,
        "ctscan": package_versions()["ctscan"],
        "options": options,
        "members": {m["trial_id"]: m.get("weight", 1.0) for m in metrics["ensemble"]["members"]},
        "test": {name: m["value"] for name, m in metrics["test"]["metrics"].items()},
    }


def with_other_choices(earlier: list[dict], options: dict) -> list[dict]:
    """The earlier evaluations whose choice options differ from `options`."""
    return [e for e in earlier
            if any(e["options"].get(k) != options.get(k) for k in CHOICE_OPTIONS)]


def write_ledger(location: str | Path, entries: list[dict]) -> None:
    """The whole ledger, written at once (atomically in a folder, as one upload to a bucket)."""
    runfolder.write_text(location, "".join(json.dumps(entry) + "\n" for entry in entries))


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
