"""The report's and model card's words are true of the run: its data, its members, its names."""

import copy
import re
from pathlib import Path

import markdown
import numpy as np
from PIL import Image
from test_plots_report import LEADERBOARD, METRICS, PLOTS
from test_report_html import Page

from results.gradcam_picks import pick_slices
from results.importance import MIN_TRIALS, parameter_importance
from results.model_card import model_card
from results.report import write_report
from results.report_html import write_report_html
from results.wording import DEMO_SOURCE, SARSCOV2_SOURCE, source_of_files

# Markdown and HTML syntax a file or folder name may hold (no "/"): a link, an image, a tag, a
# heading mark, an escape, a percent-encoding, emphasis, code, a table cell and an entity.
EVIL = "[x](https:e.vil)#1 %20 <b>b ![i](i.png) <img src=i.png> *a* _b_ `c` \\ | &amp;"
SECRET = "/home/alice/hospital-data"


def _write(folder: Path, metrics: dict, gradcams: list | None = None,
           leaderboard: list | None = None) -> tuple[str, str]:
    """report.md and report.html of `metrics` in folder, with every figure a small PNG."""
    folder.mkdir(parents=True, exist_ok=True)
    for rel in [*PLOTS.values(), *(g["image"] for g in gradcams or [])]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 6), (9, 99, 199)).save(folder / rel)
    write_report(folder / "report.md", metrics, LEADERBOARD if leaderboard is None else leaderboard,
                 PLOTS, gradcams or [])
    write_report_html(folder / "report.md", folder / "report.html")
    return ((folder / "report.md").read_text(encoding="utf-8"),
            (folder / "report.html").read_text(encoding="utf-8"))


def _card_meta(data: dict) -> dict:
    """The config.json keys model_card reads, by hand (no export, no torch)."""
    return {"image_size": 64, "resize": "pad", "threshold": 0.42,
            "members": [{"arch": "resnet18", "head": [], "dropout": 0.1, "activation": "relu",
                         "trial_id": "a1b2c3"}],
            "positive_class": METRICS["positive_class"], "negative_class": "non-COVID",
            "normalization": {"mean": 0.47, "std": 0.37}, "data": data,
            "test_metrics": METRICS["test"]["metrics"]}


def _text(page: str) -> str:
    """The text a reader sees in an HTML page (entities resolved, tags dropped)."""
    import html
    return html.unescape(re.sub(r"<[^>]+>", "", page))


def test_a_name_with_markdown_syntax_shows_as_written_and_adds_no_link_or_image(tmp_path):
    metrics = copy.deepcopy(METRICS)
    metrics["data"]["path"] = f"/data/{EVIL}"
    metrics["data"]["skipped"] = [{"path": f"COVID/{EVIL}.png", "reason": "truncated PNG"}]
    gradcams = [{"image": "gradcam/x_gradcam.png", "name": f"COVID/{EVIL}.png", "label": 1,
                 "prob": 0.9, "group": 3}]
    md, page = _write(tmp_path / "results", metrics, gradcams)
    parsed = Page(page)

    # report.html: the report's own figures, embedded, and links to its own headings only.
    imgs = parsed.attrs("img")
    assert len(imgs) == len(PLOTS) + 1
    assert all(a["src"].startswith("data:image/png;base64,") for a in imgs)
    assert all((a.get("href") or "").startswith("#") for a in parsed.attrs("a"))
    assert not parsed.attrs("b")
    seen = _text(page)
    for shown in (f"COVID/{EVIL}.png: truncated PNG", f"folder {EVIL}", f"COVID/{EVIL}.png"):
        assert shown in seen, shown

    # report.md as GitHub would render it, raw HTML allowed: still no link, image or tag.
    rendered = markdown.markdown(md, extensions=["tables"])
    targets = "".join(re.findall(r'(?:href|src)="([^"]*)"', rendered))
    assert "e.vil" not in targets and "i.png" not in targets
    assert "<b>" not in rendered and rendered.count("<img") == len(PLOTS) + 1
    assert f"COVID/{EVIL}.png" in _text(rendered)
    # The whole name reaches the figure's caption, nothing cut at "#" or a dot.
    grid = md[md.index("## Grad-CAM"):md.index("## Limitations")]
    assert f"COVID/{EVIL}.png" in _text(markdown.markdown(grid, extensions=["tables"]))


def test_a_demo_run_says_demo_data_and_no_absolute_path_of_the_data(tmp_path):
    metrics = copy.deepcopy(METRICS)
    metrics["data"].update(path=f"{SECRET}/demo-data", source=DEMO_SOURCE)
    md, page = _write(tmp_path / "results", metrics)
    card = model_card(_card_meta(metrics["data"]))
    for text in (md, _text(page), card):
        assert SECRET not in text and "/home/alice" not in text
        limitations = text[text.index("Limitations"):]
        assert "Demo data, not patients" in limitations and "make-demo-data" in limitations
        assert "São Paulo" not in text and "single centre" not in text
    assert "**Demo data.**" in md[:md.index("## Summary")]  # in the headline box
    assert "folder demo-data" in md and "- path: demo-data" in card

    # A run recorded before "source" existed is known as demo data by the folder --demo makes.
    del metrics["data"]["source"]
    md, _ = _write(tmp_path / "old", metrics)
    assert "Demo data, not patients" in md[md.index("## Limitations"):]
    # Data nobody knows: spoken of generically, and still by the folder's name only.
    metrics["data"]["path"] = f"{SECRET}/scans"
    md, _ = _write(tmp_path / "other", metrics)
    limitations = md[md.index("## Limitations"):]
    assert "One data set" in limitations and "folder scans" in limitations
    assert "São Paulo" not in md and SECRET not in md and "Demo data" not in md
    # The SARS-CoV-2 CT-scan dataset, and only it, comes from São Paulo.
    metrics["data"]["source"] = SARSCOV2_SOURCE
    md, _ = _write(tmp_path / "kaggle", metrics)
    assert "São Paulo" in md[md.index("## Limitations"):]
    assert "São Paulo" in model_card(_card_meta(metrics["data"]))


def test_the_source_is_known_only_from_every_file_name():
    demo = ["COVID/covid-p000-s00.png", "non-COVID/noncovid-p012-s03.png"]
    kaggle = ["COVID/Covid (1).png", "non-COVID/Non-Covid (1003).png"]
    assert source_of_files(demo) == DEMO_SOURCE
    assert source_of_files(["COVID/covid-p001.nii.gz#4"]) == DEMO_SOURCE
    assert source_of_files(kaggle) == SARSCOV2_SOURCE
    assert source_of_files([*demo, *kaggle]) is None  # a mix is neither
    assert source_of_files(["COVID/scan1.png"]) is None and source_of_files([]) is None


def _ensemble_metrics() -> dict:
    metrics = copy.deepcopy(METRICS)
    config = {"arch": "resnet50", "lr": 0.0003}
    metrics["ensemble"] = {
        "k": 2, "candidates": 5, "rounds": 20, "val_log_loss": {"ensemble": 0.2, "single": 0.23},
        "members": [{"trial_id": "a1b2c3", "weight": 0.65, "config": config},
                    {"trial_id": "t11", "weight": 0.35, "config": {**config, "lr": 0.01},
                     "epochs": 1, "first_rung": True}],
        "excluded": [{"trial_id": "t07", "val_auc": 0.4, "epochs": 1,
                      "reason": "no better than chance on val (AUC 0.5 or less)"}]}
    return metrics


def test_the_headline_says_why_and_flags_members_worse_than_chance_and_those_kept_out(tmp_path):
    metrics = _ensemble_metrics()
    leaderboard = [*LEADERBOARD[:11], {**LEADERBOARD[11], "trial_id": "t11", "val_auc": 0.45}]
    md, page = _write(tmp_path / "r", metrics, leaderboard=leaderboard)
    headline = md[:md.index("**Contents:**")]
    assert headline.startswith("# COVID CT classifier: test report\n\n> **Exported:** ")
    for figure in ("| Sensitivity (recall) | 0.850 | 0.790–0.910 |",
                   "| Specificity | 0.790 | 0.720–0.860 |", "| ROC AUC | 0.900 | 0.860–0.940 |",
                   "| Accuracy | 0.820 | 0.770–0.870 |"):
        assert f"> {figure}" in headline
    assert ("**Why this model:** On the validation split, the weighted mean of these 2 trials' "
            "probabilities came closer to the truth than the best trial's alone (log-loss "
            "0.2000 against 0.2300") in headline
    assert ("**Worse than chance:** member t11 (weight 0.35) has a validation AUC of 0.450, no "
            "better than chance") in headline
    assert ("**Kept out of selection:** t07 (validation AUC 0.400 after 1 epoch): no better "
            "than chance on val") in headline
    assert ("**Barely trained:** member t11 (weight 0.35) was stopped by ASHA at its first "
            "rung, after 1 epoch.") in headline
    members = md[md.index("### Exported members"):]
    assert "Kept out of selection (1), so they have no weight:" in members
    # The leaderboard shows every member, the one ranked 12th too, with its weight.
    board = md[md.index("### Leaderboard"):md.index("### Exported members")]
    assert "and 1 exported member below them" in board and "| 12 | t11 | 0.4500 |" in board
    assert "| 12 | t11 | 0.4500 | 7 | stopped early | 0.35 |" in board
    assert "| 8 | t07 | 0.8800 | 7 | stopped early | kept out |" in board
    # Every link of the table of contents lands on a heading of report.html.
    parsed = Page(page)
    ids = {a["id"] for _t, a in parsed.elements if a.get("id")}
    contents = re.findall(r"\]\(#([^)]+)\)", md[md.index("**Contents:**"):md.index("## Summary")])
    assert len(contents) >= 6 and set(contents) <= ids

    # Metrics from before "excluded" existed, and no member below chance: nothing flagged.
    del metrics["ensemble"]["excluded"]
    del metrics["ensemble"]["members"][1]["first_rung"]
    md, _ = _write(tmp_path / "old", metrics)
    assert "Kept out" not in md and "Worse than chance" not in md and "Barely" not in md


def test_a_tiny_threshold_and_a_large_calibration_error_are_explained(tmp_path):
    metrics = copy.deepcopy(METRICS)
    metrics["threshold"]["value"] = 0.003
    metrics["test"]["calibration"] = {"brier": {"value": 0.2, "ci95": [0.18, 0.22]},
                                      "ece": {"value": 0.23, "ci95": [0.2, 0.26]}, "bins": []}
    md, _ = _write(tmp_path / "r", metrics)
    summary = md[md.index("## Summary"):md.index("## Test results")]
    assert ("A threshold of 0.003 means that a slice is called COVID as soon as the model gives "
            "it a probability of 0.3%") in summary and "--calibrate" in summary
    assert "An ECE of 0.23 is large" in md[md.index("### Calibration"):]
    assert "**Calibration.** An ECE of 0.23 is large" in md[:md.index("## Summary")]
    glossary = md[md.index("## Glossary"):]
    for term in ("Youden's J", "Brier score", "ECE", "ASHA", "Perceptual hash", "Bootstrap"):
        assert f"- **{term}" in glossary, term
    for unused in ("Caruana", "bf16", "Cross-fitted", "Log-loss"):
        assert unused not in glossary, unused

    # Calibrated: no hint to calibrate, and 0.42 needs no words.
    metrics["temperature"], metrics["threshold"]["value"] = 1.7, 0.42
    metrics["test"]["calibration"]["ece"]["value"] = 0.03
    md, _ = _write(tmp_path / "calibrated", metrics)
    assert "--calibrate" not in md and "A threshold of" not in md and "is large:" not in md


def test_the_grad_cam_grid_shows_mistakes_first_from_several_patients():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 0])
    prob = np.array([0.1, 0.2, 0.9, 0.95, 0.8, 0.7, 0.1, 0.05, 0.3, 0.2])
    groups = np.array([0, 0, 1, 2, 3, 3, 4, 5, 6, 7])
    picks = pick_slices(y, prob, 0.5, groups, 6)
    # The surest miss (0.1, patient 0), the surest false alarm (0.8, patient 3), then the next
    # miss from a patient not yet shown (0.3, patient 6, not 0.2 of patient 0) ...
    assert picks[:3] == [0, 4, 8]
    # ... then the surest right calls, positive and negative in turn.
    assert picks[3:] == [3, 7, 2]
    assert len({groups[i] for i in picks}) == 6
    assert pick_slices(y, prob, 0.5, groups, 0) == []
    assert sorted(pick_slices(y, prob, 0.5, groups, 99)) == list(range(10))


def test_parameter_importance_needs_enough_trials_and_survives_missing_keys():
    rng = np.random.default_rng(0)
    trials = []
    for i in range(MIN_TRIALS + 4):
        lr = float(10 ** rng.uniform(-4, -1))
        trial = {"lr": lr, "dropout": float(rng.uniform(0, 0.5)),
                 "optimizer": ["adamw", "sgd"][i % 2],
                 "val_auc": 0.95 - 0.1 * abs(np.log10(lr) + 3) + float(rng.normal(0, 0.002))}
        if i % 2:
            trial["momentum"] = 0.9  # set on SGD trials only, as runs before 0.5 recorded it
        trials.append(trial)
    found = parameter_importance(trials, ["lr", "dropout", "optimizer", "momentum"])
    assert found["trials"] == MIN_TRIALS + 4 and found["left_out"] == ["momentum"]
    assert next(iter(found["importance"])) == "lr" and found["importance"]["lr"] > 0.5
    assert abs(sum(found["importance"].values()) - 1) < 1e-6
    few = parameter_importance(trials[:MIN_TRIALS - 1], ["lr", "dropout"])
    assert few["importance"] == {} and few["trials"] == MIN_TRIALS - 1
