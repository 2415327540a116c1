"""RMSNorm against float64 NumPy, torch.nn.RMSNorm, equinox.nn.RMSNorm and finite differences.

Tolerances: outputs are O(1) after normalization, so float32 results are compared at 1e-5
(a few float32 roundings over rows of up to ~1e3 elements, eps_f32 = 1.2e-7); gradients at
1e-3 relative to the float64 torch autograd answer, as for LayerNorm.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOL, max_relative_error, random_input, random_layer

from eqx_norm import RMSNorm

import reference

CASES = [  # (input shape, normalized_shape)
    ((10,), 10),
    ((4, 10), (10,)),
    ((20, 5, 10), 10),
    ((6, 5, 4, 3), (5, 4, 3)),
    ((2, 3, 7, 16), [7, 16]),
]


def test_defaults_scale_only():
    layer = RMSNorm(8)
    assert layer.epsilon == 1e-6 and layer.beta is None
    np.testing.assert_array_equal(layer.gamma, np.ones(8))
    assert layer.gamma.dtype == jnp.float32 and layer.elementwise_affine


@pytest.mark.parametrize(("shape", "normalized_shape"), CASES)
@pytest.mark.parametrize(
    "kwargs", [{}, {"use_bias": True}, {"elementwise_affine": False}, {"epsilon": 1e-2}]
)
@pytest.mark.slow
def test_matches_float64_numpy(shape, normalized_shape, kwargs):
    layer = random_layer(RMSNorm, normalized_shape, **kwargs)
    x = random_input(shape, mean=1.0, std=2.0)
    y = layer(x)
    expected = reference.rms_norm(
        x, len(layer.normalized_shape), layer.gamma, layer.beta, layer.epsilon
    )
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y, expected, atol=TOL[jnp.float32], rtol=TOL[jnp.float32])
    assert (layer.beta is not None) == kwargs.get("use_bias", False)


def test_does_not_centre():
    # a row with a large mean is divided by its RMS, not standardized: x / rms stays ~1
    x = random_input((4, 32), mean=1e4)
    y = RMSNorm(32)(x)
    np.testing.assert_allclose(y, reference.rms_norm(x, 1), rtol=1e-6)
    assert float(y.min()) > 0.99


@pytest.mark.parametrize("epsilon", [1e-6, 0.0])
def test_zero_input_gives_beta_with_finite_gradients(epsilon):
    layer = RMSNorm(5, epsilon=epsilon, use_bias=True, bias_initializer=np.arange(5.0))
    y = layer(jnp.zeros((2, 5)))
    np.testing.assert_array_equal(y, np.broadcast_to(np.arange(5.0), (2, 5)))
    grads = jax.grad(lambda x: layer(x).sum())(jnp.zeros((2, 5)))
    # eps > 0: d(x / sqrt(eps + x**2))/dx is finite at 0; eps == 0: 0, not 0 * inf
    assert np.isfinite(np.asarray(grads)).all(), grads


@pytest.mark.parametrize(
    ("shape", "normalized_shape"), [((64, 128, 768), 768), ((8, 14, 14, 64), (14, 14, 64))]
)
@pytest.mark.slow
def test_matches_torch_rms_norm(shape, normalized_shape):
    torch = pytest.importorskip("torch")
    layer = random_layer(RMSNorm, normalized_shape)
    x = random_input(shape)
    torch_layer = torch.nn.RMSNorm(layer.normalized_shape, eps=layer.epsilon)
    with torch.no_grad():
        torch_layer.weight.copy_(torch.tensor(np.asarray(layer.gamma)))
        expected = torch_layer(torch.tensor(np.asarray(x))).numpy()
    np.testing.assert_allclose(eqx.filter_jit(layer)(x), expected, atol=2e-5, rtol=TOL[jnp.float32])


@pytest.mark.slow
def test_matches_equinox_rms_norm_under_vmap():
    ours = random_layer(RMSNorm, (7, 16), use_bias=True)
    theirs = eqx.nn.RMSNorm((7, 16), eps=ours.epsilon)
    theirs = eqx.tree_at(lambda m: (m.weight, m.bias), theirs, (ours.gamma, ours.beta))
    x = random_input((4, 3, 7, 16), mean=0.5)
    expected = jax.vmap(jax.vmap(theirs))(x)
    np.testing.assert_allclose(ours(x), expected, atol=TOL[jnp.float32], rtol=TOL[jnp.float32])


@pytest.mark.parametrize(
    ("shape", "normalized_shape", "mean"),
    [((64, 128, 768), 768, 0.0), ((512, 256), 256, 1e3), ((5, 3, 10), (3, 10), 0.0)],
)
@pytest.mark.slow
def test_jitted_gradients_match_float64_torch(shape, normalized_shape, mean):
    torch = pytest.importorskip("torch")
    layer = random_layer(RMSNorm, normalized_shape)
    x = random_input(shape, mean=mean)
    cotangent = random_input(shape, seed=7)

    @jax.jit
    def grads(x, gamma):
        def loss(x, gamma):
            return jnp.sum(eqx.tree_at(lambda m: m.gamma, layer, gamma)(x) * cotangent)

        return jax.grad(loss, argnums=(0, 1))(x, gamma)

    ours = grads(x, layer.gamma)
    tx, tg = (torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (x, layer.gamma))
    y = torch.nn.functional.rms_norm(tx, layer.normalized_shape, tg, layer.epsilon)
    (y * torch.tensor(np.asarray(cotangent, np.float64))).sum().backward()
    for got, want, name in zip(ours, [tx.grad.numpy(), tg.grad.numpy()], ["dx", "dgamma"]):
        error = max_relative_error(got, want)
        # float32 sums over up to 1e6 terms: relative error stays well under 1e-3
        assert error < 1e-3, (name, error)


def test_batched_equals_vmap_and_jit():
    layer = random_layer(RMSNorm, 10, use_bias=True)
    x = random_input((20, 5, 10))
    y = layer(x)
    np.testing.assert_allclose(jax.vmap(jax.vmap(layer))(x), y, atol=1e-6)
    np.testing.assert_allclose(eqx.filter_jit(layer)(x), y, atol=1e-6)


def test_mask_drops_elements_from_the_mean_square():
    layer = random_layer(RMSNorm, 16, use_bias=True)
    x = random_input((6, 16), mean=1.0)
    mask = jax.random.bernoulli(jax.random.key(3), 0.6, (6, 16)).at[2].set(False)
    y = jax.jit(lambda x, m: layer(x, mask=m))(x, mask)
    expected = reference.rms_norm(x, 1, layer.gamma, layer.beta, layer.epsilon, np.asarray(mask))
    np.testing.assert_allclose(y, expected, atol=TOL[jnp.float32])
    np.testing.assert_array_equal(y[2], layer.beta)


def test_immutable_and_only_parameters_are_leaves():
    layer = RMSNorm((3, 4), use_bias=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.gamma = jnp.zeros((3, 4))
    assert [a.shape for a in jax.tree_util.tree_leaves(layer)] == [(3, 4), (3, 4)]
    assert jax.tree_util.tree_leaves(RMSNorm(3, elementwise_affine=False)) == []
    assert "RMSNorm(" in repr(layer) and "gamma=f32[3,4]" in repr(layer)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(normalized_shape=0), ValueError, r"`normalized_shape` must be a positive int"),
        (dict(normalized_shape=(4, -1)), ValueError, r"`normalized_shape`.*got \(4, -1\)"),
        (dict(normalized_shape=4, epsilon=-1.0), ValueError, r"`epsilon` must be .*-1.0"),
        (
            dict(normalized_shape=4, scale_initializer=np.ones(5)),
            ValueError,
            r"`scale_initializer` is an array of shape \(5,\).*shape \(4,\)",
        ),
        (
            dict(normalized_shape=4, use_bias=True, bias_initializer=np.ones((2, 2))),
            ValueError,
            r"`bias_initializer` is an array of shape \(2, 2\).*shape \(4,\)",
        ),
        (dict(normalized_shape=4, dtype=jnp.int8), TypeError, r"`dtype` must be a floating"),
    ],
)
def test_bad_construction_is_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        RMSNorm(**kwargs)


@pytest.mark.parametrize(
    ("x", "kwargs", "error", "match"),
    [
        (
            jnp.zeros((3, 11)),
            {},
            ValueError,
            r"RMSNorm with normalized_shape=\(10,\) expects an input `x` whose last 1 axes "
            r"are \(10,\), got x of shape \(3, 11\)",
        ),
        (jnp.zeros((3, 10), jnp.int32), {}, TypeError, r"RMSNorm expects a floating-point"),
        (jnp.zeros((3, 10), bool), {}, TypeError, r"got dtype bool"),
        (jnp.zeros((3, 10)), {"mask": jnp.ones((3, 10))}, TypeError, r"`mask` must be boolean"),
        (
            jnp.zeros((3, 10)),
            {"mask": jnp.ones((3, 2), bool)},
            ValueError,
            r"RMSNorm: `mask` must have the rank of `x`.*mask has shape \(3, 2\)",
        ),
    ],
)
def test_bad_call_is_a_clear_error(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        RMSNorm(10)(x, **kwargs)
