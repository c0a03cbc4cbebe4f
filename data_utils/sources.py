"""Find the labelled slices of a dataset: a folder of class folders, or a CSV manifest.

A slice is a 2-D image file, a DICOM file (a multi-frame one: each frame) or an axial slice of a
NIfTI volume (see data_utils.volumes). DICOM and NIfTI slices carry their patient, study and
series, as pseudonyms; PNGs only where a manifest's group column names the patient. This is the
one place where a file's path becomes the name ctscan writes (`Sample.rel`): for DICOM and NIfTI
files a stand-in (see data_utils.identity), for 2-D images the path below the dataset root.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from data_utils.errors import UserError
from data_utils.identity import file_pseudonym, pseudonym, stand_in
from data_utils.volumes import (
    DicomHeader,
    NotASlice,
    nifti_slices,
    order_series,
    read_dicom_header,
    select_slices,
    volume_kind,
)

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
POSITIVE_HINTS = ("covid", "positive")
NEGATIONS = {"no", "non", "not", "neg", "negative", "without"}


class DataError(UserError):
    """A dataset the user has to fix (missing folder, one class, bad manifest...)."""


@dataclass(frozen=True)
class Skipped:
    path: str
    reason: str


@dataclass(frozen=True)
class Sample:
    path: Path  # absolute
    # As split.json and reports name the slice: a 2-D image's path relative to the dataset
    # root; a DICOM or NIfTI slice's stand-in (data_utils.identity), "#K" for slice K of a
    # volume or multi-frame file.
    rel: str
    class_name: str
    group: str | None = None  # the patient's pseudonym (a manifest's group, DICOM PatientID)
    frame: int = 0  # which slice of the file
    frames: int = 1  # how many slices the file holds
    series: str | None = None  # pseudonyms; None for 2-D image files
    study: str | None = None
    # The strongest ID the slice carries: "patient", "study", "series" (DICOM), "volume" (a
    # NIfTI file), None (a 2-D image without a manifest group). What a split's groups may be
    # called: a NIfTI file or a study is not proof of a patient.
    id_kind: str | None = None


@dataclass(frozen=True)
class Source:
    root: Path
    samples: list[Sample]
    class_names: tuple[str, str]  # (negative, positive): label 1 means class_names[1]
    skipped: list[Skipped] = field(default_factory=list)  # files that hold no usable slice
    series_slices: dict[str, int] = field(default_factory=dict)  # before --slices chose

    @property
    def positive_class(self) -> str:
        return self.class_names[1]

    def label(self, sample: Sample) -> int:
        return self.class_names.index(sample.class_name)


def discover(data: Path, positive_class: str | None = None, slices: str = "all", *,
             key: bytes) -> Source:
    """Read a class-folder tree (Kaggle layout: COVID/, non-COVID/) or a path,label[,group] CSV,
    and expand its DICOM and NIfTI files into slices (`slices`: see volumes.select_slices).
    `key` makes the pseudonyms of patients, studies, series and files (data_utils.identity)."""
    data = Path(data).expanduser()
    if not data.exists():
        raise DataError(f"{data}: no such file or folder")
    if data.is_file():
        if data.suffix.lower() != ".csv":
            raise DataError(f"{data}: expected a folder of class folders or a .csv manifest")
        root, files = data.parent.resolve(), _read_manifest(data, key)
    else:
        root, files = data.resolve(), _read_class_folders(data)
    samples, skipped, series_slices = _expand(files, key, slices)
    where = str(data)
    names = sorted({s.class_name for s in samples})
    if len(names) < 2:
        found = f"only class {names[0]!r}" if names else "no images"
        raise DataError(f"{where}: found {found}; a binary classifier needs exactly two classes")
    if len(names) > 2:
        raise DataError(f"{where}: found {len(names)} classes {names}; ctscan needs exactly two")
    return Source(root, samples, _order_classes(names, positive_class, where), skipped,
                  series_slices)


def image_files(folder: Path) -> list[Path]:
    """Image, DICOM and NIfTI files under folder, recursively and sorted; hidden files are left
    out. A file without a suffix counts when it is DICOM (PACS exports name files by UID).

    Broken symlinks are kept, so that reading them fails and they are reported, not lost.
    """
    return sorted(p for p in folder.rglob("*") if (p.is_file() or p.is_symlink())
                  and not p.name.startswith(".")
                  and (p.suffix.lower() in IMAGE_SUFFIXES or volume_kind(p) is not None))


def unlabelled_slices(paths: list[Path], key: bytes, slices: str = "all",
                      show_paths: bool = False) -> tuple[list[Sample], list[Skipped]]:
    """The slices of files to classify (class_name ""), as a dataset's: a DICOM series or a
    NIfTI volume becomes its slices, each with its series. DICOM and NIfTI files are named by
    stand-ins, as in a dataset, unless the user asks for their own paths (show_paths)."""
    samples, skipped, _ = _expand([Sample(Path(p), str(p), "") for p in paths], key, slices,
                                  show_paths)
    return samples, skipped


def _expand(files: list[Sample], key: bytes, slices: str, show_paths: bool = False
            ) -> tuple[list[Sample], list[Skipped], dict[str, int]]:
    """One sample per slice, in the files' order: a 2-D image stays itself; a NIfTI volume
    becomes its chosen axial slices; DICOM files join their series (wherever they lie), which
    becomes its chosen slices in position order, placed where its first file was listed.
    Returns the samples, the files holding no usable slice, and each series' slice count.
    DICOM and NIfTI files are named by stand-ins unless show_paths."""
    placed: list[tuple[int, list[Sample]]] = []
    skipped, series_slices = [], {}
    series_files: dict[str, list[tuple[DicomHeader, Sample]]] = defaultdict(list)
    first_of_series: dict[str, int] = {}
    for index, f in enumerate(files):
        kind = volume_kind(f.path)
        try:
            if kind == "nifti":
                n = nifti_slices(f.path)
                volume = file_pseudonym(f.path, key)
                series_slices[volume] = n
                name = f.rel if show_paths else stand_in(f.class_name, ("volume", volume))
                placed.append((index, [
                    Sample(f.path, f"{name}#{k}", f.class_name, f.group, k, n, volume,
                           id_kind="patient" if f.group else "volume")
                    for k in select_slices(n, slices)]))
            elif kind == "dicom":
                header = read_dicom_header(f.path)
                # Without a SeriesInstanceUID, a folder is taken to hold one series.
                series = header.series or f"folder:{f.path.parent}"
                first_of_series.setdefault(series, index)
                series_files[series].append((header, f))
            else:
                placed.append((index, [f]))
        except NotASlice as e:
            skipped.append(_skip(f, str(e), key, show_paths))
        except OSError as e:
            skipped.append(_skip(f, f"cannot read: {e.strerror or e}", key, show_paths))
    for series, members in series_files.items():
        slices_of, odd = order_series(members)
        skipped += [_skip(f, reason, key, show_paths) for h, f, reason in odd]
        name = pseudonym(series, key)
        series_slices[name] = len(slices_of)
        placed.append((first_of_series[series], [
            _dicom_sample(h, f, k, name, key, show_paths) for h, f, k in
            (slices_of[i] for i in select_slices(len(slices_of), slices))]))
    placed.sort(key=lambda p: p[0])
    return [s for _, group in placed for s in group], skipped, series_slices


def _dicom_sample(header: DicomHeader, f: Sample, frame: int, series: str, key: bytes,
                  show_paths: bool) -> Sample:
    patient = f.group or (pseudonym(header.patient, key) if header.patient else None)
    study = pseudonym(header.study, key) if header.study else None
    whose = ("patient", patient) if patient else ("study", study)
    name = f.rel if show_paths else stand_in(f.class_name, whose, ("series", series),
                                             ("slice", file_pseudonym(f.path, key)))
    return Sample(f.path, f"{name}#{frame}" if header.frames > 1 else name, f.class_name,
                  patient, frame, header.frames, series, study,
                  "patient" if patient else "study" if study else "series")


def _skip(f: Sample, reason: str, key: bytes, show_paths: bool = False) -> Skipped:
    """A file that gives no slice, as every list of skipped files names it: a DICOM or NIfTI
    file by its stand-in, with its path cut out of the reason (a reader's message may quote
    it); a 2-D image by its path."""
    if show_paths or volume_kind(f.path) is None:
        return Skipped(f.rel, reason)
    for spelled in sorted({str(f.path), str(f.path.absolute()), f.rel}, key=len, reverse=True):
        reason = reason.replace(spelled, "<file>")
    return Skipped(stand_in(f.class_name, ("file", file_pseudonym(f.path, key))), reason)


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


def _read_manifest(manifest: Path, key: bytes) -> list[Sample]:
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
        samples, line_of, folders = [], {}, {}
        inside = os.path.join(root, "")  # the root with one trailing separator
        for line_no, row in enumerate(reader, start=2):
            row = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
            if not row["path"] or not row["label"]:
                raise DataError(f"{manifest}:{line_no}: empty path or label")
            try:
                path = _resolve(root, row["path"], folders)
            except RuntimeError as e:  # Python < 3.13 raises this for a symlink loop
                raise DataError(f"{manifest}:{line_no}: path {row['path']!r}: {e}") from e
            rel = _relative(path, inside)
            if rel is None:
                raise DataError(f"{manifest}:{line_no}: path {row['path']!r} escapes {root}")
            if path in line_of:
                raise DataError(f"{manifest}:{line_of[path]} and :{line_no} both list {rel}")
            line_of[path] = line_no
            group = pseudonym(row["group"], key) if row.get("group") else None
            samples.append(Sample(path, rel, row["label"], group,
                                  id_kind="patient" if group else None))
    if not samples:
        raise DataError(f"{manifest}: manifest lists no images")
    return samples


def _resolve(root: Path, listed: str, folders: dict[str, Path]) -> Path:
    """(root / listed).resolve(), resolving each folder once: resolve() looks up every part of
    the path, which for a manifest of 400k slices in a few folders is most of reading it."""
    folder, name = os.path.split(listed)
    if name in ("", ".", ".."):
        return (root / listed).resolve()
    if folder not in folders:
        folders[folder] = (root / folder).resolve()
    path = folders[folder] / name
    return path.resolve() if path.is_symlink() else path


def _relative(path: Path, inside: str) -> str | None:
    """path below the folder `inside` (which ends in a separator) as a POSIX relative path, "."
    for the folder itself; None outside it. Path.relative_to does the same in ten times the
    time, which on a manifest of 400k rows is seconds."""
    text = str(path)
    if text == inside.rstrip(os.sep) or text == inside:
        return "."
    return text.removeprefix(inside).replace(os.sep, "/") if text.startswith(inside) else None


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
