r"""One primitive pair binds every compiled kernel (rows, the fused residual, groups).

``forward_p`` runs a kernel's forward; ``linear_p`` is linear in its trailing operands and
runs either the forward's tangent (``direction="tangent"``, plain ``jnp``: forward mode) or
its transpose, the backward kernel (``direction="backward"``). A :class:`Kernel` says what
differs between kernels: its ``jnp`` formulas and its FFI calls. The rules, registered as
JAX's custom-primitive guide does:

* JVP: the primal by the primitive, the tangent by :func:`jax.jvp` of the ``jnp`` formula,
  so every order of derivative works;
* ``vmap``: with the shared operands (scale, offset) unbatched, the batch folds into the
  rows (the backward then sums ``dscale``/``doffset`` per example), else the formula is
  vmapped;
* lowering: on the CPU the kernel call, traced at bind time under ``custom_partitioning``
  (each device normalizes its own rows, the backward ``psum``\ s ``dscale``/``doffset``;
  no all-gather); for ``jax.export`` (``ctx.is_forward_compat()``) and other platforms the
  ``jnp`` formula, so exported artifacts hold no custom call;
* under ``shard_map`` operands are cast to vary alike (``jax.lax.pcast``), so that a shared
  operand's cotangent comes out psummed.

If the installed JAX lacks any of this, :data:`MISSING` says what and nothing registers.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

try:
    from jax.experimental.custom_partitioning import custom_partitioning
    from jax.extend.core import Primitive, jaxpr_as_fun
    from jax.ffi import ffi_call  # noqa: F401  (rows.py and groups.py call it)
    from jax.interpreters.ad import Zero, instantiate_zeros, primitive_jvps, primitive_transposes
    from jax.interpreters.batching import primitive_batchers
    from jax.interpreters.mlir import LoweringRuleContext, lower_fun, register_lowering
    from jax.lax import pcast

    LoweringRuleContext.is_forward_compat  # noqa: B018  (chooses the export lowering)
    jax.typeof(np.float32(0)).manual_axis_type.varying  # noqa: B018  (shard_map axes)
    MISSING = None
except (ImportError, AttributeError) as error:  # a JAX that moved or removed one
    MISSING = f"JAX {jax.__version__} lacks a hook the kernel binding needs ({error})"


@dataclasses.dataclass(frozen=True, repr=False)
class Kernel:
    """What differs between kernels. Operands: forward ``(*inputs)``; tangent and backward
    ``(x, scale, mean_shift, rstd, *linear)``, ``linear`` the tangents named by ``which``
    or the cotangents of the visible outputs."""

    name: str
    forward: Callable  # jnp formulas ...
    tangent: Callable
    backward: Callable
    forward_call: Callable  # ... and the FFI calls, all taking the attributes as keywords
    backward_call: Callable
    linear: tuple[str, ...]  # the inputs' tangent names
    visible: int  # how many forward outputs the caller sees; the rest are statistics
    saved: Callable  # (inputs, forward outputs) -> (x, scale, mean_shift, rstd)
    cotangents: Callable  # (backward outputs, attrs) -> {tangent name: cotangent}

    def __repr__(self) -> str:  # the name alone, so that printed jaxprs stay readable
        return self.name


def _varying(a) -> frozenset:
    return jax.typeof(a).manual_axis_type.varying


def result(like, shape, dtype) -> jax.ShapeDtypeStruct:
    """An FFI result's type; under ``shard_map`` it varies as ``like`` does."""
    aval = jax.typeof(like)
    if not _varying(like):
        return jax.ShapeDtypeStruct(shape, dtype)
    sharding = NamedSharding(aval.sharding.mesh, P())
    return jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding, manual_axis_type=aval.manual_axis_type
    )


def _roles(params, n):
    """Per operand: ``m`` split by rows like ``x``, ``r`` shared (scale, offset, ...)."""
    direction = params["direction"]
    if direction == "forward":
        return "m" * (n - 2) + "rr"
    if direction == "backward":
        return "mrmm" + "m" * (n - 4)
    return "mrmm" + "".join("r" if w in ("dscale", "doffset") else "m" for w in params["which"])


def _formula(kernel, params):
    attrs = {k: v for k, v in params.items() if k != "direction"}
    return functools.partial(getattr(kernel, params["direction"]), **attrs)


def _partitioned(fn, roles, out_roles, avals, outs):
    """``fn`` under ``custom_partitioning``, split by rows (the leading axis of ``m``
    operands and results): ``g`` results (per-group sums) are psummed, ``x`` (empty) and
    ``r`` operands replicated."""
    # Shardy factors: "r" for the rows, one per (axis from the end, size) for the rest,
    # which stay whole (so that y follows x's sharding wherever x's does)
    names: dict = {}

    def factors(role, shape):
        axes = [names.setdefault((i - len(shape), n), "abcdefghijklmnopqstuvwxyz"[len(names)])
                for i, n in enumerate(shape)]  # fmt: skip
        return " ".join(["r", *axes[1:]] if role == "m" else axes)

    rule = ", ".join(factors(r, a.shape) for r, a in zip(roles, avals))
    rule += " -> " + ", ".join(factors(r, o.shape) for r, o in zip(out_roles, outs))
    others = tuple(sorted(set(rule.replace(",", " ").split()) - {"r", "->"}))

    def rows(arg_shapes):
        spec = arg_shapes[0].sharding.spec
        return spec[0] if spec else None

    def shardings(mesh, arg_shapes, kinds, shapes):
        lead = rows(arg_shapes)
        specs = [
            P(lead if k == "m" else None, *[None] * (len(a.shape) - 1))
            for k, a in zip(kinds, shapes)
        ]
        return tuple(NamedSharding(mesh, spec) for spec in specs)

    def partition(mesh, arg_shapes, result_shape):
        lead = rows(arg_shapes)
        names = () if lead is None else (lead,) if isinstance(lead, str) else tuple(lead)

        def lower(*operands):
            results = fn(*operands)
            return [
                jax.lax.psum(o, names) if k == "g" and names else o
                for o, k in zip(results, out_roles, strict=True)
            ]

        ins = shardings(mesh, arg_shapes, roles, arg_shapes)
        return mesh, lower, shardings(mesh, arg_shapes, out_roles, result_shape), ins

    def infer(mesh, arg_shapes, result_shape):
        return shardings(mesh, arg_shapes, out_roles, result_shape)

    wrapped = custom_partitioning(lambda *operands: fn(*operands))
    wrapped.def_partition(
        partition=partition,
        infer_sharding_from_operands=infer,
        sharding_rule=rule,
        need_replication_factors=others,
    )
    return wrapped


@functools.cache
def _call(kernel, items, avals, shard_mapped):
    """The kernel call's jaxpr (None for the tangent: plain ``jnp``), partitioned by rows
    outside ``shard_map`` (and unless ``vmap`` folded several sums into one call)."""
    params = dict(items)
    direction = params.pop("direction")
    if direction == "tangent":
        return None
    fn = kernel.forward_call if direction == "forward" else kernel.backward_call
    fn = functools.partial(fn, **params)
    plain = jax.make_jaxpr(fn)(*avals)
    if shard_mapped or params.get("groups", 1) != 1:
        return plain
    outs = plain.out_avals
    out_roles = "m" * len(outs)
    if direction == "backward":  # (dx or dh: empty when not wanted, dscale, doffset)
        rows = avals[0].shape[0]
        out_roles = "".join("m" if o.shape[0] == rows else "x" for o in outs[:-2]) + "gg"
    roles = _roles({"direction": direction}, len(avals))
    return jax.make_jaxpr(_partitioned(fn, roles, out_roles, avals, outs))(*avals)


def bind(primitive, *args, kernel, **params):
    """``primitive.bind`` with the operands cast to vary alike under ``shard_map`` (as
    JAX's own primitives do) and the kernel call traced for these operands."""
    axes = frozenset().union(*(_varying(a) for a in args))
    args = [
        pcast(a, tuple(sorted(axes - _varying(a))), to="varying") if axes - _varying(a) else a
        for a in args
    ]
    avals = tuple(jax.typeof(a) for a in args)
    call = _call(kernel, tuple(sorted(params.items())), avals, bool(axes))
    return primitive.bind(*args, kernel=kernel, call=call, **params)


def _abstract(*avals, kernel, call, **params):
    if call is not None:
        return call.out_avals
    return jax.make_jaxpr(_formula(kernel, params))(*avals).out_avals


def _lowering(ctx, *args, kernel, call, **params):
    """The kernel on the CPU, the ``jnp`` formula for ``jax.export`` and for the tangent."""
    if call is None or ctx.is_forward_compat():
        return _reference_lowering(ctx, *args, kernel=kernel, call=call, **params)
    return lower_fun(jaxpr_as_fun(call), multiple_results=True)(ctx, *args)


def _reference_lowering(ctx, *args, kernel, call, **params):
    return lower_fun(_formula(kernel, params), multiple_results=True)(ctx, *args)


def _jvp(primitive, primals, tangents, *, kernel, call, **params):
    outs = bind(primitive, *primals, kernel=kernel, **params)
    tangents = [instantiate_zeros(t) for t in tangents]
    _, out_tangents = jax.jvp(_formula(kernel, params), tuple(primals), tuple(tangents))
    return outs, list(out_tangents)


def _batch(primitive, args, dims, *, kernel, call, **params):
    """Fold the batch into the rows when no shared operand is batched, else ``vmap`` the
    ``jnp`` formula."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    roles = _roles(params, len(args))
    if any(d is not None for r, d in zip(roles, dims) if r == "r"):
        outs = jax.vmap(_formula(kernel, params), in_axes=tuple(dims))(*args)
        return outs, [0] * len(outs)
    folded = []
    for a, d, r in zip(args, dims, roles):
        if r == "m":
            a = jnp.broadcast_to(a, (size, *a.shape)) if d is None else jnp.moveaxis(a, d, 0)
            a = a.reshape(-1, *a.shape[2:])
        folded.append(a)
    if "groups" in params:  # the backward: one set of sums per example
        params = {**params, "groups": size * params["groups"]}
    outs = bind(primitive, *folded, kernel=kernel, **params)
    return [o.reshape(size, o.shape[0] // size, *o.shape[1:]) for o in outs], [0] * len(outs)


def _transpose(cts, *args, kernel, call, which, **params):
    """The tangent's transpose: the backward kernel, asked for ``dx`` only if wanted."""
    if all(type(ct) is Zero for ct in cts):
        return [None] * len(args)
    cts = [instantiate_zeros(ct) for ct in cts]
    attrs = {k: v for k, v in params.items() if k != "direction"}
    outs = bind(
        linear_p, *args[:4], *cts, kernel=kernel, direction="backward",
        groups=1, want_dx="dx" in which, **attrs,
    )  # fmt: skip
    found = kernel.cotangents(outs, attrs)
    return [None] * 4 + [found[name] for name in which]


def _define(name, transpose=None):
    primitive = Primitive(name)
    primitive.multiple_results = True

    @functools.cache
    def compiled(items):
        return jax.jit(functools.partial(primitive.bind, **dict(items)))

    primitive.def_impl(lambda *args, **params: compiled(tuple(params.items()))(*args))
    primitive.def_abstract_eval(_abstract)
    register_lowering(primitive, _reference_lowering)
    register_lowering(primitive, _lowering, platform="cpu")
    primitive_jvps[primitive] = functools.partial(_jvp, primitive)
    primitive_batchers[primitive] = functools.partial(_batch, primitive)
    if transpose is not None:
        primitive_transposes[primitive] = transpose
    return primitive


if MISSING is None:
    forward_p = _define("eqx_norm_forward")
    linear_p = _define("eqx_norm_linear", _transpose)


def normalize(kernel: Kernel, attrs: tuple, *inputs):
    """The kernel's visible outputs, differentiable in every mode."""
    return _normalize(kernel, attrs, *inputs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _normalize(kernel, attrs, *inputs):
    outs = bind(forward_p, *inputs, kernel=kernel, direction="forward", **dict(attrs))
    return tuple(outs[: kernel.visible])


@functools.partial(_normalize.defjvp, symbolic_zeros=True)
def _normalize_jvp(kernel, attrs, inputs, tangents):
    outs = bind(forward_p, *inputs, kernel=kernel, direction="forward", **dict(attrs))
    visible = tuple(outs[: kernel.visible])
    present = [(n, t) for n, t in zip(kernel.linear, tangents, strict=True) if not _zero(t)]
    if not present:
        return visible, tuple(jnp.zeros_like(o) for o in visible)
    which = tuple(name for name, _ in present)
    out_tangents = bind(
        linear_p, *kernel.saved(inputs, outs), *(t for _, t in present),
        kernel=kernel, direction="tangent", which=which, **dict(attrs),
    )  # fmt: skip
    return visible, tuple(out_tangents)


def _zero(t) -> bool:
    return isinstance(t, jax.custom_derivatives.SymbolicZero)
