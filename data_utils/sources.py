"""Find the labelled image files of a dataset: a folder of class folders, or a CSV manifest."""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path

from data_utils.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
POSITIVE_HINTS = ("covid", "positive")
NEGATIONS = {"no", "non", "not", "neg", "negative", "without"}


class DataError(UserError):
    """A dataset the user has to fix (missing folder, one class, bad manifest...)."""


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute
    rel: str  # relative to the dataset root, as written to split.json and reports
    class_name: str
    group: str | None = None  # patient id from a manifest's group column


@dataclass(frozen=True)
class Source:
    root: Path
    samples: list[Sample]
    class_names: tuple[str, str]  # (negative, positive): label 1 means class_names[1]

    @property
    def positive_class(self) -> str:
        return self.class_names[1]

    def label(self, sample: Sample) -> int:
        return self.class_names.index(sample.class_name)


def discover(data: Path, positive_class: str | None = None) -> Source:
    """Read a class-folder tree (Kaggle layout: COVID/, non-COVID/) or a path,label[,group] CSV."""
    data = Path(data).expanduser()
    if not data.exists():
        raise DataError(f"{data}: no such file or folder")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise DataError(f"{data}: expected a folder of class folders or a .csv manifest")
        root, samples = data.parent.resolve(), _read_manifest(data)
    else:
        root, samples = data.resolve(), _read_class_folders(data)
    where = str(data)
    names = sorted({s.class_name for s in samples})
    if len(names) < 2:
        found = f"only class {names[0]!r}" if names else "no images"
        raise DataError(f"{where}: found {found}; a binary classifier needs exactly two classes")
    if len(names) > 2:
        raise DataError(f"{where}: found {len(names)} classes {names}; ctscan needs exactly two")
    return Source(root, samples, _order_classes(names, positive_class, where))


def image_files(folder: Path) -> list[Path]:
    """Image files under folder, recursively and sorted; hidden files are left out.

    Broken symlinks are kept, so that reading them fails and they are reported, not lost.
    """
    return sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink())
                  and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def _read_class_folders(root: Path) -> list[Sample]:
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class folders (expected e.g. {root}/COVID, {root}/non-COVID)")
    samples = []
    for class_dir in class_dirs:
        files = image_files(class_dir)
        if not files:
            raise DataError(f"{class_dir}: class folder holds no image files")
        # absolute(), not resolve(): a broken or looping symlink must stay itself to be reported
        samples += [
            Sample(p.absolute(), p.relative_to(root).as_posix(), class_dir.name) for p in files
        ]
    return samples


def _read_manifest(manifest: Path) -> list[Sample]:
    root = manifest.parent.resolve()
    try:
        text = manifest.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{manifest}: not UTF-8 text (byte {e.start}); save it as UTF-8") from e
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        columns = [c.strip() for c in reader.fieldnames or []]
        if "path" not in columns or "label" not in columns:
            raise DataError(f"{manifest}: header must be path,label[,group]; found {columns}")
        samples, line_of = [], {}
        for line_no, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not row["path"] or not row["label"]:
                raise DataError(f"{manifest}:{line_no}: empty path or label")
            try:
                path = (root / row["path"]).resolve()
            except RuntimeError as e:  # Python < 3.13 raises this for a symlink loop
                raise DataError(f"{manifest}:{line_no}: path {row['path']!r}: {e}") from e
            if not path.is_relative_to(root):
                raise DataError(f"{manifest}:{line_no}: path {row['path']!r} escapes {root}")
            rel = path.relative_to(root).as_posix()
            if path in line_of:
                raise DataError(f"{manifest}:{line_of[path]} and :{line_no} both list {rel}")
            line_of[path] = line_no
            samples.append(Sample(path, rel, row["label"], row.get("group") or None))
    if not samples:
        raise DataError(f"{manifest}: manifest lists no images")
    return samples


def _order_classes(names: list[str], positive_class: str | None, where: str) -> tuple[str, str]:
    if positive_class is not None:
        matches = [n for n in names if n.lower() == positive_class.lower()]
        if not matches:
            raise DataError(f"{where}: --positive-class {positive_class!r} is not one of {names}")
        positive = matches[0]
    else:
        hinted = [n for n in names if any(h in n.lower() for h in POSITIVE_HINTS)]
        hits = [n for n in hinted if not _negated(n)]
        if len(hits) != 1:
            negated = [n for n in hinted if _negated(n)]
            why = f" ({', '.join(map(repr, negated))} also says no/not/negative)" if negated else ""
            raise DataError(
                f"{where}: cannot tell which of {names} is the positive class{why}; "
                "pass --positive-class NAME"
            )
        positive = hits[0]
    negative = next(n for n in names if n != positive)
    return negative, positive


def _negated(name: str) -> bool:
    """Whether a class name negates itself anywhere: non-COVID, covid_negative, NotCovid, noncovid.

    "non-COVID" and "covid_negative" hold a positive hint too; a name with both must never be
    guessed positive, so the hints are cut out as words of their own and every word is checked.
    """
    spaced = re.sub(r"([a-z])([A-Z])", r"\1 \2", name).lower()
    for hint in POSITIVE_HINTS:
        spaced = spaced.replace(hint, f" {hint} ")
    return any(word in NEGATIONS for word in re.findall(r"[a-z]+", spaced))
