"""The documentation says what the code does: examples run, and quoted messages are real.

* Every ```python block of README.md and of docs/**/*.md runs in a fresh namespace, from a
  temporary folder (examples may write files); the blocks state their claims with
  ``assert``, so a claim that stops holding fails here. A block whose fence line carries
  options, such as ```python title="on every host", is shown and not run (it needs several
  hosts), except a ```python title="8 devices ..." block, which runs in a fresh process on
  8 simulated CPU devices (``XLA_FLAGS`` must be set before JAX starts). The training
  demo's page is left to the demo's own tests.
* Every error message a page quotes is raised by the code with that text: a fenced block
  right after a ```python block is the output of that block (it is run and its output must
  hold the quoted text), and a block that reads ``SomeError: message`` is raised by the call
  that ``TRIGGERS`` names for it (a quoted message without a trigger fails here).
* The docstrings' ``Example:`` sections run as doctests (every ``>>>`` line of every module,
  the demo's left to test_demo.py), and the site reads each as code: every ``>>>`` line
  of a documented docstring lands in a code block of griffe's examples section, which
  mkdocstrings renders highlighted (test_docs_site.py checks the rendered page).
"""

import contextlib
import doctest
import importlib
import importlib.util
import inspect
import io
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import griffe
import jax
import jax.numpy as jnp
import pytest

import eqx_norm

REPO = Path(__file__).resolve().parents[1]
PAGES = [
    REPO / "README.md",
    *sorted(path for path in (REPO / "docs").rglob("*.md") if path.name != "training_demo.md"),
]
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```[ \t]*$", re.DOTALL | re.MULTILINE)
BLOCKS = [
    pytest.param(block, id=f"{page.relative_to(REPO)}:{index}")
    for page in PAGES
    for index, block in enumerate(
        re.findall(r"^```python\n(.*?)^```", page.read_text(), flags=re.DOTALL | re.MULTILINE)
    )
]
DEVICE_BLOCKS = [  # the examples that need 8 devices: run on simulated ones
    pytest.param(block, id=f"{page.relative_to(REPO)}:8-devices:{index}")
    for page in PAGES
    for index, block in enumerate(
        re.findall(
            r'^```python title="8 devices[^"\n]*"\n(.*?)^```',
            page.read_text(),
            flags=re.DOTALL | re.MULTILINE,
        )
    )
]
MODULES = sorted(  # the Python modules (not a compiled kernel library beside them)
    info.name
    for info in pkgutil.walk_packages(eqx_norm.__path__, "eqx_norm.")
    if not info.name.startswith("eqx_norm.demo")
    and importlib.util.find_spec(info.name).origin.endswith(".py")
)
ERROR = re.compile(r"(?P<type>\w+(?:Error|Exception|Warning)): (?P<message>.*)", re.DOTALL)


def _flat(text: str) -> str:
    """``text`` with every run of whitespace as one space: pages wrap lines, code does not."""
    return " ".join(text.split())


def _run(source: str) -> str:
    """Run a page's example as a user would, from where it is; what it prints."""
    printed = io.StringIO()
    # JAX's default promotion, as a user runs it (conftest.py makes it strict for the
    # library's own tests, and optax's Adam, for one, does not run under strict promotion)
    with jax.numpy_dtype_promotion("standard"), contextlib.redirect_stdout(printed):
        exec(compile(source, "example", "exec"), {"__name__": "__example__"})
    return printed.getvalue()


def _batch_norm_call(x_shape):
    def call():
        bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(3)
        bn(jnp.ones(x_shape), state)

    return call


# The calls that raise the messages the pages quote on their own, keyed by a piece of the
# quoted message that names the input (so the key outlives a rewording of the message)
TRIGGERS = {
    "x of shape (8, 3, 5, 5) has 5 channels on axis 3": _batch_norm_call((8, 3, 5, 5)),
    "x of shape (1, 3) (channel_axis=-1)": _batch_norm_call((1, 3)),
}


def _quotes():
    """Each fenced block of a page that quotes an output or an error message."""
    for page in PAGES:
        text = page.read_text()
        fences = list(FENCE.finditer(text))
        for previous, fence in zip([None, *fences], fences):
            info = fence["info"].strip()
            if info.split(" ")[0] in ("python", "bash", "sh", "console", "toml", "yaml"):
                continue
            where = f"{page.relative_to(REPO)}:{text.count(chr(10), 0, fence.start()) + 1}"
            after_code = (
                previous is not None
                and previous["info"].strip() == "python"
                and not text[previous.end() : fence.start()].strip()
            )
            if after_code:
                yield pytest.param(fence["body"], previous["body"], id=f"{where}:output")
            elif ERROR.match(fence["body"]):
                yield pytest.param(fence["body"], None, id=f"{where}:raised")


QUOTES = list(_quotes())


def test_readme_has_examples():
    readme_blocks = [b for b in BLOCKS if b.id.startswith("README.md:")]
    assert len(readme_blocks) >= 2


@pytest.mark.slow  # every README/page example: long; CI runs them
@pytest.mark.parametrize("block", BLOCKS)
def test_example_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples may write files
    _run(block)


def test_shard_map_examples_are_on_the_layer_norm_and_group_norm_pages():
    pages = {param.id.split(":")[0] for param in DEVICE_BLOCKS}
    assert {"docs/layers/layer_norm.md", "docs/layers/group_norm.md"} <= pages, pages
    for param in DEVICE_BLOCKS:  # the mesh, the device_put, the specs and the gradients
        for piece in ("jax.make_mesh", "jax.device_put", "in_specs", "jax.set_mesh", "grad("):
            assert piece in param.values[0], (param.id, piece)


@pytest.mark.slow  # a fresh process per example
@pytest.mark.parametrize("block", DEVICE_BLOCKS)
def test_example_runs_on_8_simulated_devices(block, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    source = f"import jax\nassert jax.device_count() == 8, jax.devices()\n{block}"
    process = subprocess.run(
        [sys.executable, "-c", source],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert process.returncode == 0, process.stderr[-4000:]


def test_pages_quote_messages():
    """Not vacuous: the pages quote the messages the getting-started and BatchNorm pages show."""
    ids = [quote.id for quote in QUOTES]
    assert any(i.startswith("docs/getting_started.md") for i in ids), ids
    assert sum(i.endswith(":raised") for i in ids) >= 1, ids


@pytest.mark.parametrize(("quoted", "producer"), QUOTES)
def test_quoted_message_is_the_real_one(quoted, producer, tmp_path, monkeypatch):
    if producer is not None:  # the output of the example just above the quote
        monkeypatch.chdir(tmp_path)
        assert _flat(quoted) in _flat(_run(producer))
        return
    quote = ERROR.match(quoted)
    keys = [key for key in TRIGGERS if _flat(key) in _flat(quote["message"])]
    assert len(keys) == 1, (
        f"no single call in TRIGGERS raises this quoted message (keys found: {keys}); add one:"
        f"\n{quoted}"
    )
    with pytest.raises(Exception) as raised:
        with jax.numpy_dtype_promotion("standard"):
            TRIGGERS[keys[0]]()
    assert type(raised.value).__name__ == quote["type"]
    assert _flat(quote["message"]) in _flat(str(raised.value))


def test_every_trigger_is_quoted():
    """A trigger whose quote left the pages is removed with it, not kept to rot."""
    messages = [_flat(q.values[0]) for q in QUOTES if q.values[1] is None]
    for key in TRIGGERS:
        assert any(_flat(key) in message for message in messages), key


def test_jax_jit_of_a_layer_fails_as_the_pages_say():
    """getting_started.md and the quick start say `jax.jit(layer)` fails (as for any
    equinox module) and show `eqx.filter_jit` instead: the claim holds."""
    layer, x = eqx_norm.LayerNorm(4), jnp.ones((2, 4))
    with pytest.raises(TypeError, match="unhashable"):
        jax.jit(layer)(x)
    assert jnp.array_equal(eqx.filter_jit(layer)(x), layer(x))


def _docstrings_with_examples(module):
    """The names of the module's own objects (and their members) whose docstrings hold
    examples, as doctest names them."""
    if ">>> " in (module.__doc__ or ""):
        yield module.__name__
    for name, obj in vars(module).items():
        target = inspect.unwrap(obj) if callable(obj) else obj
        if getattr(target, "__module__", None) != module.__name__:
            continue
        if ">>> " in (getattr(obj, "__doc__", None) or ""):
            yield f"{module.__name__}.{name}"
        if inspect.isclass(target):
            for member_name, member in vars(target).items():
                if ">>> " in (getattr(member, "__doc__", None) or ""):
                    yield f"{module.__name__}.{name}.{member_name}"


@pytest.mark.slow  # every docstring example: long; CI runs them
@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    module = importlib.import_module(name)
    # doctest finds an object's docstring only through a plain function or class whose
    # __module__ is this one: a wrapper (a jit, say) would leave its example unrun
    found = {test.name for test in doctest.DocTestFinder().find(module) if test.examples}
    assert set(_docstrings_with_examples(module)) <= found
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


def _documented_docstrings():
    """(path, docstring) of every object the API reference documents, read as the site
    reads them (griffe, with docs/griffe_docstrings.py)."""
    sys.path.insert(0, str(REPO / "docs"))
    try:
        import griffe_docstrings
    finally:
        sys.path.remove(str(REPO / "docs"))
    package = griffe.load(
        "eqx_norm",
        search_paths=[REPO],
        extensions=griffe.load_extensions(str(REPO / "docs" / "griffe_docstrings.py")),
        docstring_parser="google",
        resolve_aliases=True,
    )
    seen, out = set(), []
    stack = [package[path.removeprefix("eqx_norm.")] for path in griffe_docstrings.DOCUMENTED]
    while stack:
        obj = stack.pop()
        target = obj.final_target if obj.is_alias else obj
        if target.canonical_path in seen:
            continue
        seen.add(target.canonical_path)
        if target.docstring is not None:
            out.append((obj.path, target.docstring))
        if target.is_module or target.is_class:  # their own members, not imported names
            stack += [member for member in target.members.values() if not member.is_alias]
    return out


def test_docstring_examples_render_as_code():
    documented = _documented_docstrings()
    with_examples = set()
    for path, docstring in documented:
        expected = [line.strip() for line in docstring.value.splitlines() if ">>> " in line]
        in_code, elsewhere = [], []
        for section in docstring.parsed:
            if section.kind is griffe.DocstringSectionKind.examples:
                for kind, text in section.value:
                    lines = [line.strip() for line in text.splitlines() if ">>> " in line]
                    is_code = kind is griffe.DocstringSectionKind.examples
                    (in_code if is_code else elsewhere).extend(lines)
            else:  # text, or an admonition (griffe's reading of an unknown section title)
                text = getattr(section.value, "contents", section.value)
                if isinstance(text, str):
                    elsewhere += [line for line in text.splitlines() if ">>> " in line]
        assert in_code == expected and not elsewhere, (path, elsewhere)
        if in_code:
            with_examples.add(path)
    for name in ("LayerNorm", "RMSNorm", "GroupNorm", "InstanceNorm", "BatchNorm"):
        assert f"eqx_norm.{name}" in with_examples, name
    assert len(with_examples) >= 15, sorted(with_examples)
