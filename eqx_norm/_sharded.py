"""Normalization whose reduced axes are split across a mapped axis (``axis_name``).

Inside ``shard_map``, ``pmap`` or ``vmap``, each shard holds part of every row (LayerNorm,
RMSNorm: part of the features; GroupNorm: some of the channels). Each shard computes its
own two-pass moments, and BatchNorm's count-weighted merge (Chan et al.,
:func:`eqx_norm._xla_batch_norm._merge`) combines them over ``axis_name``: the statistics
are the whole row's, exact to rounding, and equal to the unsharded call's. Plain autodiff
(``psum`` transposes to ``psum``) gives the gradients.
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from ._statistics import compute_dtype, inverse_std, shifted_mean
from ._xla_batch_norm import _merge


def normalize_across(
    x: Float[Array, "*shape"],
    axes: tuple[int, ...],
    scale: Array | None,
    offset: Array | None,
    *,
    epsilon: float,
    center: bool,
    mask: Bool[Array, "*shape"] | None,
    axis_name: Hashable,
    groups: tuple[int, int, int] | None = None,
) -> Float[Array, "*shape"]:
    """``standardize(x) * scale + offset`` over ``axes`` of ``x`` and of every shard of
    ``axis_name``, in x's compute dtype; where ``mask`` is False the output is ``offset``.

    ``groups = (group_axis, start, total)`` (GroupNorm): this shard's groups lie along
    ``group_axis`` of ``x`` and are groups ``start, start + 1, ...`` of ``total``; each
    group's moments are merged only with the same group's on other shards (a shard that
    does not hold a group adds a count of 0 to it).
    """
    x = x.astype(compute_dtype(x.dtype))
    per_row = tuple(1 if i in axes else n for i, n in enumerate(x.shape))
    if center:  # this shard's two-pass moments; ``mean + rounding`` is its exact mean
        mean, rounding = shifted_mean(x, axes, mask=mask)
        centered = (x - mean) - rounding
    else:  # RMSNorm: the mean square, merged as a variance about 0
        mean = rounding = jnp.zeros(per_row, x.dtype)
        centered = x
    if mask is None:
        count = jnp.full(per_row, math.prod(x.shape[i] for i in axes), x.dtype)
        var = jnp.mean(jnp.square(centered), axis=axes, keepdims=True)
    else:
        count = jnp.sum(jnp.broadcast_to(mask, x.shape), axis=axes, keepdims=True, dtype=x.dtype)
        squares = jnp.where(mask, jnp.square(centered), 0)
        var = jnp.sum(squares, axis=axes, keepdims=True) / jnp.maximum(count, 1)
    if groups is None:
        mean, var, count, moved = _merge(mean, rounding, var, count, axis_name)
    else:
        group_axis, start, total = groups
        local = var.shape[group_axis]

        def scatter(v: Array) -> Array:  # this shard's groups into all ``total`` groups
            shape = (*v.shape[:group_axis], total, *v.shape[group_axis + 1 :])
            return lax.dynamic_update_slice_in_dim(jnp.zeros(shape, v.dtype), v, start, group_axis)

        merged = _merge(scatter(mean), scatter(rounding), scatter(var), scatter(count), axis_name)
        mean, var, count, moved = (
            lax.dynamic_slice_in_dim(v, start, local, group_axis) for v in merged
        )
    if center:
        centered = centered - moved
    y = centered * inverse_std(var, epsilon)
    if scale is not None:
        y = y * scale
    if offset is not None:
        y = y + offset
    if mask is not None:
        y = jnp.where(mask, y, 0 if offset is None else offset)
    return y
