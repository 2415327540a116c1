"""Property-based tests: every layer agrees with the float64 reference on random layouts.

Hypothesis draws the batch and normalized shapes, the offset and spread of the data and
the parameters. Tolerance: an output is O(1), and float32 statistics of data with offset
`mean` and spread `std` carry a relative error of a few eps_f32 * mean / std (the
deviations `x - mean` keep the input's absolute rounding), so the bound is
2e-5 + 2e-7 * mean / std: 2e-3 at mean / std = 1e4, the bar of the mean-1e4 tests.
"""

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_input, random_params
from hypothesis import given, settings
from hypothesis import strategies as st

import eqx_norm

import reference

pytestmark = pytest.mark.slow  # long: the quick loop (-m "not slow") skips it

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)
dims = st.lists(st.integers(1, 5), min_size=0, max_size=2)
normalized_dims = st.lists(st.integers(1, 6), min_size=1, max_size=3)
offsets = st.sampled_from([0.0, 3.0, 1e2, 1e4])
spreads = st.sampled_from([1e-2, 1.0, 1e2])
seeds = st.integers(0, 2**16)


def tolerance(mean, std):
    return 2e-5 + 2e-7 * max(1.0, abs(mean) / std)


@SETTINGS
@given(dims, normalized_dims, offsets, spreads, seeds, st.booleans())
def test_layer_and_rms_norm_match_float64(batch, normalized, mean, std, seed, rms):
    shape = (*batch, *normalized)
    gamma, beta = random_params(tuple(normalized), seed + 1)
    x = random_input(shape, seed, mean, std)
    if rms:
        layer = eqx_norm.RMSNorm(
            normalized, scale_initializer=gamma, bias_initializer=beta, use_bias=True
        )
        expected = reference.rms_norm(x, len(normalized), gamma, beta, layer.epsilon)
        atol = 2e-5  # no centring: x / rms is O(1) whatever the offset
    else:
        layer = eqx_norm.LayerNorm(normalized, scale_initializer=gamma, bias_initializer=beta)
        expected = reference.layer_norm(x, len(normalized), gamma, beta, layer.epsilon)
        atol = tolerance(mean, std)
    y = layer(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y, expected, atol=atol, rtol=1e-5)


@SETTINGS
@given(
    dims,
    st.integers(0, 2),
    st.integers(1, 4),
    st.integers(1, 3),
    offsets,
    spreads,
    seeds,
    st.sampled_from([-1, 0]),
)
def test_group_norm_matches_float64(
    batch, spatial_ndim, groups, per_group, mean, std, seed, channel_axis
):
    channels = groups * per_group
    spatial = [3, 4, 2][:spatial_ndim]
    example = [*spatial, channels] if channel_axis == -1 else [channels, *spatial]
    gamma, beta = random_params((channels,), seed + 1)
    x = random_input((*batch, *example), seed, mean, std)
    layer = eqx_norm.GroupNorm(
        groups,
        channels,
        spatial_ndim=spatial_ndim,
        channel_axis=channel_axis,
        scale_initializer=gamma,
        bias_initializer=beta,
    )
    expected = reference.group_norm(
        x, groups, spatial_ndim, gamma, beta, layer.epsilon, channel_axis=channel_axis
    )
    np.testing.assert_allclose(layer(x), expected, atol=tolerance(mean, std), rtol=1e-5)


@SETTINGS
@given(dims, normalized_dims, st.floats(-1e6, 1e6, width=32), seeds)
def test_constant_rows_give_beta_exactly(batch, normalized, value, seed):
    gamma, beta = random_params(tuple(normalized), seed + 1)
    layer = eqx_norm.LayerNorm(normalized, scale_initializer=gamma, bias_initializer=beta)
    x = jnp.full((*batch, *normalized), value, jnp.float32)
    np.testing.assert_array_equal(layer(x), jnp.broadcast_to(beta, x.shape))
