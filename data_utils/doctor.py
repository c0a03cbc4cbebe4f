"""`ctscan inspect`: what is in a dataset, what could not be read, and what could fool a model."""

from __future__ import annotations

from collections import Counter

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, cross_val_score
from sklearn.preprocessing import OneHotEncoder
from sklearn.tree import DecisionTreeClassifier

from data_utils.cache import CTDataset
from data_utils.sources import DataError
from data_utils.split import DEFAULT_GROUP_BY, group_rows, resolve_group_by

# A metadata feature that beats the majority class by this much is a shortcut worth a warning.
SHORTCUT_LIFT = 0.10


def inspect_dataset(ds: CTDataset) -> dict:
    """The doctor's findings as one JSON-ready dict (the --json output)."""
    by_class = {name: np.flatnonzero(ds.labels == i) for i, name in enumerate(ds.class_names)}
    near = group_rows(ds, "duplicates", whole_files=False)
    grouping = resolve_group_by(ds, DEFAULT_GROUP_BY)
    # The units a model could memorise: what the split keeps together (IDs where the data carry
    # them, near-duplicates elsewhere).
    try:
        groups, refused = group_rows(ds, grouping), []
    except DataError as e:  # a patient under both labels: the doctor reports, split refuses
        groups, refused, grouping = near, [str(e)], "duplicates"
    with_ids = grouping == "patient"
    classes = {name: len(rows) for name, rows in by_class.items()}
    report = {
        "data": str(ds.root),
        "positive_class": ds.positive_class,
        "classes": classes,
        "modes": {
            name: dict(Counter(ds.modes[i] for i in rows).most_common())
            for name, rows in by_class.items()
        },
        # keys are strings ("8", "12", "HU", "float") as in the --json output
        "bits": {
            name: dict(Counter(str(ds.bits[i]) for i in rows).most_common())
            for name, rows in by_class.items()
        },
        "sizes": {name: _size_range([ds.sizes[i] for i in rows])
                  for name, rows in by_class.items()},
        "skipped": [{"path": s.path, "reason": s.reason} for s in ds.skipped],
        "patients": _patients(ds, by_class, groups),
        "duplicate_groups": _groups_of(ds, group_rows(ds, "none", whole_files=False)),
        # With patients known, neighbouring slices of one scan are alike by nature: only a
        # group spanning two patients is news (one patient under two IDs, or a copied slice).
        "near_duplicate_groups": _groups_of(ds, near, across=list(groups) if with_ids else None),
        "warnings": refused + _shortcut_warnings(ds, groups) + _balance_warnings(classes),
    }
    label_of = dict(zip(ds.paths, ds.labels.tolist(), strict=True))
    mixed = [g for g in report["near_duplicate_groups"] if len({label_of[p] for p in g}) > 1]
    if mixed:
        report["warnings"].append(
            f"{len(mixed)} near-identical group(s) hold both labels (first: {mixed[0][0]} ~ "
            f"{mixed[0][-1]}): mislabelled files, or slices too alike to tell apart")
    depths = Counter(map(str, ds.bits))
    if len(depths) > 1:
        found = ", ".join(f"{_depth_label(b)} {n}" for b, n in depths.most_common())
        report["warnings"].append(
            f"images mix bit depths ({found}): each file is scaled by its own depth, so one "
            "tissue can come out at different brightness in different files")
    peaks = [p for b, p in zip(ds.bits, ds.peaks, strict=True) if b == 16 and p is not None]
    if peaks and max(peaks) < 4096:
        report["warnings"].append(
            f"all {len(peaks)} 16-bit slice(s) use at most 12 bits (largest sample "
            f"{max(peaks)} of 65535): each file is scaled by the 16 bits it declares, so they "
            "decode nearly black; save them with a PNG sBIT chunk of 12, or as 8-bit images")
    if ds.skipped:
        report["warnings"].append(f"{len(ds.skipped)} file(s) could not be read and are skipped")
    return report


def _patients(ds: CTDataset, by_class: dict[str, np.ndarray], groups: np.ndarray
              ) -> dict | None:
    """Patients, studies, series and volumes per class, slices per group (what the split keeps
    together) and per series, and the slices that name no patient or carry no ID at all; None
    for data that carry no ID (2-D files, no manifest groups). Counts only: a pseudonym is no
    business of a report."""
    if all(k is None for k in ds.id_kinds):
        return None
    per_class = {}
    for name, rows in by_class.items():
        with_id = [i for i in rows if ds.id_kinds[i] is not None]
        per_class[name] = {
            "patients": len({ds.groups[i] for i in rows} - {None}),
            "studies": len({ds.studies[i] for i in rows} - {None}),
            "series": len({ds.series[i] for i in rows if ds.id_kinds[i] != "volume"} - {None}),
            "volumes": len({ds.series[i] for i in rows if ds.id_kinds[i] == "volume"}),
            "slices_per_group": _spread(list(Counter(groups[with_id].tolist()).values())),
        }
    kept = Counter(s for s in ds.series if s is not None)
    return {
        "by_class": per_class,
        "slices_without_patient": sum(g is None for g in ds.groups),
        "slices_without_id": sum(k is None for k in ds.id_kinds),
        "slices": ds.slices,
        "slices_kept_per_series": _spread(list(kept.values())),
        "slices_per_series": _spread([ds.series_slices[s] for s in kept]),
    }


def _spread(counts: list[int]) -> dict[str, float] | None:
    if not counts:
        return None
    return {"min": int(min(counts)), "median": float(np.median(counts)), "max": int(max(counts))}


def _depth_label(bits: str) -> str:
    return f"{bits}-bit" if bits.isdigit() else bits


def _size_range(sizes: list[tuple[int, int]]) -> dict[str, list[int]]:
    w, h = np.array(sizes).T
    return {"width": [int(w.min()), int(w.max())], "height": [int(h.min()), int(h.max())]}


def _groups_of(ds: CTDataset, group_ids: np.ndarray, across: list | None = None
               ) -> list[list[str]]:
    """The paths of each group of two or more; with `across`, only groups whose rows hold two
    or more of its values."""
    members: dict[int, list[int]] = {}
    for row, g in enumerate(group_ids.tolist()):
        members.setdefault(g, []).append(row)
    return sorted((sorted(ds.paths[i] for i in rows) for rows in members.values()
                   if len(rows) > 1 and (across is None or len({across[i] for i in rows}) > 1)),
                  key=lambda m: m[0])


def shortcut_accuracy(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray
) -> tuple[float, float] | None:
    """Cross-validated accuracy of a shallow tree that sees only `features`, and chance level.

    Folds keep near-identical groups whole; otherwise the tree would just recognise patients
    (whose slices share a size) and the check would cry wolf.
    """
    folds = min(5, len(np.unique(groups[labels == 0])), len(np.unique(groups[labels == 1])))
    if folds < 2:
        return None
    tree = DecisionTreeClassifier(max_depth=3, random_state=0)
    cv = StratifiedGroupKFold(folds, shuffle=True, random_state=0)
    accuracy = cross_val_score(tree, features, labels, cv=cv, groups=groups).mean()
    return float(accuracy), float(np.bincount(labels).max() / len(labels))


def _shortcut_warnings(ds: CTDataset, groups: np.ndarray) -> list[str]:
    features = {
        "image mode": (OneHotEncoder().fit_transform(np.array(ds.modes)[:, None]).toarray(),
                       "ctscan decodes every file to the same 8-bit grayscale, so its models "
                       "cannot see the mode"),
        "image size": (np.array(ds.sizes),
                       "with --resize pad the black bars still show the aspect ratio to the "
                       "model; --resize stretch hides it"),
    }
    warnings = []
    for name, (x, consequence) in features.items():
        result = shortcut_accuracy(x, ds.labels, groups)
        if result and result[0] - result[1] >= SHORTCUT_LIFT:
            warnings.append(
                f"{name} predicts the label: a classifier that sees only the {name} reaches "
                f"{result[0]:.0%} accuracy (majority class {result[1]:.0%}); {consequence}. "
                "Accuracy reported elsewhere on these files may be inflated by it."
            )
    return warnings


def _balance_warnings(classes: dict[str, int]) -> list[str]:
    small, large = sorted(classes.values())
    if large > 3 * small:
        return [f"classes are imbalanced ({classes}); consider pos_weight when training"]
    return []


def format_report(report: dict) -> str:
    """The human-readable version of inspect_dataset's dict."""
    lines = [f"dataset {report['data']}  (positive class: {report['positive_class']})"]
    for name, count in report["classes"].items():
        modes = ", ".join(f"{m} {n}" for m, n in report["modes"][name].items())
        depths = ", ".join(f"{_depth_label(b)} {n}" for b, n in report["bits"][name].items())
        size = report["sizes"][name]
        lines.append(
            f"  {name:<12} {count:>6} images   modes: {modes}   depth: {depths}   width "
            f"{size['width'][0]}-{size['width'][1]}, height {size['height'][0]}-"
            f"{size['height'][1]} px"
        )
    lines += _format_patients(report["patients"])
    lines.append(f"skipped (unreadable): {len(report['skipped'])}")
    lines += [f"  {s['path']}: {s['reason']}" for s in report["skipped"]]
    near = ("near-identical groups across patients" if report["patients"] else
            "near-identical groups (kept in one split)")
    for key, title in [("duplicate_groups", "byte-identical groups"),
                       ("near_duplicate_groups", near)]:
        groups = report[key]
        lines.append(f"{title}: {len(groups)}, {sum(map(len, groups))} files")
        lines += [f"  {' = '.join(g[:3])}" + (f" (+{len(g) - 3} more)" if len(g) > 3 else "")
                  for g in groups[:10]]
        if len(groups) > 10:
            lines.append(f"  ... {len(groups) - 10} more (see --json)")
    lines += [f"WARNING: {w}" for w in report["warnings"]]
    return "\n".join(lines)


def _format_patients(patients: dict | None) -> list[str]:
    if patients is None:
        return ["patients: not named by the data (2-D files without a manifest group column); "
                "the split groups near-identical slices instead"]
    lines = []
    for name, c in patients["by_class"].items():
        spread = c["slices_per_group"] or {"min": 0, "median": 0, "max": 0}
        lines.append(f"  {name:<12} {c['patients']:>6} patients, {c['studies']} studies, "
                     f"{c['series']} series, {c['volumes']} volumes; slices per group "
                     f"{spread['min']}/{spread['median']:g}/{spread['max']} (min/median/max)")
    kept, total = patients["slices_kept_per_series"], patients["slices_per_series"]
    if kept:
        lines.append(f"slices kept per series (--slices {patients['slices']}): "
                     f"{kept['min']}/{kept['median']:g}/{kept['max']} of "
                     f"{total['min']}/{total['median']:g}/{total['max']} (min/median/max)")
    lines.append(f"slices without a patient ID: {patients['slices_without_patient']} (a study, "
                 "series or NIfTI file stands in for the patient: not proof of one); without "
                 f"any ID: {patients['slices_without_id']}")
    return lines
