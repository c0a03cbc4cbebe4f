"""report.md: the one-shot test result of the winning model, written for a clinician-researcher.

Every number comes from the evaluate step's metrics dict; this module only words and lays them
out. The order follows what a reader needs: what was found, how sure we are, how the model was
chosen, what data it saw, and what the numbers do not mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from urllib.parse import quote

import yaml

from data_utils.files import atomic_write
from data_utils.split import UNIT_CAVEATS
from results.importance import MIN_TRIALS, parameter_importance
from results.ledger import describe_look
from results.report_html import github_slug
from results.wording import (
    AGGREGATE_MEANING,
    AGGREGATE_NAMES,
    COMPARED_RUNNER_UP,
    DEMO_SOURCE,
    METRIC_NAMES,
    SINGULAR,
    bootstrap_unit_text,
    data_named,
    data_source,
    glossary,
    grouping_meaning,
    groups_are,
    interval_limitation,
    interval_methods,
    limitations,
    md_text,
    scope,
)
from tuning.config import make_config

THRESHOLD_FREE = ("roc_auc", "pr_auc")  # the same at every threshold
THRESHOLD_METHODS = {"youden": "Youden's J on the validation split", "fixed": "fixed",
                     "sensitivity": "a target sensitivity set in advance, on the validation "
                                    "split"}
LEADERBOARD_ROWS = 10
MAX_SKIPPED_LISTED = 50
# The four figures the headline box gives, with their intervals.
HEADLINE_KEYS = ("recall", "specificity", "roc_auc", "accuracy")
# A threshold this close to 0 or 1 gets a sentence on what it means: the probabilities are
# squeezed towards one end, and "p = 0.3%" reads as "unlikely" where it is a positive call.
EXTREME_THRESHOLD = 0.05
# An expected calibration error above this gets a hint: probabilities off by more than 10
# points on average should not be read as chances.
LARGE_ECE = 0.1
CALIBRATE_HINT = ("`ctscan evaluate RUN_DIR --calibrate` fits a temperature on the validation "
                  "split that brings the probabilities closer to observed frequencies")
# Joins the settings in a leaderboard cell; inside a setting, spaces are non-breaking, so the
# cell wraps between settings and never inside "head=[512, 128]".
SETTINGS_SEPARATOR = " · "
NBSP = "\u00a0"


def _gradcam_note(positive: str) -> str:
    return (
        f"Grad-CAM colours the regions that most raised the model's {positive} score. Heat over "
        "the lung parenchyma is what one hopes for; heat over borders, text, the scanner table or "
        "outside the body suggests the model uses a shortcut. It shows where the model looked, "
        f"not whether it was right. **A map with no colour** means that nothing in the slice "
        f"raised the {positive} score (Grad-CAM keeps only what raises it), as is usual for a "
        f"slice called not {positive} with confidence; it is not a fault. The slices shown are "
        "the most confident mistakes first, then the most confident right calls, each from a "
        "different group of the split (a patient, where the split has them) while there is one.")


def _num(value: float | None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _ci(entry: dict) -> str:
    ci = entry.get("ci95")
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return "n/a"
    return f"{ci[0]:.3f}–{ci[1]:.3f}"


def _with_ci(entry: dict) -> str:
    return f"{_num(entry.get('value'))} (95% CI {_ci(entry)})"


def _cell(value: object) -> str:
    """A leaderboard/table cell: floats short but exact enough, pipes escaped."""
    if isinstance(value, bool) or value is None:
        text = "—" if value is None else str(value)
    elif isinstance(value, float):
        if math.isnan(value):
            text = "n/a"
        elif value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e4):
            text = f"{value:.1e}"  # lr, weight decay: 3.0e-04
        else:
            text = f"{value:.4g}"
    else:
        text = str(value)
    return md_text(text)


def _table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def _image(alt: str, rel_path: str) -> str:
    # Percent-encode so a path with spaces or parentheses still renders as a link.
    return f"![{alt}]({quote(str(rel_path).replace(chr(92), '/'))})"


# What is called positive, by whose probability, with the threshold chosen on what.
def _threshold_text(threshold: dict, positive: str, unit: str = "slice",
                    calibrated: bool = False) -> str:
    """`unit`: "slice", or what a group is ("patient", "volume"...): then its aggregate
    probability, chosen on the validation groups. `calibrated`: a temperature was applied."""
    return _threshold_rule(threshold, positive, unit) + _extreme_threshold(
        threshold["value"], positive, unit, calibrated)


def _extreme_threshold(value: float, positive: str, unit: str, calibrated: bool) -> str:
    """What a threshold near 0 or 1 means, in words; "" for one in between."""
    if EXTREME_THRESHOLD <= value <= 1 - EXTREME_THRESHOLD:
        return ""
    low = value < EXTREME_THRESHOLD
    text = (f" A threshold of {value:.3g} means that a {unit} is called {positive} as soon as "
            f"the model gives it a probability of {value:.1%}" if low else
            f" A threshold of {value:.3g} means that a {unit} is called {positive} only when "
            f"the model gives it a probability of {value:.1%} or more")
    text += (f": its probabilities sit close to {0 if low else 1} for most {_plural(unit)}, of "
             f"either class, so the cut that best separates the classes lies there too. The "
             f"ranking (ROC AUC) is not affected, but read these probabilities as scores, not "
             f"as chances")
    return text + ("." if calibrated else f"; {CALIBRATE_HINT}.")


def _threshold_rule(threshold: dict, positive: str, unit: str) -> str:
    value, method = threshold["value"], threshold["method"]
    probability, validation = (("the model's predicted probability", "the validation split")
                               if unit == "slice" else
                               ("its probability", f"the validation {_plural(unit)}"))
    rule = f"A {unit} is called {positive} when {probability} is at least {value:.3g}"
    if method == "youden":
        return (f"{rule}, a threshold chosen on {validation} by Youden's J (the point "
                f"that maximises sensitivity + specificity − 1), never on the test split.")
    if method == "fixed":
        return f"{rule}, a fixed threshold set in advance rather than tuned on any data."
    if method == "sensitivity":
        return (f"{rule}, the highest threshold that reaches a sensitivity of "
                f"{threshold['target']:.3g} on {validation}, a target set in advance, never "
                f"on the test split.")
    return f"{rule}, a threshold chosen by the `{method}` method."


def _summary(metrics: dict) -> list[str]:
    test, positive = metrics["test"], metrics["positive_class"]
    negative = _negative(metrics)
    m = test["metrics"]
    grouping = grouping_meaning(metrics.get("data", {}))
    model = _model_name(metrics)
    text = (
        f"On {test['n']} held-out test slices ({test['positives']} {positive}, "
        f"{test['negatives']} {negative}) that were never used for training or for choosing the "
        f"model, {model} reached accuracy {_with_ci(m['accuracy'])}, sensitivity "
        f"{_with_ci(m['recall'])} and specificity {_with_ci(m['specificity'])}; its ROC AUC was "
        f"{_with_ci(m['roc_auc'])}. "
        f"{_threshold_text(metrics['threshold'], positive, calibrated=_calibrated(metrics))} "
        f"{grouping} ")
    where = scope(metrics.get("data", {}))
    patient = metrics.get("patient")
    if patient:
        p, pm = patient["test"], patient["test"]["metrics"]
        unit = patient.get("unit", "patients")
        text += (
            f"Per {SINGULAR[unit]} ({p['n']} test {unit}: {p['positives']} {positive}, "
            f"{p['negatives']} {negative}), calling each from the "
            f"{AGGREGATE_NAMES.get(patient['aggregate'], patient['aggregate'])} of its slices' "
            f"probabilities, it reached accuracy {_with_ci(pm['accuracy'])}, sensitivity "
            f"{_with_ci(pm['recall'])} and specificity {_with_ci(pm['specificity'])}; see "
            f"[{SINGULAR[unit].capitalize()}-level results]"
            f"(#{SINGULAR[unit]}-level-results). These results come {where} not a "
            f"validated diagnostic test; see [Limitations](#limitations).")
    else:
        text += (f"These are slice-level results {where} not a validated diagnostic test; see "
                 "[Limitations](#limitations).")
    return ["## Summary", "", text, ""]


def _calibrated(metrics: dict) -> bool:
    return metrics.get("temperature", 1.0) != 1.0


def _exported_list(metrics: dict) -> list[dict]:
    """The exported members; evaluations before ensembles existed recorded the best trial."""
    return metrics.get("ensemble", {}).get("members") or [
        {"trial_id": metrics["trial_id"], "config": metrics.get("config", {}),
         "checkpoint": metrics.get("checkpoint")}]


def _model_name(metrics: dict) -> str:
    members = _exported_list(metrics)
    calibrated = " with temperature scaling" if _calibrated(metrics) else ""
    if len(members) > 1:
        return f"the weighted ensemble of {_members(members)}{calibrated}"
    arch = (members[0].get("config") or {}).get("arch")
    return (f"the model (trial {members[0]['trial_id']}" + (f", {arch})" if arch else ")")
            + calibrated)


def _members(members: list[dict]) -> str:
    """"3 trials (a 0.60, b 0.25, c 0.15)": trial ids with their weights."""
    weights = ", ".join(f"{m['trial_id']} {m.get('weight', 1 / len(members)):.2f}"
                        for m in members)
    return f"{len(members)} trials ({weights})"


PAIRED_NAMES = {"roc_auc": "ROC AUC", "accuracy": "Accuracy", "brier": "Brier score"}


def _exported(metrics: dict) -> list[str]:
    """How ensemble selection weighed the top trials, the exported model beside the one it is
    compared with, and their paired test differences; all but the test columns fixed on val."""
    compared, ensemble = metrics.get("compared"), metrics.get("ensemble", {})
    if not compared:
        return []
    members = ensemble["members"]
    chosen = {"k": len(members), "members": [m["trial_id"] for m in members],
              "weights": [m.get("weight", 1.0) for m in members],
              "threshold": metrics["threshold"], "test": metrics["test"], "val": metrics["val"]}
    losses, held_out = ensemble.get("val_log_loss", {}), ensemble.get("cross_fitted_log_loss")
    gave = ("gave every weight to the best trial" if len(members) == 1 else
            "gave " + ", ".join(f"{m['trial_id']} {m['weight']:.2f}" for m in members))
    text = (f"Ensemble selection (Caruana et al. 2004: greedy forward selection with "
            f"replacement over {ensemble.get('rounds', '?')} rounds, as auto-sklearn and "
            f"AutoGluon use it) weighed the best checkpoints of the top {ensemble['candidates']} "
            f"trials to minimise the log-loss of their mean probability on the validation "
            f"split, a proper score that rewards probabilities that are right rather than only "
            f"well ranked. "
            + ("Each trial's probabilities were first calibrated by a temperature of its own, "
               "fitted on the other half of the validation split, so that selection weighs what "
               "each trial ranks rather than how confident it was trained to be. "
               if ensemble.get("calibrated_members") else "")
            + f"It {gave} (log-loss {_num(losses.get('ensemble'), 4)}, against "
            f"{_num(losses.get('single'), 4)} for the best trial alone). ")
    if held_out is not None:
        text += (f"Weights chosen and judged on the same slices flatter themselves: run on each "
                 f"half of the validation split and scored on the other, selection gave a "
                 f"log-loss of {_num(held_out, 4)}, what its gain is worth on slices it did not "
                 f"choose on. ")
    if compared.get("role"):
        why = (" (the best trial is the exported model)"
               if compared["role"] == COMPARED_RUNNER_UP else "")
        text += f"The exported model is compared with {compared['role']}{why}. "
    if metrics.get("temperature", 1.0) != 1.0 or compared.get("temperature", 1.0) != 1.0:
        interval = metrics.get("temperature_ci95")
        text += (f"Probabilities are calibrated by a temperature fitted on the validation split "
                 f"(to Platt's regularised targets, with a weak prior towards 1): "
                 f"{metrics.get('temperature', 1.0):.3g} for the exported model"
                 + (f" (95% interval over resamples of the validation split "
                    f"{interval[0]:.3g} to {interval[1]:.3g})" if interval else "")
                 + f", {compared.get('temperature', 1.0):.3g} for the compared one. ")
    if metrics.get("calibration_not_applied"):
        text += (f"Calibration was asked for but not applied: "
                 f"{metrics['calibration_not_applied']}. ")
    text += ("Both models, their weights, temperatures and thresholds were fixed on the "
             "validation split before the test split was read; then both were scored on it, in "
             "this one evaluation, and the choice between them was not revisited.")
    rows = []
    for entry in (chosen, compared):
        m, c = entry["test"]["metrics"], entry["test"].get("calibration", {})
        weights = entry.get("weights") or [1.0] * entry["k"]
        name = (f"trial {entry['members'][0]} alone" if entry["k"] == 1 else
                "ensemble of " + ", ".join(f"{t} ({w:.2f})"
                                            for t, w in zip(entry["members"], weights,
                                                            strict=True)))
        rows.append([f"**{name}** (exported)" if entry is chosen else name,
                     f"{entry['threshold']['value']:.3g}",
                     _num(entry["val"]["metrics"]["roc_auc"]["value"]), _with_ci(m["roc_auc"]),
                     _with_ci(m["accuracy"]), _num(c.get("brier", {}).get("value"))])
    lines = ["## Exported model and the one it is compared with", "", text, "",
             *_table(["Model (weights)", "Threshold", "Val AUC", "Test ROC AUC",
                      "Test accuracy", "Test Brier"], rows)]
    return lines + _paired(compared.get("paired"), metrics.get("bootstrap", {}))


def _paired(paired: dict | None, boot: dict) -> list[str]:
    """Exported minus compared, each difference with its paired bootstrap interval."""
    if not paired:
        return []
    rows = [[PAIRED_NAMES[key], f"{paired[key]['value']:+.3f}", _ci(paired[key])]
            for key in PAIRED_NAMES if key in paired]
    return ["### Paired differences on the test split (exported − compared)", "",
            f"Both models were scored on the same {boot.get('resamples', '?')} bootstrap "
            f"resamples of the test split (those of the intervals below), so each interval is "
            f"that of the difference itself{_dropped(paired)}. An interval that contains 0 means "
            f"this test split cannot tell the two apart; a lower Brier score is better.", "",
            *_table(["Metric", "Difference", "95% CI"], rows)]


class _OneLineLists(yaml.SafeDumper):
    """Block style, one setting a line, but a list on its line: `head: [512, 128]`."""


_OneLineLists.add_representer(list, lambda dumper, value: dumper.represent_sequence(
    "tag:yaml.org,2002:seq", value, flow_style=True))


def _settings(values: dict, keys: Sequence[str]) -> str:
    """One table cell of settings, `key=value` each, that wraps between settings only: a
    leaderboard with a column per setting is wider than a laptop screen."""
    return SETTINGS_SEPARATOR.join(f"{key}={_cell(values.get(key))}".replace(" ", NBSP)
                                   for key in keys)


def _val_aucs(metrics: dict, leaderboard: Sequence[dict]) -> dict[str, float]:
    """Each trial's best validation AUC: the leaderboard's, or a member's own where recorded."""
    aucs = {row["trial_id"]: row.get("val_auc") for row in leaderboard}
    aucs.update({m["trial_id"]: m["val_auc"] for m in _exported_list(metrics) if "val_auc" in m})
    return {t: auc for t, auc in aucs.items() if auc is not None and not math.isnan(auc)}


def _below_chance(metrics: dict, leaderboard: Sequence[dict]) -> list[str]:
    """A sentence per exported member whose validation AUC is at or below chance (0.5)."""
    aucs = _val_aucs(metrics, leaderboard)
    return [f"member {m['trial_id']} (weight {m.get('weight', 1.0):.2f}) has a validation AUC "
            f"of {aucs[m['trial_id']]:.3f}, no better than chance"
            for m in _exported_list(metrics) if aucs.get(m["trial_id"], 1.0) <= 0.5]


def _first_rung(metrics: dict) -> list[str]:
    """A phrase per exported member that ASHA stopped at its first rung: judged weaker than
    most trials after the grace period, and barely trained (members before 0.4 say nothing)."""
    return [f"member {m['trial_id']} (weight {m.get('weight', 1.0):.2f}) was stopped by ASHA "
            f"at its first rung, after {m.get('epochs', '?')} epoch"
            f"{'' if m.get('epochs') == 1 else 's'}"
            for m in _exported_list(metrics) if m.get("first_rung")]


def _kept_out(metrics: dict) -> list[str]:
    """One phrase per candidate that evaluation kept out of selection, with why (metrics'
    ensemble "excluded"; runs before it kept none out)."""
    return [f"{e['trial_id']} (validation AUC {_num(e.get('val_auc'))} after "
            f"{e.get('epochs', '?')} epoch{'' if e.get('epochs') == 1 else 's'}): "
            f"{md_text(e.get('reason', ''))}"
            for e in metrics.get("ensemble", {}).get("excluded") or []]


def _exported_members(metrics: dict, leaderboard: Sequence[dict]) -> list[str]:
    """What was exported: each member's trial, weight and the settings that tell the members
    apart, then the settings they share; and the candidates kept out of selection."""
    members = _exported_list(metrics)
    configs = [make_config(m.get("config") or {}).acting() for m in members]
    keys = list(dict.fromkeys(k for c in configs for k in c))
    differ = [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1
              or k in metrics.get("searched", {})]
    shared = {k: configs[0][k] for k in keys if k not in differ and k in configs[0]}
    aucs = _val_aucs(metrics, leaderboard)
    rows = [[m["trial_id"], f"{m.get('weight', 1 / len(members)):.2f}",
             _num(aucs.get(m["trial_id"]), 4), m.get("precision") or "—", _settings(c, differ)]
            for m, c in zip(members, configs, strict=True)]
    lines = ["### Exported members", "",
             "Each member's searched settings (and any other that differs between members); "
             "the full config of each is in the export's `config.json`.", "",
             *_table(["trial", "weight", "val AUC", "precision", "settings"], rows)]
    kept_out = _kept_out(metrics)
    if kept_out:
        lines += [f"Kept out of selection ({len(kept_out)}), so they have no weight:", "",
                  *(f"- {phrase}" for phrase in kept_out), ""]
    if shared:
        lines += ["Settings every member shares (those that act on it):", "", "```yaml",
                  yaml.dump(shared, Dumper=_OneLineLists, sort_keys=False).rstrip(),
                  "```", ""]
    lines += ["Checkpoints: " + ", ".join(md_text(m.get("checkpoint") or "n/a")
                                          for m in members), ""]
    return lines


def _negative(metrics: dict) -> str:
    others = [c for c in metrics["class_names"] if c != metrics["positive_class"]]
    return others[0] if others else "negative"


def _metric_rows(entries: dict, keys: Sequence[str], extra: dict | None = None) -> list[list]:
    rows = []
    for key in keys:
        if key in entries:
            row = [METRIC_NAMES.get(key, key), _num(entries[key].get("value")), _ci(entries[key])]
            if extra is not None:
                row.append(_num(extra.get(key, {}).get("value")))
            rows.append(row)
    return rows


def _confusion_text(cm: list[list[int]], threshold: float, negative: str, positive: str,
                    units: str) -> str:
    (tn, fp), (fn, tp) = cm
    return (f"Rows are the true class, columns the model's call at threshold {threshold:.3g}. "
            f"Of {fn + tp} {positive} {units} the model missed {fn} (false negatives); of "
            f"{tn + fp} {negative} {units} it called {fp} {positive} (false positives).")


def _confusion_table(cm: list[list[int]], negative: str, positive: str) -> list[str]:
    (tn, fp), (fn, tp) = cm
    return _table(["", f"predicted {negative}", f"predicted {positive}"],
                  [[f"**true {negative}**", f"{tn} (TN)", f"{fp} (FP)"],
                   [f"**true {positive}**", f"{fn} (FN)", f"{tp} (TP)"]])


def _results(metrics: dict, plots: dict[str, str]) -> list[str]:
    test, threshold = metrics["test"], metrics["threshold"]
    positive, negative = metrics["positive_class"], _negative(metrics)
    val = metrics.get("val")
    boot = metrics.get("bootstrap", {})
    keys = [k for k in METRIC_NAMES if k in test["metrics"]]
    header = ["Metric", "Test value", "Test 95% CI"]
    if val:
        header.append(f"Validation (n={val['n']})")
    how = THRESHOLD_METHODS.get(threshold["method"], threshold["method"])
    lines = [f"## Test results at threshold {threshold['value']:.3g} ({how})", ""]
    lines += _table(header, _metric_rows(test["metrics"], keys, val["metrics"] if val else None))
    calibrated = [m for m in ("brier", "ece") if m in test.get("calibration", {})]
    lines += [f"95% CIs: {_interval_methods(test, keys + calibrated, boot)}; all over "
              f"{_bootstrap_unit(metrics)}{_dropped(test)}. ROC AUC and PR AUC do not "
              f"depend on the threshold. The validation column is the split the model (and a "
              f"tuned threshold) was chosen on; a large gap to the test value is a warning "
              f"sign.", ""]

    at_half = test.get("at_0.5")
    if at_half and not math.isclose(threshold["value"], 0.5):
        lines += ["### At the conventional threshold 0.5", ""]
        free = [k for k in keys if k not in THRESHOLD_FREE]
        lines += _table(["Metric", "Test value", "Test 95% CI"],
                        _metric_rows(at_half["metrics"], free))
        (tn, fp), (fn, tp) = at_half["confusion_matrix"]
        lines += [f"Confusion matrix at 0.5: TN {tn}, FP {fp}, FN {fn}, TP {tp}.", ""]

    lines += ["### Confusion matrix", "",
              _confusion_text(test["confusion_matrix"], threshold["value"], negative, positive,
                              "slices"), ""]
    lines += _confusion_table(test["confusion_matrix"], negative, positive)
    lines += _figure(plots, "confusion", "Confusion matrix on the test split")
    lines += ["### ROC and precision–recall curves", "",
              "The red dot on the ROC curve is the operating point of the chosen threshold. On "
              "the PR curve the dashed line is the share of positives, what a model without "
              "skill would reach.", ""]
    lines += _figures(plots, ("roc", "ROC curve on the test split"),
                      ("pr", "Precision-recall curve on the test split"))
    lines += _calibration(test.get("calibration"), plots, _calibrated(metrics))
    return lines


def _patients(metrics: dict) -> list[str]:
    """Patient-level results, present when the split's groups are patients: each test patient
    is one observation, called from an aggregate of its slices' probabilities. Patients are
    only counted here, never named."""
    patient = metrics.get("patient")
    if not patient:
        return []
    test, val, threshold = patient["test"], patient.get("val"), patient["threshold"]
    positive, negative = metrics["positive_class"], _negative(metrics)
    boot = metrics.get("bootstrap", {})
    units = patient.get("unit", "patients")
    unit = SINGULAR[units]
    tried = ", ".join(f"{AGGREGATE_NAMES.get(m, m)} {_num(auc)}"
                      for m, auc in patient.get("val_auc_by_aggregate", {}).items())
    aggregate = patient["aggregate"]
    how = f"A {unit}'s probability is {AGGREGATE_MEANING.get(aggregate, aggregate)}. "
    if patient.get("chosen_by") == "fixed":
        how += (f"This way of combining slices was fixed before anything was scored (the mean "
                f"by default: unlike the maximum it does not grow with a {unit}'s number of "
                f"slices); for information, the validation ROC AUCs of each way: {tried}. ")
    else:
        counted = patient.get("slice_count_auc", {})
        how += (f"This way of combining slices was chosen on the validation {units}, before the "
                f"test split was scored, as the one with the best ROC AUC there ({tried}; a tie "
                f"goes to the first of these). ")
        if counted:
            how += (f"A choice can reward slice counts that differ by class, which the maximum "
                    f"feeds on: a {unit}'s number of slices alone reaches a ROC AUC of "
                    f"{_num(counted.get('val'))} on the validation {units} and "
                    f"{_num(counted.get('test'))} on the test {units}. ")
    how += _threshold_text(threshold, positive, unit, _calibrated(metrics))
    caveat = ([f"These groups are {units}, not proven patients ({UNIT_CAVEATS[units]}).", ""]
              if units != "patients" else [])
    keys = [k for k in METRIC_NAMES if k in test["metrics"]]
    header = ["Metric", "Test value", "Test 95% CI"]
    if val:
        header.append(f"Validation (n={val['n']} {units})")
    return [
        f"## {unit.capitalize()}-level results", "", how, "", *caveat,
        f"The test split holds {test['n']} {units} ({test['positives']} {positive}, "
        f"{test['negatives']} {negative}); each counts once, however many slices it has.", "",
        *_table(header, _metric_rows(test["metrics"], keys, val["metrics"] if val else None)),
        f"95% CIs: {_interval_methods(test, keys, boot)}; all over test {units}, each {unit} "
        f"one observation{_dropped(test)}.", "",
        f"### Confusion matrix in {units}", "",
        _confusion_text(test["confusion_matrix"], threshold["value"], negative, positive,
                        units), "",
        *_confusion_table(test["confusion_matrix"], negative, positive),
    ]


def _plural(unit: str) -> str:
    return next((units for units, one in SINGULAR.items() if one == unit), f"{unit}s")


def _dropped(entry: dict) -> str:
    """What the bootstrapped AUCs' intervals left out: resamples that drew one class only."""
    dropped = entry.get("resamples_dropped", 0)
    bootstrapped = entry.get("intervals", {}).get("roc_auc", "bootstrap") == "bootstrap"
    which = "AUCs' intervals" if bootstrapped else "PR AUC's interval"
    return (f" ({dropped} resamples drew one class only and are left out of the {which})"
            if dropped else "")


def _interval_methods(entry: dict, keys: list[str], boot: dict) -> str:
    """Which method made the intervals of a scored entry's metrics `keys`, in words."""
    return interval_methods(entry.get("intervals", {}), keys, f"({boot.get('resamples', '?')} "
                            f"resamples, seed {boot.get('seed', '?')})")


def _bootstrap_unit(metrics: dict) -> str:
    boot = metrics.get("bootstrap", {})
    data = {**metrics.get("data", {}), "group_by": boot.get("unit")}
    unit = bootstrap_unit_text(data) if boot.get("unit") or "data" in metrics else "test slices"
    groups = boot.get("test_groups")
    return f"{unit} ({groups} groups in the test split)" if groups else unit


def _calibration_hint(ece: float, calibrated: bool) -> str:
    """What a large expected calibration error means and what to do; "" for a small one."""
    if ece <= LARGE_ECE:
        return ""
    return (f"An ECE of {ece:.2f} is large: the probabilities are off by about "
            f"{ece:.0%} on average, so read them as scores, not as chances"
            + (" (even after the temperature applied here)." if calibrated else
               f"; {CALIBRATE_HINT}."))


def _calibration(calibration: dict | None, plots: dict[str, str],
                 calibrated: bool) -> list[str]:
    if not calibration:
        return []
    hint = _calibration_hint(calibration["ece"]["value"], calibrated)
    return ["### Calibration", "",
            "Whether the model's probabilities can be taken at their word: of the slices given "
            "a probability near 0.8, about 80% should be positive. The Brier score is the mean "
            "squared error of the probabilities (0 is perfect; always answering 0.5 gives "
            "0.25); the expected calibration error (ECE) is the average gap between predicted "
            "and observed frequency over ten probability bins, weighted by their size.", "",
            *_table(["Measure", "Test value", "Test 95% CI"],
                    [["Brier score", _num(calibration["brier"]["value"]),
                      _ci(calibration["brier"])],
                     ["Expected calibration error", _num(calibration["ece"]["value"]),
                      _ci(calibration["ece"])]]),
            *([hint, ""] if hint else []),
            *_figure(plots, "reliability", "Reliability diagram on the test split")]


def _figure(plots: dict[str, str], name: str, alt: str) -> list[str]:
    return _figures(plots, (name, alt))


def _figures(plots: dict[str, str], *figures: tuple[str, str]) -> list[str]:
    """Figures (name, alt) in one paragraph: report.html sets two of them side by side."""
    shown = [_image(alt, plots[name]) for name, alt in figures if name in plots]
    return [*shown, ""] if shown else []


def _evaluations(evaluations: dict | None) -> list[str]:
    """How many times the test split has been scored, from results/evaluations.jsonl."""
    if not evaluations:  # evaluated before the ledger existed
        return []
    count, earlier = evaluations["count"], evaluations["earlier"]
    others = evaluations.get("other_looks", [])
    seen = ([f"Its files were also run through the exported model: "
             f"{'; '.join(describe_look(e) for e in others)}."] if others else [])
    if count == 1:
        return [" ".join(["**The test split of this run has been scored 1 time**, by this "
                          "evaluation: the first, and the one to report "
                          "(`results/evaluations.jsonl` records every one).", *seen]), ""]
    looks = "; ".join(describe_look(e, evaluations) for e in earlier)
    return [" ".join([f"**The test split of this run has been scored {count} times**; this "
                      f"report is evaluation {count}. Earlier: {looks} "
                      "(`results/evaluations.jsonl`). The first evaluation is the one to report: "
                      "a later one run with other options, or on a model changed since, could "
                      "keep whatever the test split favoured.", *seen]), ""]


def _search(metrics: dict, leaderboard: list[dict], plots: dict[str, str]) -> list[str]:
    lines = ["## How the model was chosen", "",
             "A Ray Tune search trained many configurations on the training split and ranked "
             "them by their best validation ROC AUC. The exported model (and the one it is "
             "compared with, when there is one) was fixed on the validation split; only then, "
             "after the search had ended, was the test split scored.", ""]
    lines += _evaluations(metrics.get("evaluations"))
    lines += _search_extent(metrics.get("search", {}))
    if "training_curves" in plots:
        lines += ["### Training curves of the top trials", "",
                  "Validation loss rising while training loss keeps falling means over-fitting.",
                  ""]
        lines += _figure(plots, "training_curves", "Training curves of the top trials")
    if "hparams" in plots:
        lines += ["### Hyperparameters vs validation AUC", "",
                  "Each dot is one trial; the star is the winner. A clear trend means the "
                  "setting mattered; a flat cloud means it did not, within the range searched.",
                  ""]
        lines += _figure(plots, "hparams", "Searched hyperparameters vs best validation AUC")
    lines += _importance(leaderboard)
    lines += _leaderboard(leaderboard, metrics)
    return lines + _exported_members(metrics, leaderboard)


def _search_extent(search: dict) -> list[str]:
    if not search:
        return []
    text = (f"The search ran {search['trials']} trials; {search['trials_stopped_early']} were "
            "stopped early by ASHA")
    # Absent from the best.json of searches run before ctscan told these trials apart.
    ended = search.get("trials_ended_by_budget")
    if ended:
        text += (f", {ended} {'was' if ended == 1 else 'were'} still running when the time "
                 "budget ended the search,")
    text += f" and {search['errored_trials']} failed."
    if search.get("budget_reached"):
        text += (f" **Its time budget ({search['time_budget_s']:.0f} s) was reached:** the "
                 "search ended on time, not because every planned trial had run.")
    elif search.get("time_budget_s"):
        text += f" It ended within its time budget ({search['time_budget_s']:.0f} s)."
    return [text, ""]


LEADERBOARD_FIXED = ("trial_id", "val_auc", "epochs", "status")


def _searched_keys(leaderboard: Sequence[dict]) -> list[str]:
    return list(dict.fromkeys(k for row in leaderboard for k in row if k not in LEADERBOARD_FIXED))


def _leaderboard(leaderboard: list[dict], metrics: dict) -> list[str]:
    """The top trials by validation AUC, and every exported member below them: rank, status,
    weight in the exported model (or why it was kept out) and settings."""
    if not leaderboard:
        return []
    searched = _searched_keys(leaderboard)
    weights = {m["trial_id"]: f"{m.get('weight', 1.0):.2f}" for m in _exported_list(metrics)}
    kept_out = {e["trial_id"] for e in metrics.get("ensemble", {}).get("excluded") or []}
    rows = []
    ranked = list(enumerate(leaderboard, 1))
    for rank, row in [(r, row) for r, row in ranked
                      if r <= LEADERBOARD_ROWS or row["trial_id"] in weights]:
        trial = (f"**{row['trial_id']}**" if row["trial_id"] == metrics["trial_id"]
                 else row["trial_id"])
        member = weights.get(row["trial_id"], "kept out" if row["trial_id"] in kept_out else "—")
        rows.append([rank, trial, _num(row.get("val_auc"), 4), _cell(row.get("epochs")),
                     _cell(row.get("status")), member, _settings(row, searched)])
    shown = min(len(leaderboard), LEADERBOARD_ROWS)
    # The statuses that say who ended a trial, explained for those in the table.
    meanings = {"stopped early": "were cut by ASHA for trailing the others",
                "budget": "were still running when the time budget ended the search: cut by "
                          "the clock, never judged worse"}
    statuses = {row.get("status") for row in leaderboard[:LEADERBOARD_ROWS]}
    legend = [f"\"{status}\" trials {meaning}" for status, meaning in meanings.items()
              if status in statuses]
    legend.append("\"weight\" is a trial's share of the exported model"
                  + ("; \"kept out\" trials were not offered to ensemble selection (see "
                     "Exported members)" if kept_out else ""))
    beyond = len(rows) - shown
    return ([f"### Leaderboard (top {shown} of {len(leaderboard)} trials, by validation AUC"
             + (f", and {beyond} exported member{'s' * (beyond > 1)} below them)" if beyond
                else ")"), "", "; ".join(legend) + ".", ""]
            + _table(["#", "trial", "val AUC", "epochs", "status", "weight", "settings"], rows))


def _importance(leaderboard: Sequence[dict]) -> list[str]:
    """Which searched settings explain the spread in validation AUC (results.importance), or
    why that is not estimated."""
    keys = _searched_keys(leaderboard)
    if not keys:
        return []
    found = parameter_importance(leaderboard, keys)
    lines = ["### Which settings mattered", ""]
    if not found["importance"]:
        return [*lines, f"With {found['trials']} scored trials, fewer than the {MIN_TRIALS} that "
                "fANOVA needs (a random forest fitted to fewer trials mostly fits their noise), "
                "how much each setting mattered is not estimated; the figure above shows each "
                "setting against validation AUC instead.", ""]
    left_out = found["left_out"]
    rows = [[md_text(key), f"{share:.2f}", "█" * round(20 * share) or "▏"]
            for key, share in found["importance"].items()]
    return [*lines,
            f"Optuna's fANOVA (seed 0) fitted a random forest to the {found['trials']} scored "
            "trials' settings and validation AUCs and split the spread of its predictions among "
            "the settings: a larger share means the setting mattered more, within the range "
            "searched. It shows how much, not in which direction (the figure above does)."
            + (f" Left out: {', '.join(md_text(k) for k in left_out)} (not set on every trial, "
               "or never varied)." if left_out else ""), "",
            *_table(["setting", "share", ""], rows)]


def _failures(failures: Sequence[dict]) -> list[str]:
    if not failures:
        return []
    lines = [f"### Failed trials ({len(failures)})", "",
             "These trials raised an error; the search went on without them. A trial that failed "
             "after some epochs still competed with the epochs it finished.", ""]
    for f in failures:
        # In the run folder, named from there: where a machine keeps it is nobody's business.
        in_run = "/".join(PurePosixPath(str(f["error_file"])).parts[-2:])
        lines.append(f"- {f['trial_id']} after {f['epochs']} epochs: {md_text(f['error'])} "
                     f"(full error: {md_text(in_run)} in the run folder)")
    return [*lines, ""]


def _data(metrics: dict) -> list[str]:
    data = metrics.get("data")
    if not data:
        return []
    classes = list(metrics["class_names"])
    units = groups_are(data)
    kinds = data.get("group_kinds") or {}
    of = (f" ({', '.join(f'{n} {k}' for k, n in kinds.items())})" if len(kinds) > 1 else "")
    lines = ["## Data", "",
             f"Data: {data_named(data)}. {data.get('images', '?')} readable images, split by "
             f"`group_by: {data.get('group_by', '?')}` with seed {data.get('split_seed', '?')}"
             f"; the split's groups are {units}{of}"
             # Splits before ctscan 0.4 (no recorded unit) dealt the largest groups first.
             + (", each drawn at random into one split (stratified by class), so the test "
                "split is a random sample of them." if "unit" in data else "."), ""]
    counts, groups = data.get("split_counts", {}), data.get("split_groups")
    if counts:
        total = sum(sum(c.values()) for c in counts.values())
        rows = [[split, *(c.get(k, 0) for k in classes), sum(c.values()),
                 f"{sum(c.values()) / total:.0%}",
                 *([groups[split], f"{groups[split] / sum(groups.values()):.0%}"]
                   if groups else [])]
                for split, c in counts.items()]
        rows.append(["**total**", *(sum(c.get(k, 0) for c in counts.values()) for k in classes),
                     total, "100%", *([sum(groups.values()), "100%"] if groups else [])])
        lines += _table(["split", *classes, "slices", "share",
                         *([units, "share"] if groups else [])], rows)
    if units != "patients" and units in UNIT_CAVEATS:
        lines += [f"What grouping by {units} does not guarantee: {UNIT_CAVEATS[units]}.", ""]
    skipped = data.get("skipped", [])
    lines += [f"Skipped files (could not be decoded): {len(skipped) or 'none'}", ""]
    lines += [f"- {md_text(s['path'])}: {md_text(s['reason'])}"
              for s in skipped[:MAX_SKIPPED_LISTED]]
    if len(skipped) > MAX_SKIPPED_LISTED:
        lines.append(f"- … and {len(skipped) - MAX_SKIPPED_LISTED} more")
    if skipped:
        lines.append("")
    return lines


def _gradcams(gradcams: Sequence[str | dict], metrics: dict) -> list[str]:
    """A grid of Grad-CAM thumbnails, each captioned with the slice's file name (as written),
    its true class and the model's call. An entry is the overlay's path relative to report.md,
    or {"image": that path, "name": the slice's path in the data, "label": its class index,
    "prob": the exported model's probability, "group": its group in the split}."""
    if not gradcams:
        return []
    positive, classes = metrics["positive_class"], metrics["class_names"]
    unit = SINGULAR.get(groups_are(metrics.get("data", {})), "group")
    lines = ["## Grad-CAM examples", "", _gradcam_note(positive), ""]
    for i, entry in enumerate(gradcams, 1):
        if isinstance(entry, str):  # explain's `<stem>_gradcam.png`: the stem is all we know
            entry = {"image": entry, "name": Path(entry).stem.removesuffix("_gradcam")}
        caption = md_text(entry["name"])
        if "prob" in entry:
            label = classes[entry["label"]]
            called = positive if entry["prob"] >= metrics["threshold"]["value"] else _negative(
                metrics)
            verdict = (f"right: {called}" if called == label else
                       f"**wrong**: {label}, called {called}")
            caption = (f"{verdict} (p = {entry['prob']:.3f}), {unit} {entry['group']}: "
                       f"{caption}")
        # The alt text names no file: TensorBoard's text tab rewrites image links by a pattern
        # that a name with brackets would break.
        lines.append(f"- {_image(f'Grad-CAM overlay {i}', entry['image'])} {caption}")
    return [*lines, ""]


def _limitations(metrics: dict) -> list[str]:
    data = {**metrics.get("data", {}), "group_by": metrics.get("bootstrap", {}).get("unit")}
    return [
        "## Limitations", "",
        *(f"- **{title}.** {text}" for title, text in
          [*limitations("patient" in metrics, metrics.get("data", {})),
           interval_limitation(data)]),
        "- **Threshold.** The threshold was fixed before testing; on a population with a "
        "different prevalence or scanner, sensitivity and specificity at that threshold will "
        "shift, and precision with them.",
        "",
    ]


def _why(metrics: dict) -> str:
    """Why the exported model was chosen, in one or two plain sentences."""
    ensemble, members = metrics.get("ensemble", {}), _exported_list(metrics)
    losses = ensemble.get("val_log_loss", {})
    ours, single = _num(losses.get("ensemble"), 4), _num(losses.get("single"), 4)
    fixed = (" It was fixed on the validation split; the test split played no part in the "
             "choice.")
    if len(members) > 1:
        return (f"On the validation split, the weighted mean of these {len(members)} trials' "
                f"probabilities came closer to the truth than the best trial's alone (log-loss "
                f"{ours} against {single}; lower is better), so ensemble selection kept them "
                "all." + fixed)
    if members[0]["trial_id"] == metrics["trial_id"]:
        return ("It is the trial with the best validation ROC AUC"
                + (f", and no weighted mix of the top {ensemble['candidates']} trials gave "
                   "probabilities closer to the truth on the validation split (lower log-loss)"
                   if ensemble.get("candidates", 1) > 1 else "") + "." + fixed)
    return (f"Its probabilities came closer to the truth on the validation split (log-loss "
            f"{ours}) than those of the trial with the best validation ROC AUC "
            f"({metrics['trial_id']}, {single}), so ensemble selection kept it alone." + fixed)


def _headline(metrics: dict, leaderboard: Sequence[dict]) -> list[str]:
    """The box under the title: the exported model, its four key test figures with their
    intervals, why it was chosen, and what must not be missed."""
    test, patient = metrics["test"], metrics.get("patient")
    header = ["Test", f"Slices (n={test['n']})", "95% CI"]
    if patient:
        unit = patient.get("unit", "patients")
        header.append(f"{SINGULAR[unit].capitalize()}s (n={patient['test']['n']}), 95% CI")
    rows = [[METRIC_NAMES[key], _num(test["metrics"][key].get("value")),
             _ci(test["metrics"][key]),
             *([_with_ci(patient["test"]["metrics"][key])] if patient else [])]
            for key in HEADLINE_KEYS if key in test["metrics"]]
    notes = []
    if data_source(metrics.get("data", {})) == DEMO_SOURCE:
        notes.append("**Demo data.** These slices were generated by `ctscan make-demo-data`, "
                     "not taken from patients: the figures show that the pipeline works, not "
                     "how a model does on CT scans.")
    below = _below_chance(metrics, leaderboard)
    if below:
        notes.append(f"**Worse than chance:** {'; '.join(below)}. Such a member adds noise to "
                     "the exported model's probabilities; see [Exported members]"
                     "(#exported-members).")
    barely = _first_rung(metrics)
    if barely:
        notes.append(f"**Barely trained:** {'; '.join(barely)}. Selection weighed it by its "
                     "validation log-loss all the same; see [Exported members]"
                     "(#exported-members).")
    kept_out = _kept_out(metrics)
    if kept_out:
        notes.append(f"**Kept out of selection:** {'; '.join(kept_out)}.")
    ece = test.get("calibration", {}).get("ece", {}).get("value")
    hint = _calibration_hint(ece, _calibrated(metrics)) if ece is not None else ""
    if hint:
        notes.append(f"**Calibration.** {hint}")
    box = [f"**Exported:** {_model_name(metrics)}; positive class **{metrics['positive_class']}**.",
           "", *_table(header, rows), f"**Why this model:** {_why(metrics)}", "",
           *(line for note in notes for line in (note, ""))]
    return [f"> {line}".rstrip() for line in box[:-1]] + [""]


def _contents(body: Sequence[str]) -> list[str]:
    """Links to the report's sections, in one paragraph."""
    headings = [line[3:] for line in body if line.startswith("## ")]
    links = " · ".join(f"[{h}](#{github_slug(h.replace(chr(92), ''))})" for h in headings)
    return [f"**Contents:** {links}", ""]


def _glossary(text: str) -> list[str]:
    terms = glossary(text)
    if not terms:
        return []
    return ["## Glossary", "", *(f"- **{term}**: {meaning}" for term, meaning in terms), ""]


def write_report(path: Path, metrics: dict, leaderboard: list[dict], plots: dict[str, str],
                 gradcams: Sequence[str | dict] = (), failures: Sequence[dict] = ()) -> None:
    """Write report.md atomically; `plots` and `gradcams` (see _gradcams) are paths relative
    to its folder; `failures` are trials.json's errored trials (trial_id, epochs, error,
    error_file)."""
    # Class names are folder names: user text, escaped once here for every sentence below.
    metrics = {**metrics, "positive_class": md_text(metrics["positive_class"]),
               "class_names": [md_text(c) for c in metrics["class_names"]]}
    body = [*_summary(metrics), *_exported(metrics), *_results(metrics, plots),
            *_patients(metrics), *_search(metrics, leaderboard, plots), *_failures(failures),
            *_data(metrics), *_gradcams(gradcams, metrics), *_limitations(metrics)]
    body += _glossary("\n".join(body))
    lines = [f"# {metrics['positive_class']} CT classifier: test report", "",
             *_headline(metrics, leaderboard), *_contents(body), *body]
    text = "\n".join(lines).rstrip() + "\n"
    # Bytes, not text mode: the report has non-ASCII (São Paulo, −, –) whatever the locale is.
    with atomic_write(Path(path), "wb") as f:
        f.write(text.encode("utf-8"))
