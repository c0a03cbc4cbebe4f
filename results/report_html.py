"""report.html: report.md as one file a reader can open on any laptop, mail, or print.

report.md reads well on GitHub but not in a browser or on paper, and its figures are separate
files that get lost when the report travels alone. Here it becomes a single HTML file: each
figure embedded as a data URI, the styling inline, nothing fetched from a network (results of a
clinical study may be read on machines that must not call out, and a report must not change
when a server goes away).
"""

from __future__ import annotations

import base64
import html
import re
import xml.etree.ElementTree as etree
from pathlib import Path
from urllib.parse import unquote, urlsplit

import markdown
from markdown.treeprocessors import Treeprocessor

from data_utils.files import atomic_write

# Only raster types: an SVG could itself load from the network.
IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

# Laid out for a laptop (a 1366-px screen: the text column is 60rem) and for A4 or Letter paper
# (the page margins leave 180 mm on either). Tables never scroll sideways: numbers keep their
# cells whole (class "num", _MarkNumbers) and the text beside them wraps at spaces; words break
# nowhere but at a hyphen already there (hyphens: manual).
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; line-height: 1.5; color: #1f2328; max-width: 60rem; margin: 0 auto;
       padding: 1.5rem 1.5rem 4rem; hyphens: manual; overflow-wrap: break-word; }
h1, h2, h3 { line-height: 1.25; }
h1 { margin-bottom: .6rem; }
h2 { margin-top: 2.2rem; padding-bottom: .3rem; border-bottom: 1px solid #d0d7de; }
h3 { margin-top: 1.6rem; }
blockquote { margin: 1rem 0; padding: 0 1rem; border-left: 4px solid #d0d7de; }
/* The headline box: the blockquote right under the title. */
h1 + blockquote { border: 2px solid #0969da; border-radius: 8px; background: #f6f8fa;
                  padding: .5rem 1.2rem; }
h1 + blockquote p { margin: .5rem 0; }
h1 + blockquote table { margin: .5rem 0; background: #fff; }
table { border-collapse: collapse; margin: 1rem 0; table-layout: auto; max-width: 100%; }
th, td { border: 1px solid #d0d7de; padding: .3rem .6rem; text-align: left;
         vertical-align: top; }
th { background: #eaeef2; }
td.num { white-space: nowrap; text-align: right; font-variant-numeric: tabular-nums; }
/* A value with its interval may wrap between the two, never inside either. */
td.ci { white-space: normal; }
td.ci span { white-space: nowrap; }
tbody tr:nth-child(even) { background: #f6f8fa; }
pre, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono",
            monospace; }
code { font-size: .88em; background: #f6f8fa; padding: .1em .3em; border-radius: 4px;
       overflow-wrap: anywhere; }
pre { background: #f6f8fa; padding: .8rem 1rem; overflow-x: auto; border-radius: 6px; }
pre code { padding: 0; overflow-wrap: normal; }
img { max-width: 100%; height: auto; }
/* Two figures in one paragraph (ROC and PR) sit side by side. */
p:has(> img + img) { display: flex; gap: 1rem; align-items: flex-start; }
p:has(> img + img) > img { width: calc(50% - .5rem); }
/* The Grad-CAM list: a grid of small thumbnails, each captioned. */
ul:has(> li > img:first-child) { display: grid; gap: .8rem; padding: 0; list-style: none;
                                 grid-template-columns: repeat(auto-fill, minmax(10.5rem, 1fr)); }
ul:has(> li > img:first-child) > li { font-size: .82em; line-height: 1.35; }
li > img:first-child { display: block; width: 100%; margin-bottom: .25rem; }
.missing { color: #a40e26; font-style: italic; }
@page { margin: 15mm 14mm; }
@media print {
  body { max-width: none; padding: 0; font-size: 9.5pt; }
  table { font-size: 8pt; }
  th, td { padding: .12rem .3rem; }
  th, tr, h1 + blockquote { print-color-adjust: exact; -webkit-print-color-adjust: exact; }
  pre { white-space: pre-wrap; font-size: 7.5pt; }
  table, tr, pre, img, li, h1 + blockquote, p:has(> img) { break-inside: avoid; }
  h1, h2, h3, p:has(+ p > img), p:has(+ table) { break-after: avoid; }
  /* Two ordinary figures fit on a page of A4 or Letter, a figure pair beside its text. */
  img { max-height: 10cm; width: auto; }
  p:has(> img + img) > img { width: auto; max-width: calc(50% - .5rem); max-height: 8cm; }
  ul:has(> li > img:first-child) { grid-template-columns: repeat(4, 1fr); }
  a { color: inherit; text-decoration: none; }
}
"""
# A table cell that holds a number, an interval, or a number with its interval or its cell of
# the confusion matrix: "0.820", "3.0e-04", "0.770–0.870", "0.900 (95% CI 0.860–0.940)",
# "19 (FN)", "n/a", "—". report.html keeps these on one line.
_NUMBER = r"(?:[−+-]?\d[\d.,]*(?:e[−+-]?\d+)?%?|n/a)"
_RANGE = rf"{_NUMBER}–{_NUMBER}"
NUMERIC_CELL = re.compile(rf"(?:{_NUMBER}|{_RANGE}|—)"
                          rf"(?: \((?:95% CI (?:{_RANGE}|n/a)|TN|FP|FN|TP)\))?")


def github_slug(value: str, separator: str = "-") -> str:
    """The id GitHub gives a heading, so report.md's `#limitations` links work here too:
    lower case, punctuation dropped, each space a hyphen (toc's own slugify would also fold
    accents away and merge runs of hyphens)."""
    return re.sub(r"[^\w\- ]", "", value.strip().lower()).replace(" ", separator)


class _EmbedImages(Treeprocessor):
    """Inline each image from the report's folder; anything else is left out with a note."""

    def __init__(self, md: markdown.Markdown, folder: Path) -> None:
        super().__init__(md)
        self.folder = folder.resolve()

    def run(self, root: etree.Element) -> None:
        for element in root.iter():
            if element.tag == "img":
                self._embed(element)
            elif element.tag == "a" and not element.get("href", "").startswith("#"):
                # A link out would leave the file; keep its text, drop the target.
                element.attrib.pop("href", None)

    def _embed(self, img: etree.Element) -> None:
        src = img.get("src", "")
        path, reason = self._resolve(src)
        if path is not None:
            data = base64.b64encode(path.read_bytes()).decode("ascii")
            img.set("src", f"data:{IMAGE_TYPES[path.suffix.lower()]};base64,{data}")
            return
        # The tail (text after the image) stays with the element, so mutate it in place.
        alt = img.get("alt", "")
        img.clear()
        img.tag = "span"
        img.set("class", "missing")
        img.text = f"[figure left out: {alt} ({unquote(src)}: {reason})]"

    def _resolve(self, src: str) -> tuple[Path | None, str]:
        """The image file src names, or None and why it is refused."""
        parts = urlsplit(src)
        if parts.scheme or parts.netloc or not parts.path:
            return None, "not a file in the report's folder"
        path = (self.folder / unquote(parts.path)).resolve()
        if not path.is_relative_to(self.folder):
            return None, "outside the report's folder"
        if path.suffix.lower() not in IMAGE_TYPES:
            return None, "not a PNG or JPEG image"
        if not path.is_file():
            return None, "missing"
        return path, ""


class _MarkNumbers(Treeprocessor):
    """Class "num" on each table cell that holds a number (NUMERIC_CELL): CSS keeps it whole;
    a value with its interval, "0.900 (95% CI 0.860–0.940)", also gets class "ci" and its
    interval a span, so the cell may wrap between the two."""

    def run(self, root: etree.Element) -> None:
        for cell in root.iter("td"):
            text = "".join(cell.itertext()).strip()
            if len(cell) or not NUMERIC_CELL.fullmatch(text):  # a number has no markup
                continue
            value, _, interval = text.partition(" (95% CI ")
            cell.set("class", "num ci" if interval else "num")
            if interval:
                cell.text = f"{value} "
                etree.SubElement(cell, "span").text = f"(95% CI {interval}"


def write_report_html(md_path: Path, html_path: Path) -> Path:
    """Write report.md as one self-contained HTML file; image paths are relative to md_path's
    folder. Returns html_path."""
    md_path = Path(md_path)
    md = markdown.Markdown(extensions=["tables", "fenced_code", "toc"],
                           extension_configs={"toc": {"slugify": github_slug}})
    # Class names, paths and error text reach report.md verbatim; with raw HTML off they show as
    # text and cannot inject a tag (a <script>, or an <img> that loads from the network).
    md.preprocessors.deregister("html_block")
    md.inlinePatterns.deregister("html")
    md.treeprocessors.register(_EmbedImages(md, md_path.parent), "embed_images", 1)
    md.treeprocessors.register(_MarkNumbers(md), "mark_numbers", 1)
    body = md.convert(md_path.read_text(encoding="utf-8"))
    tokens = getattr(md, "toc_tokens", [])
    title = html.unescape(tokens[0]["name"]) if tokens else md_path.stem
    page = (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n"
            f"<body>\n{body}\n</body>\n</html>\n")
    with atomic_write(Path(html_path), "wb") as f:
        f.write(page.encode("utf-8"))
    return Path(html_path)
