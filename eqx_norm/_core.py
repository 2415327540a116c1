r"""The one normalization every layer and every pure-JAX path runs.

:func:`normalize` standardizes ``x`` over some ``axes`` (the trailing features for LayerNorm
and RMSNorm, space and a group of channels for GroupNorm and InstanceNorm, the batch for
BatchNorm), with an optional mask, scale, offset and residual add, and with the reduced
axes optionally split across a mapped axis (``axis_name``).

**One centring.** A shift ``m`` near each row's mean (a first mean, each element scaled
before the sum so that values near float32's largest cannot overflow it, or on XLA:CPU for
BatchNorm's columns the first element, see :func:`shifts_by_first_element`), then the mean
``d`` of ``x - m``: ``x - m`` is exact where ``x`` is close to ``m`` (Sterbenz), so
``(x - m) - d`` is the centred ``x`` to float32 precision at any mean (mean 1e4 loses
nothing), and a constant row gives exactly 0. The variance is the mean of its squares
(two-pass, never ``E[x^2] - E[x]^2``). With ``axis_name`` each shard computes these moments
of its part and they are merged, count-weighted (Chan et al.), so no shard subtracts large
squares. Statistics are in at least float32 (:func:`compute_dtype`).

**One derivative.** A :func:`jax.custom_jvp` whose tangent is linear in the tangents, so
reverse mode is JAX's transpose of it and forward mode (``jvp``, ``jacfwd``, ``hessian``)
works:

.. math::
    \dot y = s r (\dot x - c\,\overline{\dot x} - \hat x\, \overline{\dot x \hat x})
             + \dot s\, \hat x + \dot o,

with ``x_c`` the centred ``x`` (``x`` itself when ``center=False``), ``r`` the inverse
standard deviation, ``\hat x = x_c r``, ``c = 1`` (0 for RMSNorm) and bars for means over
the normalized elements (masked, and across ``axis_name``). Transposed, the backward is two
reductions (``sum(g)``, ``sum(g \hat x)`` of ``g = s r \bar y``) and one pass that writes
``dx``. It is written in ``\hat x`` so that ``r^2`` never forms, in either direction: it
under- or overflows float32 for spreads beyond 1e19 or below 1e-19 (``epsilon=0``).

**Edges.** With ``epsilon > 0`` an overflowed variance gives NaN, not ``rsqrt(inf) = 0``
(which would silently return ``offset``). With ``epsilon == 0`` the variance is taken of
the centred values divided by their largest magnitude, so spreads whose squares under- or
overflow float32 are still right, and a constant row gives ``offset``. A NaN stays in its
row. Where ``mask`` is False an element takes no part and its output is ``offset``; a
fully masked row gives ``offset``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float

from ._checks import DTypeLike


def compute_dtype(dtype: DTypeLike) -> np.dtype:
    """The dtype statistics are computed in: at least float32 (bf16/fp16 are upcast)."""
    dtype = jnp.dtype(dtype)
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def affine(
    gamma: Array | None, beta: Array | None, zero_centered_scale: bool, dtype: DTypeLike, shape
) -> tuple[Array | None, Array | None]:
    """``(scale, offset)`` in ``dtype`` reshaped to ``shape``; ``1 + gamma`` when
    ``zero_centered_scale``."""
    scale = offset = None
    if gamma is not None:
        scale = gamma.astype(dtype).reshape(shape)
        scale = 1 + scale if zero_centered_scale else scale
    if beta is not None:
        offset = beta.astype(dtype).reshape(shape)
    return scale, offset


def modulate(
    scale: Array | None,
    offset: Array | None,
    modulation_scale: Array | None,
    modulation_shift: Array | None,
    dtype: DTypeLike,
) -> tuple[Array | None, Array | None]:
    """The per-example ``(scale * (1 + s), offset * (1 + s) + t)`` of a conditional norm,
    ``normalized * (1 + s) + t`` after the layer's own affine folded into one affine, so
    that the norm still makes one pass (None stands for ones and zeros). ``s``/``t`` have
    the rank of the normalized view; ``scale``/``offset`` are expanded to it."""
    rank = max((m.ndim for m in (modulation_scale, modulation_shift) if m is not None), default=0)
    scale, offset = (None if p is None else expand(p.astype(dtype), rank) for p in (scale, offset))
    if modulation_scale is not None:
        factor = 1 + modulation_scale.astype(dtype)
        scale = factor if scale is None else scale * factor
        offset = None if offset is None else offset * factor
    if modulation_shift is not None:
        shift = modulation_shift.astype(dtype)
        offset = shift if offset is None else offset + shift
    return scale, offset


def per_example(m: Array, batch_shape: tuple[int, ...], width: int) -> Array:
    """A modulation ``m`` (x's rank, each batch axis x's size or 1) as ``(E, width)`` for a
    kernel's flattened view: E examples of equally many consecutive rows (or examples)
    each. The leading batch axes up to the last that ``m`` does not broadcast are its
    examples (expanded where they are 1); the rest lie within one."""
    b = m.shape[: len(batch_shape)]
    k = max((i + 1 for i, n in enumerate(b) if n != 1), default=0)
    m = jnp.broadcast_to(m, (*batch_shape[:k], *m.shape[k:]))
    return m.reshape(math.prod(batch_shape[:k]), width)


def add_residual(x: Array, residual: Array) -> Array:
    """``x + residual``, added in at least float32 and stored in residual's dtype."""
    wide = jnp.promote_types(compute_dtype(x.dtype), compute_dtype(residual.dtype))
    return (x.astype(wide) + residual.astype(wide)).astype(residual.dtype)


class Groups(NamedTuple):
    """GroupNorm's channels split across ``axis_name``: this shard's groups lie along
    ``axis`` of ``x`` and are groups ``start, start + 1, ...`` of ``total``."""

    axis: int
    start: Array
    total: int


class Moments(NamedTuple):
    """Per-row statistics (``x``'s rank, the reduced axes of size 1): the mean (0 when not
    centred), the biased variance (the mean square when not centred) and the count."""

    mean: Array
    var: Array
    count: Array


def normalize(
    x: Float[Array, "*shape"],
    axes: tuple[int, ...],
    scale: Array | None = None,
    offset: Array | None = None,
    *,
    epsilon: float,
    center: bool = True,
    mask: Bool[Array, "*shape"] | None = None,
    axis_name: Hashable | None = None,
    groups: Groups | None = None,
    with_moments: bool = False,
) -> Float[Array, "*shape"] | tuple[Float[Array, "*shape"], Moments]:
    """``(x - E[x]) * rsqrt(Var[x] + epsilon) * scale + offset`` over ``axes``, in x's
    compute dtype; ``x * rsqrt(E[x^2] + epsilon) * scale + offset`` with ``center=False``.

    ``scale``/``offset`` broadcast against ``x`` (x's rank, or trailing axes that leading
    size-1 axes complete). Where ``mask`` is False the output is ``offset`` (0 without it).
    With ``axis_name`` the ``axes`` are split across that mapped axis and the statistics
    are the whole row's (``groups`` for GroupNorm's split channels). ``with_moments``
    returns ``(y, Moments)``, the statistics it normalized by (BatchNorm's running
    statistics are updated from them).

    Example:
        >>> import jax.numpy as jnp
        >>> normalize(jnp.array([[1.0, 3.0]]), (1,), epsilon=0.0)
        Array([[-1.,  1.]], dtype=float32)
    """
    compute = compute_dtype(x.dtype)
    x = x.astype(compute)
    scale, offset = (
        None if p is None else expand(p.astype(compute), x.ndim) for p in (scale, offset)
    )
    static = _Static.of(axes, x.ndim, epsilon, center, axis_name)
    start, across_groups = (None, None) if groups is None else (groups.start, groups[::2])
    y, *moments = _normalize(x, scale, offset, mask, start, static, across_groups)
    return (y, Moments(*moments)) if with_moments else y


def centered_statistics(
    x: Float[Array, "*shape"],
    axes: tuple[int, ...],
    *,
    epsilon: float,
    center: bool = True,
    mask: Bool[Array, "*shape"] | None = None,
) -> tuple[Array, Array]:
    """``(x - E[x], rsqrt(Var[x] + epsilon))`` over ``axes`` (``x`` and the mean square's
    with ``center=False``), the second with the reduced axes of size 1: the statistics of
    :func:`normalize`, without its derivative, for the kernels' ``jnp`` formulas."""
    static = _Static.of(axes, x.ndim, epsilon, center, None)
    across = _Across(static.axes, mask, None, None, None)
    centered, rstd, _ = _statistics(x, across, static)
    return centered, rstd


class _Static(NamedTuple):
    axes: tuple[int, ...]
    epsilon: float
    center: bool
    axis_name: Hashable | None
    first_element: bool  # shift by the first element where it can (see _shift)

    @classmethod
    def of(cls, axes, ndim: int, epsilon: float, center: bool, axis_name) -> _Static:
        """The static configuration of a call over ``axes`` of a rank-``ndim`` input, with
        the backend's choice of shift."""
        axes = tuple(sorted(a % ndim for a in axes))
        first = shifts_by_first_element(jax.default_backend(), axes, ndim)
        return cls(axes, float(epsilon), bool(center), axis_name, first)


def shifts_by_first_element(backend: str, axes: tuple[int, ...], ndim: int) -> bool:
    """The one backend-specific choice of the pure-JAX path: whether the centring's shift is
    each row's first element (a slice, no pass over ``x``) rather than a first mean (one
    more reduction), where :func:`_shift` allows it.

    Measured on XLA:CPU (``benchmarks/batch_norm.py``, ``benchmarks/portable_path.py``,
    ``benchmarks/training_steps.py``): BatchNorm's column reductions (the leading axis
    reduced), where a first mean is one more slow column reduction (training forward 1.23
    -> 1.08x torch's). Not rows: their forward alone gained about 10 % (1.39-1.49 against
    1.50-1.67x the plain formula), but the MLP-Mixer's training step, whose norms read
    transposed activations, lost 20 % (0.96 against 0.79x equinox's), and half-precision
    rows lost a pass to slicing the converted input. Other backends keep the first mean
    until measured on them (``benchmarks/gpu_check.py``).
    """
    return backend == "cpu" and 0 in axes and axes != (ndim - 1,)


def expand(p: Array, ndim: int) -> Array:
    """``p`` with leading size-1 axes up to rank ``ndim`` (an explicit broadcast, so that
    ``jax_numpy_rank_promotion="raise"`` accepts it)."""
    return p.reshape((1,) * (ndim - p.ndim) + p.shape)


# ------------------------------------------------------------------------ the statistics


class _Across(NamedTuple):
    """How per-row values are summed over the normalized elements: over ``axes`` of this
    call, where ``mask`` is True, and across ``axis_name`` (GroupNorm: per ``groups``)."""

    axes: tuple[int, ...]
    mask: Array | None
    axis_name: Hashable | None
    start: Array | None
    groups: tuple[int, int] | None

    def local_sum(self, values: Array) -> Array:
        if self.mask is not None:
            values = jnp.where(self.mask, values, 0)
        return jnp.sum(values, axis=self.axes, keepdims=True)

    def local_count(self, like: Array) -> Array | int:
        """This call's number of normalized elements per row, at least 1 (a Python int
        without a mask)."""
        if self.mask is None:
            return max(math.prod(like.shape[i] for i in self.axes), 1)
        return jnp.maximum(self.count(like), 1)

    def count(self, like: Array) -> Array:
        """This call's number of normalized elements per row, as ``like``'s dtype."""
        if self.mask is None:
            per_row = tuple(1 if i in self.axes else n for i, n in enumerate(like.shape))
            return jnp.full(per_row, math.prod(like.shape[i] for i in self.axes), like.dtype)
        mask = jnp.broadcast_to(self.mask, like.shape)
        return jnp.sum(mask, axis=self.axes, keepdims=True, dtype=like.dtype)

    def psum(self, *values: Array) -> tuple[Array, ...]:
        """``values`` (per-row) summed across ``axis_name``; with ``groups`` each group's
        only with the same group's on other shards (a shard without it adds 0)."""
        if self.axis_name is None:
            return values
        if self.groups is None:
            return tuple(lax.psum(values, self.axis_name))
        axis, total = self.groups

        def scatter(v: Array) -> Array:
            shape = (*v.shape[:axis], total, *v.shape[axis + 1 :])
            return lax.dynamic_update_slice_in_dim(jnp.zeros(shape, v.dtype), v, self.start, axis)

        summed = lax.psum(tuple(scatter(v) for v in values), self.axis_name)
        local = values[0].shape[axis]
        return tuple(lax.dynamic_slice_in_dim(v, self.start, local, axis) for v in summed)

    def mean(self, values: Array, count: Array) -> Array:
        """The mean over all normalized elements, given their (global) ``count``."""
        (total,) = self.psum(self.local_sum(values))
        return total / jnp.maximum(count, 1)


def _statistics(x: Array, across: _Across, static: _Static):
    """``(centered, rstd, Moments)``: the one centring (see the module's docstring)."""
    count = across.count(x)
    local_count = across.local_count(x)
    if static.center:
        # Any shift gives the same mean: no gradient flows through it.
        shift = lax.stop_gradient(_shift(x, across, static))
        shifted = x - shift
        rounding = across.local_sum(shifted) / local_count
        centered = shifted - rounding
        # the mean of the squares of the centred values, which are exactly 0 in a constant
        # row: the corrected two-pass form (the sum of squares of x - shift, less the mean
        # of x - shift squared) squares x - shift, which overflows in a constant row of 1e30
        var = across.local_sum(jnp.square(centered)) / local_count
    else:
        shift = rounding = jnp.zeros_like(count)
        centered = x
        var = across.local_sum(jnp.square(centered)) / local_count
    if static.axis_name is not None:
        mean, var, count, moved = _merge(shift, rounding, var, count, across)
        if static.center:
            centered = centered - moved
        return centered, inverse_std(var, static.epsilon), Moments(mean, var, count)
    moments = Moments(shift + rounding, var, count)
    if static.epsilon > 0:
        return centered, inverse_std(var, static.epsilon), moments
    return centered, _rescaled_inverse_std(centered, across, local_count), moments


def _shift(x: Array, across: _Across, static: _Static) -> Array:
    """A value near each row's mean, to centre by: its first element where
    :func:`shifts_by_first_element` chose it (a slice, which XLA:CPU broadcasts for free),
    else a first mean, each element scaled before the sum so that values near float32's
    largest do not overflow it. The first mean also serves masks (the first element may be
    masked out), axes sharded across devices (JAX slices no element out of them) and
    ``epsilon == 0`` (whose rescaled variance allows spreads up to float32's largest, where
    ``x - x[0]`` would overflow). Either is exact for a constant row; the first element
    costs accuracy only where it lies far out (the centred values lose about
    ``eps * |x[0] - mean|``, at most ``sqrt(n)`` standard deviations' worth)."""
    spec = getattr(jax.typeof(x).sharding, "spec", ())
    sharded = any(i < len(spec) and spec[i] is not None for i in across.axes)
    if (
        static.first_element
        and static.epsilon > 0
        and across.mask is None
        and static.axis_name is None
        and not sharded
        and all(x.shape[i] > 0 for i in across.axes)
    ):
        return x[tuple(slice(0, 1) if i in across.axes else slice(None) for i in range(x.ndim))]
    return across.local_sum(x * (1.0 / across.local_count(x)))


def _merge(mean: Array, rounding: Array, var: Array, count: Array, across: _Across):
    """``(mean, var, count, moved)`` across shards from each one's two-pass moments (its
    mean as ``mean + rounding``); ``moved`` is the global mean minus this shard's, without
    the rounding of either. The mean is a count-weighted mean corrected by a second sum
    over the shards' deviations from it, and the variance adds the spread of the shards'
    means (Chan et al.)."""
    total, weighted = across.psum(count, count * mean)
    safe = jnp.maximum(total, 1)
    first = weighted / safe
    deviation = (mean - first) + rounding
    shift, spread = across.psum(count * deviation, count * (var + jnp.square(deviation)))
    shift = shift / safe
    var = jnp.maximum(spread / safe - jnp.square(shift), 0)
    return first + shift, var, total, shift - deviation


def inverse_std(var: Array, epsilon: float) -> Array:
    """``rsqrt(var + epsilon)``; with ``epsilon == 0`` a zero variance gives 0, not inf
    (a constant row's centred values are exactly 0, so its output is ``offset``, not NaN).
    An infinite variance (the squares overflowed) gives NaN, not ``rsqrt(inf) = 0``."""
    if epsilon > 0:
        rstd = lax.rsqrt(var + epsilon)
    else:
        positive = var > 0
        rstd = jnp.where(positive, lax.rsqrt(jnp.where(positive, var, 1)), 0)
    # inf - inf = NaN, else 0: an add, which XLA fuses where a select on (rows, 1) cost
    # 40 % of a (8192, 1024) forward and backward.
    return rstd + (var - var)


def _rescaled_inverse_std(centered: Array, across: _Across, count: Array | int) -> Array:
    """``rsqrt(Var)`` for ``epsilon == 0``, from the variance of the centred values divided
    by their largest magnitude ``s`` (in ``[1/n, 1]``), then divided by ``s``; a constant
    row gives 0; a row whose answer is not a normal float32 gives NaN."""
    magnitude = jnp.abs(centered)
    if across.mask is not None:
        magnitude = jnp.where(across.mask, magnitude, 0)
    # The result does not depend on s: no gradient flows through it.
    s = lax.stop_gradient(jnp.max(magnitude, axis=across.axes, keepdims=True))
    nonconstant = s > 0
    divisor = jnp.where(nonconstant, s, 1)
    var_scaled = across.local_sum(jnp.square(centered / divisor)) / count
    rstd = lax.rsqrt(var_scaled) / divisor
    # s is NaN where the row holds a NaN (or inf - inf): NaN, not the constant row's 0.
    return jnp.where(nonconstant, jnp.where(rstd > 0, rstd, jnp.nan), s * 0)


def _output(centered, rstd, scale, offset, mask):
    y = centered * (rstd if scale is None else rstd * scale)
    y = y if offset is None else y + offset
    if mask is not None:
        y = jnp.where(mask, y, 0 if offset is None else offset)
    return y


# ------------------------------------------------------------------------ the derivative


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _normalize(x, scale, offset, mask, start, static, groups):
    across = _Across(static.axes, mask, static.axis_name, start, groups)
    centered, rstd, moments = _statistics(x, across, static)
    return (_output(centered, rstd, scale, offset, mask), *moments)


def _is_zero_tangent(tangent) -> bool:
    """Whether a ``custom_jvp`` tangent (``symbolic_zeros=True``) is known to be zero: a
    ``SymbolicZero`` (an input not differentiated), or None (an absent parameter)."""
    return tangent is None or isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def _normalize_jvp(static, groups, primals, tangents):
    x, scale, offset, mask, start = primals
    # symbolic_zeros: a tangent known to be zero arrives as a SymbolicZero and its term is
    # left out entirely.
    dx, dscale, doffset = (None if _is_zero_tangent(t) else t for t in tangents[:3])
    across = _Across(static.axes, mask, static.axis_name, start, groups)
    centered, rstd, moments = _statistics(x, across, static)
    y = _output(centered, rstd, scale, offset, mask)
    zero = jnp.zeros_like(moments.mean)
    dmean = dvar = zero
    dy = []
    xhat = centered * rstd
    factors = static.epsilon > 0 and static.axes != (x.ndim - 1,)
    if dx is not None:
        k = rstd if scale is None else rstd * scale
        mean_dx = across.mean(dx, moments.count) if static.center else zero
        mean_dx_centered = across.mean(dx * centered, moments.count)
        # Two groupings of the same tangent, chosen by what XLA:CPU reduces faster
        # (benchmarks/batch_norm.py, benchmarks/portable_path.py): the xhat form for rows
        # (the last axis alone: 23 against 27 ms forward and backward on (8192, 1024)) and
        # always with epsilon == 0, where r^2 under- or overflows; per-row factors times
        # per-row means for every other set of axes (BatchNorm's columns: 15 against 22 ms
        # on (25088, 256)).
        if factors:
            # `+ (-k * mean)`: the factors multiply before the broadcast, so that
            # transposed they scale the per-row sums, not a full-size cotangent
            term = dx * k + (-k * mean_dx) + centered * (-(k * rstd) * (rstd * mean_dx_centered))
        else:
            # `+ xhat * (-mean)` rather than `- ...`: transposed, a subtraction negates
            # the full-size cotangent, one more op per element
            inner = dx - mean_dx if static.center else dx
            inner = inner + xhat * -across.mean(dx * xhat, moments.count)
            term = inner * k
        dy.append(term if mask is None else jnp.where(mask, term, 0))
        dmean, dvar = mean_dx, 2 * mean_dx_centered
    if dscale is not None:  # with factors, no full-size xhat to keep for the backward
        term = centered * (dscale * rstd) if factors else xhat * dscale
        dy.append(term if mask is None else jnp.where(mask, term, 0))
    if doffset is not None:
        dy.append(jnp.broadcast_to(doffset, y.shape))
    dy = functools.reduce(jnp.add, dy) if dy else jnp.zeros_like(y)
    return (y, *moments), (dy, dmean, dvar, jnp.zeros_like(moments.count))


_normalize.defjvp(_normalize_jvp, symbolic_zeros=True)
