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
