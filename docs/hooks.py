"""MkDocs hook: draw the formulas of every page as MathML when the site is built.

pymdownx.arithmatex (generic mode) wraps ``$...$`` and ``$$...$$`` in the pages, and the
``.. math::`` blocks of the docstrings (see griffe_docstrings.py), as
``<span class="arithmatex">\\(...\\)</span>`` and ``<div class="arithmatex">\\[...\\]</div>``.
This replaces each with MathML, which browsers draw natively, so no page loads a math
script from another host and the site works offline.
"""

from __future__ import annotations

import html
import re

from latex2mathml.converter import convert

_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\\[(\[](?P<tex>.*?)\\[)\]]</(?P=tag)>', re.DOTALL
)


def _mathml(match: re.Match) -> str:
    display = "block" if match["tag"] == "div" else "inline"
    return convert(html.unescape(match["tex"]).strip(), display=display)


def on_page_content(html_text: str, **kwargs) -> str:
    return _MATH.sub(_mathml, html_text)
