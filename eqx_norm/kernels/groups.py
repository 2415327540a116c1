r"""GroupNorm and InstanceNorm on the compiled CPU kernel, as differentiable JAX operations.

``x`` arrives as a 3-D view: channels-last ``(N, S, C)`` (each group is ``C / G`` strided
channels at every position) or channels-first ``(N, C, S)`` (each group is contiguous).
The binding is built like :mod:`eqx_norm.kernels.rows`, from the same rule builders
(:mod:`eqx_norm.kernels._binding`):

* :func:`normalize_groups` is a :func:`jax.custom_jvp` whose primal runs the forward
  kernel (which also returns each ``(n, g)`` group's statistics) and whose tangent is a
  primitive linear in ``(dx, dscale, doffset)``; reverse mode transposes it into the
  backward kernel, which writes no ``dx`` when ``x`` is not differentiated;
* forward mode, and every primitive's own derivative, is :func:`jax.jvp` of the ``jnp``
  formulas below, so ``jvp``, ``jacfwd`` and ``hessian`` work;
* ``vmap`` with shared parameters folds its axis into ``N`` (the backward then sums
  ``dscale``/``doffset`` per example); a per-example scale runs the ``jnp`` formula;
* under a multi-device ``jit`` the kernels go through ``custom_partitioning`` over ``N``
  (rows.py's rule on a flat ``(N, S * C)`` view): each device normalizes its own examples,
  the backward ``psum``\ s ``dscale``/``doffset``; no all-gather of ``x``;
* ``jax.export`` and other platforms lower the ``jnp`` formulas: no custom call.

The kernel's results for one example do not depend on the rest of the batch or on the
thread count (bitwise): see ``cpu/group_norm.cc``.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._statistics import centered_statistics
from .._xla import is_zero_tangent
from . import _jax_hooks as hooks
from ._binding import (
    _abstract,
    _backward_fold,
    _batch_rule,
    _jvp_of,
    _kernel_or_reference,
    _partitioned,
    _rows_unfold,
)

__all__ = ["normalize_groups"]

_FORWARD, _BACKWARD = "eqx_norm_groups_forward", "eqx_norm_groups_backward"


def normalize_groups(
    x: Float[Array, "n a b"],
    scale: Float[Array, " c"] | None,
    offset: Float[Array, " c"] | None,
    *,
    num_groups: int,
    channels_last: bool,
    epsilon: float,
) -> Float[Array, "n a b"]:
    """GroupNorm of each ``(n, g)`` group of ``x``, by the compiled kernel.

    ``y = (x - mean) * rsqrt(var + eps) * scale[c] + offset[c]`` with the mean and variance
    of each example's group of ``C / num_groups`` channels over all positions, float32 and
    two-pass after subtracting the group's first element; the output has x's dtype. A
    constant group gives exactly ``offset``.

    Args:
        x: ``(N, S, C)`` if ``channels_last`` else ``(N, C, S)``, of a dtype the library
            was built for (see :func:`eqx_norm.kernels.rows.unavailable_reason`).
        scale: ``(C,)`` float32, or None (ones).
        offset: ``(C,)`` float32, or None (zeros).
        num_groups: ``G``, dividing ``C`` (``C`` for InstanceNorm).
        channels_last: the layout of ``x``.
        epsilon: added to the variance, ``>= 0``.

    Returns:
        An array of x's shape and dtype.
    """
    c = x.shape[2] if channels_last else x.shape[1]
    scale = jnp.ones((c,), jnp.float32) if scale is None else scale
    offset = jnp.zeros((c,), jnp.float32) if offset is None else offset
    return _normalize(x, scale, offset, float(epsilon), int(num_groups), bool(channels_last))


# ----------------------------------------------------------------------------------------
# The jnp formulas: the kernel's reference, its derivatives, and its lowering where the
# kernel may not run. They work on the grouped view (N, S, G, K) or (N, G, K, S).


def _grouped(a, num_groups, channels_last):
    """``a`` of x's 3-D shape as ``(N, S, G, K)`` or ``(N, G, K, S)``, and the group axes."""
    n, first, second = a.shape
    if channels_last:
        return a.reshape(n, first, num_groups, second // num_groups), (1, 3)
    return a.reshape(n, num_groups, first // num_groups, second), (2, 3)


def _per_channel(v, num_groups, channels_last):
    """A ``(C,)`` vector broadcastable against the grouped view."""
    shape = (1, 1, num_groups, -1) if channels_last else (1, num_groups, -1, 1)
    return v.reshape(shape)


def _per_group(v, channels_last):
    """An ``(N, G)`` statistic broadcastable against the grouped view."""
    return v[:, None, :, None] if channels_last else v[:, :, None, None]


def _first(xg, axes):
    """Each group's first element, kept as size-1 axes: the kernel's shift."""
    return xg[tuple(slice(0, 1) if i in axes else slice(None) for i in range(xg.ndim))]


def _xhat(x, mean_shift, rstd, num_groups, channels_last):
    xg, axes = _grouped(x.astype(jnp.float32), num_groups, channels_last)
    centered = (xg - _first(xg, axes)) - _per_group(mean_shift, channels_last)
    return centered * _per_group(rstd, channels_last), axes


def _jnp_forward(x, scale, offset, *, epsilon, num_groups, channels_last):
    xg, axes = _grouped(x.astype(jnp.float32), num_groups, channels_last)
    # the library's one copy of the statistics; `mean_shift` is the residual the tangent
    # and the backward rebuild xhat from, as the kernel saves it
    centered, rstd = centered_statistics(xg, axes, epsilon=epsilon)
    mean_shift = jnp.mean(xg - _first(xg, axes), axis=axes)
    y = centered * rstd * _per_channel(scale, num_groups, channels_last)
    y = y + _per_channel(offset, num_groups, channels_last)
    return y.reshape(x.shape).astype(x.dtype), mean_shift, rstd.reshape(mean_shift.shape)


def _group_mean(a, axes):
    return jnp.mean(a, axis=axes, keepdims=True)


def _jnp_tangent(x, scale, mean_shift, rstd, *linear, num_groups, channels_last, which):
    """The forward pass's tangent, linear in the operands named by ``which``."""
    named = dict(zip(which, linear, strict=True))
    xhat, axes = _xhat(x, mean_shift, rstd, num_groups, channels_last)
    dy = jnp.zeros(xhat.shape, jnp.float32)
    if "dx" in named:
        dxg, _ = _grouped(named["dx"].astype(jnp.float32), num_groups, channels_last)
        inner = (dxg - _group_mean(dxg, axes)) - xhat * _group_mean(dxg * xhat, axes)
        dxhat = _per_group(rstd, channels_last) * inner
        dy = dy + dxhat * _per_channel(scale, num_groups, channels_last)
    if "dscale" in named:
        dy = dy + xhat * _per_channel(named["dscale"], num_groups, channels_last)
    if "doffset" in named:
        dy = dy + _per_channel(named["doffset"], num_groups, channels_last)
    return [dy.reshape(x.shape).astype(x.dtype)]


def _jnp_backward(x, scale, mean_shift, rstd, ct, *, num_groups, channels_last, groups, want_dx):
    """The tangent's transpose: ``(dx, dscale, doffset)``, the last two ``(groups, C)``,
    summed over each group of ``N / groups`` examples; ``dx`` is empty unless ``want_dx``."""
    xhat, axes = _xhat(x, mean_shift, rstd, num_groups, channels_last)
    g, _ = _grouped(ct.astype(jnp.float32), num_groups, channels_last)
    space = 1 if channels_last else 3  # the position axis of the grouped view
    c = scale.shape[0]
    dscale = jnp.sum(jnp.sum(g * xhat, axis=space).reshape(groups, -1, c), axis=1)
    doffset = jnp.sum(jnp.sum(g, axis=space).reshape(groups, -1, c), axis=1)
    if not want_dx:
        return jnp.zeros((0, *x.shape[1:]), x.dtype), dscale, doffset
    v = g * _per_channel(scale, num_groups, channels_last)
    inner = (v - _group_mean(v, axes)) - xhat * _group_mean(v * xhat, axes)
    dx = _per_group(rstd, channels_last) * inner
    return dx.reshape(x.shape).astype(x.dtype), dscale, doffset


# ----------------------------------------------------------------------------------------
# The kernel calls.


def _forward_call(x, scale, offset, *, epsilon, num_groups, channels_last):
    stats = jax.ShapeDtypeStruct((x.shape[0], num_groups), jnp.float32)
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), stats, stats)
    return jax.ffi.ffi_call(_FORWARD, out)(
        x,
        scale,
        offset,
        epsilon=np.float32(epsilon),
        num_groups=np.int64(num_groups),
        channels_last=channels_last,
    )


def _backward_call(x, scale, mean_shift, rstd, ct, *, num_groups, channels_last, groups, want_dx):
    c = scale.shape[0]
    out = (
        jax.ShapeDtypeStruct(x.shape if want_dx else (0, *x.shape[1:]), x.dtype),
        jax.ShapeDtypeStruct((groups, c), jnp.float32),
        jax.ShapeDtypeStruct((groups, c), jnp.float32),
    )
    return jax.ffi.ffi_call(_BACKWARD, out)(
        x,
        scale,
        mean_shift,
        rstd,
        ct,
        num_groups=np.int64(num_groups),
        channels_last=channels_last,
        groups=np.int64(groups),
        want_dx=want_dx,
    )


# Under a multi-device jit: partitioned over N by rows.py's rule, on the flat (N, S * C)
# view ("m": split by rows, "r": replicated); the statistics (N, G) are split by rows too.


def _unflat(x2, channels, channels_last):
    n = x2.shape[0]
    return x2.reshape((n, -1, channels) if channels_last else (n, channels, -1))


def _forward_flat(x2, scale, offset, *, epsilon, num_groups, channels_last):
    x = _unflat(x2, scale.shape[0], channels_last)
    params = dict(epsilon=epsilon, num_groups=num_groups, channels_last=channels_last)
    y, mean_shift, rstd = _forward_call(x, scale, offset, **params)
    return y.reshape(x2.shape), mean_shift, rstd


def _backward_flat(x2, scale, mean_shift, rstd, ct2, *, num_groups, channels_last):
    x = _unflat(x2, scale.shape[0], channels_last)
    ct = _unflat(ct2, scale.shape[0], channels_last)
    params = dict(num_groups=num_groups, channels_last=channels_last, groups=1, want_dx=True)
    dx, dscale, doffset = _backward_call(x, scale, mean_shift, rstd, ct, **params)
    return dx.reshape(x2.shape), dscale[0], doffset[0]


_forward_flat_partitioned = _partitioned(
    _forward_flat,
    "mrr",
    "mmm",
    ("epsilon", "num_groups", "channels_last"),
    "r d, c, c -> r d, r g, r g",
)
_backward_flat_partitioned = _partitioned(
    _backward_flat,
    "mrmmm",
    "mrr",
    ("num_groups", "channels_last"),
    "r d, c, r g, r g, r d -> r d, c, c",
    psum_outputs=(1, 2),
)


def _forward_partitioned(x, scale, offset, **params):
    y, mean_shift, rstd = _forward_flat_partitioned(
        x.reshape(x.shape[0], -1), scale, offset, **params
    )
    return y.reshape(x.shape), mean_shift, rstd


def _backward_partitioned(x, scale, mean_shift, rstd, ct, *, groups, want_dx, **params):
    """The example-partitioned backward (``groups == 1``; it always writes dx)."""
    flat = (x.shape[0], -1)
    dx, dscale, doffset = _backward_flat_partitioned(
        x.reshape(flat), scale, mean_shift, rstd, ct.reshape(flat), **params
    )
    dx = dx.reshape(x.shape)
    return (dx if want_dx else dx[:0]), dscale[None], doffset[None]


# ----------------------------------------------------------------------------------------
# The primitives.


def _channels(x, channels_last):
    return x.shape[2] if channels_last else x.shape[1]


_forward_p = hooks.define_primitive(
    "eqx_norm_groups_forward",
    abstract_eval=_abstract(
        lambda x, s, o, *, num_groups, **_: [
            (x.shape, x.dtype),
            ((x.shape[0], num_groups), jnp.float32),
            ((x.shape[0], num_groups), jnp.float32),
        ]
    ),
    reference=_jnp_forward,
    lowering=_kernel_or_reference(
        _forward_call, lambda **p: functools.partial(_forward_partitioned, **p), _jnp_forward
    ),
    jvp=lambda *a, **p: _jvp_of(_jnp_forward, _forward_p)(*a, **p),
    batch=_batch_rule(
        lambda: _forward_p, _jnp_forward, (0,), (1, 2), lambda p, n: (p, _rows_unfold)
    ),
)


_backward_p = hooks.define_primitive(
    "eqx_norm_groups_backward",
    abstract_eval=_abstract(
        lambda x, s, m, r, ct, *, groups, want_dx, **_: [
            (x.shape if want_dx else (0, *x.shape[1:]), x.dtype),
            ((groups, s.shape[0]), jnp.float32),
            ((groups, s.shape[0]), jnp.float32),
        ]
    ),
    reference=_jnp_backward,
    lowering=_kernel_or_reference(
        _backward_call,
        lambda **p: functools.partial(_backward_partitioned, **p),
        _jnp_backward,
    ),
    jvp=lambda *a, **p: _jvp_of(_jnp_backward, _backward_p)(*a, **p),
    batch=_batch_rule(lambda: _backward_p, _jnp_backward, (0, 2, 3, 4), (1,), _backward_fold),
)


def _tangent_transpose(cts, x, scale, mean_shift, rstd, *linear, num_groups, channels_last, which):
    (ct,) = cts
    if type(ct) is hooks.Zero:
        return [None] * (4 + len(linear))
    dx, dscale, doffset = hooks.bind(
        _backward_p,
        x,
        scale,
        mean_shift,
        rstd,
        ct,
        num_groups=num_groups,
        channels_last=channels_last,
        groups=1,
        want_dx="dx" in which,
    )
    found = {"dx": dx, "dscale": dscale[0], "doffset": doffset[0]}
    return [None] * 4 + [found[name] for name in which]


def _tangent_fold(params, size):
    return params, lambda outs, n: [outs[0].reshape(n, -1, *outs[0].shape[1:])]


def _tangent_batch(args, dims, **params):
    """Fold when only ``dx`` among the linear operands is batched (like ``x``)."""
    which = params["which"]
    shared = [1] + [4 + i for i, name in enumerate(which) if name != "dx"]
    per_example = (0, 2, 3, *(4 + i for i, name in enumerate(which) if name == "dx"))
    if dims[0] is None:  # x unbatched, a tangent batched (jacfwd): vmap the jnp formula
        shared = range(len(args))
    rule = _batch_rule(lambda: _tangent_p, _jnp_tangent, per_example, shared, _tangent_fold)
    return rule(args, dims, **params)


_tangent_p = hooks.define_primitive(
    "eqx_norm_groups_tangent",
    abstract_eval=_abstract(lambda x, *rest, **_: [(x.shape, x.dtype)]),
    reference=_jnp_tangent,
    # evaluated only in forward mode: plain jnp, fused by XLA
    lowering=lambda for_export, devices, **params: functools.partial(_jnp_tangent, **params),
    jvp=lambda *a, **p: _jvp_of(_jnp_tangent, _tangent_p)(*a, **p),
    batch=_tangent_batch,
    transpose=_tangent_transpose,
)


# ----------------------------------------------------------------------------------------
# The differentiable function.


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4, 5))
def _normalize(x, scale, offset, epsilon, num_groups, channels_last):
    params = dict(epsilon=epsilon, num_groups=num_groups, channels_last=channels_last)
    return hooks.bind(_forward_p, x, scale, offset, **params)[0]


@functools.partial(_normalize.defjvp, symbolic_zeros=True)
def _normalize_jvp(epsilon, num_groups, channels_last, primals, tangents):
    x, scale, offset = primals
    params = dict(num_groups=num_groups, channels_last=channels_last)
    y, mean_shift, rstd = hooks.bind(_forward_p, x, scale, offset, epsilon=epsilon, **params)
    names = ("dx", "dscale", "doffset")
    present = [(n, t) for n, t in zip(names, tangents, strict=True) if not is_zero_tangent(t)]
    if not present:
        return y, jnp.zeros_like(y)
    which = tuple(name for name, _ in present)
    linear = (t for _, t in present)
    (dy,) = hooks.bind(_tangent_p, x, scale, mean_shift, rstd, *linear, which=which, **params)
    return y, dy
