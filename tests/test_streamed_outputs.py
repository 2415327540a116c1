"""The kernels' streamed outputs: a call that moves more than 32 MiB (common.h's
``kStreamBytes``) writes ``y`` and ``dx`` by non-temporal stores, a smaller call by regular
ones. The values must not depend on which: each example of a large batch is compared
bitwise with the same example computed alone (a call far below the threshold), at rows
whose starts fall at every 4-byte (bfloat16: 2-byte) offset of a 16-byte line (so the
aligned middle, the scalar head and the tail are all exercised), and against a float64
NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_input, random_layer

import eqx_norm
from eqx_norm.kernels import groups, rows

import reference

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(rows.unavailable_reason(jnp.zeros((2, 3))) is not None, reason="no kernel"),
]

STREAM_BYTES = 32 << 20


def _y_and_dx(layer, x, ct):
    y, vjp = jax.vjp(layer, x)
    return y, vjp(ct)[0]


def _alone_equals_in_batch(layer, x, ct, examples):
    run = jax.jit(lambda x, ct: _y_and_dx(layer, x, ct))
    y, dx = (np.asarray(a) for a in run(x, ct))
    for i in examples:
        y_i, dx_i = (np.asarray(a) for a in run(x[i : i + 1], ct[i : i + 1]))
        np.testing.assert_array_equal(y[i], y_i[0], err_msg=f"y of example {i}")
        np.testing.assert_array_equal(dx[i], dx_i[0], err_msg=f"dx of example {i}")
    return y


@pytest.mark.parametrize("name", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_rows_streamed_equal_rows_alone(name, dtype):
    # d = 1001 elements: consecutive rows start 4004 (bfloat16: 2002) bytes apart, so rows 0-3
    # (0-7) start at every 4-byte (2-byte) offset of a 16-byte line, and 1001 leaves a tail
    rows_, d = (8400 if dtype == jnp.float32 else 16800), 1001
    x = random_input((rows_, d), seed=0, mean=3.0, dtype=dtype)
    ct = random_input((rows_, d), seed=1, dtype=dtype)
    assert 2 * x.nbytes > STREAM_BYTES  # the forward streams y, the backward dx
    layer = random_layer(getattr(eqx_norm, name), d, use_bias=True)
    y = _alone_equals_in_batch(jax.vmap(layer), x, ct, [*range(8), rows_ - 1])
    ref = reference.layer_norm if name == "LayerNorm" else reference.rms_norm
    want = ref(x[:64], 1, layer.gamma, layer.beta, epsilon=layer.epsilon)
    tolerance = 1e-5 if dtype == jnp.float32 else 1.6e-2  # float32's or bfloat16's rounding
    np.testing.assert_allclose(np.asarray(y[:64], np.float64), want, atol=tolerance * 8)


@pytest.mark.parametrize("channels_last", [True, False])
def test_groups_streamed_equal_groups_alone(channels_last):
    # 27 x 27 positions x 245 channels: examples start 714420 bytes apart, the kernel's runs
    # (channels-last a position's 245 channels, 980 bytes; channels-first a channel's 729
    # positions, 2916 bytes) a multiple of 16 plus 4 apart, so examples 0-3 and the runs
    # within them start at every 4-byte offset of a 16-byte line, and every run has a tail
    n, c = 48, 245
    shape = (n, 27, 27, c) if channels_last else (n, c, 27, 27)
    x = random_input(shape, seed=2, mean=-2.0)
    ct = random_input(shape, seed=3)
    assert 2 * x.nbytes > STREAM_BYTES
    assert groups.unavailable_reason(x) is None
    axis = -1 if channels_last else 0
    layer = random_layer(eqx_norm.GroupNorm, 5, c, param_shape=c, channel_axis=axis)
    y = _alone_equals_in_batch(jax.vmap(layer), x, ct, [0, 1, 2, 3, n - 1])
    want = reference.group_norm(
        x[:2], 5, 2, layer.gamma, layer.beta, epsilon=layer.epsilon, channel_axis=axis
    )
    np.testing.assert_allclose(np.asarray(y[:2], np.float64), want, atol=1e-4)
