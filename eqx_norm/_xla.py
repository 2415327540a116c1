r"""The pure-JAX implementations, compiled by XLA on any backend.

* :func:`normalize`: any axes, any mask, parameters broadcast against ``x``; plain autodiff.
  GroupNorm, InstanceNorm, BatchNorm and masked calls run it.
* :func:`normalize_rows`: ``(*batch, D)`` rows with ``(D,)`` parameters, no mask: LayerNorm
  and RMSNorm without a mask. The same values, with a hand-written derivative.

Both have the structure of the plain two-pass formula (mean, mean of squared deviations,
``rsqrt``, affine), with the same statistics as every other path
(:func:`~eqx_norm._statistics.centered_statistics`), and nothing that depends on the backend
or on the number of rows: a row's output is bitwise the same alone or in any batch.

The derivative of :func:`normalize_rows` is a :func:`jax.custom_jvp` whose tangent is
linear in the tangents, so reverse mode is JAX's transpose of it and forward mode (``jvp``,
``jacfwd``, ``hessian``) works too:

.. math::
    \dot y = s r (\dot x - c\,\overline{\dot x} - \hat x\,\overline{\dot x \hat x})
             + \dot s\, \hat x + \dot o,

with ``x_c = x - mean`` (``x`` when ``center=False``), ``r = rsqrt(mean(x_c^2) + eps)``,
``\hat x = x_c r``, ``c = 1`` for LayerNorm and 0 for RMSNorm, and bars for row means.
Plain autodiff of the forward gives the same values with more operations (the gradient
through the statistics of every row, then their sum).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float

from ._statistics import centered_statistics, compute_dtype, standardize


def normalize(
    x: Float[Array, "*shape"],
    axes: tuple[int, ...],
    scale: Array | None,
    offset: Array | None,
    *,
    epsilon: float,
    center: bool,
    mask: Bool[Array, "*shape"] | None,
) -> Float[Array, "*shape"]:
    """``standardize(x) * scale + offset`` over ``axes`` in x's compute dtype.

    ``scale``/``offset`` have x's rank (size-1 axes where they broadcast); where ``mask``
    is False the output is ``offset`` (0 without it).
    """
    y = standardize(
        x.astype(compute_dtype(x.dtype)), axes, epsilon=epsilon, center=center, mask=mask
    )
    if scale is not None:
        y = y * _expand(scale, y.ndim)
    if offset is not None:
        y = y + _expand(offset, y.ndim)
    return y


def _expand(p: Array, ndim: int) -> Array:
    """``p`` with leading size-1 axes up to rank ``ndim`` (an explicit broadcast, so that
    ``jax_numpy_rank_promotion="raise"`` accepts it)."""
    return p.reshape((1,) * (ndim - p.ndim) + p.shape)


def normalize_rows(
    x: Float[Array, "*batch d"],
    scale: Float[Array, " d"] | None,
    offset: Float[Array, " d"] | None,
    *,
    epsilon: float,
    center: bool,
) -> Float[Array, "*batch d"]:
    """``(x - mean) * rsqrt(var + eps) * scale + offset`` over the last axis, in x's compute
    dtype.

    ``center=False`` gives ``x * rsqrt(mean(x^2) + eps) * scale + offset`` (RMSNorm).
    ``scale``/``offset`` are in the compute dtype (float32 for bf16/fp16 ``x``). The leading
    axes are kept as they are: a single example stays 1-D, so that under ``jax.vmap`` XLA
    sees the batch's own shape, not one with a size-1 rows axis (which XLA:CPU reduced 4x
    slower).
    """
    return _rows(x.astype(compute_dtype(x.dtype)), scale, offset, epsilon, center)


def _row_statistics(x: Array, epsilon: float, center: bool) -> tuple[Array, Array]:
    """``(x - mean, rstd)`` over the last axis of ``x``; ``x`` itself when ``center=False``."""
    return centered_statistics(x, (x.ndim - 1,), epsilon=epsilon, center=center)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _rows(
    x: Array, scale: Array | None, offset: Array | None, epsilon: float, center: bool
) -> Array:
    centered, rstd = _row_statistics(x, epsilon, center)
    y = centered * rstd
    if scale is not None:
        y = y * _expand(scale, y.ndim)
    if offset is not None:
        y = y + _expand(offset, y.ndim)
    return y


def _row_mean(a: Array) -> Array:
    return jnp.mean(a, axis=-1, keepdims=True)


def _tangent(
    epsilon: float,
    center: bool,
    x: Array,
    scale: Array | None,
    dx: Array | None,
    dscale: Array | None,
    doffset: Array | None,
) -> Array:
    """The tangent of ``_rows``, linear in ``(dx, dscale, doffset)``; None means zero."""
    # The same statistics as the primal's: under jit XLA computes them once.
    centered, rstd = _row_statistics(x, epsilon, center)
    # In terms of xhat = centered * r, not centered * r^2: r^2 under- or overflows for
    # spreads beyond about 1e19 or below 1e-19 (epsilon == 0), r itself does not.
    xhat = centered * rstd
    dy = []
    if dx is not None:
        inner = dx - _row_mean(dx) if center else dx
        # `+ xhat * (-mean)` rather than `- ...`: transposed, a subtraction negates the
        # full-size cotangent, one more op per element.
        inner = inner + xhat * -_row_mean(dx * xhat)
        dy.append(inner * (rstd if scale is None else rstd * _expand(scale, x.ndim)))
    if dscale is not None:
        dy.append(_expand(dscale, x.ndim) * xhat)
    if doffset is not None:
        dy.append(jnp.broadcast_to(_expand(doffset, x.ndim), x.shape))
    return functools.reduce(jnp.add, dy)


def is_zero_tangent(tangent) -> bool:
    """Whether a ``custom_jvp`` tangent (``symbolic_zeros=True``) is known to be zero: a
    ``SymbolicZero`` (an input not differentiated), or None (an absent parameter)."""
    return tangent is None or isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def _rows_jvp(epsilon, center, primals, tangents):
    x, scale, offset = primals
    # symbolic_zeros: a tangent known to be zero arrives as a SymbolicZero and its term is
    # left out entirely.
    dx, dscale, doffset = (None if is_zero_tangent(t) else t for t in tangents)
    y = _rows(x, scale, offset, epsilon, center)
    if dx is None and dscale is None and doffset is None:
        return y, jnp.zeros_like(y)
    return y, _tangent(epsilon, center, x, scale, dx, dscale, doffset)


_rows.defjvp(_rows_jvp, symbolic_zeros=True)
