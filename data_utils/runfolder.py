"""The run folder: where a search keeps everything, on this disk, a shared path or in a bucket.

A run folder is a local path or any URI pyarrow opens (s3://, gs://, hdfs://...), the same
storage Ray Tune writes trials to. Every command reads and writes runs through this module, so
no other code needs to know which kind it was given. Files are written whole: a reader sees the
old file or the new one, never half of one.

    search.json         the search's options (data, budget, storage...): enough to resume
    search_space.yaml   the space searched, copied in at the start: a resume needs no other file
    split.json          every file's split and sha256; the test rows are scored once, at the end
    trial_*/            Ray Tune's trials: results, checkpoints, TensorBoard events, errors
    best.json           the best trial, its config and the checkpoint it names (run-relative)
    trials.json         every trial's params, status, error and per-epoch history
    results/            metrics.json, plots, report.md, test predictions (`ctscan evaluate`)
    export/             the winner, ready to ship (`ctscan export` writes the same elsewhere)

`ctscan train` writes a run folder of its own: split.json, config.yaml, best.pt (the weights of
the best epoch), last.pt (the resume state, rewritten every epoch) and tensorboard/.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.fs

from data_utils.errors import UsageError, UserError, first_line
from data_utils.files import atomic_write

SEARCH = "search.json"
SPACE = "search_space.yaml"
SPLIT = "split.json"
BEST = "best.json"
TRIALS = "trials.json"
TRIAL_ERROR = "error.txt"  # Ray's, in the folder of a trial that failed
RESULTS = "results"
METRICS = "metrics.json"  # in results/, as are the next three
REPORT = "report.md"
REPORT_HTML = "report.html"  # report.md as one self-contained page, figures inside
TEST_PREDICTIONS = "test_predictions.json"
EXPORT = "export"
CONFIG = "config.yaml"
# A training run's two files, also in a trial's checkpoints: the best epoch's weights (with the
# description, config, metrics and history: all that evaluate and export read), and the resume
# state (current weights, optimizer, scheduler, RNG), which only training reads.
BEST_CHECKPOINT = "best.pt"
LAST_CHECKPOINT = "last.pt"
HISTORY = "history.json"  # in a trial's checkpoint: every epoch's metrics up to it
TENSORBOARD = "tensorboard"
LOCAL_RUNS = Path("runs")  # where a bucket run's results are also kept, to read on this machine


def is_uri(location: str | Path) -> bool:
    return "://" in str(location)


def join(location: str | Path, *parts: str) -> str:
    """A path or URI inside `location`; local paths come back absolute, so they mean the same
    thing from any working directory."""
    if is_uri(location):
        return "/".join([str(location).rstrip("/"), *parts])
    return str(Path(location).expanduser().resolve().joinpath(*parts))


def name_of(location: str | Path) -> str:
    """The last part of a path or URI: a run's name."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent_of(location: str | Path) -> str:
    """The folder holding `location`: a run's storage path."""
    if is_uri(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).expanduser().resolve().parent)


def recorded(run_dir: str, *parts: str) -> str:
    """How run files (best.json, trials.json, metrics.json) name a file of their own run:
    relative to the run folder, so a copied or moved folder still finds its own; in a bucket,
    the full URI."""
    return join(run_dir, *parts) if is_uri(run_dir) else "/".join(parts)


def in_run(run_dir: str | Path, name: str) -> str:
    """The location of a file a run file names: a relative name lies in run_dir; a URI or an
    absolute path (as ctscan 0.2 recorded them) stays as it is."""
    return name if is_uri(name) or Path(name).is_absolute() else join(run_dir, name)


class StorageError(UserError):
    """A run location that cannot be opened, or a run file that is not what ctscan wrote."""


@contextmanager
def _naming(location: str | Path) -> Iterator[None]:
    """A bucket's errors (no credentials, unknown host, no such bucket) name no path; the user
    needs to know which location failed."""
    try:
        yield
    except OSError as e:
        if e.filename or not is_uri(location):
            raise
        raise StorageError(f"{location}: {first_line(e)}") from e


def _fs(location: str | Path) -> tuple[pyarrow.fs.FileSystem, str]:
    try:
        with _naming(location):
            return pyarrow.fs.FileSystem.from_uri(join(location))
    except pyarrow.ArrowInvalid as e:
        raise StorageError(f"{location}: not a folder or a storage URI (s3://, gs://, "
                           f"hdfs://...) that pyarrow opens ({first_line(e)})") from e


def exists(location: str | Path) -> bool:
    fs, path = _fs(location)
    with _naming(location):
        return fs.get_file_info(path).type != pyarrow.fs.FileType.NotFound


def read_bytes(location: str | Path) -> bytes | None:
    """The file's bytes, or None if there is no such file."""
    fs, path = _fs(location)
    with _naming(location):
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            return None
        with fs.open_input_stream(path) as f:
            return f.read()


def read_text(location: str | Path) -> str | None:
    data = read_bytes(location)
    try:
        return None if data is None else data.decode()
    except UnicodeDecodeError as e:
        raise StorageError(f"{location}: not UTF-8 text (byte {e.start})") from e


def read_json(location: str | Path) -> Any:
    """A JSON file's content, or None if there is no such file."""
    text = read_text(location)
    return None if text is None else parse_json(text, location)


def parse_json(text: str, location: str | Path) -> Any:
    """The content of the JSON file at `location`; an error names it."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise StorageError(f"{location}: not valid JSON (line {e.lineno}, column {e.colno}: "
                           f"{e.msg}); was it edited or cut short?") from e


@contextmanager
def output_stream(location: str | Path) -> Iterator[Any]:
    """A binary file to write `location` through, published whole when the block ends: a local
    file by atomic_write, an object as its upload completes (a crash leaves the old one)."""
    if not is_uri(location):
        with atomic_write(Path(location)) as f:
            yield f
        return
    fs, path = _fs(location)
    with _naming(location):
        fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with fs.open_output_stream(path) as f:
            yield f


@contextmanager
def input_stream(location: str | Path) -> Iterator[Any]:
    """A binary file to read `location` from; FileNotFoundError names it if it is missing."""
    if not is_uri(location):
        with open(location, "rb") as f:
            yield f
        return
    fs, path = _fs(location)
    with _naming(location):
        if fs.get_file_info(path).type != pyarrow.fs.FileType.File:
            raise FileNotFoundError(f"{location}: not found")
        with fs.open_input_stream(path) as f:
            yield f


def write_bytes(location: str | Path, data: bytes | memoryview) -> None:
    with output_stream(location) as f:
        f.write(data)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode())


def write_json(location: str | Path, obj: Any) -> None:
    write_text(location, json.dumps(obj, indent=2) + "\n")


def upload(folder: Path, location: str) -> None:
    """Copy a local folder's files into `location` (a URI), replacing what is there."""
    fs, path = _fs(location)
    if fs.get_file_info(path).type == pyarrow.fs.FileType.Directory:
        fs.delete_dir_contents(path)  # files from an earlier evaluation would be stale
    fs.create_dir(path, recursive=True)
    pyarrow.fs.copy_files(str(folder), path, destination_filesystem=fs)


def local_copy_dir(run: str) -> Path:
    """Where a run's results and export are written on this machine: inside a local run, or
    under ./runs/NAME for a run in a bucket (and then uploaded there)."""
    return LOCAL_RUNS / name_of(run) if is_uri(run) else Path(run)


def publish(folder: Path, run: str, name: str) -> None:
    """Make run/name hold `folder`; a no-op for a local run, which wrote it in place."""
    if is_uri(run):
        upload(folder, join(run, name))


@contextmanager
def local_path(location: str | Path) -> Iterator[Path]:
    """A local path to read `location` (file or folder) from: itself, or a temporary download."""
    if not is_uri(location):
        yield Path(location)
        return
    fs, path = _fs(location)
    kind = fs.get_file_info(path).type
    if kind == pyarrow.fs.FileType.NotFound:
        raise FileNotFoundError(f"{location}: not found")
    with tempfile.TemporaryDirectory(prefix="ctscan-") as tmp:
        local = Path(tmp) / name_of(location)
        if kind == pyarrow.fs.FileType.Directory:
            local.mkdir()  # copy_files makes the folders below, not this one
        # copy_files downloads in large parallel parts; small reads would be one request each.
        pyarrow.fs.copy_files(path, str(local), source_filesystem=fs)
        yield local


def require_keys(content: Any, keys: tuple[str, ...], location: str) -> dict:
    """A run file's content, which must be a mapping holding `keys`: a hand-edited or foreign
    file is named with the first key it lacks, not met by a KeyError later."""
    if not isinstance(content, dict):
        raise StorageError(f"{location}: not a ctscan run file (expected a JSON object)")
    missing = [k for k in keys if k not in content]
    if missing:
        raise StorageError(f"{location}: not a ctscan run file (no key {missing[0]!r})")
    return content


def refuse_writes_inside(inputs: list[Path], outputs: dict[str, str | Path | None]) -> None:
    """The one guard of every write: nothing is written inside a data folder (a rerun would read
    it as data, and the folder may be shared or read-only) nor onto an input file. `inputs` are
    the command's data folders, manifests and image files; `outputs` maps each option (or
    environment variable) to the path it writes to. Paths are compared resolved, `..` and
    symlinks included; a class folder that links elsewhere makes that folder data too."""
    folders, files = set(), set()
    for given in map(Path, inputs):
        if given.is_dir():
            folders.add(given.resolve())
            folders.update(sub.resolve() for sub in given.iterdir() if sub.is_dir())
        elif given.exists():  # a manifest's or an image's folder may hold anything else
            files.add(given.resolve())
    for option, path in outputs.items():
        if path is None or is_uri(path):
            continue
        target = Path(path).expanduser().resolve()
        if target in files:
            raise UsageError(f"{option} {path} is one of the command's input files; ctscan never "
                             "writes over its inputs, choose another path")
        for folder in sorted(folders):
            if target.is_relative_to(folder):
                raise UsageError(f"{option} {path} lies inside the data folder {folder}; ctscan "
                                 "never writes there, choose a folder outside it")
