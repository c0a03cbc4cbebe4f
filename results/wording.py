"""The phrases the report and the model card share, so the two never say different things."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import PurePath

from data_utils.split import UNIT_CAVEATS, recorded_unit

# Markdown that a name could carry: backslash escapes (Python-Markdown's and CommonMark's) keep
# links, images, emphasis, code and table cells from forming; &, < and > become entities, since
# GitHub renders raw HTML in report.md and Python-Markdown knows no backslash escape for <.
_MD_ESCAPED = re.compile(r"([\\`*_{}\[\]()#!|])")
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def md_text(value: object) -> str:
    """`value` as Markdown text that shows exactly as written: a file name, class name or error
    message can add no link, image, HTML tag, heading or table cell to report.md (nor to
    report.html and TensorBoard's text, both rendered from it)."""
    text = "".join(_MD_ENTITIES.get(c, c) for c in str(value))
    text = _MD_ESCAPED.sub(r"\\\1", text)
    return re.sub(r"[\r\n\t\f\v]", " ", text)  # a newline would end a table row or a block


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


# Where the data come from, as a run records it in metrics' and an export's "data"["source"]
# (source_of_files); absent or None: a data set ctscan does not know, described by its folder.
DEMO_SOURCE = "demo"
SARSCOV2_SOURCE = "sarscov2-ct-scan"
# The file names (split.json's, relative to the data folder) of each known source: the slices
# and NIfTI volumes of data_utils.demo, and the SARS-CoV-2 CT-scan dataset as published on Kaggle
# (plameneduardo/sarscov2-ctscan-dataset).
SOURCE_FILES = {
    DEMO_SOURCE: re.compile(r"(COVID|non-COVID)/(covid|noncovid)-p\d{3,}"
                            r"(-s\d{2}\.png|\.nii\.gz(#\d+)?)"),
    SARSCOV2_SOURCE: re.compile(r"COVID/Covid \(\d+\)\.png|non-COVID/Non-Covid \(\d+\)\.png"),
}
# The folder `ctscan ... --demo` makes its data in (ctscan.cli.DEMO_DATA): how a run recorded
# before "source" existed is still known as demo data.
DEMO_FOLDER = "demo-data"


def source_of_files(paths: Iterable[str]) -> str | None:
    """The known source that names every one of `paths` (split.json's "path"s) as it does, or
    None: a source is recognised only by all of its files, never guessed from some."""
    paths = list(paths)
    return next((source for source, pattern in SOURCE_FILES.items()
                 if paths and all(pattern.fullmatch(p) for p in paths)), None)


def data_folder(data: dict) -> str:
    """The data folder (or manifest) by its last component only: an absolute path would tell
    every reader of a report or model card where a machine keeps its data."""
    return PurePath(str(data.get("path") or "?").rstrip("/")).name or "?"


def data_source(data: dict) -> str | None:
    """DEMO_SOURCE, SARSCOV2_SOURCE or None (unknown), from metrics' or an export's "data"."""
    if "source" in data:
        return data["source"]
    return DEMO_SOURCE if data_folder(data) == DEMO_FOLDER else None


def data_named(data: dict) -> str:
    """What the data are, in words, for "Trained and tested on ..."."""
    source, folder = data_source(data), md_text(data_folder(data))
    if source == DEMO_SOURCE:
        return (f"generated demo data (folder {folder}, made by `ctscan make-demo-data`): "
                "CT-like pictures, not scans of patients")
    if source == SARSCOV2_SOURCE:
        return (f"the SARS-CoV-2 CT-scan dataset (Soares et al. 2020; hospitals in São Paulo, "
                f"Brazil; folder {folder})")
    return f"the images in folder {folder}"


def scope(data: dict) -> str:
    """Where a result holds, ending "These results come ..." or "These are slice-level
    results ..."."""
    source = data_source(data)
    if source == DEMO_SOURCE:
        return "on generated demo data, not on patients,"
    if source == SARSCOV2_SOURCE:
        return "from a single centre,"
    return "from one data set,"


# (title, text) of what no number in a report or card can tell; `limitations` picks the
# patient-level one when there are patient-level results, and the data's own first item.
SLICE_LEVEL = ("Slice-level, not patient-level", "Every number is about single CT slices, not "
               "patients or whole scans. A patient-level decision would need the slices of a "
               "scan combined, which was not evaluated here.")
PATIENT_LEVEL = ("Patient level from this dataset's slices", "The patient-level numbers combine "
                 "the slices each patient has in this dataset, which may be a selection rather "
                 "than a whole scan; on complete CT series, with more slices per patient that "
                 "look normal, the chosen aggregate and threshold may behave differently.")
NOT_A_DEVICE = ("Not a medical device", "This is a research result. It is not cleared or "
                "approved for clinical use and must not guide diagnosis or treatment.")
ELSEWHERE = ("Scanners, protocols and patients elsewhere differ; expect lower performance on "
             "other data, and validate externally before drawing conclusions.")


def _source_limitation(data: dict) -> tuple[str, str]:
    source = data_source(data)
    if source == DEMO_SOURCE:
        return ("Demo data, not patients", "These slices were generated by `ctscan "
                "make-demo-data`: CT-like pictures whose COVID class differs only by drawn "
                "patches. The numbers show that the pipeline runs from end to end; they say "
                "nothing about how a model does on real CT scans.")
    if source == SARSCOV2_SOURCE:
        return ("Single-centre data", "The SARS-CoV-2 CT-scan dataset comes from hospitals in "
                f"São Paulo, Brazil. {ELSEWHERE}")
    return ("One data set", f"All slices come from {data_named(data)}; this run does not "
            f"record which hospitals, scanners or protocols made them. {ELSEWHERE}")


def limitations(patient_level: bool, data: dict) -> list[tuple[str, str]]:
    """What the numbers cannot tell, given whether there are patient-level results and what
    the data are (`data`: metrics' or an export's)."""
    return [_source_limitation(data), PATIENT_LEVEL if patient_level else SLICE_LEVEL,
            NOT_A_DEVICE]


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


# Plain words for each term the report or model card uses: (term, what in the text shows it is
# used (lower case), meaning). `glossary` keeps those a text uses, in this order.
GLOSSARY = [
    ("Validation and test splits", ("validation",), "Slices kept out of training: the "
     "validation split chooses (model, weights, threshold), the test split is scored once "
     "afterwards, so its figures are not flattered by the choice."),
    ("95% CI (confidence interval)", ("95% ci",), "A range computed so that, were the study "
     "repeated many times, 95 in 100 such ranges would hold the true value; a wide one means "
     "the test split is too small to be sure."),
    ("Sensitivity and specificity", ("sensitivity",), "The share of positive slices the model "
     "calls positive, and the share of negative ones it calls negative."),
    ("ROC AUC", ("roc auc",), "The chance that the model gives a random positive slice a higher "
     "probability than a random negative one: 0.5 is a coin toss, 1 a perfect ranking; it does "
     "not depend on the threshold."),
    ("Threshold", ("threshold",), "The probability from which a slice is called positive; "
     "moving it trades sensitivity for specificity."),
    ("Youden's J", ("youden",), "Sensitivity + specificity − 1; the threshold with the highest J "
     "on the validation split is the one chosen."),
    ("Brier score", ("brier",), "The mean squared gap between the predicted probability and "
     "what happened (1 or 0): 0 is perfect, 0.25 is what always answering 0.5 gets."),
    ("ECE (expected calibration error)", ("ece", "expected calibration error"), "How far, on "
     "average, the predicted probabilities are from how often the slices given them are "
     "positive."),
    ("Temperature", ("temperature",), "One number the model's raw scores are divided by before "
     "they become probabilities: above 1 makes them less sure, below 1 surer; the ranking, and "
     "so the ROC AUC, stays the same."),
    ("Log-loss", ("log-loss",), "The mean of −log(probability given to the true class): small "
     "when the model is sure and right, very large when it is sure and wrong."),
    ("Proper score", ("proper score",), "A score that only true probabilities can optimise, such "
     "as log-loss and the Brier score (accuracy and AUC are not)."),
    ("Caruana selection", ("caruana",), "Ensemble selection: trials are added one at a time, "
     "repeats allowed, each time the one that most lowers the validation log-loss of the "
     "average; how often a trial was added is its weight."),
    ("Cross-fitted", ("cross-fitted", "each half of the validation split"), "Chosen on one half "
     "of the validation split and scored on the other, then the other way round: a score from "
     "slices the choice did not see."),
    ("Perceptual hash", ("perceptual-hash", "perceptual hash"), "A short fingerprint of how an "
     "image looks; near-identical slices get near-identical ones, which is how the split finds "
     "and keeps them together."),
    ("ASHA", ("asha",), "Asynchronous successive halving: at set epochs (rungs) it stops the "
     "trials whose validation AUC trails the others', so the search spends its time on the "
     "promising ones."),
    ("bf16", ("bf16",), "bfloat16, a 16-bit number format that recent GPUs train in faster than "
     "in the usual 32 bits (fp32), at a little less precision."),
    ("Bootstrap", ("bootstrap",), "Redrawing the test split (a group at a time) many times with "
     "replacement and recomputing a figure; the middle 95% of the results is its interval."),
    ("Grad-CAM", ("grad-cam",), "A heat map of the regions whose features most raised the "
     "model's positive score."),
    ("fANOVA", ("fanova",), "Functional analysis of variance: a random forest fitted to the "
     "trials' settings and scores tells how much of the spread in score each setting explains."),
]


def glossary(text: str) -> list[tuple[str, str]]:
    """(term, meaning) of each GLOSSARY term that `text` uses (as a whole word: "ece" is not
    in "recent")."""
    lower = text.lower()
    return [(term, meaning) for term, shows, meaning in GLOSSARY
            if any(re.search(rf"\b{re.escape(s)}\b", lower) for s in shows)]
