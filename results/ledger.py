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
CHOICE_OPTIONS = ("ensemble", "calibrate", "threshold")  # options that change what is scored


def read_ledger(run_dir: str) -> list[dict]:
    """The run's earlier evaluations, oldest first; none for a run never evaluated."""
    location = runfolder.join(run_dir, runfolder.RESULTS, EVALUATIONS)
    text = runfolder.read_text(location) or ""
    return [runfolder.parse_json(line, location) for line in text.splitlines() if line.strip()]


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
        flags.append(f"--threshold {options['threshold']:g}")
    return " ".join(flags)
