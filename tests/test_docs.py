"""The Python examples of the README and of the site's pages, and the docstrings' examples,
run as written.

Every ```python block of README.md and of docs/**/*.md runs in a fresh namespace, from a
temporary folder (examples may write files); the blocks state their claims with ``assert``,
so a claim that stops holding fails here. A block whose fence line carries options, such as
```python title="on every host", is shown and not run (it needs several hosts). The
training demo's page is left to the demo's own tests.
"""

import doctest
import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path

import jax
import pytest

import eqx_norm

# the quick loop (-m "not slow") skips this file: every README/page/docstring example: long; CI runs it
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PAGES = [
    REPO / "README.md",
    *sorted(path for path in (REPO / "docs").rglob("*.md") if path.name != "training_demo.md"),
]
BLOCKS = [
    pytest.param(block, id=f"{page.relative_to(REPO)}:{index}")
    for page in PAGES
    for index, block in enumerate(
        re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    )
]
MODULES = sorted(  # the Python modules (not a compiled kernel library beside them)
    info.name
    for info in pkgutil.walk_packages(eqx_norm.__path__, "eqx_norm.")
    if not info.name.startswith("eqx_norm.demo")
    and importlib.util.find_spec(info.name).origin.endswith(".py")
)


def test_readme_has_examples():
    readme_blocks = [b for b in BLOCKS if b.id.startswith("README.md:")]
    assert len(readme_blocks) >= 2


@pytest.mark.parametrize("block", BLOCKS)
def test_example_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    # as a user runs them: JAX's default promotion (conftest.py makes it strict for the
    # library's own tests, and optax's Adam, for one, does not run under strict promotion)
    with jax.numpy_dtype_promotion("standard"):
        exec(compile(block, "example", "exec"), {"__name__": "__example__"})


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0
