r"""The fast path of LayerNorm and RMSNorm: an analytic gradient that XLA:CPU compiles well.

``fast_normalize`` computes the same values as ``_core.standardize`` followed by
``_core.apply_affine`` (two-pass statistics after a first-element shift, statistics in at
least float32, output cast at the end), for the common case: no mask, the normalized axes
are the trailing axes of ``x``, and ``gamma``/``beta`` have their shape. Only the
derivatives are written by hand.

Why a hand-written derivative. Plain autodiff of LayerNorm makes XLA:CPU 0.10.2 write two
or three full-size temporaries (a broadcast ``mean``, ``rstd`` or ``x - mean`` that feeds
two fusions is materialized), so forward+backward costs about twice as much as it must and
keeps temporaries of twice the input's size.

Which rule, and why. The rule is a :func:`jax.custom_jvp` whose tangent is linear in the
tangents and written so that its transpose *is* the backward pass we want:

.. math::
    \dot y = \gamma r (\dot x - c\,\overline{\dot x} - x_c r^2 \overline{\dot x x_c})
             + \dot\gamma\, x_c r + \dot\beta,

with ``x_c = x - mean`` (``x`` when ``center=False``), ``r = rsqrt(mean(x_c^2) + eps)``,
``c = 1`` for LayerNorm and ``0`` for RMSNorm, and bars for row means. Reverse mode is
JAX's transpose of that linear map: ``dbeta = sum(g)``, ``dgamma = sum(g x_c r)`` and
``dx = r (v - c mean(v) - x_c r^2 mean(v x_c))`` with ``v = g gamma``. Two devices make it
fast:

* the linear part runs under ``jax.checkpoint`` with ``nothing_saveable``, so the only
  residuals are ``x`` and ``gamma``; the row statistics are recomputed in the backward pass
  (they are a cheap reduction) instead of saving a full-size ``x_hat``;
* each consumer (the ``gamma`` term and the ``x`` term) recomputes the statistics from its
  own ``jax.lax.optimization_barrier`` copy of ``x``, so XLA cannot merge them into one
  shared full-size broadcast. XLA then emits exactly three backward fusions (dx, dgamma,
  dbeta) and no full-size temporary: fwd+bwd temporary memory is ~0 instead of 2-4x x
  for float32 rows (bf16 keeps a float32 copy of ``x`` and of the cotangent, because
  XLA:CPU's YNNPACK fusions take float32 only; the dot form keeps two dot operands).

Why ``custom_jvp`` and not ``custom_vjp``. A ``custom_vjp`` is not forward-differentiable
(``jax.jvp``, ``jax.hessian``, ``jacfwd`` fail on it). The ``custom_jvp`` supports every
transformation: forward mode evaluates the tangent formula directly, reverse mode
transposes it, higher orders differentiate the plain ``jnp`` code inside the rule, and
``vmap``/``pmap``/``shard_map``/sharded ``jit`` see only ordinary primitives. Measured on
(8192, 1024) float32 (2 shared CPU cores, noisy), a ``custom_vjp`` with the same
hand-written backward ran at the same speed within noise (39.3-39.6 ms against
39.2-39.3 ms under load) and the same ~0 temporary memory, so nothing is lost.

Forms by shape (decided in :func:`_use_dots`, the one place): everything works on a 2-D
``(rows, D)`` view (reshaped before any dtype conversion, a free bitcast). Reductions over
few, very long rows (the ``(32, 28, 28, 256)`` case over 3 axes: 32 rows of 200,704) are
written as matrix-vector products (``ones @ a``, ``a @ ones``), which XLA:CPU runs far
faster than its column-sum fusions there (fwd+bwd 42 ms with reductions, 15-17 ms with
dots); the statistics stay two-pass either way.

Measured and not kept:

* saving ``mean``/``rstd`` as residuals instead of recomputing them: XLA then splits the
  forward fusion and writes ``x - mean`` out; no faster;
* converting a bf16 ``x`` inside each consumer: YNNPACK fusions take float32, so XLA wrote
  one float32 copy per consumer (75 MB of temporaries instead of 50 MB);
* recomputing the statistics in the backward pass without the first-element shift: about
  10 % faster fwd+bwd, but float32 tangents lost about 3x accuracy (dx at mean 1e4: 6.7e-5
  relative against 2.3e-5; a float32 jvp at mean 1e3 was off by 1.1e-4, over a 1e-4 bar);
* a corrected two-pass mean (``m0 = mean(x)``, then ``m0 + mean(x - m0)``) in the forward:
  12-46 % faster, but in 1 of 2,006 constant rows tested the output was not exactly
  ``beta``.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array

from ._core import DTypeLike, _rsqrt, compute_dtype

# Rows at least this long, when there are at most this many of them, reduce by dots.
_DOT_MIN_ROW = 16384
_DOT_MAX_ROWS = 512


def _use_dots(rows: int, d: int) -> bool:
    """Whether to reduce with matrix-vector products instead of XLA reductions.

    XLA:CPU 0.10.2 (YNNPACK fusions) is slow on sums over few, very long rows and on column
    sums over few rows: on (32, 200704) a column sum took ~35 ms against ~0.9 ms for
    ``ones @ x``. On ordinary shapes (many rows of <= a few thousand) the reductions fuse
    with their elementwise neighbours and win.
    """
    return d >= _DOT_MIN_ROW and rows <= _DOT_MAX_ROWS


def _row_mean(a: Array, dots: bool) -> Array:
    """Mean over axis 1 of ``a`` (rows, D), kept as (rows, 1)."""
    if dots:
        ones = jnp.ones((a.shape[1], 1), a.dtype)
        return jnp.matmul(a, ones, precision=lax.Precision.HIGHEST) / a.shape[1]
    return jnp.mean(a, axis=1, keepdims=True)


def _over_rows(v: Array, rows: int, dots: bool) -> Array:
    """``v`` (D,) repeated over ``rows`` rows. In reverse mode its transpose is the column
    sum of the cotangent, so with ``dots`` that sum runs as ``ones @ g`` (a dot)."""
    if dots:
        ones = jnp.ones((rows, 1), v.dtype)
        return jnp.matmul(ones, v[None, :], precision=lax.Precision.HIGHEST)
    return jnp.broadcast_to(v, (rows, v.shape[0]))


def _statistics(x: Array, epsilon: float, center: bool, dots: bool) -> tuple[Array | None, Array]:
    """Two-pass ``(mean, rsqrt(var + eps))`` of each row of ``x`` (rows, D), as (rows, 1).

    The mean is taken after subtracting the row's first element, so a constant row has
    exactly its value as mean and 0 as variance. ``mean`` is None when ``center=False``.
    """
    if not center:
        return None, _rsqrt(_row_mean(jnp.square(x), dots), epsilon)
    shift = x[:, :1]
    mean = shift + _row_mean(x - shift, dots)
    return mean, _rsqrt(_row_mean(jnp.square(x - mean), dots), epsilon)


def _centered(x: Array, mean: Array | None) -> Array:
    return x if mean is None else x - mean


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _fast_2d(
    x: Array, scale: Array | None, offset: Array | None, epsilon: float, center: bool, dots: bool
) -> Array:
    """``(x - mean) * rstd * scale + offset`` on a (rows, D) view, in x's (compute) dtype."""
    mean, rstd = _statistics(x, epsilon, center, dots)
    y = _centered(x, mean) * rstd
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
    """The tangent of ``_fast_2d``: linear in ``(dx, dscale, doffset)``; None means zero.

    Each term recomputes the statistics from its own optimization-barrier copy of ``x``,
    so that after transposition each backward fusion holds its own recomputation and XLA
    does not materialize a shared broadcast (see the module docstring).
    """
    dy = []
    if dx is not None:
        x_dx, scale_dx = lax.optimization_barrier((x, scale))
        mean, rstd = _statistics(x_dx, epsilon, center, dots)
        centered = _centered(x_dx, mean)
        # `+ centered * (-r^2 mean)` rather than `- centered * (r^2 mean)`: transposed, a
        # subtraction negates the full-size cotangent, which costs one more op per element.
        correction = _row_mean(dx * centered, dots) * -jnp.square(rstd)
        inner = dx - _row_mean(dx, dots) if center else dx
        inner = inner + centered * correction
        dy.append(inner * (rstd if scale_dx is None else rstd * scale_dx))
    if dscale is not None:
        x_g = lax.optimization_barrier(x)
        mean_g, rstd_g = _statistics(x_g, epsilon, center, dots)
        dy.append(_over_rows(dscale, x.shape[0], dots) * (_centered(x_g, mean_g) * rstd_g))
    if doffset is not None:
        dy.append(_over_rows(doffset, x.shape[0], dots))
    return functools.reduce(jnp.add, dy)


_checkpointed_tangent = jax.checkpoint(
    _tangent,
    policy=jax.checkpoint_policies.nothing_saveable,
    static_argnums=(0, 1, 2),
)


def _fast_2d_jvp(epsilon, center, dots, primals, tangents):
    x, scale, offset = primals
    # symbolic_zeros=True: a tangent that is known to be zero (an input not being
    # differentiated) arrives as a SymbolicZero, and its term is left out entirely.
    dx, dscale, doffset = (None if _is_zero(t) else t for t in tangents)
    y = _fast_2d(x, scale, offset, epsilon, center, dots)
    if dx is None and dscale is None and doffset is None:
        return y, jnp.zeros_like(y)
    return y, _checkpointed_tangent(epsilon, center, dots, x, scale, dx, dscale, doffset)


def _is_zero(tangent) -> bool:
    return tangent is None or isinstance(tangent, jax.custom_derivatives.SymbolicZero)


_fast_2d.defjvp(_fast_2d_jvp, symbolic_zeros=True)


def fast_applies(
    x_shape: tuple[int, ...],
    axes: tuple[int, ...],
    gamma: Array | None,
    beta: Array | None,
    mask: Array | None,
) -> bool:
    """Whether ``fast_normalize`` handles this call: no mask, trailing axes, full params."""
    k = len(axes)
    trailing = x_shape[len(x_shape) - k :] if k else ()
    return (
        mask is None
        and k > 0
        and axes == tuple(range(len(x_shape) - k, len(x_shape)))
        and all(p is None or tuple(p.shape) == tuple(trailing) for p in (gamma, beta))
    )


def fast_normalize(
    x: Array,
    axes: tuple[int, ...],
    gamma: Array | None,
    beta: Array | None,
    *,
    epsilon: float,
    zero_centered_scale: bool,
    dtype: DTypeLike | None,
    center: bool = True,
) -> Array:
    """``normalize`` for trailing ``axes`` and no mask, with the fast hand-written gradient.

    Args:
        x: input of shape ``(*batch, *normalized)``; ``axes`` are its last ``len(axes)``.
        axes: the trailing axes to normalize over.
        gamma: None or an array of shape ``normalized``.
        beta: None or an array of shape ``normalized``.
        epsilon: added to the variance, ``>= 0``.
        zero_centered_scale: scale by ``1 + gamma`` instead of ``gamma``.
        dtype: output dtype (default: x's).
        center: False for RMSNorm (no mean subtraction).

    Returns:
        An array of x's shape in ``dtype`` (default x's dtype), equal to
        ``apply_affine(standardize(x, ...))``.
    """
    cdt = compute_dtype(x.dtype)
    normalized = x.shape[x.ndim - len(axes) :]
    d = math.prod(normalized)
    rows = math.prod(x.shape[: x.ndim - len(axes)])
    scale = offset = None
    if gamma is not None:
        scale = gamma.astype(cdt).reshape(d)
        scale = 1 + scale if zero_centered_scale else scale
    if beta is not None:
        offset = beta.astype(cdt).reshape(d)
    # Reshape before the convert (a free bitcast), and convert once: XLA:CPU's YNNPACK
    # fusions take float32 only, so a bf16 x is converted by a separate loop fusion in any
    # case; converting it once here keeps one float32 copy rather than one per consumer.
    x2 = x.reshape(rows, d).astype(cdt)
    y = _fast_2d(x2, scale, offset, epsilon, center, _use_dots(rows, d))
    return y.astype(x.dtype if dtype is None else dtype).reshape(x.shape)
