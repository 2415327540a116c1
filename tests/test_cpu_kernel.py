"""The compiled CPU kernel (eqx_norm.kernels.rows) against float64 and against the XLA path.

Oracles: the float64 NumPy reference (tests/reference.py) for values, float64 JAX autodiff
of a plain two-pass formula for derivatives, and the pure-JAX path (``implementation="xla"``).
Tolerances: float32 about 1e-5 relative (1e-6 absolute on y), bf16 one rounding of the
output (2^-8 relative); float16 one rounding (2^-11).
Multi-device checks run in a subprocess with 8 simulated CPU devices.
"""

import functools
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    assert_bitwise_independent_of_thread_count,
    call_target,
    kernel_inputs,
    max_error_over_terms,
)

from eqx_norm.functional import layer_norm
from eqx_norm.kernels import _library
from eqx_norm.kernels import rows as _cpu_kernel

from reference import layer_norm as ref_layer_norm
from reference import rms_norm as ref_rms_norm

# The quick loop (-m "not slow") runs a small subset: values and gradients against float64
# on small shapes, vmap and grad under jit, edge values and the targets' checks; the larger
# shapes, the other transformations and the subprocess tests are slow.
pytestmark = pytest.mark.skipif(_library.load()[0] is not None, reason=str(_library.load()[0]))

EPS = 1e-5


def _reference(x, scale, offset, center, epsilon=EPS):
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    fn = ref_layer_norm if center else ref_rms_norm
    return fn(x64, 1, np.asarray(scale), np.asarray(offset), epsilon=epsilon)


def _kernel(center, epsilon=EPS):
    return lambda x, s, o: _cpu_kernel.normalize_rows(x, s, o, epsilon=epsilon, center=center)


def _plain(center, epsilon=EPS):
    """A plain two-pass formula, differentiated by JAX: the oracle for derivatives."""

    def fn(x, s, o):
        mean = jnp.mean(x, axis=1, keepdims=True) if center else 0.0
        var = jnp.mean(jnp.square(x - mean), axis=1, keepdims=True)
        return (x - mean) / jnp.sqrt(var + epsilon) * s[None, :] + o[None, :]

    return fn


def _grads64(x, scale, offset, ct, center, epsilon=EPS):
    """float64 (dx, dscale, doffset) for cotangent ct."""
    with jax.enable_x64(True):
        args = [
            jnp.asarray(np.asarray(a.astype(jnp.float32), np.float64)) for a in (x, scale, offset)
        ]
        _, vjp = jax.vjp(_plain(center, epsilon), *args)
        return [
            np.asarray(g) for g in vjp(jnp.asarray(np.asarray(ct.astype(jnp.float32), np.float64)))
        ]


def _dx_size(x, scale, ct, center, epsilon=EPS):
    """max |ct * scale * rstd|: dx's terms before they cancel (dx of a size-1 row is 0 for
    LayerNorm and ~epsilon * rstd^3 for RMSNorm, far below its terms)."""
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    c = x64 - x64.mean(1, keepdims=True) if center else x64
    rstd = 1 / np.sqrt((c**2).mean(1, keepdims=True) + epsilon)
    return float(np.max(np.abs(np.asarray(ct.astype(jnp.float32)) * np.asarray(scale) * rstd)))


# ----------------------------------------------------------------------------------------
# Values and gradients


SHAPES = [
    pytest.param((8192, 1024), marks=pytest.mark.slow),
    pytest.param((64 * 128, 768), marks=pytest.mark.slow),
    pytest.param((32, 200704), marks=pytest.mark.slow),
    pytest.param((64, 1024), marks=pytest.mark.slow),
    # rows longer than the kernel's column block
    pytest.param((3, 40000), marks=pytest.mark.slow),
    (1, 300),  # one row
    (7, 1),  # D = 1
    (33, 17),  # D not a multiple of the 16 lanes
]


@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
@pytest.mark.parametrize("shape", SHAPES)
def test_float32_against_float64(shape, center):
    x, scale, offset, ct = kernel_inputs(shape, shape[1])
    fn = _kernel(center)
    y, vjp = jax.jit(lambda x, s, o: jax.vjp(fn, x, s, o))(x, scale, offset)
    assert y.dtype == jnp.float32 and y.shape == shape
    np.testing.assert_allclose(y, _reference(x, scale, offset, center), rtol=1e-5, atol=1e-5)
    natural = (_dx_size(x, scale, ct, center), 0.0, 0.0)
    for got, want, size in zip(vjp(ct), _grads64(x, scale, offset, ct, center), natural):
        assert max_error_over_terms(got, want, size) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_mean_1e4_is_accurate(center):
    x, scale, offset, ct = kernel_inputs((512, 1024), 1024, mean=1e4)
    y, vjp = jax.vjp(_kernel(center), x, scale, offset)
    assert (
        float(np.max(np.abs(np.asarray(y, np.float64) - _reference(x, scale, offset, center))))
        <= 1e-5
    )
    for got, want in zip(vjp(ct), _grads64(x, scale, offset, ct, center)):
        assert max_error_over_terms(got, want) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_half_precision(dtype, center):
    x, scale, offset, ct = kernel_inputs((256, 768), 768, dtype=dtype)
    y, vjp = jax.vjp(_kernel(center), x, scale, offset)
    assert y.dtype == dtype
    unit = 2.0**-8 if dtype == jnp.bfloat16 else 2.0**-11  # one rounding of the output
    want = _reference(x, scale, offset, center)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=unit, atol=unit)
    dx, dscale, doffset = vjp(ct)
    assert dx.dtype == dtype and dscale.dtype == jnp.float32
    want_dx, want_dscale, want_doffset = _grads64(x, scale, offset, ct, center)
    assert max_error_over_terms(dx, want_dx) < 2 * unit
    assert (
        max_error_over_terms(dscale, want_dscale) < 1e-5
    )  # float32 sums of exactly-converted inputs
    assert max_error_over_terms(doffset, want_doffset) < 1e-5


def _bfloat16_bits(a):
    return np.asarray(a).view(np.uint16)


def test_bfloat16_stores_round_to_nearest_even_and_keep_nan():
    """The kernels' float32 -> bfloat16 store (common.h's BF16::store), seen through the
    fused residual's h = bf16(x + r), summed in float32: bitwise NumPy's (ml_dtypes')
    round-to-nearest-even, ties to even, overflow to inf, and NaN kept NaN, for sums that
    need rounding at every magnitude; in runs long enough for the vector loop and its
    scalar tail."""
    rng = np.random.default_rng(7)
    rows, d = 64, 300  # 300: vector chunks and a scalar tail in every row
    magnitude = 2.0 ** rng.integers(-100, 100, (rows, 1))
    x = (rng.standard_normal((rows, d)) * magnitude).astype(jnp.bfloat16)
    r = (rng.standard_normal((rows, d)) * magnitude * 2.0**-9).astype(jnp.bfloat16)
    big = float(jnp.finfo(jnp.bfloat16).max)
    edges = [  # (x, r): ties to even, both ways; overflow; NaN and infinities
        (1.0, 2.0**-8), (1.0 + 2.0**-7, 2.0**-8), (-1.0, -(2.0**-8)), (big, big),
        (-big, -big), (np.nan, 1.0), (np.inf, -np.inf), (np.inf, 1.0), (0.0, -0.0),
    ]  # fmt: skip
    for k, (a, b) in enumerate(edges):
        x[k % rows, k], r[k % rows, k] = a, b
        x[k % rows, d - 1 - k], r[k % rows, d - 1 - k] = a, b  # in the tail too
    _, h = _cpu_kernel.normalize_rows_residual(
        jnp.asarray(x), jnp.asarray(r), None, None, epsilon=EPS, center=True
    )
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow and NaN edges
        want = (x.astype(np.float32) + r.astype(np.float32)).astype(jnp.bfloat16)
    nan = np.isnan(want.astype(np.float32))
    assert nan.sum() == 2 * 2  # the NaN edges, twice each
    np.testing.assert_array_equal(np.isnan(np.asarray(h, np.float32)), nan)
    np.testing.assert_array_equal(_bfloat16_bits(h)[~nan], _bfloat16_bits(want)[~nan])

    # float32 NaNs whose low half would carry out of a rounded bfloat16 (to -0 or inf),
    # reaching y through the offset: y stays NaN there, and only there
    payloads = np.array([0x7FFFFFFF, 0xFFFFFFFF, 0x7F800001, 0x7FC08000], np.uint32)
    offset = np.zeros(d, np.float32)
    offset[[3, 100, 200, d - 1]] = payloads.view(np.float32)
    ordinary = jnp.asarray(rng.standard_normal((rows, d)), jnp.bfloat16)
    y = _cpu_kernel.normalize_rows(ordinary, None, jnp.asarray(offset), epsilon=EPS, center=True)
    y_nan = np.isnan(np.asarray(y, np.float32))
    np.testing.assert_array_equal(y_nan, np.broadcast_to(np.isnan(offset), y_nan.shape))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "dtype"),
    [
        pytest.param((64 * 128, 768), jnp.float32, marks=pytest.mark.slow),
        ((64, 1024), jnp.float32),
        ((32, 20000), jnp.float32),
        ((64, 1024), jnp.bfloat16),
        ((32, 20000), jnp.bfloat16),
    ],
)
def test_matches_xla_path(shape, dtype):
    x, scale, offset, ct = kernel_inputs(shape, shape[1], dtype=dtype)

    def run(fn):
        y, vjp = jax.jit(lambda x, s, o: jax.vjp(fn, x, s, o))(x, scale, offset)
        return [y.astype(jnp.float32), *vjp(ct.astype(y.dtype))]

    kernel = run(_kernel(True))
    xla = run(lambda x, s, o: layer_norm(x, x.shape[1], s, o, epsilon=EPS, implementation="xla"))
    tol = 1e-5 if dtype == jnp.float32 else 2.0**-7
    for a, b in zip(kernel, xla):
        assert (
            max_error_over_terms(
                np.asarray(a, np.float32), np.asarray(b.astype(jnp.float32), np.float64)
            )
            < tol
        )


@pytest.mark.parametrize("epsilon", [0.0, 1e-5])
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_constant_rows_give_exactly_offset(epsilon, center):
    values = np.concatenate([np.geomspace(1e-3, 1e6, 40), -np.geomspace(1e-3, 1e6, 40), [0.0]])
    rows = np.repeat(values[:, None], 67, axis=1).astype(np.float32)
    if not center:  # RMSNorm of a constant row is sign(x) unless it is 0: check zeros only
        rows = np.zeros_like(rows)
    _, scale, offset, _ = kernel_inputs((len(values), 67), 67)
    y = _cpu_kernel.normalize_rows(jnp.asarray(rows), scale, offset, epsilon=epsilon, center=center)
    np.testing.assert_array_equal(y, np.broadcast_to(offset, rows.shape))
    none = _cpu_kernel.normalize_rows(jnp.asarray(rows), None, None, epsilon=epsilon, center=center)
    np.testing.assert_array_equal(none, 0.0)


def test_epsilon_zero_matches_reference():
    x, scale, offset, _ = kernel_inputs((16, 100), 100)
    y = _cpu_kernel.normalize_rows(x, scale, offset, epsilon=0.0, center=True)
    np.testing.assert_allclose(y, _reference(x, scale, offset, True, 0.0), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_scale_and_offset_none():
    x, _, _, _ = kernel_inputs((10, 50), 50)
    y = _cpu_kernel.normalize_rows(x, None, None, epsilon=EPS, center=True)
    np.testing.assert_allclose(
        y, _reference(x, np.ones(50), np.zeros(50), True), rtol=1e-5, atol=1e-5
    )
    gx = jax.grad(
        lambda x: jnp.sum(
            jnp.sin(_cpu_kernel.normalize_rows(x, None, None, epsilon=EPS, center=True))
        )
    )(x)
    want = jax.grad(
        lambda x: jnp.sum(jnp.sin(_plain(True)(x, jnp.ones(x.shape[1]), jnp.zeros(x.shape[1]))))
    )(x)
    np.testing.assert_allclose(gx, want, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_bitwise_deterministic_across_runs():
    x, scale, offset, ct = kernel_inputs((4096, 1024), 1024, mean=3.0)
    run = jax.jit(lambda x, s, o, ct: jax.vjp(_kernel(True), x, s, o)[1](ct))
    first = run(x, scale, offset, ct)
    for _ in range(3):
        for a, b in zip(first, run(x, scale, offset, ct)):
            np.testing.assert_array_equal(a, b)


# run on one core and on every core (helpers.assert_bitwise_independent_of_thread_count)
_THREADS = """
import sys
import jax, jax.numpy as jnp, numpy as np
from eqx_norm.kernels import rows as _cpu_kernel
rng = np.random.default_rng(0)
out = {}
for shape in [(4096, 1024), (8, 40000)]:
    x = jnp.asarray(3 + rng.standard_normal(shape), jnp.float32)
    s = jnp.asarray(1 + 0.1 * rng.standard_normal(shape[1]), jnp.float32)
    o = jnp.zeros(shape[1], jnp.float32)
    ct = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    fn = lambda x, s, o: _cpu_kernel.normalize_rows(x, s, o, epsilon=1e-5, center=True)
    y, vjp = jax.vjp(fn, x, s, o)
    for i, a in enumerate([y, *vjp(ct)]):
        out[f"{shape}-{i}"] = np.asarray(a)
np.savez(sys.argv[1], **out)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_bitwise_deterministic_across_thread_counts(tmp_path):
    assert_bitwise_independent_of_thread_count(_THREADS, tmp_path, timeout=120)


# ----------------------------------------------------------------------------------------
# Transformations, each against float64 autodiff of the plain formula.


def _f64(*arrays):
    return [jnp.asarray(np.asarray(a, np.float64)) for a in arrays]


@pytest.fixture
def small():
    return kernel_inputs((4, 6), 6, mean=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_jvp(small, center):
    x, scale, offset, _ = small
    rng = np.random.default_rng(5)
    tangents = [jnp.asarray(rng.standard_normal(a.shape), jnp.float32) for a in (x, scale, offset)]
    y, dy = jax.jvp(_kernel(center), (x, scale, offset), tuple(tangents))
    with jax.enable_x64(True):
        want_y, want_dy = jax.jvp(
            _plain(center), tuple(_f64(x, scale, offset)), tuple(_f64(*tangents))
        )
    np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dy, want_dy, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_jacfwd_jacrev_hessian(small, center):
    x, scale, offset, _ = small

    def loss(fn):
        return lambda x, s, o: jnp.sum(
            jnp.sin(fn(x, s, o)) * jnp.arange(1.0, 7.0, dtype=x.dtype)[None, :]
        )

    kernel, plain = loss(_kernel(center)), loss(_plain(center))
    with jax.enable_x64(True):
        args64 = _f64(x, scale, offset)
        want = [
            jax.jit(jax.jacfwd(plain, argnums=(0, 1)))(*args64),
            jax.jit(jax.jacrev(plain, argnums=(0, 1, 2)))(*args64),
            jax.jit(jax.hessian(plain))(*args64),
            jax.jit(jax.jacrev(jax.jacfwd(plain, argnums=1), argnums=0))(*args64),
        ]
    got = [
        jax.jit(jax.jacfwd(kernel, argnums=(0, 1)))(x, scale, offset),
        jax.jit(jax.jacrev(kernel, argnums=(0, 1, 2)))(x, scale, offset),
        jax.jit(jax.hessian(kernel))(x, scale, offset),
        jax.jit(jax.jacrev(jax.jacfwd(kernel, argnums=1), argnums=0))(x, scale, offset),
    ]
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)


@pytest.mark.slow
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_grad_of_grad(small, center):
    x, scale, offset, _ = small

    def inner(fn):
        def g(x, s, o):
            return jax.grad(lambda x, s, o: jnp.sum(jnp.sin(fn(x, s, o))), argnums=(0, 1))(x, s, o)

        return lambda x, s, o: sum(jnp.sum(jnp.cos(t)) for t in g(x, s, o))

    got = jax.grad(inner(_kernel(center)), argnums=(0, 1, 2))(x, scale, offset)
    with jax.enable_x64(True):
        want = jax.grad(inner(_plain(center)), argnums=(0, 1, 2))(*_f64(x, scale, offset))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=2e-4)


def _batched_inputs(batch=3, shape=(5, 8)):
    rng = np.random.default_rng(7)
    x = jnp.asarray(2 + rng.standard_normal((batch, *shape)), jnp.float32)
    scales = jnp.asarray(1 + 0.1 * rng.standard_normal((batch, shape[1])), jnp.float32)
    offset = jnp.asarray(0.1 * rng.standard_normal(shape[1]), jnp.float32)
    return x, scales, offset


@pytest.mark.parametrize(
    "center", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["layer", "rms"]
)
def test_vmap_forward_grad_and_per_example_scale(center):
    x, scales, offset = _batched_inputs()

    def cases(fn, x, scales, offset):
        def loss(x, s, o):
            return jnp.sum(jnp.sin(fn(x, s, o)))

        def loss_vmapped(in_axes):
            return lambda x, s, o: jnp.sum(jnp.sin(jax.vmap(fn, in_axes)(x, s, o)))

        grad = jax.grad(loss, argnums=(0, 1, 2))
        return [
            jax.vmap(fn, (0, None, None))(x, scales[0], offset),
            jax.vmap(fn, (0, 0, None))(x, scales, offset),
            # per-example gradients, with a shared and with a per-example scale
            jax.vmap(grad, (0, None, None))(x, scales[0], offset),
            jax.vmap(grad, (0, 0, None))(x, scales, offset),
            # gradients of a vmapped forward (the batch folds into the kernel's rows)
            jax.grad(loss_vmapped((0, None, None)), argnums=(0, 1, 2))(x, scales[0], offset),
            jax.grad(loss_vmapped((0, 0, None)), argnums=(0, 1, 2))(x, scales, offset),
            # batch axis in the middle
            jax.vmap(fn, (1, None, None), 1)(x.transpose(1, 0, 2), scales[0], offset),
        ]

    got = jax.jit(functools.partial(cases, _kernel(center)))(x, scales, offset)
    with jax.enable_x64(True):
        want = jax.jit(functools.partial(cases, _plain(center)))(*_f64(x, scales, offset))
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)


def test_vmap_of_grad_uses_per_example_kernel_sums():
    """vmap(grad) with a shared scale keeps the backward kernel (rows folded, one group per
    example) rather than falling back to jnp: its jaxpr holds the backward primitive."""
    x, scales, offset = _batched_inputs()
    g = jax.vmap(jax.grad(lambda x, s: jnp.sum(_kernel(True)(x, s, offset)), argnums=1), (0, None))
    assert "eqx_norm_rows_backward" in str(jax.make_jaxpr(g)(x, scales[0]))


@pytest.mark.slow
@pytest.mark.parametrize("center", [True, False], ids=["layer", "rms"])
def test_checkpoint_and_scan(center):
    x, scales, offset = _batched_inputs(batch=4)
    scale = scales[0]

    def model(fn):
        layer = jax.checkpoint(lambda h, s, o: jnp.tanh(fn(h, s, o)))

        def loss(x, s, o):
            def step(h, xi):
                h = layer(h + xi, s, o)
                return h, jnp.sum(h)

            _, out = jax.lax.scan(step, jnp.zeros_like(x[0]), x)
            return jnp.sum(out)

        return loss

    got = jax.value_and_grad(model(_kernel(center)), argnums=(0, 1, 2))(x, scale, offset)
    with jax.enable_x64(True):
        args64 = _f64(x, scale, offset)
        want = jax.value_and_grad(model(_plain(center)), argnums=(0, 1, 2))(*args64)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_export_holds_no_custom_call_and_runs():
    x, scale, offset, ct = kernel_inputs((16, 40), 40)

    def fn(x, s, o):
        y, vjp = jax.vjp(_kernel(True), x, s, o)
        return y, vjp(ct)

    exported = jax.export.export(jax.jit(fn))(x, scale, offset)
    assert "stablehlo.custom_call" not in exported.mlir_module()
    got = exported.call(x, scale, offset)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(fn(x, scale, offset))):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_jit_runs_the_kernel():
    x, scale, offset, _ = kernel_inputs((8, 32), 32)
    text = jax.jit(_kernel(True)).lower(x, scale, offset).as_text()
    assert "eqx_norm_rows_forward" in text


# ----------------------------------------------------------------------------------------
# Availability


def test_unavailable_reasons():
    assert _cpu_kernel.unavailable_reason(jnp.zeros((2, 3), jnp.float32)) is None
    assert _cpu_kernel.unavailable_reason(jax.ShapeDtypeStruct((2, 3), jnp.bfloat16)) is None
    reason = _cpu_kernel.unavailable_reason(jax.ShapeDtypeStruct((2, 3), np.float64))
    assert reason is not None and "float64" in reason


def test_missing_library_is_reported(monkeypatch):
    monkeypatch.setattr(_library, "LIBRARY", "libdoes_not_exist.so")
    reason, dtypes = _library.load.__wrapped__()
    assert not dtypes
    assert reason is not None and "not built" in reason and "EQX_NORM_KERNEL=OFF" in reason


# ----------------------------------------------------------------------------------------
# Several devices (8 simulated CPU devices, in a subprocess: XLA_FLAGS must precede jax).

_MULTI_DEVICE = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from eqx_norm.kernels import rows as _cpu_kernel

def kernel(x, s, o):
    return _cpu_kernel.normalize_rows(x, s, o, epsilon=1e-5, center=True)

def plain(x, s, o):
    mean = jnp.mean(x, axis=1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=1, keepdims=True)
    return (x - mean) / jnp.sqrt(var + 1e-5) * s[None, :] + o[None, :]

def fwd_bwd(fn):
    def f(x, s, o, ct):
        y, vjp = jax.vjp(fn, x, s, o)
        return (y, *vjp(ct))
    return f

rng = np.random.default_rng(0)
x = jnp.asarray(2 + rng.standard_normal((64, 48)), jnp.float32)
s = jnp.asarray(1 + 0.1 * rng.standard_normal(48), jnp.float32)
o = jnp.asarray(0.1 * rng.standard_normal(48), jnp.float32)
ct = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
want = fwd_bwd(plain)(x, s, o, ct)
out = {}

def err(got):
    return max(float(jnp.max(jnp.abs(g - w))) for g, w in zip(got, want))

mesh = jax.make_mesh((8,), ("b",))
rows, cols, rep = (NamedSharding(mesh, P("b", None)), NamedSharding(mesh, P(None, "b")),
                   NamedSharding(mesh, P()))
for name, xs in (("rows", rows), ("cols", cols)):
    f = jax.jit(fwd_bwd(kernel), in_shardings=(xs, rep, rep, xs))
    compiled = f.lower(x, s, o, ct).compile()
    hlo = compiled.as_text()
    out[name] = {"err": err(f(x, s, o, ct)), "all_gather": "all-gather" in hlo,
                 "kernel": "eqx_norm_rows_forward" in hlo and "eqx_norm_rows_backward" in hlo,
                 "y_rows_axis": str(f(x, s, o, ct)[0].sharding.spec[0])}

sm = jax.jit(jax.shard_map(fwd_bwd(kernel), mesh=mesh, in_specs=(P("b"), P(), P(), P("b")),
                           out_specs=(P("b"), P("b"), P(), P())))
# the cotangents of the shared s and o come out summed over the devices (invariant)
out["shard_map"] = {"err": err(sm(jax.device_put(x, rows), s, o, jax.device_put(ct, rows)))}

xp = x.reshape(8, 8, 48)
ctp = ct.reshape(8, 8, 48)
pm = jax.pmap(fwd_bwd(kernel), in_axes=(0, None, None, 0))
y, dx, ds, do = pm(xp, s, o, ctp)
out["pmap"] = {"err": err((y.reshape(64, 48), dx.reshape(64, 48), ds.sum(0), do.sum(0)))}

# the fused residual kernel, batch-sharded: per-device rows too, against the composition
r = jnp.asarray(rng.standard_normal((64, 48)), jnp.float32)
def fused(x, r, s, o):
    return sum(jnp.sum(a * a) for a in _cpu_kernel.normalize_rows_residual(
        x, r, s, o, epsilon=1e-5, center=True))
def composed(x, r, s, o):
    y = plain(x + r, s, o)
    return jnp.sum(y * y) + jnp.sum((x + r) ** 2)
g = jax.jit(jax.grad(fused, argnums=(0, 1, 2, 3)), in_shardings=(rows, rows, rep, rep))
hlo = g.lower(x, r, s, o).compile().as_text()
want_g = jax.grad(composed, argnums=(0, 1, 2, 3))(x, r, s, o)
out["residual"] = {
    "err": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g(x, r, s, o), want_g)),
    "all_gather": "all-gather" in hlo,
    "kernel": "eqx_norm_residual_forward" in hlo and "eqx_norm_residual_backward" in hlo,
}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_multiple_devices():
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_MULTI_DEVICE)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for name in ("rows", "cols", "shard_map", "pmap"):
        assert out[name]["err"] < 1e-4, (name, out[name])
    # batch-sharded jit: each device runs the kernel on its own rows, x is never gathered
    assert out["rows"]["kernel"] and not out["rows"]["all_gather"], out["rows"]
    assert out["rows"]["y_rows_axis"] == "b", out["rows"]
    residual = out["residual"]
    assert residual["kernel"] and not residual["all_gather"] and residual["err"] < 1e-3, residual


@pytest.mark.slow
@pytest.mark.parametrize("center", [True, False])
def test_jnp_fallback_agrees_with_the_kernel_where_squares_underflow(center):
    """The fallback (jax.export, other platforms) shares the library's statistics, so at
    epsilon 0 a spread of 1e-20 is normalized, not collapsed to the offset."""
    x = (1e-20 * np.random.default_rng(0).standard_normal((4, 64))).astype(np.float32)
    scale, offset = jnp.ones(64), jnp.zeros(64)
    fallback, _, _ = _cpu_kernel._jnp_forward(
        jnp.asarray(x), scale, offset, epsilon=0.0, center=center
    )
    x64 = x.astype(np.float64)
    centered = x64 - x64.mean(1, keepdims=True) if center else x64
    expected = centered / np.sqrt((centered**2).mean(1, keepdims=True))
    # float32 statistics of O(1) outputs: a few ulps
    np.testing.assert_allclose(np.asarray(fallback), expected, atol=1e-5)
    kernel = _cpu_kernel.normalize_rows(jnp.asarray(x), scale, offset, epsilon=0.0, center=center)
    np.testing.assert_allclose(np.asarray(fallback), np.asarray(kernel), atol=1e-5)


# ----------------------------------------------------------------------------------------
# Memory safety: the registered targets check every buffer, whoever calls them.


_F32 = jnp.float32
_GOOD_FORWARD = dict(x=(8, 16), scale=(16,), offset=(16,), y=(8, 16), mean_shift=(8,), rstd=(8,))


@pytest.mark.parametrize(
    "buffer, shape",
    [
        ("scale", (15,)),
        ("scale", (3, 16)),  # per-example rows must divide the 8 rows
        ("offset", (32,)),
        ("offset", (8, 15)),
        ("y", (8, 8)),
        ("mean_shift", (4,)),
        ("rstd", (9,)),
    ],
)
def test_forward_target_rejects_a_wrong_buffer_shape(buffer, shape):
    shapes = {**_GOOD_FORWARD, buffer: shape}
    args = [jnp.ones(shapes[name], _F32) for name in ("x", "scale", "offset")]
    outs = [jax.ShapeDtypeStruct(shapes[name], _F32) for name in ("y", "mean_shift", "rstd")]
    with pytest.raises(Exception, match=rf"{buffer} has dimensions"):
        jax.block_until_ready(
            call_target("eqx_norm_rows_forward", outs, *args, epsilon=np.float32(1e-5), center=True)
        )
    good = [jnp.ones(_GOOD_FORWARD[n], _F32) for n in ("x", "scale", "offset")]
    good_outs = [jax.ShapeDtypeStruct(_GOOD_FORWARD[n], _F32) for n in ("y", "mean_shift", "rstd")]
    y = call_target(
        "eqx_norm_rows_forward", good_outs, *good, epsilon=np.float32(1e-5), center=True
    )
    assert y[0].shape == (8, 16)  # the same call with the right shapes runs


_GOOD_BACKWARD = dict(
    x=(8, 16), scale=(16,), mean_shift=(8,), rstd=(8,), ct=(8, 16), dx=(8, 16),
    dscale=(2, 16), doffset=(2, 16),
)  # fmt: skip


@pytest.mark.parametrize(
    "buffer, shape",
    [
        ("scale", (8,)),
        ("scale", (3, 16)),
        ("mean_shift", (16,)),
        ("rstd", (1,)),
        ("ct", (8, 8)),
        ("dx", (4, 16)),
        ("dscale", (1, 16)),
        ("doffset", (2, 8)),
    ],
)
def test_backward_target_rejects_a_wrong_buffer_shape(buffer, shape):
    shapes = {**_GOOD_BACKWARD, buffer: shape}
    args = [jnp.ones(shapes[n], _F32) for n in ("x", "scale", "mean_shift", "rstd", "ct")]
    outs = [jax.ShapeDtypeStruct(shapes[n], _F32) for n in ("dx", "dscale", "doffset")]
    with pytest.raises(Exception, match=rf"{buffer} has dimensions"):
        jax.block_until_ready(
            call_target(
                "eqx_norm_rows_backward",
                outs,
                *args,
                center=True,
                groups=np.int64(2),
                want_dx=True,
            )
        )


def test_backward_target_rejects_groups_that_do_not_divide_the_rows():
    args = [jnp.ones(_GOOD_BACKWARD[n], _F32) for n in ("x", "scale", "mean_shift", "rstd", "ct")]
    outs = [jax.ShapeDtypeStruct(s, _F32) for s in ((8, 16), (3, 16), (3, 16))]
    with pytest.raises(Exception, match="groups must be >= 1 and divide"):
        jax.block_until_ready(
            call_target(
                "eqx_norm_rows_backward", outs, *args, center=True, groups=np.int64(3), want_dx=True
            )
        )


_BUFFERS = {  # target: (argument names, result names, good shapes, attributes)
    "eqx_norm_rows_forward": (
        ("x", "scale", "offset"), ("y", "mean_shift", "rstd"), _GOOD_FORWARD,
        dict(epsilon=np.float32(1e-5), center=True),
    ),
    "eqx_norm_rows_backward": (
        ("x", "scale", "mean_shift", "rstd", "ct"), ("dx", "dscale", "doffset"), _GOOD_BACKWARD,
        dict(center=True, groups=np.int64(2), want_dx=True),
    ),
    "eqx_norm_residual_forward": (
        ("x", "residual", "scale", "offset"), ("y", "h", "mean_shift", "rstd"),
        {**_GOOD_FORWARD, "residual": (8, 16), "h": (8, 16)},
        dict(epsilon=np.float32(1e-5), center=True),
    ),
    "eqx_norm_residual_backward": (
        ("h", "scale", "mean_shift", "rstd", "ct", "ct_h"), ("dh", "dscale", "doffset"),
        {**_GOOD_BACKWARD, "h": (8, 16), "ct_h": (8, 16), "dh": (8, 16)},
        dict(center=True, groups=np.int64(2)),
    ),
}  # fmt: skip
_I32, _BF16, _F16 = jnp.int32, jnp.bfloat16, jnp.float16


@pytest.mark.parametrize(
    "target, types, message",
    [
        ("eqx_norm_rows_forward", {"x": _I32, "y": _I32}, "x has element type int32, expected float32"),
        ("eqx_norm_rows_forward", {"x": jnp.float64, "y": jnp.float64}, "x has element type float64, expected float32"),
        ("eqx_norm_rows_forward", {"y": _BF16}, r"y has element type bfloat16, expected float32 \(x's\)"),
        ("eqx_norm_rows_forward", {"scale": _F16}, "Wrong buffer dtype"),
        ("eqx_norm_rows_backward", {"x": _I32, "ct": _I32, "dx": _I32}, "x has element type int32"),
        ("eqx_norm_rows_backward", {"ct": _BF16}, r"ct has element type bfloat16, expected float32 \(x's\)"),
        ("eqx_norm_rows_backward", {"dx": _BF16}, r"dx has element type bfloat16, expected float32 \(x's\)"),
        ("eqx_norm_rows_backward", {"mean_shift": _F16}, "Wrong buffer dtype"),
        ("eqx_norm_residual_forward", {"x": _I32, "y": _I32}, "x has element type int32"),
        ("eqx_norm_residual_forward", {"x": _BF16, "y": _BF16, "residual": _F16, "h": _F16},
         r"residual has element type float16, expected float32 or bfloat16 \(x's\)"),
        ("eqx_norm_residual_forward", {"x": _BF16, "y": _BF16, "residual": _BF16},
         r"h has element type float32, expected bfloat16 \(the residual's\)"),
        ("eqx_norm_residual_forward", {"offset": _BF16}, "Wrong buffer dtype"),
        ("eqx_norm_residual_backward", {"h": _I32, "dh": _I32}, "h has element type int32"),
        ("eqx_norm_residual_backward", {"h": _BF16, "ct_h": _BF16, "dh": _BF16},
         r"ct has element type float32, expected bfloat16 \(h's\)"),
        ("eqx_norm_residual_backward", {"ct_h": _BF16}, r"ct_h has element type bfloat16, expected float32 \(h's\)"),
        ("eqx_norm_residual_backward", {"dh": _F16}, r"dh has element type float16, expected float32 \(h's\)"),
        ("eqx_norm_residual_backward", {"rstd": _BF16}, "Wrong buffer dtype"),
    ],
)  # fmt: skip
def test_targets_reject_a_wrong_element_type(target, types, message):
    """Every buffer's element type is checked: an error naming the buffer, its type and the
    expected one (the float32 statistics and parameters by XLA's own decoding)."""
    arg_names, out_names, shapes, attrs = _BUFFERS[target]
    with jax.enable_x64(jnp.float64 in types.values()):
        args = [jnp.ones(shapes[n], types.get(n, _F32)) for n in arg_names]
        outs = [jax.ShapeDtypeStruct(shapes[n], types.get(n, _F32)) for n in out_names]
        with pytest.raises(Exception, match=message):
            jax.block_until_ready(call_target(target, outs, *args, **attrs))


@pytest.mark.parametrize("residual", [False, True])
def test_forward_targets_write_nan_statistics_for_rows_of_no_elements(residual):
    """Rows of D = 0: every output is still written, the statistics NaN, as a mean over
    nothing."""
    x = jnp.ones((4, 0))
    outs = [jax.ShapeDtypeStruct(s, _F32) for s in ((4, 0), (4, 0), (4,), (4,))]
    attrs = dict(epsilon=np.float32(1e-5), center=True)
    if residual:
        args, target = (x, x, jnp.ones(0), jnp.ones(0)), "eqx_norm_residual_forward"
    else:
        args, target, outs = (x, jnp.ones(0), jnp.ones(0)), "eqx_norm_rows_forward", outs[1:]
    *_, mean_shift, rstd = call_target(target, outs, *args, **attrs)
    assert np.isnan(mean_shift).all() and np.isnan(rstd).all()


@pytest.mark.slow
def test_parameter_only_gradient_writes_no_dx():
    """With x not differentiated, the backward kernel is asked for no dx at all."""
    x, scale, offset, _ = kernel_inputs((64, 32), 32)

    def loss(s, o):
        return (_kernel(True)(x, s, o) ** 2).sum()

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(scale, offset))
    assert "want_dx=False" in jaxpr and "want_dx=True" not in jaxpr
    got = jax.grad(loss, argnums=(0, 1))(scale, offset)
    ref = jax.grad(lambda s, o: (_plain(True)(x, s, o) ** 2).sum(), argnums=(0, 1))(scale, offset)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-4)


_MISSING_HOOK = """
import sys
import equinox  # uses the module itself: imported first, so only eqx_norm misses it
import jax
import jax.interpreters
# what a future JAX might move: the public shim module of the batching rules
sys.modules["jax.interpreters.batching"] = None
if hasattr(jax.interpreters, "batching"):
    delattr(jax.interpreters, "batching")
import jax.numpy as jnp
import numpy as np
import eqx_norm
from eqx_norm.kernels import rows
x = jax.random.normal(jax.random.key(0), (16, 8))
reason = rows.unavailable_reason(x)
assert reason is not None and "lacks a hook" in reason, reason
y = eqx_norm.LayerNorm(8)(x)  # the XLA path serves
ref = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
np.testing.assert_allclose(y, ref, atol=1e-5)
try:
    eqx_norm.LayerNorm(8, implementation="kernel")(x)
except ValueError as error:
    assert "lacks a hook" in str(error), error
else:
    raise AssertionError("implementation='kernel' should say why it cannot serve")
print("ok", reason)
"""


@pytest.mark.slow
def test_missing_jax_hook_disables_the_kernel_with_a_reason():
    """A JAX without one of the internals the binding uses: import works, the kernel says
    why it is off, and every call takes the XLA path."""
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-c", _MISSING_HOOK], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")


# ----------------------------------------------------------------------------------------
# The fused residual add + norm against the unfused composition.


def _unfused_residual(x, r, s, o, center):
    h = (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(r.dtype)
    return _plain(center)(h.astype(jnp.float32), s, o).astype(x.dtype), h


def _fused_residual(x, r, s, o, center):
    return _cpu_kernel.normalize_rows_residual(x, r, s, o, epsilon=EPS, center=center)


# (x dtype, residual dtype, tolerance): float32 rounding of O(1) values; in bfloat16 the
# fused backward rounds dh once where the composition rounds twice: one bf16 ulp at |dh| <= 4
_RESIDUAL_CASES = [
    (jnp.float32, jnp.float32, 2e-5),
    (jnp.bfloat16, jnp.float32, 2e-2),
    (jnp.bfloat16, jnp.bfloat16, 4e-2),
]


@pytest.mark.slow
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("x_dtype, r_dtype, tol", _RESIDUAL_CASES)
def test_fused_residual_equals_the_unfused_composition(x_dtype, r_dtype, tol, center):
    rng = np.random.default_rng(3)
    x, scale, offset, ct_y = kernel_inputs((96, 160), 160, dtype=x_dtype)
    r = jnp.asarray(rng.standard_normal((96, 160)), jnp.float32).astype(r_dtype)
    ct_h = jnp.asarray(rng.standard_normal((96, 160)), jnp.float32)
    assert _cpu_kernel.residual_unavailable_reason(x, r) is None
    y, h = jax.jit(_fused_residual, static_argnums=4)(x, r, scale, offset, center)
    y_ref, h_ref = _unfused_residual(x, r, scale, offset, center)
    assert y.dtype == x_dtype and h.dtype == r_dtype
    np.testing.assert_array_equal(np.asarray(h, np.float32), np.asarray(h_ref, np.float32))
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_ref, np.float32), atol=tol)

    def loss(fn):
        def value(x, r, s, o):
            y, h = fn(x, r, s, o, center)
            f32 = jnp.float32
            return jnp.sum(y.astype(f32) * ct_y.astype(f32)) + jnp.sum(h.astype(f32) * ct_h)

        return value

    grads = jax.jit(jax.grad(loss(_fused_residual), argnums=(0, 1, 2, 3)))(x, r, scale, offset)
    refs = jax.grad(loss(_unfused_residual), argnums=(0, 1, 2, 3))(x, r, scale, offset)
    for name, g, ref in zip(("dx", "dr", "dscale", "doffset"), grads, refs):
        assert g.dtype == ref.dtype, name
        scale_of = max(1.0, float(jnp.abs(ref.astype(jnp.float32)).max()))
        err = float(jnp.abs(g.astype(jnp.float32) - ref.astype(jnp.float32)).max()) / scale_of
        assert err < tol, (name, err)
    # forward mode and vmap run the same maths
    tangents = jax.jvp(lambda x, r: _fused_residual(x, r, scale, offset, center), (x, r), (x, r))
    ref_tangents = jax.jvp(
        lambda x, r: _unfused_residual(x, r, scale, offset, center), (x, r), (x, r)
    )
    for t, ref in zip(tangents[1], ref_tangents[1]):
        np.testing.assert_allclose(np.asarray(t, np.float32), np.asarray(ref, np.float32), atol=tol)
    xb, rb = x.reshape(4, 24, 160), r.reshape(4, 24, 160)
    yb, hb = jax.vmap(lambda x, r: _fused_residual(x, r, scale, offset, center))(xb, rb)
    np.testing.assert_array_equal(np.asarray(yb.reshape(y.shape)), np.asarray(y))
    np.testing.assert_array_equal(np.asarray(hb.reshape(h.shape)), np.asarray(h))


def test_fused_residual_backward_reads_both_cotangents_in_one_kernel():
    x, scale, offset, _ = kernel_inputs((32, 64), 64)
    r = x[::-1]
    jaxpr = str(
        jax.make_jaxpr(
            jax.grad(
                lambda x, r: sum(jnp.sum(a**2) for a in _fused_residual(x, r, scale, offset, True)),
                argnums=(0, 1),
            )
        )(x, r)
    )
    assert jaxpr.count("eqx_norm_residual_backward") == 1
    assert "eqx_norm_rows_backward" not in jaxpr


def test_residual_targets_reject_wrong_shapes():
    x, scale, offset, _ = kernel_inputs((8, 16), 16)
    outs = [jax.ShapeDtypeStruct(s, _F32) for s in ((8, 16), (8, 16), (8,), (8,))]
    with pytest.raises(Exception, match="residual has dimensions"):
        jax.block_until_ready(
            call_target(
                "eqx_norm_residual_forward",
                outs,
                x,
                jnp.ones((8, 8)),
                scale,
                offset,
                epsilon=np.float32(1e-5),
                center=True,
            )
        )
    args = [x, scale, jnp.ones(8), jnp.ones(8), x, jnp.ones((4, 16))]
    outs = [jax.ShapeDtypeStruct(s, _F32) for s in ((8, 16), (1, 16), (1, 16))]
    with pytest.raises(Exception, match="ct_h has dimensions"):
        jax.block_until_ready(
            call_target("eqx_norm_residual_backward", outs, *args, center=True, groups=np.int64(1))
        )
