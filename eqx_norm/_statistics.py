"""The statistics every normalization computes: the mean and variance over some axes.

One copy for every layer and every pure-JAX path (the fast LayerNorm gradient included):

* two-pass: the variance is ``E[(x - E[x])^2]``, never ``E[x^2] - E[x]^2``;
* the mean is taken after subtracting the first element of each row (without a mask), so a
  constant row has exactly its value as mean and 0 as variance, and a mean of 1e4 loses no
  precision; with a mask, a first masked mean plays that part;
* computed in at least float32 (:func:`compute_dtype`); the caller upcasts ``x``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float

from ._checks import DTypeLike


def compute_dtype(dtype: DTypeLike) -> np.dtype:
    """The dtype statistics are computed in: at least float32 (bf16/fp16 are upcast)."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def axis_mean(a: Array, axes: tuple[int, ...], *, dots: bool = False) -> Array:
    """Mean of ``a`` over ``axes``, keeping them as size 1.

    ``dots=True`` (``a`` of shape ``(rows, D)``, ``axes == (1,)``) computes it as ``a @ ones``,
    which XLA:CPU runs far faster than a reduction on few, very long rows.
    """
    if dots:
        ones = jnp.ones((a.shape[1], 1), a.dtype)
        return jnp.matmul(a, ones, precision=lax.Precision.HIGHEST) / a.shape[1]
    return jnp.mean(a, axis=axes, keepdims=True)


def moments(
    x: Float[Array, "*shape"],
    axes: tuple[int, ...],
    *,
    center: bool = True,
    mask: Bool[Array, "*shape"] | None = None,
    dots: bool = False,
) -> tuple[Array | None, Array]:
    """``(mean, var)`` of ``x`` over ``axes`` (kept as size-1 axes), two-pass.

    With ``center=False`` the mean is None and ``var`` is the mean square ``E[x^2]``
    (RMSNorm). Where ``mask`` is False an element takes no part; a fully masked row has
    mean 0 and variance 0.

    Example:
        >>> import jax.numpy as jnp
        >>> mean, var = moments(jnp.array([[1.0, 2.0, 3.0]]), (1,))
        >>> float(mean[0, 0]), float(var[0, 0])
        (2.0, 0.6666666865348816)
    """
    if mask is None:
        mean = None
        if center:
            shift = x[tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))]
            mean = shift + axis_mean(x - shift, axes, dots=dots)
            x = x - mean
        return mean, axis_mean(jnp.square(x), axes, dots=dots)
    count = jnp.maximum(jnp.sum(mask, axis=axes, keepdims=True, dtype=x.dtype), 1)

    def masked_mean(values: Array) -> Array:
        return jnp.sum(jnp.where(mask, values, 0), axis=axes, keepdims=True) / count

    mean = None
    if center:
        shift = masked_mean(x)  # a second pass removes its rounding error
        mean = shift + masked_mean(x - shift)
        x = x - mean
    return mean, masked_mean(jnp.square(x))


def inverse_std(var: Array, epsilon: float) -> Array:
    """``rsqrt(var + epsilon)``; with ``epsilon == 0`` a zero variance gives 0, not inf.

    A row of zero variance is constant, so its centred values are exactly 0 and its output
    is ``0 * 0 = 0`` rather than ``0 * inf = NaN``.
    """
    if epsilon > 0:
        return lax.rsqrt(var + epsilon)
    positive = var > 0
    return jnp.where(positive, lax.rsqrt(jnp.where(positive, var, 1)), 0)


def standardize(
    x: Float[Array, "*shape"],
    axes: tuple[int, ...],
    *,
    epsilon: float,
    center: bool = True,
    mask: Bool[Array, "*shape"] | None = None,
) -> Float[Array, "*shape"]:
    """``(x - E[x]) * rsqrt(Var[x] + epsilon)`` over ``axes`` (``x * rsqrt(E[x^2] + eps)``
    with ``center=False``); 0 where ``mask`` is False.

    Example:
        >>> import jax.numpy as jnp
        >>> standardize(jnp.array([[1.0, 3.0]]), (1,), epsilon=0.0)
        Array([[-1.,  1.]], dtype=float32)
    """
    mean, var = moments(x, axes, center=center, mask=mask)
    y = (x if mean is None else x - mean) * inverse_std(var, epsilon)
    return y if mask is None else jnp.where(mask, y, 0)
