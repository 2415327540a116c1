"""BatchNorm's compiled CPU kernel (eqx_norm.kernels.columns), both layouts.

Oracles: float64 NumPy (``reference_batch_norm``, and the gradients by their formula),
torch's BatchNorm2d in float64 (tests/test_batch_norm.py, which now runs the kernel by
default), and the XLA path. Tolerances: float32 1e-5 (y absolute, O(1) outputs; gradients
relative to their largest value); bfloat16/float16 one rounding of the output, on the
reference taken from the rounded input. The sums are bitwise the same at every thread
count; inference is one elementwise pass, so an example's output does not depend on its
batch (bitwise).
"""

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
from test_batch_norm import as64, assert_close_relative, clone, reference_batch_norm

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
    assert "eqx_norm_columns" not in hlo(bn, mask=jnp.ones((8, 1, 1, 1), bool))
    assert "eqx_norm_columns" not in hlo(eqx.nn.inference_mode(bn))
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
    for kwargs, reason in (
        (dict(mask=jnp.ones((8, 1), bool)), "a `mask` is given"),
        (dict(epsilon=0.0), "epsilon=0"),
    ):
        with pytest.raises(ValueError, match=f"implementation='kernel' cannot serve.*{reason}"):
            batch_norm(x, jnp.zeros(3), jnp.ones(3), training=True, implementation="kernel",
                       **kwargs)  # fmt: skip
    bn, state = eqx.nn.make_with_state(BatchNorm)(3, axis_name="batch", implementation="kernel")
    with pytest.raises(ValueError, match=r"cannot serve.*`axis_name`='batch'"):
        jax.vmap(bn, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)


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
    with pytest.raises(Exception, match=r"ct has dimensions \(2, 6, 7\)"):
        call_target("eqx_norm_columns_backward", outs, x, jnp.ones((2, 6, 7), f32), shift,
                    shift, **attrs)  # fmt: skip


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
print("ok")
"""
