"""Helpers shared by the per-family test files: seeded inputs, layers with non-trivial
parameters, and jitted gradients of ``sum(cotangent * layer(x))``."""

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def random_input(shape, seed=1, mean=0.0, std=1.0, dtype=jnp.float32):
    """``mean + std * N(0, 1)`` of ``shape``, seeded, cast to ``dtype``."""
    return (mean + std * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def random_trailing_layer(cls, normalized_shape, seed=0, **kwargs):
    """A LayerNorm/RMSNorm with gamma ~ 1 + 0.5 N and beta ~ 0.3 N (beta is used only where
    the layer has one), so that the affine step is tested too."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    keys = jax.random.split(jax.random.key(seed), 2)
    scale = 1.0 + 0.5 * jax.random.normal(keys[0], shape)
    bias = 0.3 * jax.random.normal(keys[1], shape)
    return cls(normalized_shape, **existing_initializers(cls, scale, bias, kwargs), **kwargs)


def existing_initializers(cls, scale, bias, kwargs):
    """``scale_initializer``/``bias_initializer`` for the parameters that ``cls(...,
    **kwargs)`` has: an initializer for a parameter switched off is an error."""
    defaults = inspect.signature(cls).parameters
    affine = kwargs.get("elementwise_affine", True)
    inits = {"scale_initializer": scale, "bias_initializer": bias}
    switches = {"scale_initializer": "use_scale", "bias_initializer": "use_bias"}
    return {
        argument: value
        for argument, value in inits.items()
        if affine and kwargs.get(switches[argument], defaults[switches[argument]].default)
    }


def jitted_gradients(layer, x, cotangent):
    """``(dx, dgamma, dbeta)`` of ``sum(cotangent * layer(x))``, jitted."""

    @jax.jit
    def grads(x, gamma, beta):
        def loss(x, gamma, beta):
            y = eqx.tree_at(lambda m: (m.gamma, m.beta), layer, (gamma, beta))(x)
            return jnp.sum(y * cotangent)

        return jax.grad(loss, argnums=(0, 1, 2))(x, gamma, beta)

    return grads(x, layer.gamma, layer.beta)


def max_relative_error(got, want):
    """``max|got - want| / max|want|`` in float64."""
    want = np.asarray(want, np.float64)
    return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
