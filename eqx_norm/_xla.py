r"""The pure-JAX implementations, compiled by XLA on any backend.

* :func:`normalize`: any axes, any mask, parameters broadcast against ``x``; plain autodiff.
  GroupNorm, InstanceNorm, BatchNorm and masked calls run it.
* :func:`normalize_rows`: ``(rows, D)`` rows with ``(D,)`` parameters, no mask: LayerNorm and
  RMSNorm without a mask. The same values, with a hand-written derivative that XLA:CPU
  compiles into a few fusions and no full-size temporary (plain autodiff materializes two
  or three).

The derivative of :func:`normalize_rows` is a :func:`jax.custom_jvp` whose tangent is
linear in the tangents, so reverse mode is JAX's transpose of it:

.. math::
    \dot y = s r (\dot x - c\,\overline{\dot x} - \hat x\,\overline{\dot x \hat x})
             + \dot s\, x_c r + \dot o,

with ``x_c = x - mean`` (``x`` when ``center=False``), ``r = rsqrt(mean(x_c^2) + eps)``,
``\hat x = x_c r``,
``c = 1`` for LayerNorm and 0 for RMSNorm, and bars for row means. The tangent runs under
``jax.checkpoint(nothing_saveable)``, so the only residuals are ``x`` and the scale and the
statistics are recomputed in the backward pass; each term recomputes them from its own
``optimization_barrier`` copy of ``x``, so that XLA gives each backward fusion its own
recomputation instead of a shared full-size broadcast. Unlike a ``custom_vjp``, this keeps
forward mode (``jvp``, ``jacfwd``, ``hessian``) working. Measurements behind these choices
are in ``benchmarks/NOTES.md``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from ._statistics import axis_mean, centered_statistics, compute_dtype, standardize

# Rows at least this long, when there are at most this many of them, reduce by dots.
_DOT_MIN_ROW = 16384
_DOT_MAX_ROWS = 512


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

    ``scale``/``offset`` broadcast against ``x``; where ``mask`` is False the output is
    ``offset`` (0 without it).
    """
    y = standardize(
        x.astype(compute_dtype(x.dtype)), axes, epsilon=epsilon, center=center, mask=mask
    )
    if scale is not None:
        y = y * scale
    if offset is not None:
        y = y + offset
    return y


def normalize_rows(
    x: Float[Array, "rows d"],
    scale: Float[Array, " d"] | None,
    offset: Float[Array, " d"] | None,
    *,
    epsilon: float,
    center: bool,
) -> Float[Array, "rows d"]:
    """``(x - mean) * rsqrt(var + eps) * scale + offset`` per row, in x's compute dtype.

    ``center=False`` gives ``x * rsqrt(mean(x^2) + eps) * scale + offset`` (RMSNorm).
    ``scale``/``offset`` are in the compute dtype (float32 for bf16/fp16 ``x``).
    """
    rows, d = x.shape
    # Rows of >= 16384 elements, at most 512 of them, reduce by matrix-vector products:
    # XLA:CPU's reductions over few very long rows are ~40x slower than `a @ ones` there.
    dots = d >= _DOT_MIN_ROW and rows <= _DOT_MAX_ROWS
    # Convert once, after the caller's reshape: XLA:CPU's fused kernels take float32, so a
    # conversion inside each consumer would write one float32 copy per consumer.
    return _rows(x.astype(compute_dtype(x.dtype)), scale, offset, epsilon, center, dots)


def _row_statistics(x: Array, epsilon: float, center: bool, dots: bool) -> tuple[Array, Array]:
    """``(x - mean, rstd)`` of each row of ``x``; ``x`` itself when ``center=False``."""
    return centered_statistics(x, (1,), epsilon=epsilon, center=center, dots=dots)


def _over_rows(v: Array, rows: int, dots: bool) -> Array:
    """``v`` (D,) repeated over ``rows`` rows. Transposed (reverse mode) it is the column sum
    of the cotangent, which with ``dots`` runs as ``ones @ g``."""
    if dots:
        return jnp.matmul(jnp.ones((rows, 1), v.dtype), v[None, :], precision=lax.Precision.HIGHEST)
    return jnp.broadcast_to(v, (rows, v.shape[0]))


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _rows(
    x: Array, scale: Array | None, offset: Array | None, epsilon: float, center: bool, dots: bool
) -> Array:
    centered, rstd = _row_statistics(x, epsilon, center, dots)
    y = centered * rstd
    if scale is not None:
        y = y * scale
    if offset is not None:
        y = y + offset
    return y


def _tangent(
    epsilon: float,
    center: bool,
    dots: bool,
    x: Array,
    scale: Array | None,
    dx: Array | None,
    dscale: Array | None,
    doffset: Array | None,
) -> Array:
    """The tangent of ``_rows``, linear in ``(dx, dscale, doffset)``; None means zero."""
    dy = []
    if dx is not None:
        x_dx, scale_dx = lax.optimization_barrier((x, scale))
        centered, rstd = _row_statistics(x_dx, epsilon, center, dots)
        # In terms of xhat = centered * r, not centered * r^2: r^2 under- or overflows for
        # spreads beyond about 1e19 or below 1e-19 (epsilon == 0), r itself does not.
        xhat = centered * rstd
        # `+ xhat * (-mean)` rather than `- ...`: transposed, a subtraction negates the
        # full-size cotangent, one more op per element.
        correction = -axis_mean(dx * xhat, (1,), dots=dots)
        inner = dx - axis_mean(dx, (1,), dots=dots) if center else dx
        inner = inner + xhat * correction
        dy.append(inner * (rstd if scale_dx is None else rstd * scale_dx))
    if dscale is not None:
        centered_g, rstd_g = _row_statistics(lax.optimization_barrier(x), epsilon, center, dots)
        dy.append(_over_rows(dscale, x.shape[0], dots) * (centered_g * rstd_g))
    if doffset is not None:
        dy.append(_over_rows(doffset, x.shape[0], dots))
    return functools.reduce(jnp.add, dy)


_checkpointed_tangent = jax.checkpoint(
    _tangent, policy=jax.checkpoint_policies.nothing_saveable, static_argnums=(0, 1, 2)
)


def _is_zero(tangent) -> bool:
    return tangent is None or isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def _rows_jvp(epsilon, center, dots, primals, tangents):
    x, scale, offset = primals
    # symbolic_zeros: a tangent known to be zero arrives as a SymbolicZero and its term is
    # left out entirely.
    dx, dscale, doffset = (None if _is_zero(t) else t for t in tangents)
    y = _rows(x, scale, offset, epsilon, center, dots)
    if dx is None and dscale is None and doffset is None:
        return y, jnp.zeros_like(y)
    return y, _checkpointed_tangent(epsilon, center, dots, x, scale, dx, dscale, doffset)


_rows.defjvp(_rows_jvp, symbolic_zeros=True)
