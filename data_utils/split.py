"""Stratified, seeded train/val/test split that never lets related slices straddle two splits.

Slices are first joined into groups, then whole groups are dealt to splits:
- byte-identical files (same sha256) are always one group, whatever --group-by says; so are the
  slices of one file (a NIfTI volume, a multi-frame DICOM);
- `patient` (the default when every slice names its patient: DICOM PatientID, one NIfTI file, a
  manifest's group column): a patient's slices are one group; a patient under both labels is an
  error. `manifest` is its former name, still read from older runs;
- `duplicates` (the default otherwise): near-identical slices join: 256-bit pHashes at Hamming
  distance <= NEAR_DUPLICATE_BITS (of 256). On the 314-slice real sample that joins the 2
  byte-identical pairs and 5 same-class pairs at distance 20-40 that are visibly the same patient
  (Non-Covid (787) and (987) are one slice, 200 file numbers apart); the closest pair with
  different labels, visibly different patients, is at distance 50.
Groups joined this way are transitive: A~B and B~C puts A, B and C together.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from data_utils import runfolder
from data_utils.cache import CTDataset, load_dataset
from data_utils.files import atomic_write, write_json
from data_utils.sources import DataError
from data_utils.volumes import DEFAULT_WINDOW

SPLITS = ("train", "val", "test")
DEFAULT_GROUP_BY = "auto"  # patient where every slice names one, else duplicates
GROUP_BY = (DEFAULT_GROUP_BY, "patient", "duplicates", "none")
PATIENT_GROUPING = ("patient", "manifest")  # groups that are patients; "manifest": former name
DEFAULT_RATIOS = (0.7, 0.2, 0.1)  # train, val, test
NEAR_DUPLICATE_BITS = 40
SEARCH_BLOCK = 4096  # hashes searched at once: more rows per search, fewer repeated index builds
@dataclass(frozen=True)
class Split:
    assignment: np.ndarray  # int8 [N]: index into SPLITS for each dataset row
    groups: np.ndarray  # int [N]: group id of each row; rows of one group share a split
    seed: int
    ratios: tuple[float, float, float]
    group_by: str

    def indices(self, name: str) -> np.ndarray:
        return np.flatnonzero(self.assignment == SPLITS.index(name))


def near_duplicate_pairs(phash: np.ndarray, max_bits: int = NEAR_DUPLICATE_BITS) -> np.ndarray:
    """Pairs (i, j), i < j, of rows whose packed hashes differ in at most max_bits bits.

    faiss compares every pair with popcount kernels on all cores: still N^2 work, but tens of
    times faster than XOR and popcount in numpy. Its hashing indexes (IndexBinaryHash,
    IndexBinaryMultiHash) are faster only because they miss pairs: at 40 of 256 bits no
    bucket key is exact.
    """
    codes = np.ascontiguousarray(phash)
    pairs = [np.zeros((0, 2), np.int64)]
    for start in range(0, len(codes) - 1, SEARCH_BLOCK):
        # A block against itself and the rows after it only: each pair is compared once.
        index = faiss.IndexBinaryFlat(codes.shape[1] * 8)
        index.add(codes[start:])
        # range_search keeps distances strictly below the radius.
        limits, _, found = index.range_search(codes[start : start + SEARCH_BLOCK], max_bits + 1)
        rows = np.repeat(np.arange(len(limits) - 1), np.diff(limits).astype(np.int64))
        later = rows < found
        pairs.append(np.stack([rows[later], found[later]], 1) + start)
    return np.concatenate(pairs)


def cached_near_duplicate_pairs(ds: CTDataset) -> np.ndarray:
    """near_duplicate_pairs(ds.phash), kept in the dataset's cache folder. On a large dataset the
    search is the slowest part of inspect and split, and every command that groups would repeat
    it; its answer depends only on the hashes in row order, which name the file."""
    if ds.cache_dir is None:
        return near_duplicate_pairs(ds.phash)
    key = hashlib.sha256(f"{NEAR_DUPLICATE_BITS}|".encode() + ds.phash.tobytes()).hexdigest()
    path = ds.cache_dir / "near-duplicates" / f"{key[:20]}.npy"
    try:
        return np.load(path, allow_pickle=False)
    except FileNotFoundError:
        pairs = near_duplicate_pairs(ds.phash)
    with atomic_write(path) as f:
        np.save(f, pairs)
    return pairs


def resolve_group_by(ds: CTDataset, group_by: str) -> str:
    """`auto` as the data allow: patients where every slice names one, else near-duplicates."""
    if group_by == DEFAULT_GROUP_BY:
        return "patient" if all(g is not None for g in ds.groups) else "duplicates"
    if group_by not in (*GROUP_BY, *PATIENT_GROUPING):
        raise DataError(f"--group-by must be one of {GROUP_BY}, got {group_by!r}")
    return group_by


def group_rows(ds: CTDataset, group_by: str, whole_files: bool = True) -> np.ndarray:
    """Connected components of 'must share a split' links; returns a group id per row. With
    whole_files=False the slices of one volume are not joined for being in one file, only
    byte-identical slices are (how the dataset doctor looks for near-duplicates)."""
    keys = [ds.sha256 if whole_files else list(zip(ds.sha256, ds.frames, strict=True))]
    if group_by in PATIENT_GROUPING:
        missing = sum(g is None for g in ds.groups)
        if missing:
            raise DataError(
                f"{ds.root}: --group-by {group_by} needs every slice's patient: DICOM files with "
                "a PatientID, NIfTI volumes, or a CSV manifest with a group column "
                f"(path,label,group); {missing} of {len(ds)} slices name none"
            )
        _refuse_patients_under_both_labels(ds)
        keys.append(ds.groups)
    links = [_same_key_links(k) for k in keys]
    if group_by == "duplicates":
        links.append(cached_near_duplicate_pairs(ds))
    edges = np.concatenate(links)
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(len(ds),) * 2)
    return connected_components(graph, directed=False)[1]


def _refuse_patients_under_both_labels(ds: CTDataset) -> None:
    # The count only: an error message must not name a patient.
    labels: dict[str, set[int]] = {}
    for group, label in zip(ds.groups, ds.labels.tolist(), strict=True):
        labels.setdefault(group, set()).add(label)
    mixed = sum(len(seen) > 1 for seen in labels.values())
    if mixed:
        raise DataError(f"{ds.root}: {mixed} of {len(labels)} patients have slices under both "
                        f"{ds.class_names[0]!r} and {ds.class_names[1]!r}; a patient has one "
                        "label: fix the folders or the manifest")


def _same_key_links(keys: list) -> np.ndarray:
    """Link each row to the first row with the same key."""
    first: dict = {}
    return np.array([(first.setdefault(k, i), i) for i, k in enumerate(keys)], np.int64)


def split_dataset(
    ds: CTDataset,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    seed: int = 0,
    group_by: str = DEFAULT_GROUP_BY,
) -> Split:
    """Deal whole groups to train/val/test so each split gets its share of each class."""
    ratios = _check_ratios(ratios)
    group_by = resolve_group_by(ds, group_by)
    groups = group_rows(ds, group_by)
    rng = np.random.default_rng(seed)
    sizes = np.bincount(groups)
    split_of_group = np.full(len(sizes), -1, np.int8)
    # A group's stratum is its majority label (near-duplicates can span both classes).
    positives = np.bincount(groups, weights=ds.labels)
    stratum = (positives * 2 > sizes).astype(int)
    for label in (0, 1):
        members = np.flatnonzero(stratum == label)
        members = rng.permutation(members)
        # Big groups first, random among equals: the greedy fill then lands close to the ratios.
        members = members[np.argsort(-sizes[members], kind="stable")]
        target = np.asarray(ratios) * sizes[members].sum()
        filled = np.zeros(3)
        for g in members:
            k = int(np.argmax(target - filled))
            filled[k] += sizes[g]
            split_of_group[g] = k
    split = Split(split_of_group[groups], groups, seed, ratios, group_by)
    _check(split, ds)
    return split


def load_and_split(data: Path, image_size: int, resize: str, options: dict,
                   cache_dir: Path | None = None) -> tuple[CTDataset, Split]:
    """The dataset, decoded (or read from the cache), and its split; `options` are split.json's
    and search.json's: ratios, seed, group_by and positive_class."""
    ds = load_data_options(data, image_size, resize, options, cache_dir)
    return ds, split_dataset(ds, tuple(options["ratios"]), options["seed"], options["group_by"])


def load_data_options(data: Path, image_size: int, resize: str, options: dict,
                      cache_dir: Path | None = None) -> CTDataset:
    """load_dataset with how a run reads its data (split.json's options): the positive class,
    the HU window and slice rule of DICOM and NIfTI files, and the run's pseudonym key (runs
    from before these existed read as they did)."""
    key = options.get("identity_key")
    return load_dataset(data, image_size, resize, cache_dir, options.get("positive_class"),
                        window=tuple(options.get("window", DEFAULT_WINDOW)),
                        slices=options.get("slices", "all"),
                        identity_key=bytes.fromhex(key) if key else None)


def describe_split(split: Split, ds: CTDataset) -> str:
    """A few lines saying how many images and groups there are and what went where."""
    lines = [f"{len(ds)} images ({len(ds.skipped)} skipped), {split.groups.max() + 1} groups "
             f"(--group-by {split.group_by}), split seed {split.seed}"]
    for name, counts in split_counts(split, ds).items():
        lines.append(f"  {name:<5} " + "  ".join(f"{c}: {n}" for c, n in counts.items()))
    return "\n".join(lines)


def _check_ratios(ratios: tuple[float, ...]) -> tuple[float, float, float]:
    if len(ratios) != 3 or min(ratios) <= 0 or abs(sum(ratios) - 1) > 1e-6:
        raise DataError(f"split ratios must be three positive numbers summing to 1, got {ratios}")
    return tuple(float(r) for r in ratios)


def _check(split: Split, ds: CTDataset) -> None:
    sha = np.asarray(ds.sha256)
    seen = [set(sha[split.indices(name)]) for name in SPLITS]
    for a in range(3):
        for b in range(a + 1, 3):
            leaked = seen[a] & seen[b]
            if leaked:  # not `assert`: this must hold under python -O too
                raise AssertionError(f"in both {SPLITS[a]} and {SPLITS[b]}: {sorted(leaked)[:3]}")
    for name in SPLITS:
        counts = np.bincount(ds.labels[split.indices(name)], minlength=2)
        for label, count in enumerate(counts):
            if count == 0:
                raise DataError(
                    f"{ds.root}: the {name} split got no {ds.class_names[label]!r} images; the "
                    f"dataset has too few independent groups ({split.groups.max() + 1}) for "
                    f"ratios {split.ratios}. Add data or use --group-by none (leaky)."
                )


def write_split(split: Split, ds: CTDataset, path: Path) -> None:
    write_json(path, split_record(split, ds))


def split_record(split: Split, ds: CTDataset) -> dict:
    """split.json's content: enough to rebuild the split, and to audit it, without the images."""
    files = [
        {
            "path": ds.paths[i],
            "sha256": ds.sha256[i],
            "label": ds.class_names[ds.labels[i]],
            "group": int(split.groups[i]),
            "split": SPLITS[split.assignment[i]],
        }
        for i in range(len(ds))
    ]
    return {
        "seed": split.seed,
        "ratios": dict(zip(SPLITS, split.ratios, strict=True)),
        "group_by": split.group_by,
        "near_duplicate_bits": NEAR_DUPLICATE_BITS if split.group_by == "duplicates" else None,
        "positive_class": ds.positive_class,
        "window": list(ds.window),
        "slices": ds.slices,
        "counts": split_counts(split, ds),
        "files": files,
    }


def split_changes(old: dict, new: dict) -> str:
    """What differs between two split.json records, in words ("" when they are equal): a run
    continued on another split would put former training images into val or test."""
    # A key the old record lacks was not recorded then (window, slices: before DICOM), and the
    # data were read as its default reads them.
    changes = [f"{key} {old.get(key)!r} -> {new.get(key)!r}"
               for key in ("seed", "ratios", "group_by", "near_duplicate_bits", "positive_class",
                           "window", "slices")
               if key in old and old[key] != new.get(key)]
    before = {f["path"]: f for f in old.get("files", [])}
    after = {f["path"]: f for f in new.get("files", [])}
    for what, paths in (
        ("added", sorted(after.keys() - before.keys())),
        ("removed or unreadable", sorted(before.keys() - after.keys())),
        ("changed content", sorted(p for p in before.keys() & after.keys()
                                   if before[p]["sha256"] != after[p]["sha256"])),
        ("relabelled", sorted(p for p in before.keys() & after.keys()
                              if before[p]["label"] != after[p]["label"])),
        ("moved to another split", sorted(p for p in before.keys() & after.keys()
                                          if before[p]["split"] != after[p]["split"])),
    ):
        if paths:
            changes.append(f"{len(paths)} file(s) {what} (first: {paths[0]})")
    if not changes and old != new:
        changes.append("the split's grouping changed")
    return "; ".join(changes)


def recorded_split_changes(location: str, record: dict) -> str:
    """What differs between the split a run recorded at `location` (its split.json) and
    `record`, in words; "" when they are equal or the run recorded none yet."""
    recorded = runfolder.read_json(location)
    return "" if recorded is None else split_changes(recorded, record)


def split_counts(split: Split, ds: CTDataset) -> dict[str, dict[str, int]]:
    return {
        name: {
            cls: int((ds.labels[split.indices(name)] == label).sum())
            for label, cls in enumerate(ds.class_names)
        }
        for name in SPLITS
    }
