"""The kernel binding (eqx_norm/kernels/*.py) stays on JAX's public API and says why it is
off when that API is missing or changed; the layers then run on the XLA path."""

import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_norm
from eqx_norm.kernels import _library, groups, rows

PACKAGE = pathlib.Path(eqx_norm.__file__).parent

# JAX internals the binding once read: none may come back, in code or in comments
_PRIVATE = [
    r"jax\._src",
    r"prim_requires_devices",
    r"lowering_parameters",
    r"for_export",
    r"device_assignment",
    r"axis_context",
    r"module_context",
    r"\.mat\b",
]


def test_no_file_under_eqx_norm_reads_jax_internals():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 10 and any(f.name == "_binding.py" for f in files)
    found = [
        f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}"
        for path in files
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if any(re.search(pattern, line) for pattern in _PRIVATE)
    ]
    assert not found, "\n".join(found)


def test_the_check_finds_what_it_looks_for():
    lines = ["from jax._src import dispatch", "ctx.module_context.lowering_parameters.for_export"]
    lines += ["aval.mat.varying", "axis_context.device_assignment"]
    for line in lines:
        assert any(re.search(pattern, line) for pattern in _PRIVATE), line


needs_kernel = pytest.mark.skipif(_library.load()[0] is not None, reason=str(_library.load()[0]))


@needs_kernel
def test_one_primitive_pair_serves_every_kernel():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 6)), jnp.float32)
    s, o = jnp.ones(6), jnp.zeros(6)

    def loss(x, s, o):
        y = rows.normalize_rows(x, s, o, epsilon=1e-5, center=True)
        z, h = rows.normalize_rows_residual(x, y, s, o, epsilon=1e-5, center=False)
        g = groups.normalize_groups(
            h.reshape(2, 2, 6), s, o, num_groups=3, channels_last=True, epsilon=1e-5
        )
        return jnp.sum(z * z) + jnp.sum(jnp.sin(g))

    def names(jaxpr):
        yield from (eqn.primitive.name for eqn in jaxpr.eqns)
        for sub in jax.extend.core.subjaxprs(jaxpr):
            yield from names(sub)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(x, s, o).jaxpr
    ours = {name for name in names(jaxpr) if name.startswith("eqx_norm")}
    assert ours == {"eqx_norm_forward", "eqx_norm_linear"}
    targets = set(re.findall(r"target_name=(\w+)", str(jaxpr)))
    assert targets == {
        f"eqx_norm_{kernel}_{direction}"
        for kernel in ("rows", "residual", "groups")
        for direction in ("forward", "backward")
    }


def test_an_unloaded_library_turns_the_kernel_off_with_its_reason(monkeypatch):
    monkeypatch.setattr(_library, "load", lambda: ("the library is gone (test)", frozenset()))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((5, 8)), jnp.float32)
    assert rows.unavailable_reason(x) == "the library is gone (test)"
    assert rows.residual_unavailable_reason(x, x) == "the library is gone (test)"
    assert groups.unavailable_reason(x) == "the library is gone (test)"
    # a direct call says why instead of running something else
    with pytest.raises(ValueError, match=r"cannot serve this call: the library is gone \(test\)"):
        rows.normalize_rows(x, None, None, epsilon=1e-5, center=True)
    with pytest.raises(ValueError, match=r"the library is gone \(test\)"):
        groups.normalize_groups(
            x.reshape(5, 2, 4), None, None, num_groups=2, channels_last=True, epsilon=1e-5
        )
    # the layers take the XLA path, and implementation="kernel" says why it cannot
    ref = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(eqx_norm.LayerNorm(8)(x), ref, atol=1e-5)
    with pytest.raises(ValueError, match=r"the library is gone \(test\)"):
        eqx_norm.LayerNorm(8, implementation="kernel")(x)


# Each public JAX object the binding reads, removed before eqx_norm is imported.
_REMOVALS = {
    "ffi_call": "del jax.ffi.ffi_call",
    "primitive_batchers": "del jax.interpreters.batching.primitive_batchers",
    "primitive_transposes": "del jax.interpreters.ad.primitive_transposes",
    "register_lowering": "del jax.interpreters.mlir.register_lowering",
    "is_forward_compat": "del jax.interpreters.mlir.LoweringRuleContext.is_forward_compat",
    "Primitive": "del jax.extend.core.Primitive",
    "custom_partitioning": "del jax.experimental.custom_partitioning.custom_partitioning",
    "pcast": "del jax.lax.pcast",
}

_WITHOUT = """
import equinox  # imported first: it may use what is removed below, eqx_norm alone misses it
import jax, jax.ffi, jax.extend.core, jax.interpreters.ad, jax.interpreters.batching
import jax.interpreters.mlir, jax.experimental.custom_partitioning
{removal}
import jax.numpy as jnp
import numpy as np
import eqx_norm
from eqx_norm.kernels import groups, rows
x = jax.random.normal(jax.random.key(0), (16, 8))
reason = rows.unavailable_reason(x)
assert reason is not None and "lacks a hook" in reason and {name!r} in reason, reason
assert groups.unavailable_reason(x) == reason == rows.residual_unavailable_reason(x, x)
ref = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
np.testing.assert_allclose(eqx_norm.LayerNorm(8)(x), ref, atol=1e-5)  # the XLA path
assert jax.grad(lambda x: eqx_norm.RMSNorm(8)(x).sum())(x).shape == x.shape
eqx_norm.GroupNorm(2, 8, spatial_ndim=1, channel_axis=-1)(x)
try:
    eqx_norm.LayerNorm(8, implementation="kernel")(x)
except ValueError as error:
    assert reason in str(error), error
else:
    raise AssertionError("implementation='kernel' should say why it cannot serve")
print("ok", reason)
"""


@pytest.mark.parametrize(
    "name",  # a subprocess each: the quick loop keeps one
    [n if n == "ffi_call" else pytest.param(n, marks=pytest.mark.slow) for n in sorted(_REMOVALS)],
)
@pytest.mark.slow
def test_a_missing_jax_hook_turns_the_kernel_off_with_a_reason(name):
    script = _WITHOUT.format(removal=_REMOVALS[name], name=name)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
