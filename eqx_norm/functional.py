"""Normalization as pure functions of arrays and configuration.

The layers in :mod:`eqx_norm` call these; use them directly when you keep the parameters
yourself. Every function checks its arguments, computes statistics in at least float32
and returns an array of ``x``'s shape and (unless ``dtype`` is given) ``x``'s dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Array, Bool, Float

from ._core import (
    DTypeLike,
    canonical_shape,
    check_epsilon,
    check_floating,
    check_mask,
    check_parameter,
    check_trailing_shape,
    normalize,
    optional_dtype,
)

__all__ = ["layer_norm"]


def layer_norm(
    x: Float[Array, "*batch *normalized"],
    normalized_shape: int | Sequence[int],
    gamma: Float[Array, "*normalized"] | None = None,
    beta: Float[Array, "*normalized"] | None = None,
    *,
    epsilon: float = 1e-5,
    mask: Bool[Array, "..."] | None = None,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
) -> Float[Array, "*batch *normalized"]:
    r"""Layer normalization over the trailing ``normalized_shape`` axes of ``x``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Args:
        x: floating array of shape ``(*batch, *normalized_shape)``; ``batch`` may be empty.
        normalized_shape: the trailing axes to normalize over, an int or a sequence.
        gamma: scale of shape ``normalized_shape``, or None for no scale.
        beta: offset of shape ``normalized_shape``, or None for no offset.
        epsilon: added to the variance, ``>= 0``.
        mask: optional boolean array of x's rank (axes of size 1 broadcast); False elements
            take no part in the statistics and their output is ``beta`` (0 without beta).
        zero_centered_scale: use ``1 + gamma`` as the scale.
        dtype: output dtype; default ``x.dtype``.

    Returns:
        An array of ``x``'s shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm.functional import layer_norm
        >>> x = jax.random.normal(jax.random.key(0), (20, 5, 10))
        >>> y = layer_norm(x, 10, jnp.ones(10), jnp.zeros(10))
        >>> bool(jnp.allclose(y.mean(-1), 0, atol=1e-6))
        True

    References:
        Ba, Kiros and Hinton, "Layer Normalization", 2016. arXiv:1607.06450.
    """
    name = "layer_norm"
    shape = canonical_shape(normalized_shape, "normalized_shape")
    x = check_floating(x, name)
    axes = check_trailing_shape(x.shape, shape, name)
    check_parameter(gamma, shape, "gamma", name)
    check_parameter(beta, shape, "beta", name)
    return normalize(
        x,
        axes,
        gamma,
        beta,
        epsilon=check_epsilon(epsilon),
        mask=check_mask(mask, x.shape, name),
        zero_centered_scale=zero_centered_scale,
        dtype=optional_dtype(dtype, "dtype"),
    )
