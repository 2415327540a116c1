r"""One primitive pair binds every compiled kernel (rows, the fused residual, groups).

``forward_p`` runs a kernel's forward; ``linear_p``, linear in its trailing operands, its
tangent (``direction="tangent"``: plain ``jnp``, for forward mode) or the tangent's
transpose, the backward kernel (``"backward"``). A :class:`Kernel` holds what differs: the
``jnp`` formulas and the FFI calls. The rules are registered as JAX's custom-primitive
guide does: JVP by :func:`jax.jvp` of the formula (every order works); ``vmap`` folds the
batch into the rows when scale and offset are shared; on the CPU the kernel call, traced
at bind time under ``custom_partitioning`` (each device its own rows; ``dscale`` and
``doffset`` psummed, no all-gather), lowers unless ``ctx.is_forward_compat()`` (the
lowering is for ``jax.export``): then, and elsewhere, the formula lowers, so that
exported artifacts hold no custom call. Under ``shard_map`` the operands are cast
(``jax.lax.pcast``) to vary alike, so that a shared operand's cotangent is psummed.
If the installed JAX lacks any of this, :data:`MISSING` says what and nothing registers.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero
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
    """What differs between kernels: the ``jnp`` formulas and the FFI calls, each taking
    every attribute as a keyword. Forward operands ``(x, [residual,] scale, offset)``, its
    outputs the ``visible`` ones (``y``, or ``y`` and ``h``), ``mean_shift`` and ``rstd``;
    the tangent's and backward's ``(x or h, scale, offset, *saved, *linear)`` (``saved``: the
    statistics, ``mean_shift`` and ``rstd``, and any more the kernel keeps), ``linear``
    the inputs' tangents named by ``which``, or the visible outputs' cotangents."""

    name: str
    forward: Callable
    tangent: Callable
    backward: Callable
    forward_call: Callable
    backward_call: Callable
    visible: int  # how many outputs the caller sees: 1 (y), or 2 (y, h)
    saved: int  # the outputs after them that the tangent and backward read

    def __repr__(self) -> str:  # the name alone, so that printed jaxprs stay readable
        return self.name


def _varying(a) -> frozenset:
    return jax.typeof(a).manual_axis_type.varying


def result(like, shape, dtype) -> jax.ShapeDtypeStruct:
    """An FFI result's type; under ``shard_map`` it varies as ``like`` does."""
    if not _varying(like):
        return jax.ShapeDtypeStruct(shape, dtype)
    aval = jax.typeof(like)
    sharding = NamedSharding(aval.sharding.mesh, P())
    return jax.ShapeDtypeStruct(
        shape, dtype, sharding=sharding, manual_axis_type=aval.manual_axis_type
    )


def affine(scale, offset, d: int):
    """``(scale, offset)`` with float32 ones and zeros for None, both ``(D,)`` or both
    ``(E, D)`` (one row per example, where either has one)."""
    scale = jnp.ones((d,), jnp.float32) if scale is None else scale
    offset = jnp.zeros((d,), jnp.float32) if offset is None else offset
    examples = max(p.shape[0] if p.ndim == 2 else 1 for p in (scale, offset))
    shape = (examples, d) if examples > 1 else (d,)
    both = (jnp.broadcast_to(p.reshape(-1, d), (examples, d)) for p in (scale, offset))
    return tuple(p.reshape(shape) for p in both)


def _per_example(a) -> bool:
    """Whether an affine operand holds one row per example, ``(E, D)`` with E > 1."""
    return a.ndim == 2 and a.shape[0] > 1


def _roles(kernel, params, n):
    """Per operand: ``m`` split by rows like ``x``, ``r`` shared (scale, offset, ...)."""
    if params["direction"] == "forward":
        return "m" * (n - 2) + "rr"
    linear = params.get("which", ("ct",) * (n - 3 - kernel.saved))
    roles = "mrr" + "m" * kernel.saved
    return roles + "".join("r" if w in ("dscale", "doffset") else "m" for w in linear)


def _formula(kernel, params):
    attrs = {k: v for k, v in params.items() if k != "direction"}
    return functools.partial(getattr(kernel, params["direction"]), **attrs)


def _partitioned(fn, roles, out_roles, avals, outs, examples=None):
    """``fn`` under ``custom_partitioning``, split by rows (the leading axis of ``m``
    operands and results): ``g`` results (per-group sums) are psummed, ``x`` (empty)
    results and ``r`` operands replicated. ``e`` operands and results hold one row per
    example of ``examples`` (a per-example affine, its sums) and are split with the rows,
    where the split keeps whole examples on each device (else all is replicated)."""
    # Shardy factors: "r" for the rows (or "(e q)": examples, rows in each), one per (axis
    # from the end, size) for the rest, which stay whole (so that y follows x's sharding
    # wherever x's does)
    names: dict = {}
    per = None if examples is None else avals[0].shape[0] // examples  # rows per example
    rows = "r" if per is None else "e" if per == 1 else "(e q)"

    def factors(role, shape):
        lead = int(role in "me")
        axes = [names.setdefault((i - len(shape), n), "abcdfghijklmnopstuvwxyz"[len(names)])
                for i, n in enumerate(shape) if i >= lead]  # fmt: skip
        return " ".join([rows if role == "m" else "e"] * lead + axes)

    rule = ", ".join(factors(r, a.shape) for r, a in zip(roles, avals))
    rule += " -> " + ", ".join(factors(r, o.shape) for r, o in zip(out_roles, outs))
    sizes = {"q": per} if rows == "(e q)" else {}

    def leading(mesh, arg_shapes):
        lead = arg_shapes[0].sharding.spec[0] if arg_shapes[0].sharding.spec else None
        axes = () if lead is None else (lead,) if isinstance(lead, str) else tuple(lead)
        if examples is not None and examples % math.prod(mesh.shape[a] for a in axes):
            return None  # the split would cut an example's rows apart
        return lead

    def shardings(mesh, arg_shapes, kinds, shapes):
        lead = leading(mesh, arg_shapes)
        specs = [
            P(lead if k in "me" else None, *[None] * (len(a.shape) - 1))
            for k, a in zip(kinds, shapes)
        ]
        return tuple(NamedSharding(mesh, spec) for spec in specs)

    def partition(mesh, arg_shapes, result_shape):
        lead = leading(mesh, arg_shapes)
        axes = () if lead is None else (lead,) if isinstance(lead, str) else tuple(lead)

        def lower(*operands):
            summed = zip(fn(*operands), out_roles, strict=True)
            return [jax.lax.psum(o, axes) if k == "g" and axes else o for o, k in summed]

        ins = shardings(mesh, arg_shapes, roles, arg_shapes)
        return mesh, lower, shardings(mesh, arg_shapes, out_roles, result_shape), ins

    wrapped = custom_partitioning(lambda *operands: fn(*operands))
    wrapped.def_partition(
        partition=partition,
        infer_sharding_from_operands=lambda m, a, r: shardings(m, a, out_roles, r),
        sharding_rule=rule,
        need_replication_factors=tuple(sorted(set(names.values()))),
        **sizes,
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
    roles = "".join(
        "e" if r == "r" and _per_example(a) else r
        for r, a in zip(_roles(kernel, {"direction": direction, **params}, len(avals)), avals)
    )
    examples = {a.shape[0] for r, a in zip(roles, avals) if r == "e"}
    groups = params.get("groups", 1)
    if shard_mapped or len(examples) > 1 or groups not in (1, *examples):
        return plain  # (vmap folded several sums into one call)
    outs, out_roles = plain.out_avals, "m" * len(plain.out_avals)
    if direction == "backward":  # (dx or dh, empty when not wanted; dscale, doffset)
        out_roles = "m" if outs[0].shape[0] == avals[0].shape[0] else "x"
        out_roles += "gg" if groups == 1 else "ee"  # summed over all rows, or per example
    examples = examples.pop() if examples else None
    if direction == "backward" and groups != 1:  # per-example sums: as many as each shard has
        call = kernel.backward_call
        fn = lambda *ops: call(*ops, **{**params, "groups": ops[1].shape[0]})  # noqa: E731
    return jax.make_jaxpr(_partitioned(fn, roles, out_roles, avals, outs, examples))(*avals)


def bind(primitive, *args, kernel, **params):
    """``primitive.bind`` with the operands cast to vary alike under ``shard_map`` (as
    JAX's own primitives do) and the kernel call traced for these operands."""
    axes = frozenset().union(*(_varying(a) for a in args))
    args = [pcast(a, tuple(sorted(axes - _varying(a))), to="varying") for a in args]
    call = _call(kernel, tuple(sorted(params.items())), tuple(map(jax.typeof, args)), bool(axes))
    return primitive.bind(*args, kernel=kernel, call=call, **params)


def _abstract(*avals, kernel, call, **params):
    if call is not None:
        return call.out_avals
    return jax.make_jaxpr(_formula(kernel, params))(*avals).out_avals


def _lowering(ctx, *args, kernel, call, cpu, **params):
    """The kernel on the CPU; the ``jnp`` formula elsewhere, for the tangent, and for
    ``jax.export`` (so that exported artifacts hold no custom call)."""
    if not cpu or call is None or ctx.is_forward_compat():
        return lower_fun(_formula(kernel, params), multiple_results=True)(ctx, *args)
    return lower_fun(jaxpr_as_fun(call), multiple_results=True)(ctx, *args)


def _jvp(primitive, primals, tangents, *, kernel, call, **params):
    outs = bind(primitive, *primals, kernel=kernel, **params)
    tangents = tuple(instantiate_zeros(t) for t in tangents)
    return outs, list(jax.jvp(_formula(kernel, params), tuple(primals), tangents)[1])


def _batch(primitive, args, dims, *, kernel, call, **params):
    """Fold the batch into the rows when no shared operand is batched, else ``vmap`` the
    ``jnp`` formula."""
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    roles = _roles(kernel, params, len(args))
    if any(d is not None for r, d in zip(roles, dims) if r == "r"):
        outs = jax.vmap(_formula(kernel, params), in_axes=tuple(dims))(*args)
        return outs, [0] * len(outs)
    folded = []
    for a, d, r in zip(args, dims, roles):
        if r == "m" or _per_example(a):  # a per-example affine repeats for each of `size`
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
    attrs = {k: v for k, v in params.items() if k != "direction"}
    cts = [instantiate_zeros(ct) for ct in cts]
    scale = args[1]  # (D,), or (E, D): then one set of sums per example
    examples = scale.shape[0] if scale.ndim == 2 else 1
    dx, dscale, doffset = bind(
        linear_p, *args[: 3 + kernel.saved], *cts, kernel=kernel, direction="backward",
        groups=examples, want_dx="dx" in which or "dr" in which, **attrs,
    )  # fmt: skip
    # the fused residual's dx is dh: dx in x's dtype, and dr
    found = {"dx": dx.astype(attrs.get("dtype", dx.dtype)), "dr": dx}
    found.update(dscale=dscale.reshape(scale.shape), doffset=doffset.reshape(scale.shape))
    return [None] * (3 + kernel.saved) + [found[name] for name in which]


def _define(name, transpose=None):
    primitive = Primitive(name)
    primitive.multiple_results = True
    compiled = functools.cache(
        lambda items: jax.jit(functools.partial(primitive.bind, **dict(items)))
    )
    primitive.def_impl(lambda *args, **params: compiled(tuple(params.items()))(*args))
    primitive.def_abstract_eval(_abstract)
    register_lowering(primitive, functools.partial(_lowering, cpu=False))
    register_lowering(primitive, functools.partial(_lowering, cpu=True), platform="cpu")
    primitive_jvps[primitive] = functools.partial(_jvp, primitive)
    primitive_batchers[primitive] = functools.partial(_batch, primitive)
    if transpose is not None:
        primitive_transposes[primitive] = transpose
    return primitive


if MISSING is None:
    forward_p = _define("eqx_norm_forward")
    linear_p = _define("eqx_norm_linear", _transpose)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def normalize(kernel: Kernel, attrs: tuple, *inputs):
    """The kernel's visible outputs, differentiable in every mode: reverse mode transposes
    the tangent into the backward kernel. Undifferentiated, the forward is asked not to keep
    what only a derivative reads (``keep=False``)."""
    attrs = {**dict(attrs), "keep": False}
    outs = bind(forward_p, *inputs, kernel=kernel, direction="forward", **attrs)
    return tuple(outs[: kernel.visible])


@functools.partial(normalize.defjvp, symbolic_zeros=True)
def _normalize_jvp(kernel, attrs, inputs, tangents):
    outs = bind(forward_p, *inputs, kernel=kernel, direction="forward", keep=True, **dict(attrs))
    visible = tuple(outs[: kernel.visible])
    names = (
        ("dx", "dr", "dscale", "doffset") if kernel.visible == 2 else ("dx", "dscale", "doffset")
    )
    named = [(n, t) for n, t in zip(names, tangents) if not isinstance(t, SymbolicZero)]
    if not named:
        return visible, tuple(jnp.zeros_like(o) for o in visible)
    normalized = inputs[0] if kernel.visible == 1 else outs[1]  # x, or the residual's h
    saved = (normalized, *inputs[-2:], *outs[kernel.visible :])  # x, affine, statistics
    which = tuple(n for n, _ in named)
    dy = bind(linear_p, *saved, *(t for _, t in named), kernel=kernel, direction="tangent",
              which=which, **dict(attrs))  # fmt: skip
    return visible, tuple(dy)
