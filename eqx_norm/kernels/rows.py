r"""The compiled CPU kernel for LayerNorm and RMSNorm rows, as JAX primitives.

The C++ library (``eqx_norm/cpu_kernels/``, built by CMake at install time) is loaded with
:mod:`ctypes` and its two handlers are registered with :func:`jax.ffi.register_ffi_target`:
a forward pass that also returns each row's statistics (``mean - x[row, 0]`` and ``rstd``),
and a backward pass returning ``(dx, dscale, doffset)``.

Design: :func:`normalize_rows` is a :func:`jax.custom_jvp` whose primal runs the forward
kernel and whose tangent is a primitive that is *linear* in ``(dx, dscale, doffset)``:

* reverse mode transposes the tangent primitive, and its transpose rule calls the backward
  kernel: ``grad`` runs forward kernel + backward kernel and keeps no full-size residual
  but ``x``;
* forward mode evaluates the tangent (plain ``jnp``, XLA fuses it), so ``jvp``, ``jacfwd``
  and ``hessian`` work, which a ``custom_vjp`` would forbid;
* each primitive has a JVP rule from :func:`jax.jvp` of its ``jnp`` formula, so every
  higher order works (the higher orders run in ``jnp``);
* batching rules fold ``vmap``'s axis into the rows when the scale and offset are shared,
  and the backward kernel then sums ``dscale``/``doffset`` per example (``groups``);
  a per-example scale falls back to the vmapped ``jnp`` formula (correct, not fast);
* the kernel calls are wrapped in :func:`jax.experimental.custom_partitioning`: under
  ``jit`` with the rows sharded, each device runs the kernel on its own rows and the
  backward sums ``dscale``/``doffset`` with one ``psum`` (no all-gather of ``x``); a
  sharded normalized axis is gathered first.
* ``jax.export`` (and any non-CPU platform) lowers the primitives to the same ``jnp``
  formulas, so exported artifacts hold no custom call.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jaxtyping import Array, Float

from .._statistics import centered_statistics

_SUPPORTED = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_FORWARD_TARGET = "eqx_norm_forward"
_BACKWARD_TARGET = "eqx_norm_backward"
if sys.platform == "win32":
    _LIBRARY = "eqx_norm_cpu.dll"
elif sys.platform == "darwin":
    _LIBRARY = "libeqx_norm_cpu.dylib"
else:
    _LIBRARY = "libeqx_norm_cpu.so"


@functools.cache
def _load_reason() -> str | None:
    """Load and register the library once; None on success, else why not."""
    package = sys.modules[__package__]
    folders = [Path(p) for p in getattr(package, "__path__", [])] + [Path(__file__).parent]
    path = next((f / _LIBRARY for f in folders if (f / _LIBRARY).is_file()), None)
    if path is None:
        return (
            "the eqx_norm CPU kernel was not built (installed with EQX_NORM_KERNEL=OFF, or "
            f"no {_LIBRARY} beside eqx_norm's sources)"
        )
    try:
        library = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in (
            (_FORWARD_TARGET, library.EqxNormForward),
            (_BACKWARD_TARGET, library.EqxNormBackward),
        ):
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform="cpu")
    except (OSError, AttributeError) as error:
        return f"the eqx_norm CPU kernel failed to load from {path}: {error}"
    return None


def unavailable_reason(x: jax.Array | jax.ShapeDtypeStruct) -> str | None:
    """None when the kernel can serve ``x``, else a short reason why it cannot.

    It serves a float32, bfloat16 or float16 ``x`` that lives on the CPU (a traced ``x``:
    when JAX's default backend is the CPU), once the library is built and loaded.
    """
    reason = _load_reason()
    if reason is not None:
        return reason
    dtype = jnp.dtype(x.dtype)
    if dtype not in _SUPPORTED:
        return f"dtype {dtype} is not supported by the kernel (float32, bfloat16, float16)"
    platforms = None
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        platforms = {device.platform for device in x.devices()}
    elif getattr(x, "sharding", None) is not None:
        platforms = {device.platform for device in x.sharding.device_set}
    if not platforms:
        platforms = {jax.default_backend()}
    if platforms != {"cpu"}:
        return f"the kernel runs on CPU only, x is on {', '.join(sorted(platforms))}"
    return None


def normalize_rows(
    x: Float[Array, "rows d"],
    scale: Float[Array, " d"] | None,
    offset: Float[Array, " d"] | None,
    *,
    epsilon: float,
    center: bool,
) -> Float[Array, "rows d"]:
    """``(x - mean) * rsqrt(var + eps) * scale + offset`` per row, by the compiled kernel.

    ``center=False`` gives ``x * rsqrt(mean(x^2) + eps) * scale + offset`` (RMSNorm).
    Statistics are float32 and two-pass after subtracting each row's first element; the
    output has x's dtype. With ``epsilon == 0`` a constant row gives exactly ``offset``.

    Args:
        x: ``(rows, D)``, float32, bfloat16 or float16.
        scale: ``(D,)`` float32, or None (ones).
        offset: ``(D,)`` float32, or None (zeros).
        epsilon: added to the variance, ``>= 0``.
        center: False for RMSNorm.

    Returns:
        ``(rows, D)`` in x's dtype.
    """
    d = x.shape[1]
    scale = jnp.ones((d,), jnp.float32) if scale is None else scale
    offset = jnp.zeros((d,), jnp.float32) if offset is None else offset
    return _normalize(x, scale, offset, float(epsilon), bool(center))


# ----------------------------------------------------------------------------------------
# The jnp formulas: the kernel's reference, its higher derivatives, and its lowering where
# the kernel cannot run (jax.export, other platforms).


def _xhat(x: Array, mean_shift: Array, rstd: Array, center: bool) -> Array:
    """``((x - x[:, :1]) - mean_shift) * rstd`` in float32 (``x * rstd`` for RMSNorm)."""
    xf = x.astype(jnp.float32)
    if center:
        xf = (xf - xf[:, :1]) - mean_shift[:, None]
    return xf * rstd[:, None]


def _jnp_forward(x, scale, offset, *, epsilon, center):
    xf = x.astype(jnp.float32)
    # the library's one copy of the statistics (with its epsilon == 0 rescaling, as the
    # kernel does); `mean_shift` is only the residual the tangent and backward rebuild from
    centered, rstd = centered_statistics(xf, (1,), epsilon=epsilon, center=center)
    rstd = rstd[:, 0]
    if center:
        mean_shift = jnp.mean(xf - xf[:, :1], axis=1)
    else:
        mean_shift = jnp.zeros(x.shape[:1], jnp.float32)
    y = centered * rstd[:, None] * scale + offset
    return y.astype(x.dtype), mean_shift, rstd


def _jnp_tangent(x, scale, mean_shift, rstd, dx, dscale, doffset, *, center):
    """The tangent of the forward pass; linear in ``(dx, dscale, doffset)`` (None: zero)."""
    xhat = _xhat(x, mean_shift, rstd, center)
    dy = jnp.zeros(x.shape, jnp.float32)
    if dx is not None:
        dxf = dx.astype(jnp.float32)
        inner = dxf - jnp.mean(dxf, axis=1, keepdims=True) if center else dxf
        dxhat = rstd[:, None] * (inner - xhat * jnp.mean(dxf * xhat, axis=1, keepdims=True))
        dy = dy + dxhat * scale
    if dscale is not None:
        dy = dy + xhat * dscale
    if doffset is not None:
        dy = dy + doffset
    return dy.astype(x.dtype)


def _jnp_backward(x, scale, mean_shift, rstd, ct, *, center, groups):
    """The transpose of the tangent: ``(dx, dscale, doffset)``, the sums per row group."""
    xhat = _xhat(x, mean_shift, rstd, center)
    g = ct.astype(jnp.float32)
    v = g * scale
    inner = v - jnp.mean(v, axis=1, keepdims=True) if center else v
    dx = rstd[:, None] * (inner - xhat * jnp.mean(v * xhat, axis=1, keepdims=True))
    d = x.shape[1]
    dscale = jnp.sum((g * xhat).reshape(groups, -1, d), axis=1)
    doffset = jnp.sum(g.reshape(groups, -1, d), axis=1)
    return dx.astype(x.dtype), dscale, doffset


# ----------------------------------------------------------------------------------------
# The kernel calls, row-partitioned under sharded jit.


def _forward_call(x, scale, offset, epsilon, center):
    rows = x.shape[0]
    out = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct((rows,), jnp.float32),
        jax.ShapeDtypeStruct((rows,), jnp.float32),
    )
    return jax.ffi.ffi_call(_FORWARD_TARGET, out)(
        x, scale, offset, epsilon=np.float32(epsilon), center=center
    )


def _backward_call(x, scale, mean_shift, rstd, ct, center, groups):
    out = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct((groups, x.shape[1]), jnp.float32),
        jax.ShapeDtypeStruct((groups, x.shape[1]), jnp.float32),
    )
    return jax.ffi.ffi_call(_BACKWARD_TARGET, out)(
        x, scale, mean_shift, rstd, ct, center=center, groups=np.int64(groups)
    )


def _row_axes(sharding) -> object:
    """The mesh axes that shard the rows (axis 0) of an operand, or None."""
    spec = getattr(sharding, "spec", None)
    return spec[0] if spec else None


def _axis_names(axes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return tuple(axes) if isinstance(axes, (tuple, list)) else (axes,)


@functools.partial(custom_partitioning, static_argnums=(3, 4))
def _partitioned_forward(x, scale, offset, epsilon, center):
    return _forward_call(x, scale, offset, epsilon, center)


def _forward_shardings(mesh, arg_shapes):
    rows = _row_axes(arg_shapes[0].sharding)
    matrix, vector, replicated = (
        NamedSharding(mesh, P(rows, None)),
        NamedSharding(mesh, P(rows)),
        NamedSharding(mesh, P()),
    )
    return (matrix, replicated, replicated), (matrix, vector, vector)


def _forward_infer(epsilon, center, mesh, arg_shapes, result_shape):
    return _forward_shardings(mesh, arg_shapes)[1]


def _forward_partition(epsilon, center, mesh, arg_shapes, result_shape):
    arg_shardings, result_shardings = _forward_shardings(mesh, arg_shapes)

    def lower(x, scale, offset):
        return _forward_call(x, scale, offset, epsilon, center)

    return mesh, lower, result_shardings, arg_shardings


_partitioned_forward.def_partition(
    infer_sharding_from_operands=_forward_infer,
    partition=_forward_partition,
    sharding_rule="r d, d, d -> r d, r, r",
    need_replication_factors=("d",),
)


@functools.partial(custom_partitioning, static_argnums=(5,))
def _partitioned_backward(x, scale, mean_shift, rstd, ct, center):
    dx, dscale, doffset = _backward_call(x, scale, mean_shift, rstd, ct, center, 1)
    return dx, dscale[0], doffset[0]


def _backward_shardings(mesh, arg_shapes):
    rows = _row_axes(arg_shapes[0].sharding)
    matrix, vector, replicated = (
        NamedSharding(mesh, P(rows, None)),
        NamedSharding(mesh, P(rows)),
        NamedSharding(mesh, P()),
    )
    return (matrix, replicated, vector, vector, matrix), (matrix, replicated, replicated), rows


def _backward_infer(center, mesh, arg_shapes, result_shape):
    return _backward_shardings(mesh, arg_shapes)[1]


def _backward_partition(center, mesh, arg_shapes, result_shape):
    arg_shardings, result_shardings, rows = _backward_shardings(mesh, arg_shapes)
    names = _axis_names(rows)

    def lower(x, scale, mean_shift, rstd, ct):
        dx, dscale, doffset = _backward_call(x, scale, mean_shift, rstd, ct, center, 1)
        dscale, doffset = dscale[0], doffset[0]
        if names:  # each device summed its own rows
            dscale, doffset = jax.lax.psum((dscale, doffset), names)
        return dx, dscale, doffset

    return mesh, lower, result_shardings, arg_shardings


_partitioned_backward.def_partition(
    infer_sharding_from_operands=_backward_infer,
    partition=_backward_partition,
    # dscale/doffset carry no row factor: the partition's lowering psums them itself
    sharding_rule="r d, d, r, r, r d -> r d, d, d",
    need_replication_factors=("d",),
)


def _kernel_lowering_allowed(ctx) -> bool:
    """The kernel serves this lowering: library loaded and not for ``jax.export``."""
    parameters = ctx.module_context.lowering_parameters
    return _load_reason() is None and not getattr(parameters, "for_export", False)


def _partitioned(ctx) -> bool:
    """Whether this is a jit over several devices (SPMD-partitioned by XLA): then the kernel
    goes through custom_partitioning. pmap, shard_map and one device call it directly."""
    devices = getattr(ctx.module_context.axis_context, "device_assignment", None)
    return devices is not None and len(devices) > 1


# ----------------------------------------------------------------------------------------
# Primitives.


def _varying(a) -> frozenset:
    """The shard_map axes ``a`` (a value or an aval) varies over; empty outside shard_map."""
    aval = a if isinstance(a, jax.core.AbstractValue) else jax.typeof(a)
    return frozenset(getattr(getattr(aval, "mat", None), "varying", ()))


def _bind(primitive, *args, **params):
    """``primitive.bind`` with every operand cast to vary over the same shard_map axes, as
    JAX's own primitives do (so that, transposed, a shared operand's cotangent is psummed)."""
    axes = frozenset().union(*(_varying(a) for a in args))
    if axes:
        args = [
            jax.lax.pcast(a, tuple(sorted(axes - _varying(a))), to="varying")
            if axes - _varying(a)
            else a
            for a in args
        ]
    return primitive.bind(*args, **params)


def _abstract(shape, dtype, operands):
    """An output aval; under shard_map it varies over the axes its operands vary over."""
    first = operands[0]
    if not _varying(first):
        return jax.core.ShapedArray(shape, dtype)
    sharding = NamedSharding(first.sharding.mesh, P(*(None for _ in shape)))
    return first.update(shape=shape, dtype=dtype, weak_type=False, sharding=sharding)


def _jitted_impl(primitive):
    @functools.cache
    def compiled(params):
        return jax.jit(lambda *args: primitive.bind(*args, **dict(params)))

    def impl(*args, **params):
        return compiled(tuple(sorted(params.items())))(*args)

    return impl


def _to_front(a, dim, size):
    """``a`` with its batch axis first, broadcast to ``size`` if it has none."""
    if dim is None:
        return jnp.broadcast_to(a, (size, *a.shape))
    return jnp.moveaxis(a, dim, 0)


def _batch_size(args, dims):
    return next(a.shape[d] for a, d in zip(args, dims) if d is not None)


def _instantiate(tangents, primals):
    pairs = zip(tangents, primals, strict=True)
    return [jnp.zeros_like(p) if type(t) is ad.Zero else t for t, p in pairs]


# forward: (x, scale, offset) -> (y, mean_shift, rstd)
_forward_p = Primitive("eqx_norm_forward")
_forward_p.multiple_results = True
_forward_p.def_impl(_jitted_impl(_forward_p))


@_forward_p.def_abstract_eval
def _forward_abstract(x, scale, offset, *, epsilon, center):
    rows, operands = x.shape[0], (x, scale, offset)
    return (
        _abstract(x.shape, x.dtype, operands),
        _abstract((rows,), jnp.float32, operands),
        _abstract((rows,), jnp.float32, operands),
    )


def _forward_lowering(ctx, x, scale, offset, *, epsilon, center):
    if _kernel_lowering_allowed(ctx):
        call = _partitioned_forward if _partitioned(ctx) else _forward_call
        fn = functools.partial(call, epsilon=epsilon, center=center)
    else:
        fn = functools.partial(_jnp_forward, epsilon=epsilon, center=center)
    return mlir.lower_fun(fn, multiple_results=True)(ctx, x, scale, offset)


def _forward_jnp_lowering(ctx, x, scale, offset, *, epsilon, center):
    fn = functools.partial(_jnp_forward, epsilon=epsilon, center=center)
    return mlir.lower_fun(fn, multiple_results=True)(ctx, x, scale, offset)


def _forward_jvp(primals, tangents, *, epsilon, center):
    out = _bind(_forward_p, *primals, epsilon=epsilon, center=center)
    fn = functools.partial(_jnp_forward, epsilon=epsilon, center=center)
    _, out_tangents = jax.jvp(fn, tuple(primals), tuple(_instantiate(tangents, primals)))
    return out, list(out_tangents)


def _forward_batch(args, dims, *, epsilon, center):
    x, scale, offset = args
    size = _batch_size(args, dims)
    if dims[1] is None and dims[2] is None:
        xb = _to_front(x, dims[0], size)
        y, mean_shift, rstd = _bind(
            _forward_p, xb.reshape(-1, xb.shape[-1]), scale, offset, epsilon=epsilon, center=center
        )
        rows = xb.shape[:2]
        return (y.reshape(xb.shape), mean_shift.reshape(rows), rstd.reshape(rows)), (0, 0, 0)
    fn = functools.partial(_jnp_forward, epsilon=epsilon, center=center)
    return jax.vmap(fn, in_axes=tuple(dims), out_axes=0)(*args), (0, 0, 0)


# tangent: (x, scale, mean_shift, rstd, *linear) -> dy, linear in the operands named `which`
_tangent_p = Primitive("eqx_norm_tangent")
_tangent_p.def_impl(_jitted_impl(_tangent_p))


@_tangent_p.def_abstract_eval
def _tangent_abstract(x, scale, mean_shift, rstd, *linear, center, which):
    return _abstract(x.shape, x.dtype, (x, scale, mean_shift, rstd, *linear))


def _tangent_fn(center, which):
    def fn(x, scale, mean_shift, rstd, *linear):
        named = dict(zip(which, linear, strict=True))
        return _jnp_tangent(
            x,
            scale,
            mean_shift,
            rstd,
            named.get("dx"),
            named.get("dscale"),
            named.get("doffset"),
            center=center,
        )

    return fn


def _tangent_lowering(ctx, *args, center, which):
    return mlir.lower_fun(_tangent_fn(center, which), multiple_results=False)(ctx, *args)


def _tangent_transpose(ct, x, scale, mean_shift, rstd, *linear, center, which):
    nonlinear = [None, None, None, None]
    if type(ct) is ad.Zero:
        return [*nonlinear, *(None for _ in linear)]
    dx, dscale, doffset = _bind(
        _backward_p, x, scale, mean_shift, rstd, ct, center=center, groups=1
    )
    found = {"dx": dx, "dscale": dscale[0], "doffset": doffset[0]}
    return [*nonlinear, *(found[name] for name in which)]


def _tangent_jvp(primals, tangents, *, center, which):
    fn = _tangent_fn(center, which)
    return jax.jvp(fn, tuple(primals), tuple(_instantiate(tangents, primals)))


def _tangent_batch(args, dims, *, center, which):
    size = _batch_size(args, dims)
    named = dict(zip(which, dims[4:], strict=True))
    shared = dims[1] is None and named.get("dscale") is None and named.get("doffset") is None
    if shared and dims[0] is not None:
        x, scale, mean_shift, rstd = args[:4]
        xb = _to_front(x, dims[0], size)
        d = xb.shape[-1]
        folded = [xb.reshape(-1, d), scale]
        folded += [_to_front(mean_shift, dims[2], size).reshape(-1)]
        folded += [_to_front(rstd, dims[3], size).reshape(-1)]
        for name, a, k in zip(which, args[4:], dims[4:]):
            folded.append(_to_front(a, k, size).reshape(-1, d) if name == "dx" else a)
        out = _bind(_tangent_p, *folded, center=center, which=which)
        return out.reshape(xb.shape), 0
    return jax.vmap(_tangent_fn(center, which), in_axes=tuple(dims))(*args), 0


# backward: (x, scale, mean_shift, rstd, ct) -> (dx, dscale (groups, D), doffset (groups, D))
_backward_p = Primitive("eqx_norm_backward")
_backward_p.multiple_results = True
_backward_p.def_impl(_jitted_impl(_backward_p))


@_backward_p.def_abstract_eval
def _backward_abstract(x, scale, mean_shift, rstd, ct, *, center, groups):
    d, operands = x.shape[1], (x, scale, mean_shift, rstd, ct)
    return (
        _abstract(x.shape, x.dtype, operands),
        _abstract((groups, d), jnp.float32, operands),
        _abstract((groups, d), jnp.float32, operands),
    )


def _backward_lowering(ctx, *args, center, groups):
    if _kernel_lowering_allowed(ctx):
        if groups == 1 and _partitioned(ctx):

            def fn(*a):
                dx, dscale, doffset = _partitioned_backward(*a, center=center)
                return dx, dscale[None], doffset[None]

        else:
            fn = functools.partial(_backward_call, center=center, groups=groups)
    else:
        fn = functools.partial(_jnp_backward, center=center, groups=groups)
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


def _backward_jnp_lowering(ctx, *args, center, groups):
    fn = functools.partial(_jnp_backward, center=center, groups=groups)
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)


def _backward_jvp(primals, tangents, *, center, groups):
    out = _bind(_backward_p, *primals, center=center, groups=groups)
    fn = functools.partial(_jnp_backward, center=center, groups=groups)
    _, out_tangents = jax.jvp(fn, tuple(primals), tuple(_instantiate(tangents, primals)))
    return out, list(out_tangents)


def _backward_batch(args, dims, *, center, groups):
    size = _batch_size(args, dims)
    x, scale, mean_shift, rstd, ct = args
    if dims[1] is None:
        xb = _to_front(x, dims[0], size)
        d = xb.shape[-1]
        dx, dscale, doffset = _bind(
            _backward_p,
            xb.reshape(-1, d),
            scale,
            _to_front(mean_shift, dims[2], size).reshape(-1),
            _to_front(rstd, dims[3], size).reshape(-1),
            _to_front(ct, dims[4], size).reshape(-1, d),
            center=center,
            groups=size * groups,
        )
        shape = (size, groups, d)
        return (dx.reshape(xb.shape), dscale.reshape(shape), doffset.reshape(shape)), (0, 0, 0)
    fn = functools.partial(_jnp_backward, center=center, groups=groups)
    return jax.vmap(fn, in_axes=tuple(dims))(*args), (0, 0, 0)


for _primitive, _lowering, _fallback, _jvp, _batch in (
    (_forward_p, _forward_lowering, _forward_jnp_lowering, _forward_jvp, _forward_batch),
    (_tangent_p, _tangent_lowering, _tangent_lowering, _tangent_jvp, _tangent_batch),
    (_backward_p, _backward_lowering, _backward_jnp_lowering, _backward_jvp, _backward_batch),
):
    mlir.register_lowering(_primitive, _fallback)  # any platform: the jnp formula
    mlir.register_lowering(_primitive, _lowering, platform="cpu")
    ad.primitive_jvps[_primitive] = _jvp
    batching.primitive_batchers[_primitive] = _batch
ad.primitive_transposes[_tangent_p] = _tangent_transpose
# custom_partitioning needs the device assignment at lowering time, which jit passes only
# for primitives in this (private) registry; without it a sharded jit still runs correctly,
# the kernel then running on gathered rows.
try:
    from jax._src import dispatch as _dispatch

    _dispatch.prim_requires_devices_during_lowering.update((_forward_p, _backward_p))
except (ImportError, AttributeError):  # pragma: no cover - a future jax
    pass


# ----------------------------------------------------------------------------------------
# The differentiable function.


def _is_zero(tangent) -> bool:
    return isinstance(tangent, jax.custom_derivatives.SymbolicZero)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _normalize(x, scale, offset, epsilon, center):
    return _bind(_forward_p, x, scale, offset, epsilon=epsilon, center=center)[0]


@functools.partial(_normalize.defjvp, symbolic_zeros=True)
def _normalize_jvp(epsilon, center, primals, tangents):
    x, scale, offset = primals
    y, mean_shift, rstd = _bind(_forward_p, x, scale, offset, epsilon=epsilon, center=center)
    present = [
        (name, t)
        for name, t in zip(("dx", "dscale", "doffset"), tangents, strict=True)
        if not _is_zero(t)
    ]
    if not present:
        return y, jnp.zeros_like(y)
    which = tuple(name for name, _ in present)
    dy = _bind(
        _tangent_p, x, scale, mean_shift, rstd, *(t for _, t in present), center=center, which=which
    )
    return y, dy
