r"""BatchNorm's training step on the compiled CPU kernel: :func:`normalize_columns`.

XLA:CPU runs BatchNorm's column reductions (per channel, over the batch and every spatial
axis) at a quarter of its copy rate; its elementwise passes run at the copy rate, but read
each line of their output before writing it. So the kernel (``cpu/batch_norm.cc``)
computes the per-channel sums and the forward's ``y``, and XLA the rest:

- forward: ``s1 = sum(x - x0)``, ``s2 = sum((x - x0)^2)`` about each channel's first
  element ``x0`` (one read of ``x``), then ``d = s1 / n``, ``var = s2 / n - d^2`` and
  ``y = ((x - x0) - d) * rstd * scale + offset`` (one read, one write, streamed where the
  call is larger than a cache);
- backward: ``sum(ct)`` and ``sum(ct * xhat)`` (one read of ``x`` and ``ct``), then the
  elementwise ``dx = scale * rstd * (ct - mean(ct) - xhat * mean(ct * xhat))`` in XLA,
  which fuses its terms.

Two primitives carry the derivative, each the other's transpose. ``sums_p`` is the
kernel's sums; under a batch-sharded ``jit`` each device sums its own rows and the sums,
being sums about the same shift, are psummed, so the statistics are the global batch's
exactly; ``vmap`` folds the batch into the kernel's ``groups``. The backward sums are
linear in ``ct``, and their transpose is elementwise. ``spread_p`` is the tangent once its
sums are known, ``k * dx + u + xhat * v`` per channel, in ``jnp``; its transpose is the
kernel's backward sums. So the derivative is plain JAX between the two: with
``axis_name`` the per-channel sums are psummed there, and JAX transposes the psum as it
does any other. ``normalize_p`` is the forward's ``y`` (its derivative is the tangent
above). The lowering runs the kernel on the CPU, and the ``jnp`` formula elsewhere and for
``jax.export``, as the other kernels' binding does (:mod:`eqx_norm.kernels._binding`).
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float

from .._core import inverse_std
from ._binding import MISSING, _partitioned, _varying, result
from ._library import served, unavailable_reason

__all__ = ["normalize_columns", "normalize_inference", "unavailable_reason"]

if MISSING is None:
    from jax.extend.core import Primitive, jaxpr_as_fun
    from jax.interpreters import ad, batching, mlir
    from jax.lax import pcast


class _Static(NamedTuple):
    channels_last: bool
    epsilon: float
    dtype: np.dtype  # y's
    axis_name: Hashable | None  # the replicas whose sums are merged
    kernel_y: bool  # y by the kernel's pass; else jnp, where a mask's select fuses into it


def normalize_columns(
    x: Float[Array, "n a b"],
    scale: Float[Array, " c"],
    offset: Float[Array, " c"],
    *,
    channels_last: bool,
    epsilon: float,
    dtype: jnp.dtype,
    axis_name: Hashable | None = None,
    shift: Float[Array, " c"] | None = None,
    count: Float[Array, " c"] | None = None,
) -> tuple[Float[Array, "n a b"], Float[Array, " c"], Float[Array, " c"]]:
    """BatchNorm in training, by the kernel's sums: ``(y, mean, var)`` per channel of ``x``
    ``(N, S, C)`` (``channels_last``) or ``(N, C, S)``, over every example and position:
    ``y = (x - mean) * rsqrt(var + epsilon) * scale + offset`` in ``dtype``, ``var``
    biased; ``scale``/``offset`` ``(C,)`` float32. ``epsilon`` must be positive. With
    ``axis_name`` the statistics are those of every replica along that mapped axis (``vmap``,
    ``pmap``, ``shard_map``): each replica's sums, psummed. Differentiable in every mode,
    batchable, and exact under a batch-sharded ``jit``.

    ``shift`` and ``count`` serve a mask: the sums are taken about ``shift`` (a value of
    each channel, the same on every replica; default its first element), and ``count`` is
    the number of values of each channel on this replica (default all), so that elements
    equal to ``shift`` and left out of ``count`` take no part (a channel with none gives
    mean 0 and variance 0). Neither is differentiated."""
    served(unavailable_reason(x))
    static = _Static(
        bool(channels_last),
        float(epsilon),
        jnp.dtype(dtype),
        axis_name,
        kernel_y=count is None and jnp.dtype(dtype) == x.dtype,
    )
    if shift is None:
        shift = jax.lax.stop_gradient(_first(x, static.channels_last))
        if axis_name is not None:  # one shift for all replicas: the largest of theirs
            shift = jax.lax.pmax(shift, axis_name)
    else:
        shift = jax.lax.stop_gradient(jnp.asarray(shift, jnp.float32).reshape(1, -1))
    if count is not None:
        count = jax.lax.stop_gradient(jnp.asarray(count, jnp.float32).reshape(1, -1))
    return _train(x, scale, offset, shift, count, static)


# ----------------------------------------------------------------------------------------
# The jnp formulas, on x viewed as (groups, N / groups, S, C) or (groups, N / groups, C, S)
# with per-group statistics (groups, C): the kernel's reference, and its lowering where it
# may not run.


def _grouped(a, groups):
    return a.reshape(groups, a.shape[0] // groups, *a.shape[1:])


def _per_channel(v, channels_last):
    """``(groups, C)`` broadcastable against the grouped view."""
    return v[:, None, None, :] if channels_last else v[:, None, :, None]


def _axes(channels_last):
    return (1, 2) if channels_last else (1, 3)


def _jnp_sums(x, *operands, channels_last, groups, backward):
    """``(sum(x - shift), sum((x - shift)^2))``, or with ``backward`` ``(x, ct, shift,
    mean)``: ``(sum(ct), sum(ct * ((x - shift) - mean)))``, each ``(groups, C)``."""
    axes = _axes(channels_last)
    shift = operands[-1 - backward]
    v = _grouped(x.astype(jnp.float32), groups) - _per_channel(shift, channels_last)
    if not backward:
        return jnp.sum(v, axis=axes), jnp.sum(jnp.square(v), axis=axes)
    ct, mean = _grouped(operands[0].astype(jnp.float32), groups), operands[2]
    return jnp.sum(ct, axis=axes), jnp.sum(ct * (v - _per_channel(mean, channels_last)), axis=axes)


def _centered(x, shift, d, channels_last, groups):
    """``(x - shift) - d`` in float32, grouped: ``xhat / rstd``."""
    per = functools.partial(_per_channel, channels_last=channels_last)
    return (_grouped(x.astype(jnp.float32), groups) - per(shift)) - per(d)


def _jnp_spread(x, shift, d, rstd, k, *linear, channels_last, groups, has_dx, dtype):
    """``k * dx + u + xhat * v`` (each per channel but ``dx``) in ``dtype``: the training
    forward's tangent once its sums are known, linear in ``(dx, u, v)``, ``dx`` only with
    ``has_dx``."""
    per = functools.partial(_per_channel, channels_last=channels_last)
    *dx, u, v = linear
    out = per(u) + _centered(x, shift, d, channels_last, groups) * per(rstd * v)
    if has_dx:
        out = out + _grouped(dx[0].astype(jnp.float32), groups) * per(k)
    return [out.reshape(x.shape).astype(dtype)]


def _jnp_normalize(x, shift, d, w, u, *, channels_last, groups):
    """``((x - shift) - d) * w + u`` per channel, in x's dtype: the forward's ``y``."""
    per = functools.partial(_per_channel, channels_last=channels_last)
    y = _centered(x, shift, d, channels_last, groups) * per(w) + per(u)
    return [y.reshape(x.shape).astype(x.dtype)]


# ----------------------------------------------------------------------------------------
# The kernel's sums and its normalize pass: primitives lowered to the FFI calls on the CPU.


def _sums_call(x, *operands, channels_last, groups, backward):
    c = x.shape[2] if channels_last else x.shape[1]
    out = (result(x, (groups, c), jnp.float32),) * 2
    target = "eqx_norm_columns_backward" if backward else "eqx_norm_columns_forward"
    return jax.ffi.ffi_call(target, out)(
        x, *operands, channels_last=channels_last, groups=np.int64(groups)
    )


def _normalize_call(x, *stats, channels_last, groups):
    out = (result(x, x.shape, x.dtype),)
    return jax.ffi.ffi_call("eqx_norm_columns_normalize", out)(
        x, *stats, channels_last=channels_last, groups=np.int64(groups)
    )


@functools.cache
def _call_jaxpr(call, items, avals, shard_mapped):
    """The kernel call's jaxpr, split by rows under a batch-sharded ``jit`` (the sums
    psummed, ``y`` split as x is) unless ``vmap`` folded several batches into it or under
    ``shard_map``."""
    params = dict(items)
    fn = functools.partial(call, **params)
    plain = jax.make_jaxpr(fn)(*avals)
    if shard_mapped or params["groups"] != 1:
        return plain
    if call is _normalize_call:
        roles, out_roles = "mrrrr", "m"
    else:
        roles, out_roles = ("mmrr" if params["backward"] else "mr"), "gg"
    return jax.make_jaxpr(_partitioned(fn, roles, out_roles, avals, plain.out_avals))(*avals)


def _vary_alike(args):
    """The operands cast to vary alike under ``shard_map``, as JAX's own primitives are."""
    axes = frozenset().union(*(_varying(a) for a in args))
    return [pcast(a, tuple(sorted(axes - _varying(a))), to="varying") for a in args], axes


def _bind_sums(x, *operands, channels_last, groups, backward):
    args, axes = _vary_alike([x, *operands])
    params = dict(channels_last=channels_last, groups=groups, backward=backward)
    items, avals = tuple(sorted(params.items())), tuple(map(jax.typeof, args))
    call = _call_jaxpr(_sums_call, items, avals, bool(axes))
    return sums_p.bind(*args, call=call, **params)


def _bind_normalize(x, *stats, channels_last, groups):
    args, axes = _vary_alike([x, *stats])
    params = dict(channels_last=channels_last, groups=groups)
    items, avals = tuple(sorted(params.items())), tuple(map(jax.typeof, args))
    call = _call_jaxpr(_normalize_call, items, avals, bool(axes))
    (y,) = normalize_p.bind(*args, call=call, **params)
    return y


def _kernel_lowering(formula, *, cpu):
    """The FFI call's jaxpr on the CPU, else (and for ``jax.export``) ``formula``."""

    def lowering(ctx, *args, call, **params):
        if not cpu or ctx.is_forward_compat():
            fn = functools.partial(formula, **params)
            return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)
        return mlir.lower_fun(jaxpr_as_fun(call), multiple_results=True)(ctx, *args)

    return lowering


def _fold(args, dims, size):
    """Each operand with its batch axis first and merged into its leading axis."""
    folded = []
    for a, d in zip(args, dims):
        a = jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
        folded.append(a.reshape(-1, *a.shape[2:]))
    return folded


def _sums_batch(args, dims, *, call, groups, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    outs = _bind_sums(*_fold(args, dims, size), groups=size * groups, **params)
    return [o.reshape(size, groups, *o.shape[1:]) for o in outs], [0, 0]


def _sums_jvp(primals, tangents, *, call, **params):
    formula = functools.partial(_jnp_sums, **params)
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    outs = _bind_sums(*primals, **params)
    return outs, list(jax.jvp(formula, tuple(primals), tangents)[1])


def _normalize_batch(args, dims, *, call, groups, **params):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    y = _bind_normalize(*_fold(args, dims, size), groups=size * groups, **params)
    return [y.reshape(size, -1, *y.shape[1:])], [0]


def _normalize_jvp(primals, tangents, *, call, **params):
    formula = functools.partial(_jnp_normalize, **params)
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    return [_bind_normalize(*primals, **params)], jax.jvp(formula, tuple(primals), tangents)[1]


def _sums_transpose(cts, x, *operands, call, channels_last, groups, backward):
    """The backward sums are linear in ``ct``: their transpose spreads each channel's pair
    of cotangents back over it, ``ca + ((x - shift) - mean) * cb``."""
    if not backward or ad.is_undefined_primal(x) or not ad.is_undefined_primal(operands[0]):
        raise NotImplementedError("the kernel's sums are linear only in the backward's ct")
    ct, shift, mean = operands
    zero = jnp.zeros((groups, shift.shape[-1]), jnp.float32)
    ca, cb = (zero if type(c) is ad.Zero else c for c in cts)
    per = functools.partial(_per_channel, channels_last=channels_last)
    spread = per(ca) + _centered(x, shift, mean, channels_last, groups) * per(cb)
    return [None, spread.reshape(x.shape).astype(ct.aval.dtype), None, None]


# ----------------------------------------------------------------------------------------
# The spread: the tangent once its sums are known, jnp, linear in its trailing operands;
# its transpose is the kernel's backward sums.


def _bind_spread(*args, **params):
    args, _ = _vary_alike(args)
    return spread_p.bind(*args, **params)


def _spread_transpose(cts, x, shift, d, rstd, k, *linear, channels_last, groups, has_dx,
                      dtype):  # fmt: skip
    (ct,) = cts
    found = [None] * (5 + len(linear))
    if type(ct) is ad.Zero:
        return found
    *dx, u, v = linear
    if has_dx and ad.is_undefined_primal(dx[0]):
        per = functools.partial(_per_channel, channels_last=channels_last)
        dx_ct = _grouped(ct.astype(jnp.float32), groups) * per(k)
        found[5] = dx_ct.reshape(x.shape).astype(dx[0].aval.dtype)
    if ad.is_undefined_primal(u) or ad.is_undefined_primal(v):
        sums = dict(channels_last=channels_last, groups=groups, backward=True)
        sum_ct, sum_ct_centered = _bind_sums(x, ct, shift, d, **sums)
        found[-2] = sum_ct if ad.is_undefined_primal(u) else None
        found[-1] = sum_ct_centered * rstd if ad.is_undefined_primal(v) else None
    return found


def _spread_batch(args, dims, *, groups, **params):
    """Fold the batch into ``groups``: every operand is per row of x or per group."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    (out,) = _bind_spread(*_fold(args, dims, size), groups=size * groups, **params)
    return [out.reshape(size, -1, *out.shape[1:])], [0]


def _spread_jvp(primals, tangents, **params):
    formula = functools.partial(_jnp_spread, **params)
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    return jax.jvp(formula, tuple(primals), tangents)


def _lower_jnp(formula):
    def lowering(ctx, *args, **params):
        fn = functools.partial(formula, **params)
        return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)

    return lowering


def _kernel_primitive(name, formula, jvp, batch):
    """A primitive of the kernel: its call's jaxpr (``call``) run jitted, lowered to the FFI
    call on the CPU and to ``formula`` elsewhere."""
    prim = Primitive(name)
    prim.multiple_results = True
    jitted = functools.cache(lambda items: jax.jit(functools.partial(prim.bind, **dict(items))))
    prim.def_impl(lambda *args, **params: jitted(tuple(params.items()))(*args))
    prim.def_abstract_eval(lambda *avals, call, **params: call.out_avals)
    mlir.register_lowering(prim, _kernel_lowering(formula, cpu=False))
    mlir.register_lowering(prim, _kernel_lowering(formula, cpu=True), platform="cpu")
    ad.primitive_jvps[prim] = jvp
    batching.primitive_batchers[prim] = batch
    return prim


def _define():
    sums = _kernel_primitive("eqx_norm_columns_sums", _jnp_sums, _sums_jvp, _sums_batch)
    ad.primitive_transposes[sums] = _sums_transpose
    normalize = _kernel_primitive(
        "eqx_norm_columns_normalize", _jnp_normalize, _normalize_jvp, _normalize_batch
    )

    spread = Primitive("eqx_norm_columns_spread")
    spread.multiple_results = True
    spread.def_impl(lambda *args, **params: _jnp_spread(*args, **params))
    spread.def_abstract_eval(
        lambda *avals, **params: (
            jax.make_jaxpr(functools.partial(_jnp_spread, **params))(*avals).out_avals
        )
    )
    mlir.register_lowering(spread, _lower_jnp(_jnp_spread))
    ad.primitive_jvps[spread] = _spread_jvp
    ad.primitive_transposes[spread] = _spread_transpose
    batching.primitive_batchers[spread] = _spread_batch
    return sums, normalize, spread


if MISSING is None:
    sums_p, normalize_p, spread_p = _define()


# ----------------------------------------------------------------------------------------
# The training forward and its derivative.


def _first(x, channels_last):
    """A value of each channel, ``(1, C)`` float32: the shift the sums are taken about, the
    same on every device. Its first element (a slice), or where the batch axis is sharded
    over explicit mesh axes (which JAX slices no element out of) the largest of each
    example's first elements: an element too, so that a constant channel stays exact."""
    first = x[:, 0, :] if channels_last else x[:, :, 0]
    spec = getattr(jax.typeof(x).sharding, "spec", ())
    first = jnp.max(first, axis=0) if spec and spec[0] is not None else first[0]
    return first.astype(jnp.float32)[None]


def _merged(sums, axis_name):
    """The sums over every replica of ``axis_name`` (they are about the same shift)."""
    return sums if axis_name is None else jax.lax.psum(tuple(sums), axis_name)


def _forward(x, scale, offset, shift, count, static):
    if count is None:  # every element: a number
        n = x.size // scale.shape[0]
        n = n if static.axis_name is None else n * jax.lax.psum(1, static.axis_name)
    else:  # a channel with no value: its sums are 0, so are its moments
        n = count if static.axis_name is None else jax.lax.psum(count, static.axis_name)
        n = jnp.maximum(n, 1)
    sums = _bind_sums(x, shift, channels_last=static.channels_last, groups=1, backward=False)
    s1, s2 = _merged(sums, static.axis_name)
    d = s1 / n
    var = jnp.maximum(s2 / n - jnp.square(d), 0)
    rstd = inverse_std(var, static.epsilon)
    stats = (shift, d, rstd * scale[None], offset[None])
    if static.kernel_y:  # the kernel streams y
        y = _bind_normalize(x, *stats, channels_last=static.channels_last, groups=1)
    else:  # the formula in float32, rounded once to y's dtype
        per = functools.partial(_per_channel, channels_last=static.channels_last)
        y = _centered(x, shift, d, static.channels_last, 1) * per(stats[2]) + per(stats[3])
        y = y.reshape(x.shape).astype(static.dtype)
    return y, shift, d, var, rstd, n


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _train(x, scale, offset, shift, count, static):
    y, shift, d, var, *_ = _forward(x, scale, offset, shift, count, static)
    return y, (shift + d)[0], var[0]


@functools.partial(_train.defjvp, symbolic_zeros=True)
def _train_jvp(static, primals, tangents):
    """``dy = k * (dx - mean(dx) - xhat * mean(dx * xhat)) + xhat * dscale + doffset``,
    ``k = rstd * scale``: the kernel's sums of ``dx`` (merged over ``axis_name``), then the
    spread. Under ``grad`` the spread transposes to the kernel's sums of the cotangent and
    the sums to the elementwise ``dx``: one kernel pass, one fused pass."""
    x, scale, offset, shift, count = primals  # shift and count are not differentiated
    dx, dscale, doffset = (None if isinstance(t, SymbolicZero) else t for t in tangents[:3])
    y, shift, d, var, rstd, n = _forward(x, scale, offset, shift, count, static)
    k = rstd * scale[None]
    zero = jnp.zeros_like(var)
    u = zero if doffset is None else doffset[None]
    v = zero if dscale is None else dscale[None]
    dmean = dvar = zero[0]
    linear = []
    if dx is not None:
        dx = dx.astype(jnp.float32)  # one rounding of the cotangent under grad, not two
        sums = _bind_sums(x, dx, shift, d, channels_last=static.channels_last, groups=1,
                          backward=True)  # fmt: skip
        sum_dx, sum_dx_centered = _merged(sums, static.axis_name)
        u = u - k * sum_dx / n
        v = v - k * rstd * sum_dx_centered / n
        dmean, dvar = (sum_dx / n)[0], (2 * sum_dx_centered / n)[0]
        linear = [dx]
    if dx is None and dscale is None and doffset is None:
        dy = jnp.zeros_like(y)
    else:
        (dy,) = _bind_spread(x, shift, d, rstd, k, *linear, u, v,
                             channels_last=static.channels_last, groups=1,
                             has_dx=dx is not None, dtype=static.dtype)  # fmt: skip
    return (y, (shift + d)[0], var[0]), (dy, dmean, dvar)


# ----------------------------------------------------------------------------------------
# Inference: one kernel pass by the running statistics; its tangent is the spread above.


def normalize_inference(
    x: Float[Array, "n a b"],
    scale: Float[Array, " c"],
    offset: Float[Array, " c"],
    mean: Float[Array, " c"],
    var: Float[Array, " c"],
    *,
    channels_last: bool,
    epsilon: float,
) -> Float[Array, "n a b"]:
    """BatchNorm in inference, one pass of the kernel: ``y = (x - mean) * rsqrt(var +
    epsilon) * scale + offset`` in x's dtype, ``x`` as in :func:`normalize_columns` and
    every other operand ``(C,)`` float32. Elementwise, so an example's ``y`` does not depend
    on its batch. Differentiable in every operand and mode: the gradients of ``scale`` and
    ``offset`` are the kernel's sums."""
    served(unavailable_reason(x))
    return _inference(x, scale, offset, mean, var, (bool(channels_last), float(epsilon)))


def _inference_terms(scale, mean, var, static):
    """``(shift, d, rstd, k)`` of the spread, each ``(1, C)``."""
    rstd = inverse_std(var, static[1])[None]
    shift = mean[None]
    return shift, jnp.zeros_like(shift), rstd, rstd * scale[None]


@functools.partial(jax.custom_jvp, nondiff_argnums=(5,))
def _inference(x, scale, offset, mean, var, static):
    shift, d, _, k = _inference_terms(scale, mean, var, static)
    return _bind_normalize(x, shift, d, k, offset[None], channels_last=static[0], groups=1)


@functools.partial(_inference.defjvp, symbolic_zeros=True)
def _inference_jvp(static, primals, tangents):
    """``dy = k * dx + (doffset - k * dmean) + xhat * (dscale - scale * rstd^2 * dvar / 2)``:
    the spread, whose transpose is the kernel's sums."""
    x, scale, offset, mean, var = primals
    dx, dscale, doffset, dmean, dvar = (
        None if isinstance(t, SymbolicZero) else t for t in tangents
    )
    y = _inference(x, scale, offset, mean, var, static)
    shift, d, rstd, k = _inference_terms(scale, mean, var, static)
    u = d if doffset is None else doffset[None]
    v = d if dscale is None else dscale[None]
    if dmean is not None:
        u = u - k * dmean[None]
    if dvar is not None:
        v = v - scale[None] * jnp.square(rstd) * dvar[None] / 2
    if all(t is None for t in (dx, dscale, doffset, dmean, dvar)):
        return y, jnp.zeros_like(y)
    linear = [] if dx is None else [dx.astype(jnp.float32)]
    (dy,) = _bind_spread(x, shift, d, rstd, k, *linear, u, v, channels_last=static[0],
                         groups=1, has_dx=dx is not None, dtype=x.dtype)  # fmt: skip
    return y, dy
