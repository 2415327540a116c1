"""The statistics every normalization computes: the mean and variance over some axes.

One copy for every layer and every pure-JAX path (the fast LayerNorm gradient included):

* two-pass: the variance is ``E[(x - E[x])^2]``, never ``E[x^2] - E[x]^2``;
* the mean is a first mean plus the mean of ``x`` minus it (its rounding error), so a
  constant row has 0 as variance and exactly ``beta`` as output, and a mean of 1e4 loses no
  precision; with a mask, both are masked means;
* computed in at least float32 (:func:`compute_dtype`); the caller upcasts ``x``.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float

from ._checks import DTypeLike


def compute_dtype(dtype: DTypeLike) -> np.dtype:
    """The dtype statistics are computed in: at least float32 (bf16/fp16 are upcast)."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def axis_mean(a: Array, axes: tuple[int, ...]) -> Array:
    """Mean of ``a`` over ``axes``, keeping them as size 1."""
    return jnp.mean(a, axis=axes, keepdims=True)


def moments(
    x: Float[Array, "*shape"],
    axes: tuple[int, ...],
    *,
    center: bool = True,
    mask: Bool[Array, "*shape"] | None = None,
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
    mean, centered = _center(x, axes, center=center, mask=mask)
    return mean, _mean(jnp.square(centered), axes, mask=mask)


def _center(
    x: Array, axes: tuple[int, ...], *, center: bool, mask: Array | None
) -> tuple[Array | None, Array]:
    """``(mean, x - mean)``; ``(None, x)`` with ``center=False``.

    Two means: a first one ``m`` of ``x``, then the mean ``d`` of ``x - m``, its rounding
    error. ``x - m`` is exact where ``x`` is close to ``m`` (Sterbenz), so ``(x - m) - d`` is
    the centred ``x`` to float32 precision at any mean (at a mean of 1e4 the first mean's
    rounding alone, 5e-4, would exceed the error of everything else), and a constant row
    gives exactly 0. Both reductions read ``x`` or ``x - m``, which XLA:CPU sums as fast as
    the plain formula's (a slice of ``x`` as the shift ran the forward at 2x its time).
    """
    if not center:
        return None, x
    # Any shift gives the same mean: no gradient flows through it. Each element is scaled
    # before the sum, so that values near float32's largest do not overflow it.
    shift = lax.stop_gradient(_mean(x, axes, mask=mask, scale_first=True))
    shifted = x - shift
    rounding = _mean(shifted, axes, mask=mask)
    return shift + rounding, shifted - rounding


def _mean(
    values: Array, axes: tuple[int, ...], *, mask: Array | None, scale_first: bool = False
) -> Array:
    """The mean over ``axes`` of the elements where ``mask`` is True (all without one);
    ``scale_first`` divides each element by the count before summing (no overflow)."""
    if mask is None:
        if not scale_first:
            return axis_mean(values, axes)
        count = math.prod(values.shape[a] for a in axes)
        return jnp.sum(values * (1.0 / count), axis=axes, keepdims=True)
    count = jnp.maximum(jnp.sum(mask, axis=axes, keepdims=True, dtype=values.dtype), 1)
    if scale_first:
        return jnp.sum(jnp.where(mask, values / count, 0), axis=axes, keepdims=True)
    return jnp.sum(jnp.where(mask, values, 0), axis=axes, keepdims=True) / count


def inverse_std(var: Array, epsilon: float) -> Array:
    """``rsqrt(var + epsilon)``; with ``epsilon == 0`` a zero variance gives 0, not inf.

    A row of zero variance is constant, so its centred values are exactly 0 and its output
    is ``0 * 0 = 0`` rather than ``0 * inf = NaN``. An infinite variance (the squares
    overflowed float32) gives NaN, not ``rsqrt(inf) = 0``, which would silently return
    ``offset``.
    """
    if epsilon > 0:
        rstd = lax.rsqrt(var + epsilon)
    else:
        positive = var > 0
        rstd = jnp.where(positive, lax.rsqrt(jnp.where(positive, var, 1)), 0)
    # inf - inf = NaN, else 0: an add, which XLA fuses where a select on (rows, 1) cost
    # 40 % of a (8192, 1024) forward and backward.
    return rstd + (var - var)


def centered_statistics(
    x: Float[Array, "*shape"],
    axes: tuple[int, ...],
    *,
    epsilon: float,
    center: bool = True,
    mask: Bool[Array, "*shape"] | None = None,
) -> tuple[Array, Array]:
    """``(x - E[x], rsqrt(Var[x] + epsilon))`` over ``axes`` (``x`` and the mean square with
    ``center=False``); the second kept as size-1 axes.

    With ``epsilon > 0`` an overflowed variance gives NaN (:func:`inverse_std`). With
    ``epsilon == 0`` the variance is taken of the centred values divided by their largest
    magnitude ``s`` and the result divided by ``s``, so spreads whose squares underflow
    (below about 1e-19) or overflow (above about 1e19) in float32 are still right; a
    constant row gives 0; a row whose answer is not a normal float32 gives NaN.
    """
    _, centered = _center(x, axes, center=center, mask=mask)
    if epsilon > 0:
        return centered, inverse_std(_mean(jnp.square(centered), axes, mask=mask), epsilon)
    magnitude = jnp.abs(centered) if mask is None else jnp.where(mask, jnp.abs(centered), 0)
    # The result does not depend on s: no gradient flows through it.
    s = lax.stop_gradient(jnp.max(magnitude, axis=axes, keepdims=True))
    nonconstant = s > 0
    scaled = jnp.square(centered / jnp.where(nonconstant, s, 1))
    var_scaled = _mean(scaled, axes, mask=mask)  # in [1/n, 1]
    rstd = lax.rsqrt(var_scaled) / jnp.where(nonconstant, s, 1)
    # s is NaN where the row holds a NaN (or inf - inf): NaN, not the constant row's 0.
    return centered, jnp.where(nonconstant, jnp.where(rstd > 0, rstd, jnp.nan), s * 0)


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
    centered, rstd = centered_statistics(x, axes, epsilon=epsilon, center=center, mask=mask)
    y = centered * rstd
    return y if mask is None else jnp.where(mask, y, 0)


def shifted_mean(
    x: Float[Array, "*shape"], axes: tuple[int, ...], *, mask: Bool[Array, "*shape"] | None = None
) -> tuple[Array, Array]:
    """``(mean, rounding)`` over ``axes`` (kept as size-1 axes): ``mean + rounding`` is the
    mean to about twice float32's precision, so ``(x - mean) - rounding`` is the centred
    ``x`` as accurately as ``(x - shift) - mean(x - shift)``.

    As in :func:`moments`, the mean is taken after subtracting a shift: the first element
    without a mask, a first masked mean with one. BatchNorm uses the pair to centre ``x``,
    and to merge shards' means (Chan et al.) without their rounding.

    Example:
        >>> import jax.numpy as jnp
        >>> mean, rounding = shifted_mean(jnp.array([[1e4, 1e4 + 1.0, 1e4 + 1.0]]), (1,))
        >>> float(mean[0, 0]), round(float(mean[0, 0]) + float(rounding[0, 0]), 6)
        (10000.6669921875, 10000.666667)
    """

    if mask is None:
        shift = x[tuple(slice(0, 1) if i in axes else slice(None) for i in range(x.ndim))]
    else:
        shift = _mean(x, axes, mask=mask)
    shift = lax.stop_gradient(shift)  # any shift gives the same mean
    mean_shifted = _mean(x - shift, axes, mask=mask)
    mean = shift + mean_shifted
    return mean, mean_shifted - (mean - shift)
