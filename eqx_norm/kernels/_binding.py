"""The pieces that bind a kernel as a JAX primitive, shared by rows.py and groups.py.

Partitioning over rows (``custom_partitioning``), the CPU lowering's choice between the
kernel and the ``jnp`` formula, and the JVP, ``vmap`` and abstract-evaluation rules that
:func:`eqx_norm.kernels._jax_hooks.define_primitive` takes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from . import _jax_hooks as hooks
from ._library import load


def _rows_spec(arg_shapes):
    """The mesh axes that shard the rows of ``x``: the partition keeps them, gathers ``D``."""
    spec = getattr(arg_shapes[0].sharding, "spec", None)
    return spec[0] if spec else None


def _partitioned(call, arg_kinds, out_kinds, static, rule, psum_outputs=()):
    """``call`` under ``custom_partitioning``: ``"m"`` operands/results are split by rows
    like ``x``, ``"v"`` are per-row vectors, ``"r"`` replicated; ``psum_outputs`` are
    summed over the row axes."""

    def shardings(mesh, arg_shapes, kinds):
        rows = _rows_spec(arg_shapes)
        spec = {"m": P(rows, None), "v": P(rows), "r": P()}
        return tuple(NamedSharding(mesh, spec[k]) for k in kinds)

    def infer(*args):
        *_, mesh, arg_shapes, _ = args
        return shardings(mesh, arg_shapes, out_kinds)

    def partition(*args):
        *params, mesh, arg_shapes, _ = args
        rows = _rows_spec(arg_shapes)
        names = () if rows is None else tuple(rows) if isinstance(rows, tuple) else (rows,)
        kwargs = dict(zip(static, params, strict=True))

        def lower(*operands):
            outs = tuple(call(*operands, **kwargs))
            summed = [
                jax.lax.psum(o, names) if i in psum_outputs and names else o
                for i, o in enumerate(outs)
            ]
            return type(outs)(summed)

        return (
            mesh,
            lower,
            shardings(mesh, arg_shapes, out_kinds),
            shardings(mesh, arg_shapes, arg_kinds),
        )

    n = len(arg_kinds)
    fn = custom_partitioning(
        lambda *a: call(*a[:n], **dict(zip(static, a[n:], strict=True))),
        static_argnums=tuple(range(n, n + len(static))),
    )
    fn.def_partition(
        infer_sharding_from_operands=infer,
        partition=partition,
        sharding_rule=rule,
        need_replication_factors=("d",),
    )
    return lambda *operands, **params: fn(*operands, *(params[k] for k in static))


def _kernel_or_reference(kernel, partitioned, reference):
    """The CPU lowering: the kernel (partitioned over several devices), or the ``jnp``
    formula for ``jax.export`` and where the library did not load."""

    def choose(for_export, devices, **params):
        if for_export or load()[0] is not None:
            return functools.partial(reference, **params)
        if devices > 1 and partitioned is not None and params.get("groups", 1) == 1:
            return partitioned(**params)
        return functools.partial(kernel, **params)

    return choose


def _instantiate(tangents, primals):
    pairs = zip(tangents, primals, strict=True)
    return [jnp.zeros_like(p) if type(t) is hooks.Zero else t for t, p in pairs]


def _jvp_of(reference, primitive):
    """A primitive's JVP: its primal by the primitive, its tangent by ``jax.jvp`` of the
    ``jnp`` formula, so that every order of derivative works."""

    def jvp(primals, tangents, **params):
        out = hooks.bind(primitive, *primals, **params)
        fn = functools.partial(reference, **params)
        _, out_tangents = jax.jvp(fn, tuple(primals), tuple(_instantiate(tangents, primals)))
        return out, list(out_tangents)

    return jvp


def _front(a, dim, size):
    """``a`` with its batch axis first, broadcast to ``size`` if it has none."""
    return jnp.broadcast_to(a, (size, *a.shape)) if dim is None else jnp.moveaxis(a, dim, 0)


def _batch_rule(get_primitive, reference, row_operands, shared_operands, fold):
    """Fold ``vmap``'s axis into the rows when the ``shared_operands`` are unbatched, else
    ``vmap`` the ``jnp`` formula. ``row_operands`` are per-row (folded), ``fold(params,
    size)`` gives the folded call's parameters and ``unfold(outs, size)`` its outputs."""

    def batch(args, dims, **params):
        size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
        if any(dims[i] is not None for i in shared_operands):
            outs = jax.vmap(functools.partial(reference, **params), in_axes=tuple(dims))(*args)
            return outs, [0] * len(outs)
        folded = list(args)
        for i in row_operands:
            a = _front(args[i], dims[i], size)
            folded[i] = a.reshape(-1, *a.shape[2:])
        new_params, unfold = fold(params, size)
        outs = hooks.bind(get_primitive(), *folded, **new_params)
        return unfold(outs, size), [0] * len(outs)

    return batch


def _abstract(shapes_of):
    def abstract(*args, **params):
        return [hooks.output_aval(s, t, args) for s, t in shapes_of(*args, **params)]

    return abstract


def _rows_unfold(outs, size):
    return [o.reshape(size, -1, *o.shape[1:]) for o in outs]


def _backward_fold(params, size):
    """A backward call's ``vmap`` folded into its rows: ``groups`` times as many sums."""
    groups = params["groups"]

    def unfold(outs, size):
        dx, dscale, doffset = outs
        c = dscale.shape[-1]
        dx = dx.reshape(size, -1, *dx.shape[1:])
        return [dx, dscale.reshape(size, groups, c), doffset.reshape(size, groups, c)]

    return {**params, "groups": size * groups}, unfold
