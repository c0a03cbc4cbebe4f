"""results/evaluations.jsonl: one line for every time a run's test split was scored.

The first evaluation is the one to report. A later one run with other choice options (another
ensemble size, calibration or threshold) could keep whichever the test split favoured, and its
test figures would no longer be an unbiased estimate; the ledger keeps every look on record so
that the report, and anyone reading the run folder, can tell.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from data_utils import runfolder
from data_utils.files import atomic_write
from results.export import package_versions

EVALUATIONS = "evaluations.jsonl"  # in results/
# Options that change what is scored.
CHOICE_OPTIONS = ("ensemble", "calibrate", "threshold", "patient_aggregate")


def read_ledger(run_dir: str) -> list[dict]:
    """The run's earlier evaluations, oldest first; none for a run never evaluated. A line that
    is not such a record stops here, in one line naming the file: read before the test split
    is, so a damaged ledger never lets an evaluation go uncounted."""
    location = runfolder.join(run_dir, runfolder.RESULTS, EVALUATIONS)
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


def ledger_entry(metrics: dict, options: dict) -> dict:
    """This evaluation's line: when, with which options and ctscan, the members scored (trial id:
    weight) and the headline test metrics."""
    return {
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "ctscan": package_versions()["ctscan"],
        "options": options,
        "members": {m["trial_id"]: m.get("weight", 1.0) for m in metrics["ensemble"]["members"]},
        "test": {name: m["value"] for name, m in metrics["test"]["metrics"].items()},
    }


def with_other_choices(earlier: list[dict], options: dict) -> list[dict]:
    """The earlier evaluations whose choice options differ from `options`."""
    return [e for e in earlier
            if any(e["options"].get(k) != options.get(k) for k in CHOICE_OPTIONS)]


def write_ledger(path: Path, entries: list[dict]) -> None:
    with atomic_write(path, "w") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in entries)


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
