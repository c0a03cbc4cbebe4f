"""Stratified, seeded train/val/test split that never lets related slices straddle two splits.

Slices are first joined into groups, then whole groups are dealt to splits:
- byte-identical files (same sha256) are always one group, whatever --group-by says; so are the
  slices of one file (a NIfTI volume, a multi-frame DICOM);
- `patient`: slices join on every ID the data carry: the patient (DICOM PatientID, a manifest's
  group column), the DICOM study and series, the NIfTI file. So files of one series that
  disagree on their PatientID stay together, as do a patient's studies. Every slice must carry
  one; an ID under both labels is an error. `manifest` is its former name, read from old runs;
- `duplicates`: near-identical slices join: 256-bit pHashes at Hamming distance <=
  NEAR_DUPLICATE_BITS (of 256). On the 314-slice real sample that joins the 2 byte-identical
  pairs and 5 same-class pairs at distance 20-40 that are visibly the same patient (Non-Covid
  (787) and (987) are one slice, 200 file numbers apart); the closest pair with different
  labels, visibly different patients, is at distance 50;
- `mixed`: what `auto` (the default) becomes when some slices carry IDs and some do not: IDs
  join as in `patient`; slices without an ID join their near-duplicates without an ID, and
  the one ID group they most resemble (a PNG that repeats a DICOM slice joins that patient),
  never two, which would merge two patients through one blank slice. `auto` is `patient` when
  every slice carries an ID and `duplicates` when none does.
Groups joined this way are transitive: A~B and B~C puts A, B and C together. A group is named
for the strongest ID it holds (GROUP_UNITS): only a patient ID makes it a patient; a NIfTI file
is a volume (two files of one patient are two groups), a study without a PatientID a study.

Groups are dealt at random within each stratum (a group's majority label): shuffled with the
split seed, the first share to test, the next to val, the rest to train. The ratios hold in
groups (to within one, by largest remainder; a stratum of 3 or more gives each split at least
one), and the slice shares follow only on average, varying with the seed. A rule that fills
slice shares must decide by size: ctscan 0.3 dealt the largest groups first to the split
furthest below its share, so big patients all went to train, test held the small-patient tail
(a population unlike the one the model meets), and a new seed moved few slices. Counted in
groups, a group's chance of test does not depend on its size and each seed is an independent
draw. The same holds for near-duplicate groups of PNG slices, where a group is not a patient
and one chain can be large. bench/split_bias.py measures both rules.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from data_utils.cache import CTDataset, ShardRunner, load_dataset
from data_utils.files import atomic_write, write_json
from data_utils.identity import check_key, load_key
from data_utils.sources import DataError
from data_utils.volumes import DEFAULT_WINDOW

SPLITS = ("train", "val", "test")
DEFAULT_GROUP_BY = "auto"  # patient where every slice carries an ID, duplicates where none does
GROUP_BY = (DEFAULT_GROUP_BY, "patient", "duplicates", "none")
PATIENT_GROUPING = ("patient", "manifest")  # IDs join slices; "manifest": its former name
LINKED_BY_IDS = (*PATIENT_GROUPING, "mixed")
# What a group is, by the strongest ID among its slices (Sample.id_kind), strongest first; a
# group without any is a near-duplicate group (or, with --group-by none, a file).
GROUP_UNITS = {"patient": "patients", "study": "studies", "series": "series",
               "volume": "volumes", None: "near-duplicate groups"}
# What each kind of group does not guarantee, said wherever the groups are counted.
UNIT_CAVEATS = {
    "patients": "",
    "studies": "a study stands for its patient (no PatientID): two studies of one patient are "
               "two groups and may sit on both sides of the split",
    "series": "a DICOM series stands for its patient (no PatientID or study): two series of one "
              "patient may sit on both sides of the split",
    "volumes": "a NIfTI file stands for its patient: two files of one patient are two groups "
               "and may sit on both sides of the split",
    "near-duplicate groups": "near-identical slices are kept together, but less similar slices "
                             "of one patient can sit on both sides of the split",
    "files": "only byte-identical files are kept together: slices of one patient sit on both "
             "sides of the split, and the test figures are optimistic",
    "groups": "only groups made of patient IDs are patients; the others do not keep all of a "
              "patient's slices together",
}
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
    """`auto` as the data allow: IDs where every slice carries one, near-duplicates where none
    does, both (`mixed`) otherwise."""
    if group_by == DEFAULT_GROUP_BY:
        with_id = sum(k is not None for k in ds.id_kinds)
        return ("patient" if with_id == len(ds) else "duplicates" if with_id == 0 else "mixed")
    if group_by not in (*GROUP_BY, *PATIENT_GROUPING):
        raise DataError(f"--group-by must be one of {GROUP_BY}, got {group_by!r}")
    return group_by


def group_rows(ds: CTDataset, group_by: str, whole_files: bool = True) -> np.ndarray:
    """Connected components of 'must share a split' links; returns a group id per row. With
    whole_files=False the slices of one volume are not joined for being in one file, only
    byte-identical slices are (how the dataset doctor looks for near-duplicates)."""
    keys = [ds.sha256 if whole_files else list(zip(ds.sha256, ds.frames, strict=True))]
    if group_by in PATIENT_GROUPING:
        missing = sum(k is None for k in ds.id_kinds)
        if missing:
            raise DataError(
                f"{ds.root}: --group-by {group_by} needs an ID on every slice: DICOM files, "
                "NIfTI volumes, or a CSV manifest with a group column (path,label,group); "
                f"{missing} of {len(ds)} slices carry none"
            )
    if group_by in LINKED_BY_IDS:
        keys += [ds.groups, ds.studies, ds.series]
    links = [_same_key_links(k) for k in keys]
    if group_by in LINKED_BY_IDS:
        _refuse_ids_under_both_labels(ds, _components(len(ds), links[1:]))
    if group_by == "duplicates":
        links.append(cached_near_duplicate_pairs(ds))
    elif group_by == "mixed":  # only where an ID does not already say whose a slice is
        links.append(_near_duplicates_without_ids(ds, links))
    return _components(len(ds), links)


def _components(n: int, links: list[np.ndarray]) -> np.ndarray:
    """The connected component of each of n rows, given pairs of rows that must be together."""
    edges = np.concatenate([np.zeros((0, 2), np.int64), *links])
    graph = coo_matrix((np.ones(len(edges)), (edges[:, 0], edges[:, 1])), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def _near_duplicates_without_ids(ds: CTDataset, links: list[np.ndarray]) -> np.ndarray:
    """Near-duplicate links for the slices no ID places: among themselves, and each set of them
    to the one ID group it has most near-duplicate pairs with (ties: the first). Not to every
    such group: a slice without an ID that resembles two patients' slices (a blank slice, a
    common artefact) would otherwise join the two patients."""
    pairs = cached_near_duplicate_pairs(ds)
    no_id = np.array([k is None for k in ds.id_kinds])
    among = pairs[no_id[pairs[:, 0]] & no_id[pairs[:, 1]]]
    group = _components(len(ds), [*links, among])
    _, first_row = np.unique(group, return_index=True)  # a row standing for each group
    votes: dict[int, Counter] = {}
    for a, b in pairs[no_id[pairs[:, 0]] != no_id[pairs[:, 1]]].tolist():
        free, placed = (a, b) if no_id[a] else (b, a)
        if group[free] != group[placed]:
            votes.setdefault(group[free], Counter())[group[placed]] += 1
    joined = [(first_row[free], first_row[counts.most_common(1)[0][0]])
              for free, counts in votes.items()]
    return np.array([*among.tolist(), *joined], np.int64).reshape(-1, 2)


def _refuse_ids_under_both_labels(ds: CTDataset, component: np.ndarray) -> None:
    """A patient, study or series has one label (`component`: each row's group by IDs alone).
    The count only: an error message must not name a patient."""
    has_id = np.array([k is not None for k in ds.id_kinds])
    ids = np.unique(component[has_id])
    labels = np.zeros((component.max() + 1, 2), bool)
    labels[component, ds.labels] = True
    mixed = int(labels[ids].all(axis=1).sum())
    if mixed:
        raise DataError(f"{ds.root}: {mixed} of {len(ids)} patients (or studies, series, "
                        f"volumes) have slices under both {ds.class_names[0]!r} and "
                        f"{ds.class_names[1]!r}; a patient has one label: fix the folders or "
                        "the manifest")


def _same_key_links(keys: list) -> np.ndarray:
    """Link each row to the first row with the same key; rows without a key (None) to none."""
    first: dict = {}
    return np.array([(first.setdefault(k, i), i) for i, k in enumerate(keys) if k is not None],
                    np.int64).reshape(-1, 2)


def group_kinds(split: Split, ds: CTDataset) -> dict[str, int]:
    """How many of the split's groups are patients, studies, series, volumes, near-duplicate
    groups (or files, with --group-by none): each group named for the strongest ID it holds."""
    if split.group_by == "none":
        return {"files": int(split.groups.max()) + 1}
    order = list(GROUP_UNITS)
    rank = np.array([order.index(k if split.group_by != "duplicates" else None)
                     for k in ds.id_kinds])
    strongest = np.full(split.groups.max() + 1, len(order) - 1)
    np.minimum.at(strongest, split.groups, rank)
    counts = np.bincount(strongest, minlength=len(order))
    return {GROUP_UNITS[k]: int(n) for k, n in zip(order, counts, strict=True) if n}


def group_unit(kinds: dict[str, int]) -> str:
    """What to call the groups: "patients", "volumes"... when they are all one kind, else
    "groups"."""
    return next(iter(kinds)) if len(kinds) == 1 else "groups"


def grouping_warnings(split: Split, ds: CTDataset) -> list[str]:
    """What a user should know of their IDs before trusting the split, in counts."""
    warnings = []
    if split.group_by in LINKED_BY_IDS:
        missing = sum(k is None for k in ds.id_kinds)
        if missing:
            warnings.append(f"{missing} of {len(ds)} slices carry no patient, study or series "
                            "ID: they are kept with their near-duplicates only")
        patients_of: dict[str, set[str]] = {}
        for series, patient in zip(ds.series, ds.groups, strict=True):
            if series is not None and patient is not None:
                patients_of.setdefault(series, set()).add(patient)
        split_series = sum(len(p) > 1 for p in patients_of.values())
        if split_series:
            warnings.append(f"{split_series} series hold files with different PatientIDs: each "
                            "is kept as one group with all those patients")
    caveat = UNIT_CAVEATS.get(group_unit(group_kinds(split, ds)))
    if caveat:
        warnings.append(caveat)
    return warnings


def split_dataset(
    ds: CTDataset,
    ratios: tuple[float, float, float] = DEFAULT_RATIOS,
    seed: int = 0,
    group_by: str = DEFAULT_GROUP_BY,
) -> Split:
    """Deal whole groups to train/val/test so each split gets its share of each class's groups."""
    ratios = _check_ratios(ratios)
    group_by = resolve_group_by(ds, group_by)
    groups = group_rows(ds, group_by)
    sizes = np.bincount(groups)
    # A group's stratum is its majority label (near-duplicates can span both classes).
    positives = np.bincount(groups, weights=ds.labels)
    stratum = (positives * 2 > sizes).astype(int)
    split_of_group = assign_groups(stratum, ratios, np.random.default_rng(seed))
    split = Split(split_of_group[groups], groups, seed, ratios, group_by)
    _check(split, ds)
    return split


def assign_groups(stratum: np.ndarray, ratios: tuple[float, float, float],
                  rng: np.random.Generator) -> np.ndarray:
    """The split of each group (int8, an index into SPLITS): within each stratum the groups are
    shuffled, the first share goes to test, the next to val, the rest to train. Shares count
    groups, not slices, so a group's chance of each split does not depend on its size."""
    split_of_group = np.zeros(len(stratum), np.int8)
    for label in np.unique(stratum):
        members = rng.permutation(np.flatnonzero(stratum == label))
        train, val, test = _group_counts(len(members), ratios, rng)
        split_of_group[members] = np.repeat([SPLITS.index(s) for s in ("test", "val", "train")],
                                            [test, val, train])
    return split_of_group


def _group_counts(n: int, ratios: tuple[float, float, float], rng: np.random.Generator
                  ) -> np.ndarray:
    """n groups apportioned to train, val and test by largest remainder, ties at random; when
    n >= 3 a split that would get none takes one from the largest, so each gets one."""
    quotas = n * np.asarray(ratios) / sum(ratios)  # ratios may miss 1 by 1e-6: n groups, no more
    # The tolerances keep float error (100 * 0.29 = 28.999999999999996) from losing a whole
    # group or breaking a tie that is exact in decimals (15 groups at 0.7/0.2/0.1: 10.5 and 1.5
    # come out as 10.500000000000002 and 1.5000000000000002).
    counts = np.floor(quotas + 1e-9).astype(int)
    remainders = np.round(quotas - counts, 9)
    counts[np.lexsort((rng.random(3), -remainders))[: n - counts.sum()]] += 1
    while n >= 3 and counts.min() == 0:
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return counts


def load_and_split(data: Path, image_size: int, resize: str, options: dict,
                   cache_dir: str | Path | None = None, recorded: dict | None = None,
                   where: str = "the run",
                   decode: ShardRunner | None = None) -> tuple[CTDataset, Split]:
    """The dataset, decoded (or read from the cache), and its split; `options` are split.json's
    and search.json's: ratios, seed, group_by and positive_class. With `recorded` (a run's
    split.json) the slices it lists keep the side and group it gave them, whatever rule made
    it: a run continues on the split it started with."""
    ds = load_data_options(data, image_size, resize, options, cache_dir, recorded, where, decode)
    split = split_dataset(ds, tuple(options["ratios"]), options["seed"], options["group_by"])
    return ds, split if recorded is None else follow_record(split, ds, recorded)


def load_data_options(data: Path, image_size: int, resize: str, options: dict,
                      cache_dir: str | Path | None = None, recorded: dict | None = None,
                      where: str = "the run", decode: ShardRunner | None = None) -> CTDataset:
    """load_dataset with how a run reads its data (split.json's options): the positive class,
    the HU window and slice rule of DICOM and NIfTI files, and the pseudonym key, which must be
    the one `recorded` (the run's split.json) has the fingerprint of (runs of ctscan 0.3 kept
    the key itself). `decode` as load_dataset's."""
    legacy = options.get("identity_key")
    key = bytes.fromhex(legacy) if legacy else load_key()
    if not legacy and recorded is not None:
        check_key(recorded.get("key_fingerprint"), key, where)
    return load_dataset(data, image_size, resize, cache_dir, options.get("positive_class"),
                        window=tuple(options.get("window", DEFAULT_WINDOW)),
                        slices=options.get("slices", "all"), identity_key=key, decode=decode)


def follow_record(split: Split, ds: CTDataset, record: dict) -> Split:
    """`split` with the side and group of every slice that `record` (a split.json) lists, found
    by content; slices it does not list keep theirs (split_changes then reports them)."""
    recorded = _recorded_slices(record)
    assignment = split.assignment.copy()
    # Computed group ids of unlisted slices come after the recorded ones, which stay as they
    # were: the same data give back the same split.json.
    groups = split.groups + max((e["group"] + 1 for e in recorded.values()), default=0)
    for i, key in enumerate(zip(ds.sha256, ds.frames, strict=True)):
        entry = recorded.get(key)
        if entry is not None:
            assignment[i] = SPLITS.index(entry["split"])
            groups[i] = entry["group"]
    _, groups = np.unique(groups, return_inverse=True)  # contiguous, in the same order
    return Split(assignment, groups, split.seed, split.ratios, record.get("group_by",
                                                                          split.group_by))


def describe_split(split: Split, ds: CTDataset) -> str:
    """A few lines saying how many images and groups there are, what went where (in groups and
    in slices), and what the groups do not guarantee."""
    kinds = group_kinds(split, ds)
    unit = group_unit(kinds)
    of = f" ({', '.join(f'{n} {k}' for k, n in kinds.items())})" if unit == "groups" else ""
    lines = [f"{len(ds)} images ({len(ds.skipped)} skipped), {split.groups.max() + 1} {unit}"
             f"{of} (--group-by {split.group_by}), split seed {split.seed}"]
    in_groups, in_slices = split_group_counts(split), split_counts(split, ds)
    total_groups, total = sum(in_groups.values()), len(ds)
    for name in SPLITS:
        counts = in_slices[name]
        slices = sum(counts.values())
        lines.append(f"  {name:<5} {in_groups[name]} {unit} ({in_groups[name] / total_groups:.0%})"
                     f", {slices} slices ({slices / total:.0%}): "
                     + "  ".join(f"{c}: {n}" for c, n in counts.items()))
    lines += [f"  note: {w}" for w in grouping_warnings(split, ds)]
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
    """split.json's content: enough to rebuild the split, and to audit it, without the images.
    Slices are named as data_utils.identity allows, and known by their content (sha256, frame)."""
    files = [
        {
            "path": ds.paths[i],
            "sha256": ds.sha256[i],
            "frame": ds.frames[i],
            "label": ds.class_names[ds.labels[i]],
            "group": int(split.groups[i]),
            "split": SPLITS[split.assignment[i]],
        }
        for i in range(len(ds))
    ]
    kinds = group_kinds(split, ds)
    return {
        "seed": split.seed,
        "ratios": dict(zip(SPLITS, split.ratios, strict=True)),
        "group_by": split.group_by,
        "near_duplicate_bits": (NEAR_DUPLICATE_BITS if split.group_by in ("duplicates", "mixed")
                                else None),
        "positive_class": ds.positive_class,
        "window": list(ds.window),
        "slices": ds.slices,
        "key_fingerprint": ds.key_fingerprint,
        "unit": group_unit(kinds),
        "group_kinds": kinds,
        "groups": split_group_counts(split),
        "counts": split_counts(split, ds),
        "files": files,
    }


def split_changes(old: dict, new: dict) -> str:
    """What differs between two split.json records, in words ("" when they are equal): a run
    continued on another split would put former training images into val or test."""
    # A key the old record lacks was not recorded then (window, slices: before DICOM), and the
    # data were read as its default reads them. Slices are compared by content: a renamed or
    # moved file is the same slice, a changed one is another.
    changes = [f"{key} {old.get(key)!r} -> {new.get(key)!r}"
               for key in ("seed", "ratios", "group_by", "near_duplicate_bits", "positive_class",
                           "window", "slices", "key_fingerprint")
               if key in old and old[key] != new.get(key)]
    before, after = _recorded_slices(old), _recorded_slices(new)
    both = before.keys() & after.keys()
    for what, names in (
        ("added or changed", sorted(after[k]["path"] for k in after.keys() - before.keys())),
        ("removed, changed or unreadable",
         sorted(before[k]["path"] for k in before.keys() - after.keys())),
        ("relabelled", sorted(after[k]["path"] for k in both
                              if before[k]["label"] != after[k]["label"])),
        ("moved to another split", sorted(after[k]["path"] for k in both
                                          if before[k]["split"] != after[k]["split"])),
    ):
        if names:
            changes.append(f"{len(names)} file(s) {what} (first: {names[0]})")
    pairs = {(before[k]["group"], after[k]["group"]) for k in both}
    if len(pairs) != len({a for a, _ in pairs}) or len(pairs) != len({b for _, b in pairs}):
        changes.append("the split's grouping changed")
    return "; ".join(changes)


def _recorded_slices(record: dict) -> dict[tuple[str, int], dict]:
    """split.json's files by (sha256, frame); records before ctscan 0.4 say the frame only in
    the path's "#K"."""
    return {slice_key(f): f for f in record.get("files", [])}


def slice_key(entry: dict) -> tuple[str, int]:
    """A split.json file entry's slice by content: (sha256, frame)."""
    return entry["sha256"], entry["frame"] if "frame" in entry else _frame_in(entry["path"])


# Groups that are each one person's scan (so scored one observation each, as patients are).
PERSON_UNITS = ("patients", "studies", "series", "volumes")


def recorded_unit(record: dict) -> str:
    """What split.json's groups are ("patients", "volumes", ...); records before ctscan 0.4 say
    it by their --group-by only, and called every ID a patient."""
    legacy = {"patient": "patients", "manifest": "patients", "duplicates": "near-duplicate groups",
              "none": "files"}
    return record.get("unit") or legacy.get(record.get("group_by"), "groups")


def _frame_in(path: str) -> int:
    frame = path.rpartition("#")[2]
    return int(frame) if "#" in path and frame.isdigit() else 0


def split_group_counts(split: Split) -> dict[str, int]:
    """How many groups each split holds: the ratios hold in these, not in slices."""
    return {name: len(np.unique(split.groups[split.indices(name)])) for name in SPLITS}


def split_counts(split: Split, ds: CTDataset) -> dict[str, dict[str, int]]:
    return {
        name: {
            cls: int((ds.labels[split.indices(name)] == label).sum())
            for label, cls in enumerate(ds.class_names)
        }
        for name in SPLITS
    }
