"""model_card.md: what an exported model is, what it was tested on and how to load it, written
from the exported config.json so the two never disagree, in the report's words (results.wording).
"""

from __future__ import annotations

import math
from typing import Any

from results.model_folder import FILES
from results.wording import (
    AGGREGATE_MEANING,
    data_folder,
    data_named,
    glossary,
    grouping_meaning,
    interval_limitation,
    limitations,
    md_text,
)


def model_card(meta: dict) -> str:
    """Markdown model card built from the exported config."""
    data = meta.get("data", {})
    size, members = meta["image_size"], meta["members"]
    # Class names are folder names: user text, shown as written (md_text).
    positive, negative = md_text(meta["positive_class"]), md_text(meta["negative_class"])
    patient = meta.get("patient")  # {"aggregate", "threshold"} when evaluated per patient
    subject = "single CT slices, and patients from their slices," if patient else "single CT slices"
    what = (members[0]["arch"] if len(members) == 1
            else f"ensemble of {len(members)} ({', '.join(m['arch'] for m in members)})")
    lines = [
        f"# ctscan model: {what} ({positive} vs {negative})", "",
        "## Intended use", "",
        f"Research on classifying {subject} as {positive} or {negative}. **Not for "
        "diagnosis**: this is not a medical device and must not be used to make or support "
        "clinical decisions.", "",
        "## Model", "",
    ]
    if len(members) > 1:
        lines.append(f"- The weighted mean probability of {len(members)} networks, the best "
                     "checkpoints of the search's top trials, weighted by ensemble selection on "
                     "the validation split")
    for m in members:
        trial = f" (trial {md_text(m['trial_id'])}" if "trial_id" in m else ""
        if len(members) > 1 and "weight" in m:
            trial = f"{trial or ' ('}{', ' if trial else ''}weight {m['weight']:.2f}"
        trial += ")" if trial else ""
        trained = f", trained in {m['precision']}" if m.get("precision") else ""
        lines.append(f"- Architecture{trial}: {m['arch']} (torchvision), 1-channel input, head "
                     f"{m['head']}, dropout {_fmt(m['dropout'])}, activation "
                     f"{m['activation']}{trained}")
    norm = meta["normalization"]
    lines += [
        f"- Input: one grayscale slice, {size} x {size} px ({meta['resize']} resize), uint8; "
        f"normalised as (pixels / 255 - {norm['mean']}) / {norm['std']}",
        f"- Output: one logit for {positive}; probability = sigmoid(logit)",
        f"- Decision threshold: probability >= {meta['threshold']:.4g} -> {positive}, else "
        f"{negative}",
    ]
    if patient:
        aggregate, method = patient["aggregate"], meta.get("patient_threshold_method")
        threshold_how = {"youden": "the threshold by Youden's J on the same patients",
                         "fixed": "the threshold was fixed in advance",
                         "sensitivity": "the threshold by a target sensitivity set in advance, "
                                        "on the same patients"}.get(
            method, f"the threshold by the `{method}` method")
        lines.append(f"- Patient (or CT series) decision (`{aggregate}`): its probability is "
                     f"{AGGREGATE_MEANING.get(aggregate, aggregate)}; >= "
                     f"{patient['threshold']:.4g} -> {positive}, else {negative}. The "
                     f"aggregate was "
                     + ("fixed in advance"
                        if meta.get("patient_aggregate_chosen_by") == "fixed" else
                        "chosen by ROC AUC on the validation patients")
                     + ", "
                     f"{threshold_how}; `ctscan predict` calls each DICOM series or NIfTI "
                     f"volume so")
    if meta.get("temperature", 1.0) != 1.0:
        lines.append(f"- Calibrated: logits divided by a temperature of "
                     f"{meta['temperature']:.4g}, fitted on the validation split to Platt's "
                     f"regularised targets, with a weak prior towards 1")
    if meta.get("searched"):
        searched = ", ".join(f"{k}={md_text(_fmt(v))}" for k, v in meta["searched"].items())
        lines.append(f"- Searched hyperparameters of the best trial: {searched}")
    lines += ["", "## Data", ""]
    # The folder by its name only, never where a machine keeps it; its source in words.
    lines += ([f"- Source: {data_named(data)}",
               *_bullets({**{k: v for k, v in data.items() if k != "source"},
                          "path": data_folder(data)})] if data
              else ["- Not recorded in this export."])
    lines += [f"- Grouping: {grouping_meaning(data) if data else 'not recorded'}", "",
              "## Test metrics", ""]
    metrics = meta.get("test_metrics") or {}
    scored = meta.get("test_split_scored")
    if scored:
        lines += [f"The test split has been scored {scored} time{'s' * (scored > 1)}, this "
                  "evaluation included" + (": the first evaluation is the one to report."
                                           if scored > 1 else "."), ""]
    lines += _metric_table(metrics) if metrics else ["Not recorded in this export.", ""]
    patient_test = meta.get("patient_test")
    if patient_test:
        lines += ["## Patient-level test metrics", "",
                  f"On {patient_test['n']} test patients ({patient_test['positives']} "
                  f"{positive}, {patient_test['negatives']} {negative}), each one observation; "
                  "95% CIs: Wilson score intervals for accuracy, sensitivity, specificity and "
                  "precision, DeLong's on the logit scale for ROC AUC (Hanley & McNeil's "
                  "variance where the classes do not overlap), a percentile bootstrap over "
                  "patients for F1 and PR AUC.", "",
                  *_metric_table(patient_test["metrics"])]
    lines += ["## Limitations", ""]
    lines += [f"- {title}: {text}" for title, text in
              [*limitations(patient is not None, data), interval_limitation(data)]]
    lines += [
        "",
        "## How to load", "",
        "With plain torch (no ctscan), from uint8 slices decoded to grayscale and resized to "
        f"{size} x {size} as above:", "",
        "```python",
        "import torch",
        f"model = torch.jit.load({FILES['torchscript']!r})",
        f"prob = torch.sigmoid(model(images))  # images: torch.uint8 [B, {size}, {size}]",
        "```", "",
        "With onnxruntime alone (no torch):", "",
        "```python",
        "import onnxruntime, numpy as np",
        f"session = onnxruntime.InferenceSession({FILES['onnx']!r})",
        "logits = session.run(None, {'images': images})[0]  # images: np.uint8 [B, S, S]",
        "prob = 1 / (1 + np.exp(-logits))",
        "```", "",
        f"With ctscan: `model, description = ctmodels.load_model({FILES['state_dict']!r})` "
        "(weights_only=True), then `ctmodels.predict_proba(model, images)`; or `ctscan predict "
        "MODEL_DIR IMAGES...`.", "",
    ]
    terms = glossary("\n".join(lines))
    lines += ["## Glossary", "", *(f"- **{term}**: {meaning}" for term, meaning in terms), ""]
    return "\n".join(lines)


def _metric_table(metrics: dict) -> list[str]:
    lines = ["| metric | value | 95% CI |", "|---|---|---|"]
    for name, m in metrics.items():
        value, ci = (m.get("value"), m.get("ci95")) if isinstance(m, dict) else (m, None)
        interval = f"[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "-"
        lines.append(f"| {name} | {_fmt(value)} | {interval} |")
    return [*lines, ""]


def _bullets(d: dict, indent: str = "") -> list[str]:
    lines = []
    for k, v in d.items():
        if isinstance(v, dict):
            lines += [f"{indent}- {md_text(k)}:", *_bullets(v, indent + "  ")]
        elif isinstance(v, list) and any(isinstance(x, dict | list) for x in v):
            # e.g. the skipped files: a card lists how many, config.json keeps them all
            lines.append(f"{indent}- {md_text(k)}: {len(v)} (listed in {FILES['config_json']})")
        else:
            lines.append(f"{indent}- {md_text(k)}: {md_text(_fmt(v))}")
    return lines


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.4g}"
    return str(v)
