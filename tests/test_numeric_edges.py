"""The numeric edges: where each layer and implementation is exact, accurate, or loudly wrong.

Every case is checked against the float64 NumPy reference (tests/reference.py) evaluated on
the very values the layer receives (the float32/bf16/fp16 input, widened), so the bounds
measure eqx_norm's arithmetic, not the rounding of the input. The figures measured here are
in docs/numeric_edges.md.

The rule at the edges: the result is right, or NaN; never a silent ``beta``. A variance that
overflows float32 gives NaN with ``epsilon > 0``; with ``epsilon == 0`` the statistics are
rescaled by the row's largest centred magnitude, so spreads from 1e-20 to 1e30 stay right.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_norm import functional as F

import reference as ref

# the quick loop (-m "not slow") skips this file: the edges matrix: long; CI runs it
pytestmark = pytest.mark.slow

ROWS, D = 8, 256
CHANNELS, GROUPS = 4, 2  # GroupNorm/InstanceNorm see each row as (D // 4 positions, 4 channels)

# (layer, implementation): every layer, both implementations where there are two.
LAYERS = [
    ("layer_norm", "xla"),
    ("layer_norm", "kernel"),
    ("rms_norm", "xla"),
    ("rms_norm", "kernel"),
    ("group_norm", "xla"),
    ("instance_norm", "xla"),
]
LAYER_IDS = [f"{layer}-{impl}" for layer, impl in LAYERS]
# The layers that centre (RMSNorm does not: a constant row is not special to it).
CENTERING = [case for case in LAYERS if case[0] != "rms_norm"]
CENTERING_IDS = [f"{layer}-{impl}" for layer, impl in CENTERING]


def apply(layer, impl, x, epsilon, gamma=None, beta=None):
    """The layer over each row of ``x`` (rows, D), returned as (rows, D)."""
    if layer == "layer_norm":
        return F.layer_norm(x, x.shape[-1], gamma, beta, epsilon=epsilon, implementation=impl)
    if layer == "rms_norm":
        return F.rms_norm(x, x.shape[-1], gamma, beta, epsilon=epsilon, implementation=impl)
    grid = x.reshape(x.shape[0], -1, CHANNELS)
    if layer == "group_norm":
        y = F.group_norm(grid, GROUPS, gamma, beta, spatial_ndim=1, epsilon=epsilon)
    else:
        y = F.instance_norm(grid, gamma, beta, spatial_ndim=1, epsilon=epsilon)
    return y.reshape(x.shape)


def expected(layer, x, epsilon):
    """The float64 reference on the values ``x`` holds."""
    x = np.asarray(x, np.float64)
    if layer == "layer_norm":
        return ref.layer_norm(x, 1, epsilon=epsilon)
    if layer == "rms_norm":
        return ref.rms_norm(x, 1, epsilon=epsilon)
    grid = x.reshape(x.shape[0], -1, CHANNELS)
    if layer == "group_norm":
        return ref.group_norm(grid, GROUPS, 1, epsilon=epsilon).reshape(x.shape)
    return ref.instance_norm(grid, 1, epsilon=epsilon).reshape(x.shape)


def data(mean, spread, dtype=np.float32, shape=(ROWS, D), seed=0):
    """``mean + spread * N(0, 1)``, seeded, in ``dtype``."""
    z = np.random.default_rng(seed).standard_normal(shape)
    return jnp.asarray((mean + spread * z).astype(dtype))


def max_error(layer, impl, x, epsilon):
    y = np.asarray(apply(layer, impl, x, epsilon), np.float64)
    return float(np.max(np.abs(y - expected(layer, x, epsilon))))


# ------------------------------------------------------------------------------------------
# Accurate: (name, mean, spread, epsilon, dtype, bound on the max absolute error of outputs
# that are O(1)). float32 statistics after the first-element shift are exact to a few ulp of
# the spread whatever the mean, so float32 cases are bounded by 1e-5 (measured <= 1e-6);
# half-precision cases by the rounding of the output (bf16 8 bits: 2^-8 * |y| <= 0.02;
# fp16 11 bits: 2^-11 * |y| <= 2.5e-3).
ACCURATE = [
    ("mean 1e4", 1e4, 1.0, 1e-5, np.float32, 1e-5),
    ("mean 1e6", 1e6, 1.0, 1e-5, np.float32, 1e-5),
    ("mean 1e8", 1e8, 1.0, 1e-5, np.float32, 1e-5),
    ("spread 1e-3 eps 0", 0.0, 1e-3, 0.0, np.float32, 1e-5),
    ("spread 1e-6 eps 0", 0.0, 1e-6, 0.0, np.float32, 1e-5),
    ("spread 1e-10 eps 0", 0.0, 1e-10, 0.0, np.float32, 1e-5),
    ("spread 1e-3 eps 1e-5", 0.0, 1e-3, 1e-5, np.float32, 1e-5),
    ("spread 1e-10 eps 1e-5", 0.0, 1e-10, 1e-5, np.float32, 1e-5),
    ("spread 1e-20 eps 0", 0.0, 1e-20, 0.0, np.float32, 1e-5),
    ("spread 1e-20 eps 1e-5", 0.0, 1e-20, 1e-5, np.float32, 1e-5),
    ("mean 1 spread 1e-3 eps 0", 1.0, 1e-3, 0.0, np.float32, 1e-5),
    ("magnitude 1e19 eps 0", 0.0, 1e19, 0.0, np.float32, 1e-5),
    ("magnitude 1e30 eps 0", 0.0, 1e30, 0.0, np.float32, 1e-5),
    ("fp16 mean 3e4 spread 1e3", 3e4, 1e3, 1e-5, np.float16, 2.5e-3),
    ("fp16 spread 1e4", 0.0, 1e4, 1e-5, np.float16, 2.5e-3),
    ("bf16 mean 1e4 spread 1e2", 1e4, 1e2, 1e-5, jnp.bfloat16, 0.02),
    ("bf16 mean 1e6 spread 1e4", 1e6, 1e4, 1e-5, jnp.bfloat16, 0.02),
]


@pytest.mark.parametrize("case", ACCURATE, ids=[c[0] for c in ACCURATE])
@pytest.mark.parametrize(("layer", "impl"), LAYERS, ids=LAYER_IDS)
def test_accurate(layer, impl, case):
    _, mean, spread, epsilon, dtype, bound = case
    x = data(mean, spread, dtype)
    if dtype == np.float16:
        assert np.all(np.isfinite(np.asarray(x, np.float32)))  # the case stays in fp16 range
    assert max_error(layer, impl, x, epsilon) <= bound


# Magnitudes where (x - mean)^2, or its sum over the row, overflows float32 (above about
# 1.8e19 / sqrt(count)): with epsilon > 0 every such row is NaN, never beta.
OVERFLOW = [1e19, 1e20, 1e25, 1e30]


@pytest.mark.parametrize("magnitude", OVERFLOW)
@pytest.mark.parametrize(("layer", "impl"), LAYERS, ids=LAYER_IDS)
def test_overflowing_squares_are_nan_with_epsilon(layer, impl, magnitude):
    x = data(0.0, magnitude)
    beta = jnp.full((CHANNELS if layer in ("group_norm", "instance_norm") else D,), 0.5)
    gamma = jnp.ones_like(beta)
    y = np.asarray(apply(layer, impl, x, 1e-5, gamma, beta))
    assert np.all(np.isnan(y))


def test_overflow_mixed_with_ordinary_rows():
    """Only the overflowing row is NaN; its neighbours are untouched, in both implementations."""
    x = np.array(data(0.0, 1.0))
    x[3] *= 1e25
    for impl in ("xla", "kernel"):
        y = np.asarray(F.layer_norm(jnp.asarray(x), D, epsilon=1e-5, implementation=impl))
        assert np.all(np.isnan(y[3]))
        others = np.delete(np.arange(ROWS), 3)
        np.testing.assert_allclose(y[others], ref.layer_norm(x[others], 1), atol=1e-5)


# ------------------------------------------------------------------------------------------
# Exact.


@pytest.mark.parametrize("value", [0.0, 3.0, -1e4, 1e8, 1e30, -3e38])
@pytest.mark.parametrize("epsilon", [0.0, 1e-5])
@pytest.mark.parametrize(("layer", "impl"), CENTERING, ids=CENTERING_IDS)
def test_constant_rows_give_exactly_beta(layer, impl, epsilon, value):
    x = jnp.full((ROWS, D), value, jnp.float32)
    beta = jnp.linspace(-1.0, 1.0, CHANNELS if layer in ("group_norm", "instance_norm") else D)
    y = np.asarray(apply(layer, impl, x, epsilon, jnp.full_like(beta, 2.0), beta))
    np.testing.assert_array_equal(y, np.broadcast_to(np.resize(np.asarray(beta), D), y.shape))


@pytest.mark.parametrize("impl", ["xla", "kernel"])
def test_normalized_size_one(impl):
    """LayerNorm over one element is exactly beta; RMSNorm is x / sqrt(x^2 + eps)."""
    x = data(5.0, 100.0, shape=(ROWS, 1))
    beta = jnp.array([0.25])
    for epsilon in (0.0, 1e-5):
        y = F.layer_norm(x, 1, jnp.array([3.0]), beta, epsilon=epsilon, implementation=impl)
        np.testing.assert_array_equal(np.asarray(y), 0.25)
        y = F.rms_norm(x, 1, epsilon=epsilon, implementation=impl)
        np.testing.assert_allclose(np.asarray(y), ref.rms_norm(x, 1, epsilon=epsilon), rtol=1e-6)


def test_instance_norm_one_position_gives_exactly_beta():
    x = data(7.0, 3.0, shape=(ROWS, 1, CHANNELS))
    beta = jnp.arange(CHANNELS, dtype=jnp.float32)
    y = F.instance_norm(x, jnp.ones(CHANNELS), beta, spatial_ndim=1, epsilon=0.0)
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(np.asarray(beta), x.shape))


# ------------------------------------------------------------------------------------------
# Long rows: float32 accumulation over 1e6 and 4e6 elements at mean 1e4 (spread 1).
# The first pass sums values of size |x - x0| <~ 5 and the second squares of size <~ 25;
# blocked/tree sums keep their relative error near log2(n) ulp, so outputs of size <~ 5
# stay within 1e-4 (measured: see docs/numeric_edges.md).


@pytest.mark.parametrize(("layer", "impl"), LAYERS, ids=LAYER_IDS)
def test_one_million_elements_at_mean_1e4(layer, impl):
    x = data(1e4, 1.0, shape=(1, 1_000_000))
    assert max_error(layer, impl, x, 1e-5) <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(("layer", "impl"), LAYERS, ids=LAYER_IDS)
def test_four_million_elements_at_mean_1e4(layer, impl):
    x = data(1e4, 1.0, shape=(2, 2_000_000)).reshape(1, 4_000_000)
    assert max_error(layer, impl, x, 1e-5) <= 1e-4


# ------------------------------------------------------------------------------------------
# Subnormal inputs. XLA:CPU (and the kernel, on XLA's threads) flushes float32 subnormals to
# zero, so subnormal values read as 0: next to normal values they are lost below the
# spread (accurate); a row whose spread is entirely subnormal reads as constant (beta).


@pytest.mark.parametrize(("layer", "impl"), LAYERS, ids=LAYER_IDS)
def test_subnormals_next_to_normal_values(layer, impl):
    x = np.array(data(0.0, 1.0))
    x[:, ::3] = np.float32(1e-40) * np.sign(x[:, ::3])  # subnormal float32, in every channel
    x = jnp.asarray(x)
    flushed = np.where(np.abs(np.asarray(x)) < np.finfo(np.float32).tiny, 0.0, np.asarray(x))
    y = np.asarray(apply(layer, impl, x, 0.0), np.float64)
    assert np.max(np.abs(y - expected(layer, flushed, 0.0))) <= 1e-5


@pytest.mark.parametrize(("layer", "impl"), LAYERS, ids=LAYER_IDS)
def test_all_subnormal_rows_read_as_zero(layer, impl):
    x = data(0.0, 1e-40)  # every element subnormal (or 0) in float32
    y = np.asarray(apply(layer, impl, x, 0.0))
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y, 0.0)


# ------------------------------------------------------------------------------------------
# NaN and inf: a non-finite element makes its own row (LayerNorm/RMSNorm), group
# (GroupNorm: one example's group of channels) or channel (InstanceNorm: one example's
# channel) NaN; everything else is bitwise what it was without it.


def _poisoned(value):
    x = np.array(data(0.0, 1.0))
    x[2, 9] = value  # row 2, position 2, channel 1 (group 0)
    return jnp.asarray(x)


def _nan_region(layer):
    """The elements of row 2 that element (2, 9) shares statistics with."""
    region = np.zeros((ROWS, D), bool)
    channel = np.arange(D) % CHANNELS
    if layer in ("layer_norm", "rms_norm"):
        region[2] = True
    elif layer == "group_norm":
        region[2] = channel // (CHANNELS // GROUPS) == 0
    else:
        region[2] = channel == 1
    return region


@pytest.mark.parametrize("epsilon", [0.0, 1e-5])
@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize(("layer", "impl"), LAYERS, ids=LAYER_IDS)
def test_non_finite_input_stays_in_its_row(layer, impl, value, epsilon):
    clean = np.asarray(apply(layer, impl, data(0.0, 1.0), epsilon))
    y = np.asarray(apply(layer, impl, _poisoned(value), epsilon))
    region = _nan_region(layer)
    assert np.all(np.isnan(y[region]))
    np.testing.assert_array_equal(y[~region], clean[~region])


@pytest.mark.parametrize("value", [np.nan, np.inf])
@pytest.mark.parametrize(("layer", "impl"), LAYERS, ids=LAYER_IDS)
def test_non_finite_input_gradient_stays_in_its_row(layer, impl, value):
    cotangent = data(0.0, 1.0, seed=1)

    def grad(x):
        return np.asarray(jax.grad(lambda x: jnp.sum(apply(layer, impl, x, 1e-5) * cotangent))(x))

    clean = grad(data(0.0, 1.0))
    g = grad(_poisoned(value))
    region = _nan_region(layer)
    assert np.all(np.isnan(g[region]))
    # The gradient of a row depends only on that row; summation order may differ with the
    # compiled graph, hence 1e-6 rather than bitwise.
    np.testing.assert_allclose(g[~region], clean[~region], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Gradients at the edges (epsilon == 0): right, against the closed form in float64,
#   dx = r * (v - c * mean(v) - xhat * mean(v * xhat)),  v = cotangent,
# c = 1 (LayerNorm) or 0 (RMSNorm). Before the rescaling, r^2 under/overflowed here.


def _gradient_reference(x, cotangent, center):
    x, v = np.asarray(x, np.float64), np.asarray(cotangent, np.float64)
    centered = x - x.mean(axis=1, keepdims=True) if center else x
    r = 1 / np.sqrt(np.mean(centered**2, axis=1, keepdims=True))
    xhat = centered * r
    inner = v - v.mean(axis=1, keepdims=True) if center else v
    return r * (inner - xhat * np.mean(v * xhat, axis=1, keepdims=True))


@pytest.mark.parametrize("spread", [1e-20, 1e-10, 1.0, 1e19, 1e30])
@pytest.mark.parametrize(("layer", "impl"), LAYERS[:4], ids=LAYER_IDS[:4])
def test_gradients_at_extreme_spreads_epsilon_zero(layer, impl, spread):
    x = data(0.0, spread)
    cotangent = data(0.0, 1.0, seed=1)
    g = jax.grad(lambda x: jnp.sum(apply(layer, impl, x, 0.0) * cotangent))(x)
    want = _gradient_reference(x, cotangent, layer == "layer_norm")
    # Relative to the gradient's own scale (1 / spread): float32 statistics, 1e-5.
    error = np.max(np.abs(np.asarray(g, np.float64) - want)) / np.max(np.abs(want))
    assert error <= 1e-5
