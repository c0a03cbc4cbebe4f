"""The phrases the report and the model card share, so the two never say different things."""

from __future__ import annotations

from data_utils.split import UNIT_CAVEATS, recorded_unit

METRIC_NAMES = {
    "accuracy": "Accuracy",
    "recall": "Sensitivity (recall)",
    "specificity": "Specificity",
    "precision": "Precision (PPV)",
    "f1": "F1 score",
    "roc_auc": "ROC AUC",
    "pr_auc": "PR AUC (average precision)",
}

# How each 95% CI was made, by the names of metrics.json's "intervals" (results.metrics.score).
INTERVAL_METHODS = {
    "wilson": "Wilson score intervals",
    "wilson_design_effect": ("Wilson score intervals at the number of independent slices that the "
                             "groups' design effect leaves (Korn & Graubard)"),
    "delong": "DeLong's interval on the logit scale",
    "obuchowski": "DeLong's interval on the logit scale, summed within groups (Obuchowski)",
    "hanley_mcneil": ("Wilson's interval at the pairs Hanley & McNeil's variance is worth (where "
                      "DeLong's is 0, as when the classes do not overlap)"),
    "bootstrap": "percentile bootstrap",
}


def interval_methods(methods: dict[str, str], keys: list[str], bootstrap: str) -> str:
    """Which method made the intervals of the metrics `keys`, in words: "Wilson score intervals
    for accuracy and specificity; percentile bootstrap (1000 resamples) for F1 score". `methods`
    is metrics.json's "intervals"; a metric it does not name was bootstrapped, as every one was
    before they were recorded. `bootstrap` follows the bootstrap's name."""
    named = {**{key: name if name[:2].isupper() else name[0].lower() + name[1:]
                for key, name in METRIC_NAMES.items()},  # "accuracy", "ROC AUC", "F1 score"
             "brier": "Brier score", "ece": "expected calibration error"}
    by_method: dict[str, list[str]] = {}
    for key in keys:
        by_method.setdefault(methods.get(key, "bootstrap"), []).append(named.get(key, key))
    order = list(INTERVAL_METHODS)  # the bootstrap last
    return "; ".join(
        f"{INTERVAL_METHODS.get(method, method)}{' ' + bootstrap if method == 'bootstrap' else ''}"
        f" for {', '.join(names[:-1]) + ' and ' + names[-1] if len(names) > 1 else names[0]}"
        for method, names in sorted(by_method.items(), key=lambda item: order.index(item[0])
                                    if item[0] in order else len(order)))


# What the exported model is compared with (results.evaluate._compared_weights).
COMPARED_BEST = "the best trial alone"
COMPARED_RUNNER_UP = "the runner-up trial alone"

# How a patient's slice probabilities were combined (results.aggregate.AGGREGATES): a short
# name, and what the patient's probability then is.
AGGREGATE_NAMES = {"mean": "mean", "top25": "top-quarter mean", "max": "maximum"}
AGGREGATE_MEANING = {
    "mean": "the mean of its slices' probabilities",
    "top25": "the mean of the highest quarter of its slices' probabilities (at least one slice)",
    "max": "the highest of its slices' probabilities",
}

SINGULAR = {"patients": "patient", "studies": "study", "series": "series",
            "volumes": "volume", "near-duplicate groups": "near-duplicate group", "files": "file",
            "groups": "group"}


def groups_are(data: dict) -> str:
    """What the split's groups are (data_utils.split.GROUP_UNITS), from metrics' or an
    export's "data"; runs before ctscan 0.4 recorded only their --group-by."""
    return data.get("unit") or recorded_unit({"group_by": data.get("group_by")})


def grouping_meaning(data: dict) -> str:
    """What the split's grouping means for a test estimate, in the report's and card's words."""
    unit = groups_are(data)
    if unit == "patients":
        return ("The train/validation/test split kept all slices of one patient and "
                "byte-identical files on the same side, so no test patient was seen during "
                "training or model selection.")
    if unit == "near-duplicate groups":
        return ("The train/validation/test split kept byte-identical files and near-identical "
                "slices (perceptual-hash neighbours, in practice adjacent slices of one patient) "
                "on the same side, so the model was never tested on a near-copy of a training "
                "image. The dataset has no patient IDs, so less similar slices of one patient "
                "can still sit on both sides; the test score may still be somewhat optimistic.")
    if unit == "files":
        return ("The train/validation/test split kept only byte-identical files together: "
                "near-identical slices of one patient can sit in both training and test, so the "
                "model may have been tested on near-copies of training images and the test "
                "score is likely optimistic.")
    return (f"The train/validation/test split kept all slices of one {SINGULAR.get(unit, unit)} "
            f"and byte-identical files on the same side, but its groups are {unit}, not proven "
            f"patients ({UNIT_CAVEATS.get(unit, '')}), so the test score may be somewhat "
            "optimistic.")


def _bootstrap_units(unit: str) -> str:
    """What the intervals took whole (the bootstrap resampled, the design effect pooled): the
    split's groups."""
    if unit == "patients":
        return ("patients: all slices of a patient are taken together, so the intervals "
                "reflect the number of test patients")
    if unit == "files":
        return ("single slices (only byte-identical files are taken together): slices of one "
                "patient are treated as independent, so the intervals are optimistic")
    return (f"{unit} (the split's groups), each taken whole ({UNIT_CAVEATS.get(unit, '')}), so "
            "the intervals may be somewhat narrow")


# (title, text) of what no number in a report or card can tell; `limitations` picks the
# patient-level one when there are patient-level results.
SLICE_LEVEL = ("Slice-level, not patient-level", "Every number is about single CT slices, not "
               "patients or whole scans. A patient-level decision would need the slices of a "
               "scan combined, which was not evaluated here.")
PATIENT_LEVEL = ("Patient level from this dataset's slices", "The patient-level numbers combine "
                 "the slices each patient has in this dataset, which may be a selection rather "
                 "than a whole scan; on complete CT series, with more slices per patient that "
                 "look normal, the chosen aggregate and threshold may behave differently.")
LIMITATIONS = [
    ("Single-centre data", "The SARS-CoV-2 CT-scan dataset comes from hospitals in São Paulo, "
     "Brazil. Scanners, protocols and patients elsewhere differ; expect lower performance on "
     "other data, and validate externally before drawing conclusions."),
    SLICE_LEVEL,
    ("Not a medical device", "This is a research result. It is not cleared or approved for "
     "clinical use and must not guide diagnosis or treatment."),
]


def limitations(patient_level: bool) -> list[tuple[str, str]]:
    """LIMITATIONS, with the patient-level caveat in place of the slice-level one when there
    are patient-level results."""
    return [PATIENT_LEVEL if patient_level and item is SLICE_LEVEL else item
            for item in LIMITATIONS]


def interval_limitation(data: dict) -> tuple[str, str]:
    """(title, text) of what the confidence intervals cover, given what the split's groups
    are (`data`: metrics' or an export's)."""
    unit = groups_are(data)
    if unit == "patients":
        return ("Confidence intervals", "They count test patients, not slices, as the independent "
                "observations; they cover the sampling of patients, not differences between "
                "hospitals or scanners.")
    return ("Confidence intervals may be optimistic", f"They count {_bootstrap_units(unit)}. "
            "Slices of one patient that share the test split are not independent, so the true "
            "uncertainty is larger than the intervals show; an ID per patient (a DICOM patient "
            "ID, or a manifest's `group` column) fixes this.")


def bootstrap_unit_text(data: dict) -> str:
    """What the intervals over the test split's groups took whole, in words."""
    return _bootstrap_units(groups_are(data))
