"""BatchNorm's compiled CPU kernel (eqx_norm.kernels.columns), both layouts.

Oracles: float64 NumPy (``reference_batch_norm``, and the gradients by their formula),
torch's BatchNorm2d in float64 (tests/test_batch_norm.py, which now runs the kernel by
default), and the XLA path. Tolerances: float32 1e-5 (y absolute, O(1) outputs; gradients
relative to their largest value); bfloat16/float16 one rounding of the output, on the
reference taken from the rounded input. The sums are bitwise the same at every thread
count; inference is one elementwise pass, so an example's output does not depend on its
batch (bitwise).
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    TOL,
    assert_bitwise_independent_of_thread_count,
    call_target,
    random_input,
    random_params,
    run_on_simulated_devices,
)
from test_batch_norm import as64, assert_close_relative, clone, reference_batch_norm, variant

from eqx_norm import BatchNorm
from eqx_norm.functional import batch_norm
from eqx_norm.kernels import columns

pytestmark = pytest.mark.skipif(
    columns.unavailable_reason(jnp.ones(1)) is not None, reason="the CPU kernel is not built"
)


def reference_gradients(x, gamma, dy, channel_axis, epsilon=1e-5):
    """Float64 ``(dx, dgamma, dbeta)`` of training BatchNorm by the formula:
    ``dx = gamma * rstd * (dy - mean(dy) - xhat * mean(dy * xhat))``."""
    x, dy = (np.moveaxis(as64(a), channel_axis, -1) for a in (x, dy))
    axes = tuple(range(x.ndim - 1))
    mean, var = x.mean(axes), x.var(axes)
    rstd = 1 / np.sqrt(var + epsilon)
    xhat = (x - mean) * rstd
    dx = as64(gamma) * rstd * (dy - dy.mean(axes) - xhat * (dy * xhat).mean(axes))
    return np.moveaxis(dx, -1, channel_axis), (dy * xhat).sum(axes), dy.sum(axes)


def train(x, gamma, beta, channel_axis, implementation="kernel"):
    c = x.shape[channel_axis]
    return batch_norm(
        x, jnp.zeros(c), jnp.ones(c), gamma, beta, training=True, channel_axis=channel_axis,
        implementation=implementation,
    )  # fmt: skip


def y_and_gradients(x, gamma, beta, dy, channel_axis, implementation="kernel"):
    def f(x, gamma, beta):
        return train(x, gamma, beta, channel_axis, implementation)[0]

    y, vjp = jax.vjp(f, x, gamma, beta)
    return y, *vjp(dy)


LAYOUTS = {"channels-last": ((16, 14, 14, 64), -1), "channels-first": ((16, 64, 14, 14), 1)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("mean", [0.0, 1e4])
def test_float64_reference(layout, mean):
    # a real layer's size, at mean 0 and at mean 1e4 (where E[x^2] - E[x]^2 in float32
    # would lose every digit): y within 1e-5, the statistics and gradients 1e-5 relative
    shape, channel_axis = LAYOUTS[layout]
    x = random_input(shape, mean=mean, std=2.0)
    dy = random_input(shape, seed=5)
    gamma, beta = random_params(64)
    y, dx, dgamma, dbeta = jax.jit(y_and_gradients, static_argnums=(4,))(
        x, gamma, beta, dy, channel_axis
    )
    expected, batch_mean, batch_var, _ = reference_batch_norm(
        x, gamma, beta, channel_axis=channel_axis
    )
    np.testing.assert_allclose(y, expected, rtol=0, atol=1e-5)
    _, mean_out, _ = jax.jit(train, static_argnums=(3,))(x, gamma, beta, channel_axis)
    np.testing.assert_allclose(mean_out, 0.01 * batch_mean, rtol=1e-6, atol=1e-8)  # momentum 0.99
    for got, want in zip((dx, dgamma, dbeta), reference_gradients(x, gamma, dy, channel_axis)):
        assert_close_relative(got, want, 1e-5)
    assert np.isfinite(batch_var).all()


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(layout, dtype):
    # the kernel reads the half input and sums in float32/double; y is one rounding away
    # from the float64 reference on the same rounded input; gradients in the input's dtype
    shape, channel_axis = LAYOUTS[layout]
    x = random_input(shape, mean=50.0, std=1.0, dtype=dtype)
    dy = random_input(shape, seed=5, dtype=dtype)
    gamma, beta = random_params(64)
    y, dx, dgamma, dbeta = jax.jit(y_and_gradients, static_argnums=(4,))(
        x, gamma, beta, dy, channel_axis
    )
    assert y.dtype == dx.dtype == dtype and dgamma.dtype == jnp.float32
    expected, *_ = reference_batch_norm(x, gamma, beta, channel_axis=channel_axis)
    np.testing.assert_allclose(as64(y), expected, rtol=TOL[dtype], atol=TOL[dtype])
    ref_dx, ref_dgamma, ref_dbeta = reference_gradients(x, gamma, dy, channel_axis)
    assert_close_relative(dx, ref_dx, 2 * TOL[dtype])  # rounded once, stored in dtype
    assert_close_relative(dgamma, ref_dgamma, 1e-5)
    assert_close_relative(dbeta, ref_dbeta, 1e-5)


@pytest.mark.parametrize("channel_axis", [-1, 1, 2])
def test_kernel_and_xla_paths_agree(channel_axis):
    # every channel axis (2: the view (N * C', C, W)), the layer's running statistics too
    x = random_input((8, 6, 5, 7), mean=3.0, std=2.0)
    dy = random_input(x.shape, seed=3)
    c = x.shape[channel_axis]
    gamma, beta = random_params(c)
    run = jax.jit(y_and_gradients, static_argnums=(4, 5))
    for got, want in zip(run(x, gamma, beta, dy, channel_axis, "kernel"),
                         run(x, gamma, beta, dy, channel_axis, "xla")):  # fmt: skip
        assert_close_relative(got, want, 1e-5)
    states = []
    for implementation in ("kernel", "xla"):
        bn, state = eqx.nn.make_with_state(BatchNorm)(
            c, channel_axis=channel_axis, implementation=implementation
        )
        for _ in range(3):
            _, state = eqx.filter_jit(bn)(x, state)
        states.append(state.get(bn.state_index))
    for a, b in zip(*states):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_the_kernel_runs_where_it_serves():
    x = random_input((8, 4, 4, 3))
    bn, state = eqx.nn.make_with_state(BatchNorm)(3)

    def hlo(layer, *args, **kwargs):
        return jax.jit(lambda x, s: layer(x, s, **kwargs)).lower(x, state).as_text()

    assert "eqx_norm_columns_forward" in hlo(bn)
    assert "eqx_norm_columns_forward" in hlo(bn, mask=jnp.ones((8, 1, 1, 1), bool))
    inference = hlo(eqx.nn.inference_mode(bn))  # one pass: no sums
    assert "eqx_norm_columns_normalize" in inference and "columns_forward" not in inference
    xla, _ = eqx.nn.make_with_state(BatchNorm)(3, implementation="xla")
    assert "eqx_norm_columns" not in hlo(xla)
    backward = jax.jit(jax.grad(lambda x: jnp.sum(bn(x, clone(state))[0] ** 2))).lower(x).as_text()
    assert "eqx_norm_columns_backward" in backward
    # jax.export lowers the formula: the artifact holds no custom call
    exported = jax.export.export(jax.jit(lambda x: bn(x, clone(state))[0]))(x)
    assert "custom_call" not in exported.mlir_module()
    np.testing.assert_allclose(exported.call(x), bn(x, clone(state))[0], rtol=0, atol=1e-6)


def test_kernel_refuses_what_it_cannot_serve():
    x = random_input((8, 3))
    for kwargs, reason in ((dict(epsilon=0.0), "epsilon=0"),):
        with pytest.raises(ValueError, match=f"implementation='kernel' cannot serve.*{reason}"):
            batch_norm(x, jnp.zeros(3), jnp.ones(3), training=True, implementation="kernel",
                       **kwargs)  # fmt: skip


def test_constant_channels_and_overflow_are_exact_or_loud():
    # a constant channel gives exactly beta; a channel whose squares overflow float32 gives
    # NaN (in that channel only), not a silent beta
    x = jnp.ones((16, 4, 3)) * jnp.array([1e4, -3.0, 0.0])[None, None]
    gamma, beta = random_params(3)
    y = jax.jit(train, static_argnums=(3,))(x, gamma, beta, -1)[0]
    np.testing.assert_array_equal(y, np.broadcast_to(beta, x.shape))
    big = x.at[::2, :, 0].set(3e38).at[1::2, :, 0].set(-3e38)
    y = jax.jit(train, static_argnums=(3,))(big, gamma, beta, -1)[0]
    assert np.isnan(y[..., 0]).all() and np.isfinite(y[..., 1:]).all()


@pytest.mark.slow
def test_bitwise_independent_of_thread_count(tmp_path):
    script = """
import sys
import jax, jax.numpy as jnp, numpy as np
from eqx_norm.functional import batch_norm
x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (32, 28, 28, 64))
dy = jax.random.normal(jax.random.key(2), x.shape)
out = {}
for axis, a, d in ((-1, x, dy), (1, x.transpose(0, 3, 1, 2), dy.transpose(0, 3, 1, 2))):
    def f(a, g, b):
        return batch_norm(a, jnp.zeros(64), jnp.ones(64), g, b, training=True,
                          channel_axis=axis, implementation="kernel")
    (y, mean, var), vjp = jax.vjp(f, a, jnp.ones(64), jnp.zeros(64))
    dx, dg, db = vjp((d, jnp.zeros(64), jnp.zeros(64)))
    for name, v in dict(y=y, mean=mean, var=var, dx=dx, dg=dg, db=db).items():
        out[f"{axis}_{name}"] = np.asarray(v)
np.savez(sys.argv[1], **out)
"""
    assert_bitwise_independent_of_thread_count(script, tmp_path)


def test_inference_is_batch_invariant():
    # inference normalizes by the running statistics: one elementwise pass, so an example's
    # output is bitwise the same alone and in any batch
    bn, state = eqx.nn.make_with_state(BatchNorm)(64, inference=True)
    x = random_input((32, 7, 7, 64), mean=3.0, std=2.0)
    run = eqx.filter_jit(bn)
    whole, _ = run(x, state)
    for size in (1, 3, 8):
        part, _ = run(x[:size], state)
        np.testing.assert_array_equal(part, whole[:size])


@pytest.mark.parametrize("channel_axis", [-1, 1])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_inference_on_the_kernel(channel_axis, dtype):
    # inference by the running statistics is one kernel pass: y against float64, and every
    # gradient (x, gamma, beta and the running statistics themselves) and the jvp against
    # the XLA path; a NaN variance stays loud
    x = random_input((8, 5, 6, 7) if channel_axis == -1 else (8, 7, 5, 6), mean=1e3,
                     std=2.0, dtype=dtype)  # fmt: skip
    dy = random_input(x.shape, seed=5, dtype=dtype)
    gamma, beta = random_params(7)
    mean, var = jnp.linspace(999.0, 1001.0, 7), jnp.linspace(1.0, 5.0, 7)

    def f(implementation, x, gamma, beta, mean, var):
        return batch_norm(x, mean, var, gamma, beta, training=False, channel_axis=channel_axis,
                          implementation=implementation)[0]  # fmt: skip

    args = (x, gamma, beta, mean, var)
    hlo = jax.jit(functools.partial(f, None)).lower(*args).as_text()
    assert "eqx_norm_columns_normalize" in hlo
    per = (1, 1, 1, 7) if channel_axis == -1 else (1, 7, 1, 1)
    want = (as64(x) - as64(mean).reshape(per)) / np.sqrt(as64(var).reshape(per) + 1e-5)
    want = want * as64(gamma).reshape(per) + as64(beta).reshape(per)
    y = f(None, *args)
    assert y.dtype == dtype
    np.testing.assert_allclose(as64(y), want, rtol=TOL[dtype], atol=2 * TOL[dtype])
    tol = 1e-5 if dtype == jnp.float32 else 2 * TOL[dtype]
    tangents = tuple(random_input(a.shape, seed=i, dtype=a.dtype) for i, a in enumerate(args))

    def derivatives(implementation):
        fn = functools.partial(f, implementation)
        return jax.vjp(fn, *args)[1](dy), jax.jvp(fn, args, tangents)[1]

    for a, b in zip(jax.tree.leaves(derivatives(None)), jax.tree.leaves(derivatives("xla"))):
        assert_close_relative(a, b, tol)
    y = f(None, x, gamma, beta, mean, var.at[3].set(jnp.inf))
    assert np.isnan(np.moveaxis(np.asarray(y, np.float32), channel_axis, -1)[..., 3]).all()


def test_vmap_over_batches_and_forward_mode():
    # vmap: each batch its own statistics (the kernel's groups); jvp against the XLA path
    xs = jnp.stack([random_input((8, 5, 6), seed=i, mean=i, std=1 + i) for i in range(3)])
    gamma, beta = random_params(6)
    f = jax.jit(jax.vmap(lambda x: train(x, gamma, beta, -1)[0]))
    for i in range(3):
        np.testing.assert_allclose(f(xs)[i], train(xs[i], gamma, beta, -1)[0], rtol=0, atol=1e-5)
    t = random_input(xs.shape[1:], seed=9)

    def tangent(implementation):
        return jax.jvp(lambda x: train(x, gamma, beta, -1, implementation)[0], (xs[0],), (t,))[1]

    assert_close_relative(tangent("kernel"), tangent("xla"), 1e-5)


MASKS = ("examples", "first position", "channel", "random")


def make_mask(kind, shape, axis):
    """Padded examples (11 of 16 kept, as ``(N, 1, 1, 1)``), every example's first position
    left out (where the shift would otherwise come from), channel 3 with no value, or a
    random mask of x's shape."""
    if kind == "examples":
        return (np.arange(shape[0]) < 11).reshape(-1, *[1] * (len(shape) - 1))
    if kind == "random":
        return np.random.default_rng(0).random(shape) < 0.6
    mask = np.ones(shape, bool)
    if kind == "first position":
        mask[(slice(None), 0, 0) if axis == -1 else (slice(None), slice(None), 0, 0)] = False
    else:
        mask[(slice(None),) * (axis % len(shape)) + (3,)] = False
    return mask


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("kind", MASKS)
def test_masked_float64_reference(layout, kind):
    # a mask on the kernel: its False elements are set to the shift (they add nothing) and
    # the count is the True ones. At mean 1e4 with zeros where the mask is False (padding),
    # so that a shift taken from a padded element would lose every digit of the variance:
    # y 1e-5, the statistics and the gradients (through the masked output: beta where the
    # mask is False) 1e-5 relative against float64, and a channel with no value keeps its
    # running statistics
    shape, axis = LAYOUTS[layout]
    mask = make_mask(kind, shape, axis)
    x = np.where(mask, np.asarray(random_input(shape, mean=1e4, std=2.0)), 0).astype(np.float32)
    dy = random_input(shape, seed=5)
    gamma, beta = random_params(64)

    def f(x, gamma, beta):
        c = x.shape[axis]
        return batch_norm(x, jnp.zeros(c), jnp.ones(c), gamma, beta, training=True,
                          channel_axis=axis, mask=mask, implementation="kernel",
                          momentum=0.5)  # fmt: skip

    hlo = jax.jit(f).lower(x, gamma, beta).as_text()
    assert "eqx_norm_columns_forward" in hlo
    (y, running_mean, running_var), vjp = jax.jit(lambda *a: jax.vjp(f, *a))(x, gamma, beta)
    dx, dgamma, dbeta = vjp((dy, jnp.zeros(64), jnp.zeros(64)))
    want, mean, var, count = reference_batch_norm(x, gamma, beta, channel_axis=axis, mask=mask)
    np.testing.assert_allclose(y, want, rtol=0, atol=1e-5)
    unbiased = var * count / np.maximum(count - 1, 1)
    kept = count > 1
    np.testing.assert_allclose(running_mean, np.where(kept, 0.5 * mean, 0), rtol=1e-6)
    np.testing.assert_allclose(running_var, np.where(kept, 0.5 + 0.5 * unbiased, 1), rtol=1e-5)
    # the gradients by the formula over the kept elements; dbeta also takes the cotangent
    # of the masked-out outputs, which are beta
    xs, dys, keep = (np.moveaxis(np.broadcast_to(as64(a), shape), axis, -1) for a in (x, dy, mask))
    axes = tuple(range(xs.ndim - 1))
    xhat = (xs - mean) / np.sqrt(var + 1e-5)
    kept_dy = np.where(keep, dys, 0)
    n = np.maximum(count, 1)
    ref_dx = (
        as64(gamma)
        / np.sqrt(var + 1e-5)
        * (kept_dy - kept_dy.sum(axes) / n - xhat * (kept_dy * xhat).sum(axes) / n)
    )
    ref_dx = np.moveaxis(np.where(keep, ref_dx, 0), -1, axis)
    for got, ref in ((dx, ref_dx), (dgamma, (kept_dy * xhat).sum(axes)), (dbeta, dys.sum(axes))):
        assert_close_relative(got, ref, 1e-5)


@pytest.mark.parametrize("channel_axis", [-1, 0])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_axis_name_merges_the_kernels_sums(channel_axis, dtype):
    # vmap(axis_name) over examples: the kernel's sums psummed give the whole batch's
    # statistics; y, the running statistics and every gradient in both orders (grad of the
    # vmap, and the vmap of a grad: per example, through the psum's transpose) and forward
    # mode match the XLA path, and the whole batch against float64 at mean 1e4
    example = (5, 6, 7) if channel_axis == -1 else (7, 5, 6)
    x = random_input((8, *example), mean=1e4, std=2.0, dtype=dtype)
    dy = random_input(x.shape, seed=5, dtype=dtype)
    gamma, beta = random_params(7)
    built = {
        impl: eqx.nn.make_with_state(BatchNorm)(
            7, channel_axis=channel_axis, axis_name="batch", implementation=impl
        )
        for impl in ("kernel", "xla")
    }

    def mapped(impl, x, gamma, beta):
        layer, state = built[impl]
        layer = eqx.tree_at(lambda b: (b.gamma, b.beta), layer, (gamma, beta))
        run = jax.vmap(layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        y, new = run(x, clone(state))
        return y, new.get(layer.state_index)

    def grad_of_vmap(impl):
        (y, stats), vjp = jax.vjp(functools.partial(mapped, impl), x, gamma, beta)
        return y, *stats, *vjp((dy, jax.tree.map(jnp.zeros_like, stats)))

    def vmap_of_grad(impl):
        def per_example(x, dy):
            layer, state = built[impl]
            _, vjp = jax.vjp(lambda x: layer(x, clone(state))[0], x)
            return vjp(dy)[0]

        return jax.vmap(per_example, axis_name="batch")(x, dy)

    def tangent(impl):
        return jax.jvp(lambda x: mapped(impl, x, gamma, beta)[0], (x,), (dy,))[1]

    hlo = jax.jit(lambda x: grad_of_vmap("kernel")).lower(x).as_text()
    assert "eqx_norm_columns_forward" in hlo and "eqx_norm_columns_backward" in hlo
    tol = 1e-5 if dtype == jnp.float32 else 2 * TOL[dtype]  # one rounding in dtype
    for run in (jax.jit(grad_of_vmap, static_argnums=0), vmap_of_grad, tangent):
        for got, want in zip(jax.tree.leaves(run("kernel")), jax.tree.leaves(run("xla"))):
            assert_close_relative(got, want, tol)
    # the whole batch, against float64 (the per-example axis is the batch's next axis)
    axis = channel_axis % len(example) + 1
    y, *_, dx, dgamma, dbeta = grad_of_vmap("kernel")
    want, *_ = reference_batch_norm(x, gamma, beta, channel_axis=axis)
    np.testing.assert_allclose(as64(y), want, rtol=0, atol=1e-5 if dtype == jnp.float32 else
                               2 * TOL[dtype])  # fmt: skip
    for got, ref in zip((dx, dgamma, dbeta), reference_gradients(x, gamma, dy, axis)):
        assert_close_relative(got, ref, tol)


def test_nested_axis_names_on_the_kernel():
    # a tuple of names: two nested vmaps hold the batch; the kernel's sums psummed over both
    # give the whole batch's y and running statistics
    x = random_input((4, 3, 5, 2), mean=3.0, std=2.0)
    bn, state = eqx.nn.make_with_state(BatchNorm)(2, implementation="kernel")
    y, whole = eqx.filter_jit(bn)(x.reshape(12, 5, 2), clone(state))
    nested = variant(bn, axis_name=("outer", "inner"))
    inner = jax.vmap(nested, axis_name="inner", in_axes=(0, None), out_axes=(0, None))
    outer = jax.vmap(inner, axis_name="outer", in_axes=(0, None), out_axes=(0, None))
    hlo = jax.jit(outer).lower(x, clone(state)).as_text()
    assert "eqx_norm_columns_forward" in hlo
    y_nested, new = outer(x, state)
    np.testing.assert_allclose(y_nested.reshape(12, 5, 2), y, rtol=0, atol=1e-5)
    for got, want in zip(new.get(bn.state_index), whole.get(bn.state_index)):
        np.testing.assert_allclose(got, want, rtol=1e-6)


def test_targets_check_their_buffers():
    f32 = jnp.float32
    x, shift = jnp.ones((2, 6, 8), f32), jnp.zeros((1, 8), f32)
    outs = [jax.ShapeDtypeStruct((1, 8), f32)] * 2
    attrs = dict(channels_last=True, groups=np.int64(1))
    s1, s2 = call_target("eqx_norm_columns_forward", outs, x, shift, **attrs)
    np.testing.assert_array_equal(s1, np.full((1, 8), 12.0))
    np.testing.assert_array_equal(s2, np.full((1, 8), 12.0))
    with pytest.raises(Exception, match=r"shift has dimensions \(1, 6\), expected \(1, 8\)"):
        call_target("eqx_norm_columns_forward", outs, x, jnp.zeros((1, 6), f32), **attrs)
    with pytest.raises(Exception, match="x has element type int32"):
        call_target("eqx_norm_columns_forward", outs, x.astype(jnp.int32), shift, **attrs)
    with pytest.raises(Exception, match="groups must be >= 1 and divide"):
        call_target("eqx_norm_columns_forward", outs, x, shift, channels_last=True,
                    groups=np.int64(3))  # fmt: skip
    y = jax.ShapeDtypeStruct(x.shape, f32)
    stats = (shift, shift, jnp.ones((1, 8), f32), jnp.zeros((1, 8), f32))
    np.testing.assert_array_equal(call_target("eqx_norm_columns_normalize", y, x, *stats,
                                              **attrs), x)  # fmt: skip
    with pytest.raises(Exception, match=r"w has dimensions \(1, 6\), expected \(1, 8\)"):
        call_target("eqx_norm_columns_normalize", y, x, shift, shift, jnp.ones((1, 6), f32),
                    shift, **attrs)  # fmt: skip
    with pytest.raises(Exception, match=r"y has element type bfloat16, expected x's type"):
        call_target("eqx_norm_columns_normalize", jax.ShapeDtypeStruct(x.shape, jnp.bfloat16),
                    x, *stats, **attrs)  # fmt: skip
    with pytest.raises(Exception, match=r"ct has dimensions \(2, 6, 7\)"):
        call_target("eqx_norm_columns_backward", outs, x, jnp.ones((2, 6, 7), f32), shift,
                    shift, **attrs)  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_normalize_pass_streams_the_same_values(channels_last, dtype):
    # the normalize pass streams y above 32 MiB moved (common.h's kStreamBytes): elementwise
    # given the statistics, so every example of a streamed call must equal, bitwise, the
    # same example in a call far below the threshold. 1001 channels (channels-first: 1001
    # positions) start the runs at every 4-byte (bfloat16: 2-byte) offset of a 16-byte line
    n = 4400 if dtype == jnp.float32 else 8800
    shape = (n, 1, 1001) if channels_last else (n, 1001, 1)
    x = random_input(shape, mean=3.0, dtype=dtype)
    assert 2 * x.nbytes > 32 << 20
    stats = [random_input((1, 1001), seed=s) for s in range(4)]
    attrs = dict(channels_last=channels_last, groups=np.int64(1))

    def run(x):
        out = jax.ShapeDtypeStruct(x.shape, x.dtype)
        return np.asarray(call_target("eqx_norm_columns_normalize", out, x, *stats, **attrs))

    whole = run(x)
    for i in (0, 1, 2, 3, 7, n - 1):
        np.testing.assert_array_equal(whole[i], run(x[i : i + 1])[0], err_msg=f"example {i}")
    per = (lambda v: v[None]) if channels_last else (lambda v: v[:, :, None])
    shift, d, w, u = (per(as64(v)) for v in stats)
    want = ((as64(x[:16]) - shift) - d) * w + u
    np.testing.assert_allclose(as64(whole[:16]), want, rtol=TOL[dtype], atol=TOL[dtype] * 8)


@pytest.mark.slow
def test_eight_devices_exact_global_statistics():
    result = run_on_simulated_devices("-c", CHECKS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


CHECKS = """
import jax, jax.numpy as jnp, numpy as np, equinox as eqx
from jax.sharding import NamedSharding, PartitionSpec as P
from eqx_norm import BatchNorm
assert jax.device_count() == 8
mesh = jax.make_mesh((8,), ("batch",))
x = 3.0 + 2.0 * jax.random.normal(jax.random.key(1), (32, 6, 6, 16))
dy = jax.random.normal(jax.random.key(2), x.shape)
bn, state = eqx.nn.make_with_state(BatchNorm)(16, implementation="kernel")
def step(x, state, dy):
    (y, new), vjp = jax.vjp(lambda x: bn(x, state), x)
    return y, new, vjp((dy, jax.tree.map(jnp.zeros_like, new)))[0]
one = jax.jit(step)(x, state, dy)
sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
dy_sharded = jax.device_put(dy, NamedSharding(mesh, P("batch")))
state_on_mesh = jax.device_put(state, NamedSharding(mesh, P()))
compiled = jax.jit(step).lower(sharded, state_on_mesh, dy_sharded).compile()
text = compiled.as_text()
assert "eqx_norm_columns_forward" in text and "eqx_norm_columns_backward" in text
assert "all-gather" not in text, "x was gathered: each device should sum its own rows"
got = compiled(sharded, state_on_mesh, dy_sharded)
assert got[0].sharding.spec[0] == "batch"
for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(one)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
# axis_name: each device's kernel sums, psummed (shard_map and pmap), forward and backward
per_device = eqx.tree_at(lambda b: (b.state_index, b.steps_index),
                         BatchNorm(16, axis_name="batch", implementation="kernel"),
                         (bn.state_index, bn.steps_index))
def step_per_device(x, state, dy):
    (y, new), vjp = jax.vjp(lambda x: per_device(x, state), x)
    return y, new, vjp((dy, jax.tree.map(jnp.zeros_like, new)))[0]
mapped = jax.jit(jax.shard_map(step_per_device, mesh=mesh, in_specs=(P("batch"), P(), P("batch")),
                               out_specs=(P("batch"), P(), P("batch"))))
text = mapped.lower(sharded, state_on_mesh, dy_sharded).compile().as_text()
assert "eqx_norm_columns_forward" in text and "eqx_norm_columns_backward" in text
assert "all-gather" not in text, "x was gathered under shard_map"
pmapped = jax.pmap(step_per_device, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None, 0))
for got in (mapped(sharded, state_on_mesh, dy_sharded),
            pmapped(x.reshape(8, 4, 6, 6, 16), state, dy.reshape(8, 4, 6, 6, 16))):
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(one)):
        np.testing.assert_allclose(a.reshape(b.shape), b, rtol=1e-5, atol=1e-5)
print("ok")
"""
