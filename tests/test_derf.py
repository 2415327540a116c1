"""Derf (Dynamic erf): values against float64 SciPy, gradients against finite differences
and the float64 derivative, the paper's defaults, DyT's parameter conventions and call
forms, under jit, vmap and grad.

Tolerances: float32 within 1e-6 of float64 relative to the largest value (an erf, one
add and two products: a few ulps); bfloat16/float16 outputs computed in float32 and rounded
once, so within one ulp of their dtype (2**-8 and 2**-11 relative).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_layer_norm_call_forms, max_relative_error, random_input
from jax.test_util import check_grads
from scipy import special

from eqx_norm import Derf, functional

TOLERANCE = {jnp.float32: 1e-6, jnp.bfloat16: 2**-8, jnp.float16: 2**-11}


def reference_derf(x, alpha, shift, gamma=None, beta=None):
    """gamma * erf(alpha * x + shift) + beta in float64 (SciPy's erf)."""
    y = special.erf(float(alpha) * np.asarray(x, np.float64) + float(shift))
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64)
    if beta is not None:
        y = y + np.asarray(beta, np.float64)
    return y


def random_derf(shape, **kwargs):
    shape = (shape,) if isinstance(shape, int) else shape
    return Derf(
        shape,
        alpha_init=0.8,
        shift_init=-0.3,
        scale_initializer=random_input(shape, seed=11, mean=1.0, std=0.5),
        bias_initializer=random_input(shape, seed=12, std=0.3),
        **kwargs,
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize(
    ("shape", "normalized"), [((4, 16), 16), ((2, 3, 4, 5), (4, 5)), ((64, 384), 384)]
)
@pytest.mark.slow  # nine compiles: the quick loop skips it, CI runs it
def test_matches_float64(shape, normalized, dtype):
    layer = random_derf(normalized)
    x = random_input(shape, seed=1, std=2.0, dtype=dtype)
    y = layer(x)
    assert (y.shape, y.dtype) == (x.shape, dtype)
    want = reference_derf(x, layer.alpha, layer.shift, layer.gamma, layer.beta)
    assert max_relative_error(y, want) <= TOLERANCE[dtype]


def test_the_papers_defaults_and_parameters():
    layer = Derf(8)
    assert (float(layer.alpha), float(layer.shift)) == (0.5, 0.0)  # arXiv:2512.10938
    assert layer.alpha.shape == layer.shift.shape == ()
    assert layer.alpha.dtype == layer.shift.dtype == jnp.float32
    np.testing.assert_array_equal(layer.gamma, np.ones(8))
    np.testing.assert_array_equal(layer.beta, np.zeros(8))
    assert len(jax.tree.leaves(layer)) == 4  # alpha, shift, gamma, beta are learnable
    half = Derf((2, 4), shift_init=0.25, param_dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    bare = Derf(8, elementwise_affine=False, shift_init=0.5)
    assert bare.gamma is None and bare.beta is None and not bare.elementwise_affine
    x = random_input((3, 8))
    np.testing.assert_allclose(bare(x), reference_derf(x, 0.5, 0.5), rtol=1e-6)
    assert Derf(8, use_bias=False).beta is None and Derf(8, use_scale=False).gamma is None
    assert Derf(8, dtype=jnp.bfloat16)(x).dtype == jnp.bfloat16


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"shift_init": float("inf")}, ValueError, r"Derf: `shift_init` must be finite, got inf"),
        ({"shift_init": "0"}, TypeError, r"Derf: `shift_init` must be a real number, got str"),
        ({"alpha_init": None}, TypeError, r"Derf: `alpha_init` must be a real number"),
        ({"eps": 1e-5}, TypeError, r"Derf got an unexpected keyword argument `eps`"),
        (
            {"elementwise_affine": False, "use_scale": True},
            ValueError,
            r"`elementwise_affine=False`.*`use_scale=True`",
        ),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        Derf(8, **kwargs)


def test_functional_errors():
    x = jnp.zeros((2, 8))
    alpha = jnp.asarray(0.5)
    with pytest.raises(TypeError, match=r"derf: `shift` must be a floating scalar array, got None"):
        functional.derf(x, 8, alpha, None)
    with pytest.raises(ValueError, match=r"derf: `shift` must have shape \(\), got \(8,\)"):
        functional.derf(x, 8, alpha, jnp.zeros(8))
    with pytest.raises(ValueError, match=r"gamma"):
        functional.derf(x, 8, alpha, alpha, jnp.ones(4))
    with pytest.raises(TypeError, match=r"floating"):
        Derf(8)(jnp.zeros((2, 8), jnp.int32))


def test_call_forms():
    layer = random_derf(16)
    x = random_input((4, 16))
    assert_layer_norm_call_forms(layer, x)
    y = layer(x)
    args = (layer.alpha, layer.shift, layer.gamma, layer.beta)
    np.testing.assert_array_equal(functional.derf(x, 16, *args), y)
    r = random_input((4, 16), seed=2, mean=1.0)
    (y_r, h), _ = layer(x.astype(jnp.bfloat16), "state", residual=r)
    assert (y_r.dtype, h.dtype) == (jnp.bfloat16, jnp.float32)
    assert max_relative_error(y_r, reference_derf(h, *args)) <= 2**-8


def test_jit_vmap_grad_against_the_float64_derivative():
    layer = random_derf(16)
    x = random_input((5, 16), std=2.0)
    y = layer(x)
    np.testing.assert_allclose(eqx.filter_jit(lambda m, x: m(x))(layer, x), y, rtol=1e-6)
    np.testing.assert_allclose(jax.vmap(layer)(x), y, rtol=1e-6)
    grads = eqx.filter_jit(eqx.filter_grad(lambda m, x: jnp.sum(m(x) ** 2)))(layer, x)
    # d erf(u)/du = 2 / sqrt(pi) exp(-u^2), u = alpha x + shift
    x64, a, s = np.asarray(x, np.float64), float(layer.alpha), float(layer.shift)
    g64, b64 = np.asarray(layer.gamma, np.float64), np.asarray(layer.beta, np.float64)
    u = a * x64 + s
    e = special.erf(u)
    y64 = g64 * e + b64
    outer = 2 * y64 * g64 * 2 / np.sqrt(np.pi) * np.exp(-(u**2))
    np.testing.assert_allclose(float(grads.alpha), np.sum(outer * x64), rtol=1e-5)
    np.testing.assert_allclose(float(grads.shift), np.sum(outer), rtol=1e-5)
    np.testing.assert_allclose(grads.gamma, np.sum(2 * y64 * e, axis=0), rtol=1e-5)
    np.testing.assert_allclose(grads.beta, np.sum(2 * y64, axis=0), rtol=1e-5)


@pytest.mark.slow  # second-order finite differences: long
def test_gradients_match_finite_differences(x64):
    x = random_input((3, 6), seed=1, std=2.0, dtype=jnp.float64)
    r = random_input((3, 6), seed=2, dtype=jnp.float64)
    alpha, shift = jnp.asarray(0.7, jnp.float64), jnp.asarray(-0.2, jnp.float64)
    gamma = random_input((6,), seed=3, mean=1.0, dtype=jnp.float64)
    beta = random_input((6,), seed=4, dtype=jnp.float64)

    def plain(x, alpha, shift, gamma, beta):
        return functional.derf(x, 6, alpha, shift, gamma, beta)

    def with_residual(x, r, alpha, shift, gamma, beta):
        y, h = functional.derf(x, 6, alpha, shift, gamma, beta, residual=r)
        return jnp.sin(y) + jnp.cos(h)

    check_grads(plain, (x, alpha, shift, gamma, beta), order=2, modes=["fwd", "rev"])
    check_grads(with_residual, (x, r, alpha, shift, gamma, beta), order=1, modes=["fwd", "rev"])
