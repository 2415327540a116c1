"""The documentation site builds strictly and works in a real browser.

The site is built with ``mkdocs build --strict`` into the test's temporary folder, served
on 127.0.0.1 by a thread running ``http.server``, and opened in headless Chromium
(Debian's ``chromium`` package, driven by Playwright, which is told to use that binary and
never downloads a browser). The home page, the API page and the notebook pages must load
with no console error and no request to another host; typing ``LayerNorm`` in the search
box must list a result; the API page's docstring examples must be highlighted code blocks
(not prose); each entry of a notebook's table of contents must have its heading's text
and link to an anchor of the page; screenshots of the home page and of the API page's
first example are written to the temporary folder.

What a reader sees, checked on the rendered pages: the LayerNorm formula's square root has
its overbar (a row of ink across the radicand in a screenshot of the ``msqrt``), drawn with
a math font (which docs/stylesheets/extra.css asks for) so that the radical sign joins it;
every code block that is
wider than its box scrolls (``overflow-x`` auto) instead of being cut off, on the LayerNorm
page and the notebook pages; the API page's table of contents lists the layers, their
``__call__`` and the functions, and no attribute or property (``InstanceNorm.num_groups``).
"""

from __future__ import annotations

import functools
import http.server
import io
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000  # per wait; a 2-core machine shared with other work can be slow


# every code block (a notebook cell's <pre>, a page's <pre><code>) wider than its box, and
# how it overflows: "auto" or "scroll" scrolls, "visible" is cut off by its cell
OVERFLOWING_CODE = """() => [...document.querySelectorAll('article pre, article pre > code')]
    .filter(e => e.scrollWidth > e.clientWidth + 1)
    .map(e => [e.textContent.trim().slice(0, 60), getComputedStyle(e).overflowX])"""


def _has_overbar(png: bytes) -> bool:
    """Whether a screenshot of a square root has a bar of ink across most of its width in
    its top half: the overbar over the radicand."""
    ink = np.asarray(Image.open(io.BytesIO(png)).convert("L")) < 128
    return bool(ink[: ink.shape[0] // 2].mean(axis=1).max() >= 0.6)


def _fonts(page, selector: str) -> set[str]:
    """The fonts Chromium drew the text of the first element matching ``selector`` with."""
    cdp = page.context.new_cdp_session(page)
    cdp.send("DOM.enable")
    cdp.send("CSS.enable")
    root = cdp.send("DOM.getDocument", {"depth": -1})["root"]["nodeId"]
    node = cdp.send("DOM.querySelector", {"nodeId": root, "selector": selector})["nodeId"]
    fonts = cdp.send("CSS.getPlatformFontsForNode", {"nodeId": node})["fonts"]
    cdp.detach()
    return {font["familyName"] for font in fonts}


def _assert_code_blocks_scroll(page, where: str) -> None:
    overflowing = page.evaluate(OVERFLOWING_CODE)
    cut_off = [
        (text, overflow) for text, overflow in overflowing if overflow not in ("auto", "scroll")
    ]
    assert not cut_off, (where, cut_off)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


def _build_site(site: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=REPO,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{log}"
    assert "WARNING" not in log, log
    assert (site / "index.html").is_file() and (site / "api" / "index.html").is_file()


@pytest.mark.slow
@pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"the site's browser test needs Debian's chromium, not found at {CHROMIUM}: "
    "install it with `apt-get update && apt-get install -y chromium` as root (as .ci/run does)",
)
def test_site_in_headless_chromium(tmp_path):
    site = tmp_path / "site"
    _build_site(site)

    handler = functools.partial(_QuietHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # a free port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    root = f"http://127.0.0.1:{server.server_address[1]}/"

    errors: list[str] = []  # console errors and uncaught exceptions, from every page
    outside: list[str] = []  # requests to any host but the local server: none expected

    def route(route):
        if urlsplit(route.request.url).hostname == "127.0.0.1":
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"),  # a new, empty --user-data-dir
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900},
            )
            browser.set_default_timeout(TIMEOUT_MS)
            browser.route("**/*", route)
            page = browser.new_page()
            page.on(
                "console",
                lambda message: (
                    message.type == "error"
                    and errors.append(f"console error on {page.url}: {message.text}")
                ),
            )
            page.on("pageerror", lambda error: errors.append(f"exception on {page.url}: {error}"))

            def visit(path: str) -> None:
                response = page.goto(root + path, wait_until="networkidle")
                assert response is not None and response.status == 200, (path, response)

            visit("")
            assert page.locator("article h1").first.inner_text().startswith("eqx_norm")
            assert page.get_by_role("link", name="Getting started").first.is_visible()
            page.screenshot(path=tmp_path / "home.png")

            # the search box: the index is built by a web worker, so wait for the result
            search = page.locator("input[data-md-component='search-query']")
            search.click()
            search.press_sequentially("LayerNorm", delay=50)
            first_result = page.locator(".md-search-result__item").first
            first_result.wait_for(state="visible")
            assert "LayerNorm" in first_result.inner_text()

            # the LayerNorm formula: sqrt(Var[x] + eps) with its overbar, not a bare radical
            visit("layers/layer_norm/")
            square_root = page.locator("article math msqrt").first
            square_root.scroll_into_view_if_needed()
            png = square_root.screenshot(path=tmp_path / "layer_norm_sqrt.png")
            assert _has_overbar(png), "the square root has no overbar"
            # Drawn in a text font, the radical sign is a small glyph that stops short of
            # the bar, which then reads as a second fraction line (sqrt(Var[x]) + eps); a
            # font with a MATH table (docs/stylesheets/extra.css asks for one; Debian's
            # fonts-dejavu-extra has DejaVu Math TeX Gyre) joins the two and stretches it.
            fonts = _fonts(page, "article math msqrt mi")
            assert any("Math" in font for font in fonts), fonts
            page.screenshot(path=tmp_path / "layer_norm.png")
            _assert_code_blocks_scroll(page, "layers/layer_norm/")

            visit("api/")
            assert page.title().startswith("API reference")
            # its table of contents: the objects and their __call__, no attribute/property
            toc = page.locator("nav.md-nav--secondary a.md-nav__link")
            entries = [text.strip() for text in toc.all_inner_texts()]
            assert "estimate_running_statistics" in entries and "__call__" in entries, entries
            for link in toc.all():
                anchor = link.get_attribute("href").removeprefix("#")
                heading = page.locator(f"article [id='{anchor}']")
                assert heading.count() == 1, anchor
                assert heading.locator(".doc-symbol-attribute").count() == 0, anchor
            assert not {"num_groups", "elementwise_affine"} & set(entries), entries
            for name in ("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "load_leaves"):
                assert page.locator(f"[id='eqx_norm.{name}']").count() == 1, name
            # each layer's call and its arguments (mask=, residual=), also where the class
            # inherits __call__ from a shared private base
            for name in (
                "LayerNorm",
                "RMSNorm",
                "GroupNorm",
                "InstanceNorm",
                "BatchNorm",
                "DyT",
                "Derf",
            ):
                assert page.locator(f"[id='eqx_norm.{name}.__call__']").count() == 1, name
            assert page.locator("math").count() > 0  # the docstrings' formulas, as MathML
            # the docstrings' examples: code blocks highlighted by pygments (a `>>>` prompt
            # token, names and numbers in their own colours), none left as blockquoted prose
            titles = page.locator(".doc-section-title", has_text="Examples")
            examples = page.locator("div.highlight:has(code span.gp)")
            assert titles.count() >= 15 and examples.count() == titles.count()
            assert page.locator("blockquote", has_text=">>>").count() == 0
            colour = "element => getComputedStyle(element).color"
            first = examples.first
            assert first.locator("span.gp").first.evaluate(colour) != first.locator(
                "span.n"
            ).first.evaluate(colour)
            first.scroll_into_view_if_needed()
            page.screenshot(path=tmp_path / "api_example.png")

            for notebook in ("quickstart", "gradient_flow"):
                visit(f"notebooks/{notebook}/")
                _assert_code_blocks_scroll(page, notebook)
                page.screenshot(path=tmp_path / f"{notebook}.png")
                toc = page.locator("nav.md-nav--secondary a.md-nav__link")
                assert toc.count() >= 3, notebook
                for link in toc.all():
                    anchor = link.get_attribute("href").removeprefix("#")
                    heading = page.locator(f"article [id='{anchor}']")
                    assert heading.count() == 1, (notebook, anchor)
                    # the entry reads as the heading does, inline code included
                    text = heading.inner_text().removesuffix("¶").strip()
                    assert link.inner_text().strip() == text, (notebook, anchor)
            assert page.locator("img").count() > 0  # gradient_flow's stored figure
            # its first cell's long line scrolls into view instead of being cut off
            scrolled = page.evaluate(
                """() => { const cell = document.querySelector('.jupyter-wrapper pre');
                cell.scrollLeft = 10000; return [cell.scrollLeft, cell.scrollWidth > cell.clientWidth]; }"""
            )
            assert scrolled[1] and scrolled[0] > 0, scrolled

            browser.close()
    finally:
        server.shutdown()

    assert not errors, "\n".join(errors)
    assert not outside, f"pages fetched from other hosts: {outside}"
    for screenshot in ("home.png", "api_example.png", "layer_norm.png", "gradient_flow.png"):
        screenshot = tmp_path / screenshot
        assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank image
