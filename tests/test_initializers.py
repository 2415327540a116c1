"""The initializer factories: protocol, values, statistics and interoperability."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_norm
from eqx_norm.initializers import (
    Constant,
    Normal,
    OneInit,
    TruncatedNormal,
    Uniform,
    ZeroInit,
)

DETERMINISTIC = [
    (ZeroInit(), 0.0),
    (OneInit(), 1.0),
    (OneInit(2.5), 2.5),
    (Constant(-0.75), -0.75),
]
RANDOM = [Normal(0.5, 2.0), Uniform(-3.0, -1.0), TruncatedNormal(1.0, 0.5, -1.0, 1.5)]
SHAPES = [(), (7,), (3, 4), (2, 3, 5)]
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]


@pytest.mark.parametrize(("init", "value"), DETERMINISTIC)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_deterministic_shape_dtype_value(init, value, shape, dtype):
    out = init(None, shape, dtype)
    assert out.shape == shape
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(out, np.float64), np.full(shape, value))
    # the key is ignored
    np.testing.assert_array_equal(out, init(jax.random.key(3), shape, dtype))


@pytest.mark.parametrize("init", RANDOM)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_random_shape_dtype_and_determinism(init, shape, dtype):
    out = init(jax.random.key(0), shape, dtype)
    assert out.shape == shape
    assert out.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(out, init(jax.random.key(0), shape, dtype))


def test_random_statistics():
    key = jax.random.key(42)
    n = 200_000  # standard error of the mean about 2.2e-3 per unit stddev
    normal = np.asarray(Normal(0.5, 2.0)(key, (n,)), np.float64)
    assert abs(normal.mean() - 0.5) < 0.02 and abs(normal.std() - 2.0) < 0.02
    uniform = np.asarray(Uniform(-3.0, -1.0)(key, (n,)), np.float64)
    assert uniform.min() >= -3.0 and uniform.max() < -1.0 and abs(uniform.mean() + 2.0) < 0.01
    truncated = np.asarray(TruncatedNormal(1.0, 0.5, -1.0, 1.5)(key, (n,)), np.float64)
    assert truncated.min() >= 1.0 - 0.5 - 1e-6 and truncated.max() <= 1.0 + 0.75 + 1e-6
    # a standard normal truncated to [-1, 1.5] has mean (phi(-1) - phi(1.5)) / (Phi(1.5) - Phi(-1))
    from math import erf, exp, pi, sqrt

    def phi(z):
        return exp(-z * z / 2) / sqrt(2 * pi)

    def cdf(z):
        return 0.5 * (1 + erf(z / sqrt(2)))

    expected = 1.0 + 0.5 * (phi(-1.0) - phi(1.5)) / (cdf(1.5) - cdf(-1.0))
    assert abs(truncated.mean() - expected) < 0.01


@pytest.mark.parametrize("init", [*(i for i, _ in DETERMINISTIC), *RANDOM])
def test_immutable_and_hashable(init):
    with pytest.raises(dataclasses.FrozenInstanceError):
        init.value = 3.0
    assert hash(init) == hash(dataclasses.replace(init))


@pytest.mark.parametrize("init", RANDOM)
def test_random_without_key_is_a_clear_error(init):
    with pytest.raises(ValueError, match="random initializer and needs a PRNG key"):
        init(None, (3,))


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda: Normal(stddev=0.0), "`stddev` must be positive"),
        (lambda: Normal(stddev=float("nan")), "`stddev` must be finite"),
        (lambda: Uniform(1.0, 1.0), "`minval` must be less than `maxval`"),
        (lambda: TruncatedNormal(lower=2.0, upper=-2.0), "`lower` must be less than `upper`"),
        (lambda: Constant("a"), "`value` must be a real number"),
    ],
)
def test_bad_arguments(factory, match):
    with pytest.raises((ValueError, TypeError), match=match):
        factory()


def test_ours_work_where_jax_and_flax_expect_an_initializer():
    # the jax.nn.initializers protocol: init(key, shape, dtype)
    ours = OneInit(2.0)(jax.random.key(0), (4,), jnp.float32)
    np.testing.assert_array_equal(ours, jax.nn.initializers.constant(2.0)(None, (4,)))
    nnx = pytest.importorskip("flax.nnx")
    layer = nnx.LayerNorm(4, scale_init=OneInit(2.0), bias_init=Constant(0.5), rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(layer.scale[...], np.full(4, 2.0))
    np.testing.assert_array_equal(layer.bias[...], np.full(4, 0.5))


def test_common_ones_exported_at_top_level():
    assert eqx_norm.ZeroInit is ZeroInit and eqx_norm.OneInit is OneInit
    assert eqx_norm.Normal is Normal and eqx_norm.TruncatedNormal is TruncatedNormal
