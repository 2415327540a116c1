"""DyT (Dynamic Tanh): values against float64 NumPy, gradients against finite differences,
the library's parameter conventions and LayerNorm's call forms, under jit, vmap and grad.

Tolerances: float32 within 1e-6 of float64 relative to the largest value (tanh and two
products: a few ulps); bfloat16/float16 outputs computed in float32 and rounded once, so
within one ulp of their dtype (2**-8 and 2**-11 relative).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_layer_norm_call_forms, max_relative_error, random_input
from jax.test_util import check_grads

from eqx_norm import DyT, Normal, functional

TOLERANCE = {jnp.float32: 1e-6, jnp.bfloat16: 2**-8, jnp.float16: 2**-11}


def reference_dyt(x, alpha, gamma=None, beta=None):
    """gamma * tanh(alpha * x) + beta in float64."""
    y = np.tanh(float(alpha) * np.asarray(x, np.float64))
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64)
    if beta is not None:
        y = y + np.asarray(beta, np.float64)
    return y


def random_dyt(shape, alpha_init=0.8, **kwargs):
    shape = (shape,) if isinstance(shape, int) else shape
    return DyT(
        shape,
        alpha_init=alpha_init,
        scale_initializer=random_input(shape, seed=11, mean=1.0, std=0.5),
        bias_initializer=random_input(shape, seed=12, std=0.3),
        **kwargs,
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
    ("shape", "normalized"), [((4, 16), 16), ((2, 3, 4, 5), (4, 5)), ((7,), 7)]
)
@pytest.mark.slow
def test_matches_float64(shape, normalized, dtype):
    layer = random_dyt(normalized)
    x = random_input(shape, seed=1, std=2.0, dtype=dtype)
    y = layer(x)
    assert (y.shape, y.dtype) == (x.shape, dtype)
    want = reference_dyt(x, layer.alpha, layer.gamma, layer.beta)
    assert max_relative_error(y, want) <= TOLERANCE[dtype]


def test_defaults_and_parameters():
    layer = DyT(8)
    assert layer.alpha.shape == () and layer.alpha.dtype == jnp.float32
    assert float(layer.alpha) == 0.5
    np.testing.assert_array_equal(layer.gamma, np.ones(8))
    np.testing.assert_array_equal(layer.beta, np.zeros(8))
    assert layer.normalized_shape == (8,) and layer.elementwise_affine
    assert len(jax.tree.leaves(layer)) == 3  # alpha, gamma, beta are the learnable leaves
    half = DyT((2, 4), alpha_init=0.25, param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    assert half.gamma.shape == (2, 4)
    bare = DyT(8, elementwise_affine=False)
    assert bare.gamma is None and bare.beta is None and not bare.elementwise_affine
    x = random_input((3, 8))
    np.testing.assert_allclose(bare(x), np.tanh(0.5 * np.asarray(x, np.float64)), rtol=1e-6)
    assert DyT(8, use_bias=False).beta is None and DyT(8, use_scale=False).gamma is None
    random_gamma = DyT(8, scale_initializer=Normal(0.1), key=jax.random.key(0)).gamma
    assert float(jnp.std(random_gamma)) > 0
    # dtype: the output's
    assert DyT(8, dtype=jnp.bfloat16)(x).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"alpha_init": float("nan")}, ValueError, r"`alpha_init` must be finite, got nan"),
        ({"alpha_init": "0.5"}, TypeError, r"`alpha_init` must be a real number, got str"),
        ({"alpha_init": True}, TypeError, r"`alpha_init` must be a real number, got bool"),
        (
            {"use_bias": False, "bias_initializer": 1.0},
            ValueError,
            r"Cannot set `bias_initializer` if `use_bias=False`",
        ),
        (
            {"elementwise_affine": False, "scale_initializer": 1.0},
            ValueError,
            r"Cannot set `scale_initializer` if `elementwise_affine=False`",
        ),
        ({"dtype": jnp.int32}, TypeError, r"dtype"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        DyT(8, **kwargs)


def test_functional_errors():
    x = jnp.zeros((2, 8))
    with pytest.raises(ValueError, match=r"dyt: `alpha` must have shape \(\), got \(8,\)"):
        functional.dyt(x, 8, jnp.ones(8))
    with pytest.raises(TypeError, match=r"dyt: `alpha` must be a floating scalar array, got None"):
        functional.dyt(x, 8, None)
    with pytest.raises(ValueError, match=r"gamma"):
        functional.dyt(x, 8, jnp.asarray(0.5), jnp.ones(4))
    with pytest.raises(ValueError, match=r"`residual` must have x's shape"):
        functional.dyt(x, 8, jnp.asarray(0.5), residual=jnp.zeros(8))
    with pytest.raises(TypeError, match=r"floating"):
        DyT(8)(jnp.zeros((2, 8), jnp.int32))


def test_call_forms_match_layer_norm():
    layer = random_dyt(16)
    x = random_input((4, 16))
    assert_layer_norm_call_forms(layer, x)
    y = layer(x)
    np.testing.assert_array_equal(functional.dyt(x, 16, layer.alpha, layer.gamma, layer.beta), y)
    # residual: (y, h) with h = x + r in float32, stored in r's dtype
    r = random_input((4, 16), seed=2, mean=1.0)
    (y_r, h), _ = layer(x.astype(jnp.bfloat16), "state", residual=r)
    assert (y_r.dtype, h.dtype) == (jnp.bfloat16, jnp.float32)
    np.testing.assert_allclose(h, x.astype(jnp.bfloat16).astype(jnp.float32) + r, rtol=1e-6)
    assert max_relative_error(y_r, reference_dyt(h, layer.alpha, layer.gamma, layer.beta)) <= 2**-8


def test_jit_vmap_grad():
    layer = random_dyt(16)
    x = random_input((5, 16), std=2.0)
    y = layer(x)
    np.testing.assert_allclose(eqx.filter_jit(lambda m, x: m(x))(layer, x), y, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(layer)(x), y, rtol=1e-6)
    grads = eqx.filter_jit(eqx.filter_grad(lambda m, x: jnp.sum(m(x) ** 2)))(layer, x)
    assert grads.alpha.shape == () and grads.gamma.shape == (16,) and grads.beta.shape == (16,)
    # against the float64 derivative: d/dalpha sum(y^2) = sum(2 y gamma x (1 - tanh^2))
    x64, a = np.asarray(x, np.float64), float(layer.alpha)
    g64, b64 = np.asarray(layer.gamma, np.float64), np.asarray(layer.beta, np.float64)
    t = np.tanh(a * x64)
    y64 = g64 * t + b64
    np.testing.assert_allclose(
        float(grads.alpha), np.sum(2 * y64 * g64 * x64 * (1 - t**2)), rtol=1e-5
    )
    np.testing.assert_allclose(grads.gamma, np.sum(2 * y64 * t, axis=0), rtol=1e-5)
    np.testing.assert_allclose(grads.beta, np.sum(2 * y64, axis=0), rtol=1e-5)


@pytest.mark.slow
def test_gradients_match_finite_differences(x64):
    x = random_input((3, 6), seed=1, std=2.0, dtype=jnp.float64)
    r = random_input((3, 6), seed=2, dtype=jnp.float64)
    alpha = jnp.asarray(0.7, jnp.float64)
    gamma = random_input((6,), seed=3, mean=1.0, dtype=jnp.float64)
    beta = random_input((6,), seed=4, dtype=jnp.float64)

    def plain(x, alpha, gamma, beta):
        return functional.dyt(x, 6, alpha, gamma, beta)

    def with_residual(x, r, alpha, gamma, beta):
        y, h = functional.dyt(x, 6, alpha, gamma, beta, residual=r)
        return jnp.sin(y) + jnp.cos(h)

    check_grads(plain, (x, alpha, gamma, beta), order=2, modes=["fwd", "rev"])
    check_grads(with_residual, (x, r, alpha, gamma, beta), order=1, modes=["fwd", "rev"])
