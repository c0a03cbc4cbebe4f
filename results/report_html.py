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

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
       sans-serif; line-height: 1.5; color: #1f2328; max-width: 60rem; margin: 0 auto;
       padding: 1.5rem 1.5rem 4rem; }
h1, h2, h3 { line-height: 1.25; }
h2 { margin-top: 2.2rem; padding-bottom: .3rem; border-bottom: 1px solid #d0d7de; }
h3 { margin-top: 1.6rem; }
table { border-collapse: collapse; margin: 1rem 0; display: block; overflow-x: auto; }
th, td { border: 1px solid #d0d7de; padding: .3rem .7rem; text-align: left; }
th { background: #eaeef2; }
tbody tr:nth-child(even) { background: #f6f8fa; }
pre, code { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono",
            monospace; }
code { font-size: .88em; background: #f6f8fa; padding: .1em .3em; border-radius: 4px;
       overflow-wrap: anywhere; }
pre { background: #f6f8fa; padding: .8rem 1rem; overflow-x: auto; border-radius: 6px; }
pre code { padding: 0; overflow-wrap: normal; }
img { max-width: 100%; height: auto; }
.missing { color: #a40e26; font-style: italic; }
@media print {
  body { max-width: none; padding: 0; font-size: 10pt; }
  /* A wide leaderboard has no scroll bar on paper: long headers (label_smoothing) may wrap
     anywhere so that the table fits the page; values stay whole. */
  table { display: table; font-size: 8pt; }
  th, td { padding: .15rem .35rem; }
  th { overflow-wrap: anywhere; }
  th, tr { print-color-adjust: exact; -webkit-print-color-adjust: exact; }
  pre { white-space: pre-wrap; }
  table, tr, pre, img, p:has(> img) { break-inside: avoid; }
  h1, h2, h3, p:has(+ p > img) { break-after: avoid; }
  img { max-height: 22cm; }
  a { color: inherit; text-decoration: none; }
}
"""


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
