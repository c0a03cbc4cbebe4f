import base64
import copy
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

from PIL import Image
from test_plots_report import LEADERBOARD, METRICS, PLOTS

from results.report import write_report
from results.report_html import write_report_html

GRADCAM = "gradcam/Covid (1)_gradcam.png"
# Raw HTML in a value that reaches report.md verbatim (here a searched parameter's value).
INJECTED = '<script src="https://example.com/x.js"></script>'


class Page(HTMLParser):
    """Every element with its attributes, the text of each h2 and of each note of a figure left
    out, and the text of <style>."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str | None]]] = []
        self.h2: list[str] = []
        self.notes: list[str] = []
        self.style = ""
        self._open: str | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.elements.append((tag, dict(attrs)))
        if tag == "span" and ("class", "missing") in attrs:
            tag = "note"
        if tag in ("h2", "note", "style"):
            self._open = tag
            {"h2": self.h2, "note": self.notes}.get(tag, []).append("")

    def handle_endtag(self, tag):
        if tag == {"note": "span"}.get(self._open, self._open):
            self._open = None

    def handle_data(self, data):
        if self._open == "h2":
            self.h2[-1] += data
        elif self._open == "note":
            self.notes[-1] += data
        elif self._open == "style":
            self.style += data

    def attrs(self, tag: str) -> list[dict[str, str | None]]:
        return [a for t, a in self.elements if t == tag]


def _png(path: Path, colour: tuple[int, int, int]) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path)
    return path.read_bytes()


def _report(folder: Path, plots: dict[str, str], gradcams: list[str]) -> tuple[str, str]:
    """report.md and report.html in folder, every referenced PNG made (distinct bytes each)."""
    metrics = copy.deepcopy(METRICS)
    metrics["patient"] = {
        "aggregate": "mean", "threshold": {"method": "youden", "value": 0.5},
        "val_auc_by_aggregate": {"mean": 0.9, "max": 0.85},
        "test": {"n": 40, "positives": 20, "negatives": 20, "confusion_matrix": [[17, 3], [4, 16]],
                 "metrics": copy.deepcopy(METRICS["test"]["metrics"])}}
    leaderboard = [{**row, "note": INJECTED} for row in LEADERBOARD]
    write_report(folder / "report.md", metrics, leaderboard, plots, gradcams)
    write_report_html(folder / "report.md", folder / "report.html")
    return ((folder / "report.md").read_text(encoding="utf-8"),
            (folder / "report.html").read_text(encoding="utf-8"))


def _embedded(src: str) -> bytes:
    prefix = "data:image/png;base64,"
    assert src.startswith(prefix), src[:80]
    return base64.b64decode(src[len(prefix):], validate=True)


def test_report_html_is_self_contained_with_the_same_sections(tmp_path):
    folder = tmp_path / "results"
    files = {rel: _png(folder / rel, (40 * i, 255 - 40 * i, 90))
             for i, rel in enumerate([*PLOTS.values(), GRADCAM])}
    md, text = _report(folder, PLOTS, [GRADCAM])
    page = Page(text)

    # Nothing that a browser would fetch: no scripts, stylesheets, external src/href or url().
    assert not page.attrs("script") and not page.attrs("link")
    for _tag, attrs in page.elements:
        for name in ("src", "href"):
            assert not re.match(r"\s*(https?:)?//", attrs.get(name) or ""), attrs
    assert "url(" not in page.style and "@import" not in page.style and page.style.strip()
    assert "&lt;script" in text  # the injected tag shows as text

    # Every image of report.md is in the page, its bytes those of the PNG, in the same order.
    linked = [unquote(src) for src in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)]
    assert sorted(linked) == sorted(files)
    srcs = [a["src"] for a in page.attrs("img")]
    assert [_embedded(s) for s in srcs] == [files[rel] for rel in linked]

    # The same sections, and every link inside the page lands on a heading.
    assert page.h2 == [line[3:] for line in md.splitlines() if line.startswith("## ")]
    assert "Patient-level results" in page.h2 and "Limitations" in page.h2
    ids = {a["id"] for _t, a in page.elements if a.get("id")}
    anchors = [a["href"][1:] for a in page.attrs("a") if (a.get("href") or "").startswith("#")]
    assert {"limitations", "patient-level-results"} <= set(anchors) <= ids
    assert ('<meta charset="utf-8">' in text
            and "<title>COVID CT classifier: test report</title>" in text)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["gradcam", "report.html", "report.md", *PLOTS.values()])  # no temp file left


def test_images_outside_the_folder_or_missing_are_left_out_with_a_note(tmp_path):
    folder = tmp_path / "results"
    secret = _png(tmp_path / "secret.png", (255, 0, 0))
    roc = _png(folder / "roc.png", (0, 0, 255))
    plots = {"roc": "roc.png", "pr": "../secret.png", "confusion": "confusion.png"}
    _md, text = _report(folder, plots, [])
    page = Page(text)
    assert [_embedded(a["src"]) for a in page.attrs("img")] == [roc]
    assert base64.b64encode(secret).decode() not in text
    assert page.notes == [  # in the report's order: confusion matrix, then ROC and PR
        "[figure left out: Confusion matrix on the test split (confusion.png: missing)]",
        "[figure left out: Precision-recall curve on the test split (../secret.png: outside the "
        "report's folder)]"]


def test_paths_with_spaces_and_parentheses_are_embedded(tmp_path):
    folder = tmp_path / "results"
    plots = {"roc": "my plots/roc (test split).png"}
    gradcam = "gradcam/Covid (12) [b]_gradcam.png"
    roc, heat = _png(folder / plots["roc"], (1, 2, 3)), _png(folder / gradcam, (4, 5, 6))
    md, text = _report(folder, plots, [gradcam])
    assert "(my%20plots/roc%20%28test%20split%29.png)" in md
    assert [_embedded(a["src"]) for a in Page(text).attrs("img")] == [roc, heat]


# What the layout check assumes of a browser: a character of the 16-px sans-serif body text at
# its widest (DejaVu Sans, Chromium's fallback on Linux, is 0.64 em for digits; bold headers
# are no wider at this rounding), a cell's padding and border, and the laptop's screen.
CHAR_PX = 10.5
CELL_PX = 2 * 0.6 * 16 + 1
SCREEN_PX = 1366
BOX_PX = 2 * (1.2 * 16 + 2)  # the headline box's padding and border
MAX_NUMBER_CHARS = 28  # "0.900 (95% CI 0.860–0.940)": a value with its interval


class Tables(HTMLParser):
    """Each table's cells: (column, class, text, inside the headline box)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[tuple[int, str, str, bool]]] = []
        self._quote = self._column = 0
        self._cell: list | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "blockquote":
            self._quote += 1
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self._column = 0
        elif tag in ("td", "th"):
            self._cell = [self._column, dict(attrs).get("class") or tag, "", self._quote > 0]
            self._column += 1

    def handle_endtag(self, tag):
        if tag == "blockquote":
            self._quote -= 1
        elif tag in ("td", "th") and self._cell:
            self.tables[-1].append(tuple(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell:
            self._cell[2] += data


def _narrowest(cells: list[tuple[int, str, str, bool]]) -> float:
    """The narrowest a table can be laid out: per column, its widest unbreakable run (a whole
    number cell, a value or its interval, else the longest word; a no-break space joins
    words)."""
    widest: dict[int, int] = {}
    for column, kind, text, _ in cells:
        text = text.strip()
        runs = ([text] if kind == "num" else text.split(" (") if kind == "num ci"
                else re.split(r"[ \n\t]+", text))
        run = max(map(len, runs))
        widest[column] = max(widest.get(column, 0), run)
    return sum(CHAR_PX * chars + CELL_PX for chars in widest.values())


def _column_px(css: str) -> float:
    """The text column's width on the laptop: the body's max-width, or the screen less the
    body's side padding."""
    body = re.search(r"body \{([^}]*)\}", css)[1]
    max_width = float(re.search(r"max-width: ([\d.]+)rem", body)[1]) * 16
    return min(max_width, SCREEN_PX - 2 * 1.5 * 16)


def _wide_report(folder: Path) -> str:
    """report.html of an ensemble with patients and a search of ten settings."""
    metrics = copy.deepcopy(METRICS)
    metrics["patient"] = {
        "aggregate": "mean", "threshold": {"method": "youden", "value": 0.5}, "unit": "patients",
        "val_auc_by_aggregate": {"mean": 0.9},
        "test": {"n": 40, "positives": 20, "negatives": 20, "confusion_matrix": [[17, 3], [4, 16]],
                 "metrics": copy.deepcopy(METRICS["test"]["metrics"])}}
    ids = [f"1f9e2_{i:05d}" for i in range(14)]
    metrics["trial_id"] = ids[0]
    metrics["searched"] = {"arch": "resnet50", "lr": 3e-4}
    config = {"arch": "resnet101", "head": [512, 128], "lr": 0.00031, "label_smoothing": 0.05}
    metrics["ensemble"] = {
        "k": 3, "candidates": 5, "rounds": 20, "val_log_loss": {"ensemble": 0.2, "single": 0.23},
        "calibrated_members": True, "cross_fitted_log_loss": 0.21,
        "members": [{"trial_id": t, "weight": w, "precision": "bf16", "config": config}
                    for t, w in zip(ids[:3], (0.5, 0.3, 0.2), strict=True)],
        "excluded": [{"trial_id": ids[9], "val_auc": 0.41, "epochs": 1,
                      "reason": "worse than chance on the validation split"}]}
    metrics["compared"] = {
        "role": "the best trial alone", "k": 1, "members": [ids[0]], "weights": [1.0],
        "threshold": {"method": "youden", "value": 0.37}, "temperature": 1.0,
        "test": {"metrics": copy.deepcopy(METRICS["test"]["metrics"]),
                 "calibration": {"brier": {"value": 0.15}}},
        "val": {"metrics": {"roc_auc": {"value": 0.91, "ci95": [0.88, 0.94]}}},
        "paired": {key: {"value": -0.011, "ci95": [-0.02, -0.003]}
                   for key in ("roc_auc", "accuracy", "brier")}}
    settings = {"arch": "resnet101", "head": [512, 128], "dropout": 0.3125, "batch_size": 64,
                "aug_strength": 0.731, "label_smoothing": 0.0512, "optimizer": "adamw",
                "lr": 3.1e-4, "weight_decay": 1.2e-4, "momentum": None}
    leaderboard = [{"trial_id": t, "val_auc": 0.97 - 0.01 * i, "epochs": 30 - i,
                    "status": "stopped early", **settings} for i, t in enumerate(ids)]
    folder.mkdir(parents=True)
    write_report(folder / "report.md", metrics, leaderboard, {})
    write_report_html(folder / "report.md", folder / "report.html")
    return (folder / "report.html").read_text(encoding="utf-8")


def test_no_table_is_wider_than_the_text_column_on_a_laptop(tmp_path):
    text = _wide_report(tmp_path / "results")
    css = Page(text).style
    # Tables are laid out by their content, never wider than the column, never scrolled.
    table = re.search(r"\ntable \{([^}]*)\}", css)[1]
    assert "max-width: 100%" in table and "table-layout: auto" in table
    assert "display: block" not in table and "overflow" not in table
    assert "white-space: nowrap" in re.search(r"td\.num \{([^}]*)\}", css)[1]
    column = _column_px(css)
    tables = Tables(text).tables
    assert len(tables) >= 8
    for cells in tables:
        inside_box = any(boxed for *_, boxed in cells)
        assert _narrowest(cells) <= column - BOX_PX * inside_box, cells[:8]
        # Numbers stay whole, and no whole number is long enough to widen a table by itself.
        for _, kind, cell, _ in cells:
            assert not (kind == "td" and re.fullmatch(r"[\d.,–+−-]+", cell.strip())), cell
            if kind.startswith("num"):
                assert len(cell.strip()) <= MAX_NUMBER_CHARS, cell

    # The check has teeth: the leaderboard laid out a column per setting would not fit.
    header = ["#", "trial", "val AUC", "epochs", "status", "weight", *[
        "aug_strength", "label_smoothing", "weight_decay", "batch_size", "optimizer", "dropout",
        "momentum", "arch", "head", "lr"]]
    row = ["1", "1f9e2_00000", "0.9700", "30", "completed", "0.50", "0.7310", "0.0512",
           "1.2e-04", "64", "adamw", "0.3125", "—", "resnet101", "[512, 128]", "3.1e-04"]
    wide = tmp_path / "wide.md"
    wide.write_text("\n".join(["| " + " | ".join(header) + " |", "|---" * len(header) + "|",
                               "| " + " | ".join(row) + " |"]), encoding="utf-8")
    assert _narrowest(Tables(write_report_html(wide, tmp_path / "wide.html").read_text(
        encoding="utf-8")).tables[0]) > column
