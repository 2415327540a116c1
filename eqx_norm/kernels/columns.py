r"""BatchNorm's training step on the compiled CPU kernel: :func:`normalize_columns`.

XLA:CPU runs BatchNorm's column reductions (per channel, over the batch and every spatial
axis) at a quarter of its copy rate; its elementwise passes run at the copy rate. So the
kernel (``cpu/batch_norm.cc``) computes only the per-channel sums, and XLA the rest:

- forward: ``s1 = sum(x - x0)``, ``s2 = sum((x - x0)^2)`` about each channel's first
  element ``x0`` (one read of ``x``), then ``d = s1 / n``, ``var = s2 / n - d^2`` and the
  elementwise ``y = ((x - x0) - d) * rstd * scale + offset`` (one read, one write);
- backward: ``sum(ct)`` and ``sum(ct * xhat)`` (one read of ``x`` and ``ct``), then the
  elementwise ``dx = scale * rstd * (ct - mean(ct) - xhat * mean(ct * xhat))``.

Two primitives carry it: ``sums_p`` (the kernel's sums; under a batch-sharded ``jit`` each
device sums its own rows and the sums, being sums about the same shift, are psummed, so the
statistics are the global batch's exactly; ``vmap`` folds the batch into the kernel's
``groups``) and ``tangent_p`` (the forward's tangent, linear in ``dx``, ``dscale`` and
``doffset``, in ``jnp``; its transpose is the backward above). The lowering runs the
kernel on the CPU, and the ``jnp`` formula elsewhere and for ``jax.export``, as the other
kernels' binding does (:mod:`eqx_norm.kernels._binding`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
from jaxtyping import Array, Float

from .._core import inverse_std
from ._binding import MISSING, _partitioned, _varying, result
from ._library import served, unavailable_reason

__all__ = ["normalize_columns", "unavailable_reason"]

if MISSING is None:
    from jax.extend.core import Primitive, jaxpr_as_fun
    from jax.interpreters import ad, batching, mlir
    from jax.lax import pcast


class _Static(NamedTuple):
    channels_last: bool
    epsilon: float
    dtype: np.dtype  # y's


def normalize_columns(
    x: Float[Array, "n a b"],
    scale: Float[Array, " c"],
    offset: Float[Array, " c"],
    *,
    channels_last: bool,
    epsilon: float,
    dtype: jnp.dtype,
) -> tuple[Float[Array, "n a b"], Float[Array, " c"], Float[Array, " c"]]:
    """BatchNorm in training, by the kernel's sums: ``(y, mean, var)`` per channel of ``x``
    ``(N, S, C)`` (``channels_last``) or ``(N, C, S)``, over every example and position:
    ``y = (x - mean) * rsqrt(var + epsilon) * scale + offset`` in ``dtype``, ``var``
    biased; ``scale``/``offset`` ``(C,)`` float32. ``epsilon`` must be positive.
    Differentiable in every mode, batchable, and exact under a batch-sharded ``jit``."""
    served(unavailable_reason(x))
    static = _Static(bool(channels_last), float(epsilon), jnp.dtype(dtype))
    return _train(x, scale, offset, static)


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


def _xhat(x, shift, d, rstd, channels_last, groups):
    xg = _grouped(x.astype(jnp.float32), groups)
    per = functools.partial(_per_channel, channels_last=channels_last)
    return ((xg - per(shift)) - per(d)) * per(rstd)


def _jnp_tangent(x, shift, d, rstd, scale, *linear, channels_last, groups, which, dtype):
    """The training forward's tangent, linear in the operands named by ``which``."""
    named = dict(zip(which, linear, strict=True))
    xhat = _xhat(x, shift, d, rstd, channels_last, groups)
    axes = _axes(channels_last)
    per = functools.partial(_per_channel, channels_last=channels_last)
    dy = jnp.zeros(xhat.shape, jnp.float32)
    if "dx" in named:
        dx = _grouped(named["dx"].astype(jnp.float32), groups)
        mean = functools.partial(jnp.mean, axis=axes, keepdims=True)
        dy = dy + per(rstd * scale[None]) * ((dx - mean(dx)) - xhat * mean(dx * xhat))
    shape = (1, 1, 1, -1) if channels_last else (1, 1, -1, 1)
    if "dscale" in named:
        dy = dy + xhat * named["dscale"].reshape(shape)
    if "doffset" in named:
        dy = dy + named["doffset"].reshape(shape)
    return [dy.reshape(x.shape).astype(dtype)]


# ----------------------------------------------------------------------------------------
# The kernel's sums: a primitive lowered to the FFI call on the CPU.


def _sums_call(x, *operands, channels_last, groups, backward):
    c = x.shape[2] if channels_last else x.shape[1]
    out = (result(x, (groups, c), jnp.float32),) * 2
    target = "eqx_norm_columns_backward" if backward else "eqx_norm_columns_forward"
    return jax.ffi.ffi_call(target, out)(
        x, *operands, channels_last=channels_last, groups=np.int64(groups)
    )


@functools.cache
def _sums_jaxpr(items, avals, shard_mapped):
    """The kernel call's jaxpr, split by rows under a batch-sharded ``jit`` (the sums
    psummed) unless ``vmap`` folded several batches into it or under ``shard_map``."""
    params = dict(items)
    fn = functools.partial(_sums_call, **params)
    plain = jax.make_jaxpr(fn)(*avals)
    if shard_mapped or params["groups"] != 1:
        return plain
    roles = "mmrr" if params["backward"] else "mr"
    return jax.make_jaxpr(_partitioned(fn, roles, "gg", avals, plain.out_avals))(*avals)


def _vary_alike(args):
    """The operands cast to vary alike under ``shard_map``, as JAX's own primitives are."""
    axes = frozenset().union(*(_varying(a) for a in args))
    return [pcast(a, tuple(sorted(axes - _varying(a))), to="varying") for a in args], axes


def _bind_sums(x, *operands, channels_last, groups, backward):
    args, axes = _vary_alike([x, *operands])
    params = dict(channels_last=channels_last, groups=groups, backward=backward)
    call = _sums_jaxpr(tuple(sorted(params.items())), tuple(map(jax.typeof, args)), bool(axes))
    return sums_p.bind(*args, call=call, **params)


def _sums_lowering(ctx, *args, call, cpu, **params):
    if not cpu or ctx.is_forward_compat():
        return mlir.lower_fun(functools.partial(_jnp_sums, **params), multiple_results=True)(
            ctx, *args
        )
    return mlir.lower_fun(jaxpr_as_fun(call), multiple_results=True)(ctx, *args)


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


# ----------------------------------------------------------------------------------------
# The tangent: jnp, linear in its trailing operands; its transpose is the backward.


def _bind_tangent(*args, **params):
    args, _ = _vary_alike(args)
    return tangent_p.bind(*args, **params)


def _tangent_transpose(cts, x, shift, d, rstd, scale, *linear, channels_last, groups, which,
                       dtype):  # fmt: skip
    (ct,) = cts
    if type(ct) is ad.Zero:
        return [None] * (5 + len(linear))
    sums = dict(channels_last=channels_last, groups=groups)
    sum_ct, sum_ct_centered = _bind_sums(x, ct, shift, d, backward=True, **sums)
    found = {"doffset": jnp.sum(sum_ct, axis=0), "dscale": jnp.sum(sum_ct_centered * rstd, axis=0)}
    if "dx" in which:
        n = x.size // groups // scale.shape[0]
        per = functools.partial(_per_channel, channels_last=channels_last)
        xhat = _xhat(x, shift, d, rstd, channels_last, groups)
        g = _grouped(ct.astype(jnp.float32), groups)
        k = rstd * scale[None]
        dx = g * per(k) + (per(-k * sum_ct / n) + xhat * per(-k * rstd * sum_ct_centered / n))
        found["dx"] = dx.reshape(x.shape).astype(x.dtype)
    return [None] * 5 + [found[name] for name in which]


def _tangent_batch(args, dims, *, groups, which, **params):
    """Fold the batch into ``groups`` where the parameters' operands are shared, else
    ``vmap`` the ``jnp`` formula."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    shared = [4] + [5 + i for i, w in enumerate(which) if w != "dx"]  # scale, dscale, doffset
    if any(dims[i] is not None for i in shared):
        formula = functools.partial(_jnp_tangent, groups=groups, which=which, **params)
        return jax.vmap(formula, in_axes=tuple(dims))(*args), [0]
    folded = _fold(args, dims, size)
    for i in shared:
        folded[i] = args[i]
    (dy,) = _bind_tangent(*folded, groups=size * groups, which=which, **params)
    return [dy.reshape(size, -1, *dy.shape[1:])], [0]


def _tangent_jvp(primals, tangents, **params):
    formula = functools.partial(_jnp_tangent, **params)
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    return jax.jvp(formula, tuple(primals), tangents)


def _define():
    sums = Primitive("eqx_norm_columns_sums")
    sums.multiple_results = True
    jitted = functools.cache(lambda items: jax.jit(functools.partial(sums.bind, **dict(items))))
    sums.def_impl(lambda *args, **params: jitted(tuple(params.items()))(*args))
    sums.def_abstract_eval(lambda *avals, call, **params: call.out_avals)
    mlir.register_lowering(sums, functools.partial(_sums_lowering, cpu=False))
    mlir.register_lowering(sums, functools.partial(_sums_lowering, cpu=True), platform="cpu")
    ad.primitive_jvps[sums] = _sums_jvp
    batching.primitive_batchers[sums] = _sums_batch

    tangent = Primitive("eqx_norm_columns_tangent")
    tangent.multiple_results = True
    tangent.def_impl(lambda *args, **params: _jnp_tangent(*args, **params))
    tangent.def_abstract_eval(
        lambda *avals, **params: (
            jax.make_jaxpr(functools.partial(_jnp_tangent, **params))(*avals).out_avals
        )
    )
    mlir.register_lowering(
        tangent, lambda ctx, *args, **params: mlir.lower_fun(
            functools.partial(_jnp_tangent, **params), multiple_results=True
        )(ctx, *args)
    )  # fmt: skip
    ad.primitive_jvps[tangent] = _tangent_jvp
    ad.primitive_transposes[tangent] = _tangent_transpose
    batching.primitive_batchers[tangent] = _tangent_batch
    return sums, tangent


if MISSING is None:
    sums_p, tangent_p = _define()


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


def _forward(x, scale, offset, static):
    shift = _first(x, static.channels_last)
    s1, s2 = _bind_sums(x, shift, channels_last=static.channels_last, groups=1, backward=False)
    n = x.size // scale.shape[0]
    d = s1 / n
    var = jnp.maximum(s2 / n - jnp.square(d), 0)
    rstd = inverse_std(var, static.epsilon)
    per = functools.partial(_per_channel, channels_last=static.channels_last)
    xg = _grouped(x.astype(jnp.float32), 1)
    y = ((xg - per(shift)) - per(d)) * per(rstd * scale[None]) + per(offset[None])
    return y.reshape(x.shape).astype(static.dtype), shift, d, var, rstd


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _train(x, scale, offset, static):
    y, shift, d, var, _ = _forward(x, scale, offset, static)
    return y, (shift + d)[0], var[0]


@functools.partial(_train.defjvp, symbolic_zeros=True)
def _train_jvp(static, primals, tangents):
    x, scale, offset = primals
    y, shift, d, var, rstd = _forward(x, scale, offset, static)
    names = ("dx", "dscale", "doffset")
    named = [(n, t) for n, t in zip(names, tangents) if not isinstance(t, SymbolicZero)]
    params = dict(channels_last=static.channels_last, groups=1, dtype=static.dtype)
    if named:
        (dy,) = _bind_tangent(x, shift, d, rstd, scale, *(t for _, t in named),
                              which=tuple(n for n, _ in named), **params)  # fmt: skip
    else:
        dy = jnp.zeros_like(y)
    dmean = dvar = jnp.zeros_like(var[0])
    if "dx" in dict(named):  # the running statistics' tangents (jnp: they are rarely read)
        axes = _axes(static.channels_last)
        dx = _grouped(dict(named)["dx"].astype(jnp.float32), 1)
        centered = _xhat(x, shift, d, jnp.ones_like(rstd), static.channels_last, 1)
        dmean = jnp.mean(dx, axis=axes)[0]
        dvar = 2 * jnp.mean(dx * centered, axis=axes)[0]
    return (y, (shift + d)[0], var[0]), (dy, dmean, dvar)
