"""The compiled GroupNorm/InstanceNorm kernel (eqx_norm.kernels.groups), both layouts.

Oracles: the float64 NumPy references (tests/reference.py) for y and, by formula, for
dx/dgamma/dbeta, torch.nn.GroupNorm/InstanceNorm2d, finite differences in float64 (XLA
path), and the XLA path itself for the transformations (jitted: eagerly, op by op, the
Hessians take tens of seconds).
Tolerances: float32 about 1e-5 relative (y absolute 1e-5 for O(1) outputs); bfloat16 one
rounding of the output, 2^-8 relative, on the reference taken from the bf16 input.
Batch invariance is bitwise: an example's y and dx do not depend on the batch.
"""

import itertools
import json
import os
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    assert_bitwise_independent_of_thread_count,
    call_target,
    first_example_results,
    jitted_y_and_gradients,
    kernel_inputs,
    max_relative_error,
)
from jax.test_util import check_grads

import eqx_norm
from eqx_norm import functional
from eqx_norm.kernels import _library
from eqx_norm.kernels import groups as _groups

from reference import group_norm as ref_group_norm
from reference import group_norm_vjp

pytestmark = pytest.mark.skipif(_library.load()[0] is not None, reason=str(_library.load()[0]))

EPS = 1e-5
LAYOUTS = {"last": -1, "first": 0}


def _shape(layout, n, hw, c):
    return (n, *hw, c) if layout == "last" else (n, c, *hw)


def _layer(groups, channels, layout, gamma, beta, **kwargs):
    return eqx_norm.GroupNorm(
        groups,
        channels,
        EPS,
        scale_initializer=gamma,
        bias_initializer=beta,
        channel_axis=LAYOUTS[layout],
        **kwargs,
    )


def _grads64(x, groups, layout, gamma, ct):
    """float64 ``(dx, dgamma, dbeta)`` of ``sum(ct * y)``, by formula."""
    x64, ct64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, ct))
    return group_norm_vjp(x64, groups, 2, np.asarray(gamma), ct64, EPS, LAYOUTS[layout])


def _reference_y(x, groups, layout, gamma, beta):
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    return ref_group_norm(
        x64, groups, 2, np.asarray(gamma), np.asarray(beta), EPS, channel_axis=LAYOUTS[layout]
    )


# ----------------------------------------------------------------------------------------
# Values and gradients against float64 and torch.


SMALL = [((3, (5, 7)), 12, 3), ((2, (4, 4)), 8, 8), ((1, (1, 3)), 4, 1), ((4, (6, 6)), 64, 32)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dims, channels, groups", SMALL)
def test_float32_against_float64(layout, dims, channels, groups):
    n, hw = dims
    shape = _shape(layout, n, hw, channels)
    x, gamma, beta, ct = kernel_inputs(shape, channels, mean=3.0, spread=0.3)
    y, dx, dgamma, dbeta = jitted_y_and_gradients(
        _layer(groups, channels, layout, gamma, beta), x, ct
    )
    np.testing.assert_allclose(y, _reference_y(x, groups, layout, gamma, beta), atol=1e-5)
    want = _grads64(x, groups, layout, gamma, ct)
    for name, got, w in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), want):
        assert max_relative_error(got, w) < 2e-5, name


REAL = [
    ("last", (32, (28, 28)), 256, 32),
    ("first", (32, (28, 28)), 256, 32),
    ("last", (32, (28, 28)), 64, 64),  # InstanceNorm
    ("first", (32, (28, 28)), 64, 64),
]


@pytest.mark.slow
@pytest.mark.parametrize("layout, dims, channels, groups", REAL)
def test_real_sizes_against_float64(layout, dims, channels, groups):
    shape = _shape(layout, dims[0], dims[1], channels)
    x, gamma, beta, ct = kernel_inputs(shape, channels, mean=1.0, spread=0.3)
    y, dx, dgamma, dbeta = jitted_y_and_gradients(
        _layer(groups, channels, layout, gamma, beta), x, ct
    )
    np.testing.assert_allclose(y, _reference_y(x, groups, layout, gamma, beta), atol=1e-5)
    want = _grads64(x, groups, layout, gamma, ct)
    # dgamma/dbeta sum 25,088 terms per channel: float32 partial sums, double across
    for name, got, w in zip(("dx", "dgamma", "dbeta"), (dx, dgamma, dbeta), want):
        assert max_relative_error(got, w) < 2e-5, name


@pytest.mark.parametrize("layout", LAYOUTS)
def test_bfloat16_is_one_rounding_of_the_float32_answer(layout):
    channels, groups = 32, 8
    shape = _shape(layout, 4, (6, 6), channels)
    x, gamma, beta, ct = kernel_inputs(shape, channels, mean=2.0, dtype=jnp.bfloat16, spread=0.3)
    y, dx, dgamma, dbeta = jitted_y_and_gradients(
        _layer(groups, channels, layout, gamma, beta), x, ct
    )
    assert y.dtype == dx.dtype == jnp.bfloat16 and dgamma.dtype == jnp.float32
    want = _reference_y(x, groups, layout, gamma, beta)  # from the bf16 input itself
    # the statistics are float32, then one bf16 rounding: 2^-8 of the value
    err = np.abs(np.asarray(y, np.float64) - want) - 2.0**-8 * np.abs(want)
    assert err.max() <= 1e-5
    want_grads = _grads64(x, groups, layout, gamma, ct)
    # one rounding of dx (and the bf16 ct is exact)
    assert max_relative_error(dx, want_grads[0]) < 2.0**-7
    for got, w in zip((dgamma, dbeta), want_grads[1:]):
        assert max_relative_error(got, w) < 1e-5  # float32 sums of the exact bf16 values


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels, groups", [(256, 32), (64, 64)])
def test_matches_torch(layout, channels, groups):
    torch = pytest.importorskip("torch")
    shape = _shape(layout, 8, (14, 14), channels)
    x, gamma, beta, ct = kernel_inputs(shape, channels, mean=1.0, spread=0.3)
    y, dx, dgamma, dbeta = jitted_y_and_gradients(
        _layer(groups, channels, layout, gamma, beta), x, ct
    )
    if groups == channels:
        module = torch.nn.InstanceNorm2d(channels, eps=EPS, affine=True)
    else:
        module = torch.nn.GroupNorm(groups, channels, eps=EPS)
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(np.array(gamma)))
        module.bias.copy_(torch.from_numpy(np.array(beta)))
    to_nchw = (lambda a: np.moveaxis(np.array(a), -1, 1)) if layout == "last" else np.array
    xt = torch.from_numpy(np.ascontiguousarray(to_nchw(x))).requires_grad_(True)
    yt = module(xt)
    yt.backward(torch.from_numpy(np.ascontiguousarray(to_nchw(ct))))
    np.testing.assert_allclose(to_nchw(y), yt.detach().numpy(), atol=2e-5)
    assert max_relative_error(to_nchw(dx), xt.grad.numpy()) < 2e-5
    assert max_relative_error(dgamma, module.weight.grad.numpy()) < 2e-5
    assert max_relative_error(dbeta, module.bias.grad.numpy()) < 2e-5


# ----------------------------------------------------------------------------------------
# Numeric edges.


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels, groups", [(64, 8), (16, 16)])
def test_mean_1e4_is_accurate(layout, channels, groups):
    shape = _shape(layout, 4, (12, 12), channels)
    x, gamma, beta, _ = kernel_inputs(shape, channels, mean=1e4, spread=0.3)
    y = _layer(groups, channels, layout, gamma, beta)(x)
    # against float64 of the same float32 input: the kernel's own error only
    np.testing.assert_allclose(y, _reference_y(x, groups, layout, gamma, beta), atol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("epsilon", [EPS, 0.0])
def test_constant_group_gives_exactly_beta(layout, epsilon):
    channels, groups = 16, 4
    shape = _shape(layout, 3, (5, 5), channels)
    x, gamma, beta, _ = kernel_inputs(shape, channels, spread=0.3)
    x = np.array(x)
    group = slice(4, 8)  # group 1 of example 1 is constant
    if layout == "last":
        x[1, :, :, group] = 1e4 + 0.5
    else:
        x[1, group] = 1e4 + 0.5
    layer = eqx_norm.GroupNorm(
        groups,
        channels,
        epsilon,
        scale_initializer=gamma,
        bias_initializer=beta,
        channel_axis=LAYOUTS[layout],
        implementation="kernel",
    )
    y = np.asarray(layer(jnp.asarray(x)))
    got = y[1, :, :, group] if layout == "last" else np.moveaxis(y[1, group], 0, -1)
    np.testing.assert_array_equal(got, np.broadcast_to(np.asarray(beta)[group], got.shape))
    assert np.isfinite(y).all()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_nan_stays_in_its_group(layout):
    channels, groups = 16, 4
    shape = _shape(layout, 3, (5, 5), channels)
    x, gamma, beta, ct = kernel_inputs(shape, channels, spread=0.3)
    x = np.array(x)
    if layout == "last":
        x[1, 2, 3, 5] = np.nan  # example 1, channel 5: group 1
    else:
        x[1, 5, 2, 3] = np.nan
    y, dx, _, _ = jitted_y_and_gradients(
        _layer(groups, channels, layout, gamma, beta), jnp.asarray(x), ct
    )
    for a in (np.asarray(y), np.asarray(dx)):
        cl = a if layout == "last" else np.moveaxis(a, 1, -1)
        bad = np.isnan(cl).reshape(3, -1, groups, channels // groups).any(axis=(1, 3))
        expected = np.zeros((3, groups), bool)
        expected[1, 1] = True
        np.testing.assert_array_equal(bad, expected)
        assert np.isnan(cl[1, ..., 4:8]).all()


# ----------------------------------------------------------------------------------------
# Batch invariance and determinism.


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("channels, groups", [(64, 8), (32, 32)])
@pytest.mark.parametrize("jit", [False, True])
def test_batch_invariance(layout, channels, groups, jit):
    """The same example alone, in a batch of 7 and in a batch of 40: bitwise the same y
    and dx (the kernel's work units are single examples or groups)."""
    # (28, 28) images: at this size the XLA path differs in the last bit (it fails here)
    shape = _shape(layout, 40, (28, 28), channels)
    x, gamma, beta, ct = kernel_inputs(shape, channels, mean=2.0, spread=0.3)
    layer = _layer(groups, channels, layout, gamma, beta)
    results = first_example_results(layer, (x[:1], x[:7], x), ct, jit=jit)
    for y, dx in results[1:]:
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(dx, results[0][1])


@pytest.mark.parametrize("layout", LAYOUTS)
def test_vmap_of_the_layer_equals_the_batched_call_bitwise(layout):
    channels, groups = 32, 4
    shape = _shape(layout, 9, (8, 8), channels)
    x, gamma, beta, ct = kernel_inputs(shape, channels, mean=-1.0, spread=0.3)
    layer = _layer(groups, channels, layout, gamma, beta)
    np.testing.assert_array_equal(jax.vmap(layer)(x), layer(x))
    np.testing.assert_array_equal(
        jax.jit(lambda x: jax.vmap(layer)(x))(x), jax.jit(lambda x: layer(x))(x)
    )

    def loss(fn):
        return jax.grad(lambda x: jnp.sum(fn(x) * ct))(x)

    np.testing.assert_array_equal(loss(jax.vmap(layer)), loss(layer))


def test_instance_norm_layer_runs_the_kernel_and_is_batch_invariant():
    x, gamma, beta, _ = kernel_inputs((40, 10, 10, 24), 24, mean=5.0, spread=0.3)
    layer = eqx_norm.InstanceNorm(24, scale_initializer=gamma, bias_initializer=beta)
    assert "eqx_norm_groups_forward" in jax.jit(lambda x: layer(x)).lower(x).as_text()
    np.testing.assert_array_equal(layer(x[:1])[0], layer(x)[0])
    xla = eqx_norm.InstanceNorm(
        24, scale_initializer=gamma, bias_initializer=beta, implementation="xla"
    )
    np.testing.assert_allclose(layer(x), xla(x), atol=1e-5)


# run on one core and on every core (helpers.assert_bitwise_independent_of_thread_count)
_THREADS = """
import sys
import jax, jax.numpy as jnp, numpy as np
from eqx_norm.kernels import groups
rng = np.random.default_rng(0)
out = {}
for last, shape, g in [(True, (16, 400, 64), 8), (False, (16, 64, 400), 8), (True, (2, 9000, 4), 4)]:
    x = jnp.asarray(3 + rng.standard_normal(shape), jnp.float32)
    c = shape[2] if last else shape[1]
    s = jnp.asarray(1 + 0.1 * rng.standard_normal(c), jnp.float32)
    o = jnp.zeros(c, jnp.float32)
    ct = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    fn = lambda x, s, o: groups.normalize_groups(
        x, s, o, num_groups=g, channels_last=last, epsilon=1e-5)
    y, vjp = jax.vjp(fn, x, s, o)
    for i, a in enumerate([y, *vjp(ct)]):
        out[f"{last}-{shape}-{i}"] = np.asarray(a)
np.savez(sys.argv[1], **out)
"""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_bitwise_independent_of_the_thread_count(tmp_path):
    assert_bitwise_independent_of_thread_count(_THREADS, tmp_path)


# ----------------------------------------------------------------------------------------
# Dispatch.


def test_default_runs_the_kernel_xla_never_and_kernel_requires_it():
    x = jnp.ones((2, 4, 4, 8))
    text = lambda fn: jax.jit(fn).lower(x).as_text()  # noqa: E731
    assert "eqx_norm_groups_forward" in text(lambda x: functional.group_norm(x, 2))
    assert "eqx_norm_groups_forward" in text(
        lambda x: functional.instance_norm(x, channel_axis=0, spatial_ndim=2)
    )
    assert "custom_call" not in text(lambda x: functional.group_norm(x, 2, implementation="xla"))
    # served elsewhere: a mask, a wider output dtype
    masked = lambda x: functional.group_norm(x, 2, mask=jnp.ones((2, 4, 4, 1), bool))  # noqa: E731
    assert "custom_call" not in text(masked)
    with pytest.raises(
        ValueError, match="implementation='kernel' cannot serve this call: a `mask`"
    ):
        functional.group_norm(x, 2, mask=jnp.ones((2, 4, 4, 1), bool), implementation="kernel")
    with pytest.raises(ValueError, match="output dtype float64 differs"):
        with jax.enable_x64(True):
            functional.group_norm(x, 2, dtype=jnp.float64, implementation="kernel")


def test_group_norm_takes_implementation():
    layer = eqx_norm.GroupNorm(2, 8, implementation="xla")
    assert layer.implementation == "xla"
    assert eqx_norm.InstanceNorm(8, implementation="kernel").implementation == "kernel"
    with pytest.raises(ValueError, match="`implementation` must be None"):
        eqx_norm.GroupNorm(2, 8, implementation="fast")
    model = eqx_norm.from_equinox([eqx.nn.GroupNorm(2, 8)], implementation="xla")
    assert model[0].implementation == "xla"


def test_zero_size_and_feature_vectors():
    # (N, C) feature vectors (spatial_ndim=0) and an empty batch
    x, gamma, beta, _ = kernel_inputs((6, 8), 8, spread=0.3)
    got = functional.group_norm(x, 2, gamma, beta, spatial_ndim=0, implementation="kernel")
    want = functional.group_norm(x, 2, gamma, beta, spatial_ndim=0, implementation="xla")
    np.testing.assert_allclose(got, want, atol=1e-6)
    empty = functional.group_norm(jnp.ones((0, 3, 3, 8)), 2, implementation="kernel")
    assert empty.shape == (0, 3, 3, 8)


# ----------------------------------------------------------------------------------------
# Transformations.


def _small(layout="last"):
    shape = _shape(layout, 2, (3, 3), 4)
    return kernel_inputs(shape, 4, mean=1.0, spread=0.3)


def _fn(layout, implementation="kernel"):
    def fn(x, gamma, beta):
        return functional.group_norm(
            x, 2, gamma, beta, channel_axis=LAYOUTS[layout], implementation=implementation
        )

    return fn


@pytest.mark.slow
@pytest.mark.parametrize("layout", LAYOUTS)
def test_jvp_and_hessian_match_the_xla_path(layout):
    x, gamma, beta, ct = _small(layout)
    tangents = tuple(jnp.ones_like(a) * 0.1 for a in (x, gamma, beta))

    def jvp(impl):
        return jax.jit(lambda *p: jax.jvp(_fn(layout, impl), p, tangents))(x, gamma, beta)

    for g, w in zip(jvp("kernel"), jvp("xla")):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)

    def loss(impl):
        return lambda x: jnp.sum(_fn(layout, impl)(x, gamma, beta) ** 3 * ct)

    np.testing.assert_allclose(
        jax.jit(jax.hessian(loss("kernel")))(x),
        jax.jit(jax.hessian(loss("xla")))(x),
        rtol=1e-3,
        atol=1e-3,
    )
    np.testing.assert_allclose(
        jax.jit(jax.jacfwd(_fn(layout)))(x, gamma, beta),
        jax.jit(jax.jacrev(_fn(layout, "xla")))(x, gamma, beta),
        rtol=1e-4,
        atol=1e-5,
    )


@pytest.mark.slow
def test_xla_path_gradient_matches_finite_differences(x64):
    x, gamma, beta, _ = _small()
    args = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, gamma, beta)]
    check_grads(jax.jit(_fn("last", "xla")), args, order=2, modes=("fwd", "rev"), eps=1e-4)


def test_kernel_gradient_matches_the_xla_path_and_vmap_per_example_scale():
    x, gamma, beta, ct = _small()

    def loss(impl):
        return lambda x, g, b: jnp.sum(_fn("last", impl)(x, g, b) * ct)

    for g, w in zip(jax.jit(jax.grad(loss("kernel"), (0, 1, 2)))(x, gamma, beta),
                    jax.jit(jax.grad(loss("xla"), (0, 1, 2)))(x, gamma, beta)):  # fmt: skip
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
    # vmap over x with per-example gamma: the jnp formula serves the batched call
    gammas = jnp.stack([gamma, 2 * gamma, -gamma])
    xs = jnp.stack([x, x + 1, 2 * x])
    got = jax.jit(jax.vmap(_fn("last"), in_axes=(0, 0, None)))(xs, gammas, beta)
    want = jax.jit(jax.vmap(_fn("last", "xla"), in_axes=(0, 0, None)))(xs, gammas, beta)
    np.testing.assert_allclose(got, want, atol=1e-5)

    # per-example parameter gradients under vmap (the backward's `groups` attribute)
    def per_example(impl):
        grads = jax.vmap(jax.grad(loss(impl), (1, 2)), in_axes=(0, None, None))
        return jax.jit(grads)(xs, gamma, beta)

    per, ref = per_example("kernel"), per_example("xla")
    for g, w in zip(per, ref):
        assert g.shape == (3, 4)
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_parameter_only_gradient_asks_for_no_dx():
    x, gamma, beta, ct = _small("first")

    def loss(g, b):
        return jnp.sum(_fn("first")(x, g, b) * ct)

    jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(gamma, beta))
    assert "want_dx=False" in jaxpr and "want_dx=True" not in jaxpr
    got = jax.grad(loss, argnums=(0, 1))(gamma, beta)
    want = jax.grad(lambda g, b: jnp.sum(_fn("first", "xla")(x, g, b) * ct), (0, 1))(gamma, beta)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_export_holds_no_custom_call_and_runs():
    x, gamma, beta, ct = _small()

    def fn(x, g, b):
        y, vjp = jax.vjp(_fn("last"), x, g, b)
        return y, vjp(ct)

    exported = jax.export.export(jax.jit(fn))(x, gamma, beta)
    assert "stablehlo.custom_call" not in exported.mlir_module()
    for g, w in zip(
        jax.tree.leaves(exported.call(x, gamma, beta)), jax.tree.leaves(fn(x, gamma, beta))
    ):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


_MULTI_DEVICE = """
import json, os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from eqx_norm import functional
rng = np.random.default_rng(0)
mesh = jax.make_mesh((8,), ("b",))
batch, rep = NamedSharding(mesh, P("b")), NamedSharding(mesh, P())
out = {}
for ca, shape in ((-1, (16, 6, 6, 8)), (0, (16, 8, 6, 6))):
    x = jnp.asarray(2 + rng.standard_normal(shape), jnp.float32)
    g = jnp.asarray(1 + 0.1 * rng.standard_normal(8), jnp.float32)
    ct = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    def fwd_bwd(impl):
        def f(x, g, ct):
            norm = lambda x, g: functional.group_norm(
                x, 4, g, channel_axis=ca, implementation=impl)
            y, vjp = jax.vjp(norm, x, g)
            return (y, *vjp(ct))
        return f
    want = jax.jit(fwd_bwd("xla"))(x, g, ct)
    def err(got):
        return max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(got, want))
    f = jax.jit(fwd_bwd(None), in_shardings=(batch, rep, batch))
    hlo = f.lower(x, g, ct).compile().as_text()
    got = f(x, g, ct)
    sm = jax.jit(jax.shard_map(fwd_bwd(None), mesh=mesh, in_specs=(P("b"), P(), P("b")),
                               out_specs=(P("b"), P("b"), P())))
    pm = jax.pmap(fwd_bwd(None), in_axes=(0, None, 0))
    y, dx, dg = pm(x.reshape(8, 2, *shape[1:]), g, ct.reshape(8, 2, *shape[1:]))
    out[str(ca)] = {
        "jit": err(got), "y_spec": str(got[0].sharding.spec),
        "kernel": "eqx_norm_groups_forward" in hlo and "eqx_norm_groups_backward" in hlo,
        "all_gather": "all-gather" in hlo,
        "shard_map": err(sm(jax.device_put(x, batch), g, jax.device_put(ct, batch))),
        "pmap": err((y.reshape(shape), dx.reshape(shape), dg.sum(0))),
    }
print(json.dumps(out))
"""


@pytest.mark.slow
def test_several_devices():
    """Batch-sharded jit (partitioned over N: no all-gather), shard_map and pmap give the
    single-device results, in both layouts."""
    run = subprocess.run(
        [sys.executable, "-c", _MULTI_DEVICE], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for layout in out.values():
        assert layout["kernel"] and not layout["all_gather"], out
        assert layout["y_spec"] == "P('b',)", out
        # float32 sums over 16 or 2 examples' 288 values, in different orders
        assert max(layout["jit"], layout["shard_map"], layout["pmap"]) < 1e-4, out


# ----------------------------------------------------------------------------------------
# Memory safety: the registered targets check every buffer, whoever calls them.


_F32 = jnp.float32
# channels-last x (N=2, S=6, C=8), G=4
_GOOD_FORWARD = dict(
    x=(2, 6, 8), scale=(8,), offset=(8,), y=(2, 6, 8), mean_shift=(2, 4), rstd=(2, 4),
    sigmoid=(2, 1, 1),  # without the SiLU: a placeholder
)  # fmt: skip
_FORWARD_OUTS = ("y", "mean_shift", "rstd", "sigmoid")
_FORWARD_ATTRS = dict(
    epsilon=np.float32(EPS), num_groups=np.int64(4), channels_last=True, silu=False
)


@pytest.mark.parametrize(
    "buffer, shape",
    [
        ("scale", (6,)),
        ("scale", (3, 8)),  # per-example rows must divide the 2 examples
        ("offset", (16,)),
        ("y", (2, 8, 6)),
        ("mean_shift", (2, 8)),
        ("rstd", (4,)),
        ("sigmoid", (2, 6, 8)),  # x's shape only with silu=True
    ],
)
def test_forward_target_rejects_a_wrong_buffer_shape(buffer, shape):
    shapes = {**_GOOD_FORWARD, buffer: shape}
    args = [jnp.ones(shapes[n], _F32) for n in ("x", "scale", "offset")]
    outs = [jax.ShapeDtypeStruct(shapes[n], _F32) for n in _FORWARD_OUTS]
    with pytest.raises(Exception, match=rf"{buffer} has dimensions"):
        jax.block_until_ready(call_target("eqx_norm_groups_forward", outs, *args, **_FORWARD_ATTRS))
    good = [jnp.ones(_GOOD_FORWARD[n], _F32) for n in ("x", "scale", "offset")]
    good_outs = [jax.ShapeDtypeStruct(_GOOD_FORWARD[n], _F32) for n in _FORWARD_OUTS]
    y = call_target("eqx_norm_groups_forward", good_outs, *good, **_FORWARD_ATTRS)
    assert y[0].shape == (2, 6, 8)  # the same call with the right shapes runs


def test_forward_target_rejects_groups_that_do_not_divide_the_channels():
    args = [jnp.ones(_GOOD_FORWARD[n], _F32) for n in ("x", "scale", "offset")]
    outs = [jax.ShapeDtypeStruct(s, _F32) for s in ((2, 6, 8), (2, 3), (2, 3), (2, 1, 1))]
    attrs = {**_FORWARD_ATTRS, "num_groups": np.int64(3)}
    with pytest.raises(Exception, match="num_groups must be >= 1 and divide the channels"):
        jax.block_until_ready(call_target("eqx_norm_groups_forward", outs, *args, **attrs))


_GOOD_BACKWARD = dict(
    x=(2, 8, 6),
    scale=(8,),
    offset=(8,),
    mean_shift=(2, 4),
    rstd=(2, 4),
    sigmoid=(2, 1, 1),
    ct=(2, 8, 6),
    dx=(2, 8, 6),
    dscale=(2, 8),
    doffset=(2, 8),
)  # fmt: skip  (channels-first, groups=2: per-example sums)
_BACKWARD_ARGS = ("x", "scale", "offset", "mean_shift", "rstd", "sigmoid", "ct")
_BACKWARD_ATTRS = dict(
    num_groups=np.int64(4), channels_last=False, silu=False, groups=np.int64(2), want_dx=True
)


@pytest.mark.parametrize(
    "buffer, shape",
    [
        ("scale", (6,)),
        ("offset", (2, 6)),
        ("mean_shift", (2, 2)),
        ("rstd", (8,)),
        ("sigmoid", (2, 8, 6)),
        ("ct", (2, 6, 8)),
        ("dx", (1, 8, 6)),
        ("dscale", (1, 8)),
        ("doffset", (2, 6)),
    ],
)
def test_backward_target_rejects_a_wrong_buffer_shape(buffer, shape):
    shapes = {**_GOOD_BACKWARD, buffer: shape}
    args = [jnp.ones(shapes[n], _F32) for n in _BACKWARD_ARGS]
    outs = [jax.ShapeDtypeStruct(shapes[n], _F32) for n in ("dx", "dscale", "doffset")]
    with pytest.raises(Exception, match=rf"{buffer} has dimensions"):
        jax.block_until_ready(
            call_target("eqx_norm_groups_backward", outs, *args, **_BACKWARD_ATTRS)
        )


def test_backward_target_rejects_bad_groups_and_a_dx_when_none_is_wanted():
    args = [jnp.ones(_GOOD_BACKWARD[n], _F32) for n in _BACKWARD_ARGS]
    outs = [jax.ShapeDtypeStruct(s, _F32) for s in ((2, 8, 6), (3, 8), (3, 8))]
    attrs = {**_BACKWARD_ATTRS, "groups": np.int64(3)}
    with pytest.raises(Exception, match="groups must be >= 1 and divide the number of examples"):
        jax.block_until_ready(call_target("eqx_norm_groups_backward", outs, *args, **attrs))
    outs = [jax.ShapeDtypeStruct(s, _F32) for s in ((2, 8, 6), (2, 8), (2, 8))]
    attrs = {**_BACKWARD_ATTRS, "want_dx": False}
    with pytest.raises(Exception, match="dx must be empty when want_dx is false"):
        jax.block_until_ready(call_target("eqx_norm_groups_backward", outs, *args, **attrs))


_BUFFERS = {  # target: (argument names, result names, good shapes, attributes)
    "eqx_norm_groups_forward": (
        ("x", "scale", "offset"), _FORWARD_OUTS, _GOOD_FORWARD, _FORWARD_ATTRS
    ),
    "eqx_norm_groups_backward": (
        _BACKWARD_ARGS, ("dx", "dscale", "doffset"), _GOOD_BACKWARD, _BACKWARD_ATTRS,
    ),
}  # fmt: skip


@pytest.mark.parametrize(
    "target, types, message",
    [
        ("eqx_norm_groups_forward", {"x": jnp.int32, "y": jnp.int32}, "x has element type int32, expected float32"),
        ("eqx_norm_groups_forward", {"x": jnp.float64, "y": jnp.float64}, "x has element type float64, expected float32"),
        ("eqx_norm_groups_forward", {"y": jnp.bfloat16}, r"y has element type bfloat16, expected float32 \(x's\)"),
        ("eqx_norm_groups_forward", {"offset": jnp.float16}, "Wrong buffer dtype"),
        ("eqx_norm_groups_backward", {"x": jnp.int32, "ct": jnp.int32, "dx": jnp.int32}, "x has element type int32"),
        ("eqx_norm_groups_backward", {"ct": jnp.bfloat16}, r"ct has element type bfloat16, expected float32 \(x's\)"),
        ("eqx_norm_groups_backward", {"x": jnp.bfloat16, "ct": jnp.bfloat16}, r"dx has element type float32, expected bfloat16 \(x's\)"),
        ("eqx_norm_groups_backward", {"rstd": jnp.float16}, "Wrong buffer dtype"),
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


@pytest.mark.parametrize(
    "channels_last, shape", [(True, (2, 0, 8)), (False, (2, 8, 0)), (False, (2, 0, 6))]
)
def test_forward_target_writes_nan_statistics_for_empty_groups(channels_last, shape):
    """Groups of no values (no positions, or no channels): every output is still written,
    the statistics NaN, as a mean over nothing."""
    channels = shape[2] if channels_last else shape[1]
    outs = [jax.ShapeDtypeStruct(s, _F32) for s in (shape, (2, 4), (2, 4), (2, 1, 1))]
    args = (jnp.ones(shape), jnp.ones(channels), jnp.zeros(channels))
    attrs = {**_FORWARD_ATTRS, "channels_last": channels_last}
    y, mean_shift, rstd, sigmoid = call_target("eqx_norm_groups_forward", outs, *args, **attrs)
    assert y.shape == shape
    assert np.isnan(mean_shift).all() and np.isnan(rstd).all()
    assert (np.asarray(sigmoid) == 0).all()  # the placeholder, written


@pytest.mark.slow
def test_jnp_formula_agrees_with_the_kernel():
    """The reference the lowering falls back on (jax.export, other platforms) gives the
    kernel's statistics and outputs: shared and per-example affines, with and without the
    fused SiLU."""
    cases = itertools.product(((True, (3, 20, 12)), (False, (3, 12, 20))), (None, "silu"), (1, 3))
    for (last, shape), activation, examples in cases:
        x, gamma, beta, ct = kernel_inputs(shape, 12, mean=50.0, spread=0.3)
        if examples > 1:  # one affine row per example
            rows = jnp.arange(examples, dtype=jnp.float32)[:, None]
            gamma, beta = gamma[None] * (1 + 0.1 * rows), beta[None] + 0.2 * rows
        params = dict(epsilon=EPS, num_groups=3, channels_last=last, activation=activation)
        got = _groups._forward_call(x, gamma, beta, **params)
        want = _groups._jnp_forward(x, gamma, beta, **params)
        for g, w in zip(got, want):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
        bparams = dict(
            num_groups=3, channels_last=last, groups=3, want_dx=True, activation=activation
        )
        got = _groups._backward_call(x, gamma, beta, *want[1:], ct, **bparams)
        ref = _groups._jnp_backward(x, gamma, beta, *want[1:], ct, **bparams)
        for g, w in zip(got, ref):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
