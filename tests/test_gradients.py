"""LayerNorm/RMSNorm gradients, both implementations, against float64 and finite differences.

The XLA path's derivative is hand-written (a custom_jvp) and the kernel's is its own
primitives, so both are checked against an independent float64 formula; the float64
finite-difference and Hessian tests run the XLA path (the kernel takes float32/bf16 only;
tests/test_cpu_kernel.py checks its transformations).

XLA:CPU 0.10.2 miscompiles the jitted gradient of one ordinary LayerNorm op order at
(64, 128, 768) (errors up to 0.8, right without jit), so every gradient here is jitted and
compared with an independent float64 NumPy formula, never with itself.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import existing_initializers, max_relative_error
from jax.test_util import check_grads

from eqx_norm import LayerNorm, RMSNorm


def normalize(x, axes, gamma, beta, *, epsilon, center, mask):
    """The plain two-pass formula in jnp, differentiated by plain autodiff: an independent
    derivation of the library's hand-written derivative."""
    del mask
    mean = jnp.mean(x, axis=axes, keepdims=True) if center else 0
    var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + epsilon)
    y = y if gamma is None else y * gamma.reshape((1,) * (x.ndim - gamma.ndim) + gamma.shape)
    return y if beta is None else y + beta.reshape((1,) * (x.ndim - beta.ndim) + beta.shape)


IMPLEMENTATIONS = ["xla", "kernel"]


def reference_vjp(x, gamma, beta, dy, ndim, epsilon, center=True):
    """y and the gradients of sum(y * dy) wrt (x, gamma, beta), in float64, by formula."""
    x, dy = (np.asarray(np.asarray(a, np.float32), np.float64) for a in (x, dy))
    gamma = np.asarray(gamma, np.float64)
    shape = x.shape
    rows = x.reshape(-1, gamma.size)
    dy, gamma = dy.reshape(rows.shape), gamma.reshape(-1)
    centered = rows - rows.mean(1, keepdims=True) if center else rows
    rstd = 1 / np.sqrt((centered**2).mean(1, keepdims=True) + epsilon)
    x_hat = centered * rstd
    v = dy * gamma
    inner = v - x_hat * (v * x_hat).mean(1, keepdims=True)
    if center:
        inner = inner - v.mean(1, keepdims=True)
    y = x_hat * gamma + (0 if beta is None else np.asarray(beta, np.float64).reshape(-1))
    return (
        y.reshape(shape),
        (rstd * inner).reshape(shape),
        (dy * x_hat).sum(0).reshape(np.shape(gamma)),
        dy.sum(0),
    )


@jax.jit
def apply(layer, x):
    return layer(x)


def jitted_vjp(layer, x, dy):
    def loss(layer, x):
        return jnp.sum(layer(x).astype(jnp.float32) * dy.astype(jnp.float32))

    return jax.jit(jax.value_and_grad(lambda x, layer: loss(layer, x), argnums=(0, 1)))(x, layer)


# (shape, normalized ndim, dtype, family); the second is the shape of XLA's miscompile.
LARGE_CASES = [
    ((8192, 1024), 1, jnp.float32, LayerNorm),
    ((64, 128, 768), 1, jnp.float32, LayerNorm),
    ((32, 28, 28, 256), 3, jnp.float32, LayerNorm),
    ((64, 128, 768), 1, jnp.bfloat16, LayerNorm),
    ((64, 128, 768), 1, jnp.float32, RMSNorm),
]


@pytest.mark.slow
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("shape", "ndim", "dtype", "family"), LARGE_CASES)
def test_jitted_gradients_match_float64_at_benchmark_sizes(
    shape, ndim, dtype, family, implementation
):
    key_x, key_dy, key_g, key_b = jax.random.split(jax.random.key(0), 4)
    normalized = shape[len(shape) - ndim :]
    x = (3 + 2 * jax.random.normal(key_x, shape)).astype(dtype)
    dy = jax.random.normal(key_dy, shape).astype(dtype)
    gamma = 1 + 0.5 * jax.random.normal(key_g, normalized)
    beta = 0.5 * jax.random.normal(key_b, normalized)
    inits = existing_initializers(family, gamma, beta, {})
    layer = family(normalized, 1e-5, **inits, implementation=implementation)
    center = family is LayerNorm
    beta = layer.beta  # RMSNorm has none by default
    y_ref, dx_ref, dgamma_ref, dbeta_ref = reference_vjp(x, gamma, beta, dy, ndim, 1e-5, center)
    _, (dx, grads) = jitted_vjp(layer, x, dy)
    y = apply(layer, x)
    # float32: rounding of a D-term row sum and an R-term column sum, ~1e-6 relative;
    # bf16: y and dx are returned in bf16 (relative step 2**-8), parameters stay float32.
    tol = 1e-4 if dtype == jnp.float32 else 1e-2
    assert y.dtype == dtype and dx.dtype == dtype
    assert max_relative_error(y, y_ref) < tol
    assert max_relative_error(dx, dx_ref) < tol
    assert max_relative_error(grads.gamma, dgamma_ref) < 1e-4
    if grads.beta is not None:
        assert max_relative_error(grads.beta, dbeta_ref) < 1e-4


# (family, normalized_shape, epsilon, options): the fast path's variants
SMALL_LAYERS = [
    pytest.param(LayerNorm, (5,), 1e-5, {}, id="ln"),
    pytest.param(LayerNorm, (4, 5), 1e-3, {}, id="ln-2-axes"),
    pytest.param(LayerNorm, (5,), 1e-5, {"zero_centered_scale": True}, id="ln-zero-centered"),
    pytest.param(LayerNorm, (5,), 1e-5, {"use_bias": False}, id="ln-no-beta"),
    pytest.param(LayerNorm, (5,), 1e-5, {"use_scale": False}, id="ln-no-gamma"),
    pytest.param(RMSNorm, (5,), 1e-5, {}, id="rms"),
    pytest.param(RMSNorm, (4, 5), 1e-5, {"use_bias": True}, id="rms-beta"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "normalized", "epsilon", "options"), SMALL_LAYERS)
def test_second_order_finite_differences(family, normalized, epsilon, options, x64):
    key_x, key_g, key_b = jax.random.split(jax.random.key(1), 3)
    x = 1.5 + jax.random.normal(key_x, (3, 4, 5), jnp.float64)
    gamma = 1 + 0.3 * jax.random.normal(key_g, normalized, jnp.float64)
    beta = 0.3 * jax.random.normal(key_b, normalized, jnp.float64)
    inits = existing_initializers(family, gamma, beta, options)
    layer = family(normalized, epsilon, **inits, param_dtype=jnp.float64, **options)
    names = [n for n in ("gamma", "beta") if getattr(layer, n) is not None]
    params = tuple(getattr(layer, n) for n in names)

    def f(x, *params):
        where = lambda m: tuple(getattr(m, n) for n in names)  # noqa: E731
        return jnp.sin(apply(eqx.tree_at(where, layer, params), x))

    # float64: central differences with eps=1e-4 are accurate to ~1e-7; check_grads' default
    # tolerance for float64 (1e-5 with its eps scaling) leaves room for that.
    check_grads(f, (x, *params), order=2, modes=("fwd", "rev"))


@pytest.mark.slow
def test_long_rows_match_plain_autodiff_to_second_order(x64):
    """The dot form (few rows of >= 16384): finite differences, and Hessian-vector
    products against plain autodiff of the unfused path."""
    key_x, key_g, key_t, key_u = jax.random.split(jax.random.key(2), 4)
    x = 2 + jax.random.normal(key_x, (2, 16384), jnp.float64)
    gamma = 1 + 0.3 * jax.random.normal(key_g, (16384,), jnp.float64)
    tangents = (jax.random.normal(key_t, x.shape, jnp.float64), jax.random.normal(key_u, (16384,)))

    def fast(x, gamma):
        layer = LayerNorm(16384, scale_initializer=gamma, param_dtype=jnp.float64)
        return jnp.sum(jnp.sin(layer(x)))

    def plain(x, gamma):  # plain autodiff of the general path: an independent derivation
        y = normalize(x, (1,), gamma, None, epsilon=1e-5, center=True, mask=None)
        return jnp.sum(jnp.sin(y))

    check_grads(jax.jit(fast), (x, gamma), order=2, modes=("fwd", "rev"))
    fast_hvp = jax.jvp(jax.jit(jax.grad(fast, argnums=(0, 1))), (x, gamma), tangents)
    plain_hvp = jax.jvp(jax.grad(plain, argnums=(0, 1)), (x, gamma), tangents)
    for actual, expected in zip(jax.tree.leaves(fast_hvp), jax.tree.leaves(plain_hvp)):
        # float64, two derivations of the same function: agreement to ~1e-15 relative
        np.testing.assert_allclose(actual, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
def test_hessian_and_jvp_apply_directly_to_the_layer(x64):
    key_x, key_t = jax.random.split(jax.random.key(3))
    x = jax.random.normal(key_x, (2, 6), jnp.float64)
    tangent = jax.random.normal(key_t, (2, 6), jnp.float64)
    layer = LayerNorm(6, scale_initializer=jnp.linspace(0.5, 1.5, 6))

    def plain_layer(x):  # the general path under plain autodiff: an independent derivation
        gamma, beta = (p.astype(x.dtype) for p in (layer.gamma, layer.beta))
        return normalize(x, (1,), gamma, beta, epsilon=1e-5, center=True, mask=None)

    def loss(f):
        return lambda x: jnp.sum(jnp.sin(f(x)))

    # float64 throughout: both sides agree to rounding
    np.testing.assert_allclose(
        jax.hessian(loss(layer))(x), jax.hessian(loss(plain_layer))(x), atol=1e-10
    )
    primal, out = jax.jvp(layer, (x,), (tangent,))
    expected_primal, expected = jax.jvp(plain_layer, (x,), (tangent,))
    np.testing.assert_allclose(out, expected, atol=1e-12)
    np.testing.assert_allclose(primal, expected_primal, atol=1e-12)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_mean_1e4_meets_the_accuracy_bars(implementation):
    """float32 inputs at mean 1e4: y within 2e-3 of float64, gradients within 1e-3 (the
    kernel's targets: y within 1e-5, gradients within 1e-5 relative)."""
    key_x, key_dy, key_g = jax.random.split(jax.random.key(4), 3)
    x = 1e4 + jax.random.normal(key_x, (512, 1024))
    dy = jax.random.normal(key_dy, (512, 1024))
    gamma = 1 + 0.1 * jax.random.normal(key_g, (1024,))
    layer = LayerNorm(1024, scale_initializer=gamma, implementation=implementation)
    y_ref, dx_ref, dgamma_ref, dbeta_ref = reference_vjp(x, gamma, None, dy, 1, 1e-5)
    _, (dx, grads) = jitted_vjp(layer, x, dy)
    y_bar, grad_bar = (2e-3, 1e-3) if implementation == "xla" else (1e-5, 1e-5)
    assert np.max(np.abs(np.asarray(apply(layer, x), np.float64) - y_ref)) < y_bar
    assert max_relative_error(dx, dx_ref) < grad_bar
    assert max_relative_error(grads.gamma, dgamma_ref) < grad_bar
    assert max_relative_error(grads.beta, dbeta_ref) < grad_bar


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("epsilon", [1e-5, 0.0])
@pytest.mark.parametrize("shape", [(3, 8), (2, 3, 16384)])
def test_constant_input_gives_beta_exactly_with_finite_gradients(shape, epsilon, implementation):
    beta = jnp.linspace(-1.0, 1.0, shape[-1])
    layer = LayerNorm(shape[-1], epsilon, scale_initializer=jnp.full(shape[-1], 2.0),
                      bias_initializer=beta, implementation=implementation)  # fmt: skip
    x = jnp.full(shape, 1e4 + 0.25)
    np.testing.assert_array_equal(apply(layer, x), jnp.broadcast_to(beta, shape))
    dx, grads = jax.jit(jax.grad(lambda x, m: jnp.sum(jnp.sin(m(x))), argnums=(0, 1)))(x, layer)
    for g in (dx, grads.gamma, grads.beta):
        assert np.isfinite(np.asarray(g)).all()
