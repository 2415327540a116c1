"""MkDocs hook: draw the formulas of every page as MathML when the site is built.

pymdownx.arithmatex (generic mode) wraps ``$...$`` and ``$$...$$`` in the pages, and the
``.. math::`` blocks of the docstrings (see griffe_docstrings.py), as
``<span class="arithmatex">\\(...\\)</span>`` and ``<div class="arithmatex">\\[...\\]</div>``.
This replaces each with MathML, which browsers draw natively, so no page loads a math
script from another host and the site works offline.

It also rebuilds a notebook page's table of contents from the headings of the rendered
page: mkdocs-jupyter (0.26) reads the headings from a Markdown export with every inline
code span deleted, so "## Batches and `jax.vmap`" became "Batches and" and "## `jit`" an
empty entry, each linking to an anchor the page does not have.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert
from markdown.extensions.toc import nest_toc_tokens
from mkdocs.structure.toc import get_toc

_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\\[(\[](?P<tex>.*?)\\[)\]]</(?P=tag)>', re.DOTALL
)


def _mathml(match: re.Match) -> str:
    display = "block" if match["tag"] == "div" else "inline"
    return convert(html.unescape(match["tex"]).strip(), display=display)


_HEADING = re.compile(r'<h(?P<level>[1-6]) id="(?P<id>[^"]+)"[^>]*>(?P<inner>.*?)</h(?P=level)>')
_ANCHOR_LINK = re.compile(r'<a class="anchor-link"[^>]*>.*?</a>')
_TAG = re.compile(r"<[^>]+>")


def notebook_toc_tokens(html_text: str) -> list[dict]:
    """The nested table-of-contents tokens of the headings of a rendered notebook page."""
    flat = []
    for match in _HEADING.finditer(html_text):
        inner = _ANCHOR_LINK.sub("", match["inner"])
        flat.append(
            {
                "level": int(match["level"]),
                "id": match["id"],
                "name": html.unescape(_TAG.sub("", inner)).strip(),
                "html": inner,
                "data-toc-label": "",
            }
        )
    return nest_toc_tokens(flat)


def on_page_content(html_text: str, page, **kwargs) -> str:
    if page.file.src_uri.endswith(".ipynb"):
        page.toc = get_toc(notebook_toc_tokens(html_text))
    return _MATH.sub(_mathml, html_text)
