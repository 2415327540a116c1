r"""BatchNorm's arithmetic in pure JAX: training statistics, the inference forward and the
running statistics' update. :func:`eqx_norm.functional.batch_norm` checks the arguments and
calls these.

Training without a mask or ``axis_name`` (and ``epsilon > 0``) runs :func:`_normalize`, whose
derivative is a :func:`jax.custom_jvp` with a tangent linear in the tangents, so reverse
mode is JAX's transpose of it and forward mode (``jvp``, ``jacfwd``, ``hessian``) keeps
working:

.. math::
    \dot y = k (\dot x - \overline{\dot x}) - x_c\, k r^2\, \overline{\dot x x_c}
             + \dot\gamma\, r x_c + \dot\beta, \qquad k = \gamma r,

with ``x_c = x - mean`` (as accurate as ``(x - shift) - mean(x - shift)``),
``r = rsqrt(var + eps)`` and bars for per-channel means over the batch. The tangent reads
``x_c`` and per-channel values only, so reverse mode keeps ``x_c`` as its one full-size
residual (the forward writes it anyway: XLA:CPU fuses a reduction with one elementwise
producer, so the variance pass reads a materialized ``x_c``), not ``x`` and a recomputation.
Every full-size product in the tangent is of two arrays and every per-channel factor
multiplies a per-channel mean, so that transposed the backward is two one-product
reductions (``sum(dy)``, ``sum(dy * x_c)``) and one elementwise pass that writes ``dx``.
Masked calls, ``axis_name`` and ``epsilon == 0`` run plain autodiff
through :mod:`eqx_norm._statistics`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from ._statistics import centered_statistics, inverse_std, shifted_mean
from ._xla import is_zero_tangent


def train(
    x: Float[Array, "*shape"],
    scale: Array | None,
    offset: Array | None,
    *,
    axes: tuple[int, ...],
    epsilon: float,
    mask: Bool[Array, "*shape"] | None,
    axis_name: Hashable | None,
) -> tuple[Array, Array, Array, Array]:
    """``(y, mean, var, count)`` of a training call.

    ``x`` is in its compute dtype (at least float32); ``scale``/``offset`` and the returned
    per-channel ``mean``, biased ``var`` and value ``count`` have x's rank with the reduced
    ``axes`` of size 1. The statistics are the whole batch's: combined over ``axis_name``
    when given; under ``jit`` with ``x`` sharded, XLA reduces across the devices. Where
    ``mask`` is False the output is ``offset`` (0 without it).
    """
    # Under explicit sharding (jax.make_mesh's default) JAX does not slice one element out
    # of a sharded axis, so where a reduced axis is sharded the shift is a first mean.
    spec = jax.typeof(x).sharding.spec
    sharded = any(i < len(spec) and spec[i] is not None for i in axes)
    if mask is None and axis_name is None and epsilon > 0:
        y, mean, var = _normalize(x, scale, offset, axes, epsilon, sharded)
        return y, mean, var, jnp.asarray(math.prod(x.shape[i] for i in axes), x.dtype)
    local_mask = jnp.ones(x.shape, bool) if mask is None and sharded else mask
    mean, rounding = shifted_mean(x, axes, mask=local_mask)
    centered = (x - mean) - rounding
    if mask is None:
        count = jnp.asarray(math.prod(x.shape[i] for i in axes), x.dtype)
        var = jnp.mean(jnp.square(centered), axis=axes, keepdims=True)
    else:
        count = jnp.sum(mask, axis=axes, keepdims=True, dtype=x.dtype)
        squares = jnp.where(mask, jnp.square(centered), 0)
        var = jnp.sum(squares, axis=axes, keepdims=True) / jnp.maximum(count, 1)
    if axis_name is not None:
        mean, var, count, moved = _merge(mean, rounding, var, count, axis_name)
        centered = centered - moved
        rstd = inverse_std(var, epsilon)
    elif epsilon > 0:
        rstd = inverse_std(var, epsilon)
    else:  # rescaled by the largest centred value, for spreads whose squares underflow
        rstd = centered_statistics(x, axes, epsilon=0.0, mask=local_mask)[1]
    y = _output(centered, rstd, scale, offset)
    if mask is not None:
        y = jnp.where(mask, y, 0 if offset is None else offset)
    return y, mean, var, count


def infer(
    x: Float[Array, "*shape"],
    mean: Array,
    var: Array,
    scale: Array | None,
    offset: Array | None,
    *,
    epsilon: float,
    mask: Bool[Array, "*shape"] | None,
) -> Array:
    """``(x - mean) * rsqrt(var + epsilon) * scale + offset`` with given per-channel
    statistics: one elementwise pass (``x - mean`` first, so a mean of 1e4 loses nothing)."""
    y = _output(x - mean, inverse_std(var, epsilon), scale, offset)
    if mask is not None:
        y = jnp.where(mask, y, 0 if offset is None else offset)
    return y


def update_running(
    running_mean: Array,
    running_var: Array,
    mean: Array,
    var: Array,
    count: Array,
    *,
    momentum: float,
    steps: Array | None,
) -> tuple[Array, Array]:
    """The running statistics moved towards the batch's, the variance Bessel-corrected.

    ``steps`` None: ``momentum * old + (1 - momentum) * batch``. Otherwise ``steps`` is the
    number of updates the running statistics have had, and the update is zero-debiased:
    ``old + w * (batch - old)`` with ``w = (1 - momentum) / (1 - momentum**(steps + 1))``,
    so they are the ``momentum``-weighted average of the batches seen, without the bias
    towards the initial values (``w = 1`` at the first step; ``momentum == 1`` gives the
    plain average of all batches). A channel with no value keeps both; one with a single
    value keeps its variance.
    """
    channels = running_mean.shape[0]
    count = jnp.broadcast_to(count, mean.shape).reshape(channels)
    mean = lax.stop_gradient(mean).reshape(channels)
    unbiased = lax.stop_gradient(var).reshape(channels) * (count / jnp.maximum(count - 1, 1))
    weight = None if steps is None else _debiased_weight(momentum, steps)

    def move(old: Array, batch: Array, valid: Array) -> Array:
        dtype = jnp.promote_types(old.dtype, batch.dtype)
        old, batch = old.astype(dtype), batch.astype(dtype)
        if weight is None:
            new = momentum * old + (1 - momentum) * batch
        else:
            w = weight.astype(dtype)
            new = (1 - w) * old + w * batch
        return jnp.where(valid, new, old).astype(running_mean.dtype)

    return move(running_mean, mean, count >= 1), move(running_var, unbiased, count >= 2)


def _debiased_weight(momentum: float, steps: Array) -> Array:
    """``(1 - momentum) / (1 - momentum**n)`` for the ``n = steps + 1``-th update, as float32
    (``-expm1(n log momentum)`` keeps the denominator accurate for momentum near 1)."""
    n = (steps + 1).astype(jnp.float32)
    if momentum == 0:
        return jnp.ones((), jnp.float32)
    if momentum == 1:
        return 1 / n
    return (1 - momentum) / -jnp.expm1(n * math.log(momentum))


def _merge(
    mean: Array, rounding: Array, var: Array, count: Array, axis_name: Hashable
) -> tuple[Array, Array, Array, Array]:
    """``(mean, var, count, moved)`` over ``axis_name`` from each shard's two-pass moments
    (its mean as ``mean + rounding``); ``moved`` is the global mean minus this shard's,
    without the rounding of either.

    The mean is a count-weighted mean corrected by a second pass over the shards' deviations
    from it, and the variance adds the spread of the shards' means (Chan et al.), so no
    shard subtracts large squares.
    """
    total, weighted = lax.psum((count, count * mean), axis_name)
    safe = jnp.maximum(total, 1)
    first = weighted / safe
    deviation = (mean - first) + rounding
    shift, spread = lax.psum((count * deviation, count * (var + jnp.square(deviation))), axis_name)
    shift = shift / safe
    var = jnp.maximum(spread / safe - jnp.square(shift), 0)
    return first + shift, var, total, shift - deviation


def _output(centered: Array, rstd: Array, scale: Array | None, offset: Array | None) -> Array:
    y = centered * (rstd if scale is None else rstd * scale)
    return y if offset is None else y + offset


def _moments(
    x: Array, axes: tuple[int, ...], epsilon: float, shift_by_mean: bool
) -> tuple[Array, Array, Array, Array]:
    """``(mean, centered, var, rstd)``, two-pass: ``centered = (x - mean) - rounding``, with
    the rounding error of ``mean``, is as accurate as ``(x - shift) - mean(x - shift)``."""
    mean, rounding = shifted_mean(x, axes, mask=jnp.ones(x.shape, bool) if shift_by_mean else None)
    centered = (x - mean) - rounding
    var = jnp.mean(jnp.square(centered), axis=axes, keepdims=True)
    return mean, centered, var, inverse_std(var, epsilon)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _normalize(x, scale, offset, axes, epsilon, shift_by_mean):
    mean, centered, var, rstd = _moments(x, axes, epsilon, shift_by_mean)
    return _output(centered, rstd, scale, offset), mean, var


def _tangent(axes, centered, rstd, scale, dx, dscale, doffset):
    """The tangents of ``(y, mean, var)``, linear in ``(dx, dscale, doffset)`` (None: zero)."""
    dy = []
    dmean = dvar = jnp.zeros_like(rstd)
    if dx is not None:
        k = rstd if scale is None else rstd * scale
        mean_dx = jnp.mean(dx, axis=axes, keepdims=True)
        mean_dx_centered = jnp.mean(dx * centered, axis=axes, keepdims=True)
        # `+ (-k * mean)`: the per-channel factors multiply before the broadcast, so that
        # transposed they scale the per-channel sums, not a full-size cotangent.
        dy.append(dx * k + (-k * mean_dx) + centered * (-(k * rstd) * (rstd * mean_dx_centered)))
        dmean = mean_dx
        dvar = 2 * mean_dx_centered
    if dscale is not None:
        dy.append(centered * (dscale * rstd))
    if doffset is not None:
        dy.append(jnp.broadcast_to(doffset, centered.shape))
    return functools.reduce(jnp.add, dy), dmean, dvar


def _normalize_jvp(axes, epsilon, shift_by_mean, primals, tangents):
    x, scale, offset = primals
    # symbolic_zeros: a tangent known to be zero arrives as a SymbolicZero and its term is
    # left out entirely.
    dx, dscale, doffset = (None if is_zero_tangent(t) else t for t in tangents)
    mean, centered, var, rstd = _moments(x, axes, epsilon, shift_by_mean)
    y = _output(centered, rstd, scale, offset)
    if dx is None and dscale is None and doffset is None:
        return (y, mean, var), (jnp.zeros_like(y), jnp.zeros_like(mean), jnp.zeros_like(var))
    tangents = _tangent(axes, centered, rstd, scale, dx, dscale, doffset)
    return (y, mean, var), tangents


_normalize.defjvp(_normalize_jvp, symbolic_zeros=True)
