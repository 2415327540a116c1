r"""LayerNorm and RMSNorm rows on the compiled CPU kernel, as differentiable JAX operations.

:func:`normalize_rows` is a :func:`jax.custom_jvp` whose primal runs the forward kernel
(which also returns each row's statistics) and whose tangent is a primitive *linear* in
``(dx, dscale, doffset)``:

* reverse mode transposes the tangent, and the transpose runs the backward kernel for the
  cotangents that are wanted (no ``dx`` is computed when ``x`` is not differentiated);
* forward mode evaluates the tangent as plain ``jnp`` (XLA fuses it), so ``jvp``,
  ``jacfwd`` and ``hessian`` work, which a ``custom_vjp`` would forbid; every primitive's
  own derivative is :func:`jax.jvp` of its ``jnp`` formula, so every order works;
* ``vmap`` with a shared scale and offset folds its axis into the rows (the backward then
  sums ``dscale``/``doffset`` per example); a per-example scale runs the ``jnp`` formula;
* under a multi-device ``jit`` the kernels go through ``custom_partitioning``: each device
  normalizes its own rows, the backward ``psum``\ s ``dscale``/``doffset`` (no all-gather);
* ``jax.export`` and other platforms lower the same ``jnp`` formulas: no custom call.

The JAX hooks this needs are in :mod:`eqx_norm.kernels._jax_hooks`.
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
from ._library import unavailable_reason

__all__ = ["normalize_rows", "normalize_rows_residual", "residual_unavailable_reason"]

_FORWARD, _BACKWARD = "eqx_norm_rows_forward", "eqx_norm_rows_backward"
_RES_FORWARD, _RES_BACKWARD = "eqx_norm_residual_forward", "eqx_norm_residual_backward"
# (x's, the residual's) dtypes the fused kernel serves: h is never narrower than x
_RESIDUAL_PAIRS = {
    (jnp.dtype(a), jnp.dtype(b))
    for a, b in [
        (jnp.float32, jnp.float32),
        (jnp.bfloat16, jnp.bfloat16),
        (jnp.bfloat16, jnp.float32),
        (jnp.float16, jnp.float16),
        (jnp.float16, jnp.float32),
    ]
}


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
        x: ``(rows, D)``, of a dtype the library was built for (float32, bfloat16, and
            float16 where the compiler has ``_Float16``: see ``unavailable_reason``).
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
# The jnp formulas: the kernel's reference, its derivatives, and its lowering where the
# kernel may not run.


def _xhat(x, mean_shift, rstd, center):
    """``((x - x[:, :1]) - mean_shift) * rstd`` in float32 (``x * rstd`` for RMSNorm)."""
    xf = x.astype(jnp.float32)
    if center:
        xf = (xf - xf[:, :1]) - mean_shift[:, None]
    return xf * rstd[:, None]


def _jnp_forward(x, scale, offset, *, epsilon, center):
    xf = x.astype(jnp.float32)
    # the library's one copy of the statistics; `mean_shift` is the residual the tangent
    # and the backward rebuild xhat from, as the kernel saves it
    centered, rstd = centered_statistics(xf, (1,), epsilon=epsilon, center=center)
    rstd = rstd[:, 0]
    if center:
        mean_shift = jnp.mean(xf - xf[:, :1], axis=1)
    else:
        mean_shift = jnp.zeros(x.shape[:1], jnp.float32)
    y = centered * rstd[:, None] * scale[None, :] + offset[None, :]
    return y.astype(x.dtype), mean_shift, rstd


def _jnp_tangent(x, scale, mean_shift, rstd, *linear, center, which):
    """The forward pass's tangent, linear in the operands named by ``which``."""
    named = dict(zip(which, linear, strict=True))
    xhat = _xhat(x, mean_shift, rstd, center)
    dy = jnp.zeros(x.shape, jnp.float32)
    if "dx" in named:
        dxf = named["dx"].astype(jnp.float32)
        inner = dxf - jnp.mean(dxf, axis=1, keepdims=True) if center else dxf
        dxhat = rstd[:, None] * (inner - xhat * jnp.mean(dxf * xhat, axis=1, keepdims=True))
        dy = dy + dxhat * scale[None, :]
    if "dscale" in named:
        dy = dy + xhat * named["dscale"][None, :]
    if "doffset" in named:
        dy = dy + named["doffset"][None, :]
    return [dy.astype(x.dtype)]


def _jnp_backward(x, scale, mean_shift, rstd, ct, ct_h=None, *, center, groups, want_dx=True):
    """The tangent's transpose: ``(dx, dscale, doffset)``, the last two summed per group of
    ``rows / groups`` rows; ``dx`` is empty unless ``want_dx``, and has ``ct_h`` added
    (the residual backward: then ``x`` is ``h``)."""
    xhat = _xhat(x, mean_shift, rstd, center)
    g = ct.astype(jnp.float32)
    d = x.shape[1]
    dscale = jnp.sum((g * xhat).reshape(groups, -1, d), axis=1)
    doffset = jnp.sum(g.reshape(groups, -1, d), axis=1)
    if not want_dx:
        return jnp.zeros((0, d), x.dtype), dscale, doffset
    v = g * scale[None, :]
    inner = v - jnp.mean(v, axis=1, keepdims=True) if center else v
    dx = rstd[:, None] * (inner - xhat * jnp.mean(v * xhat, axis=1, keepdims=True))
    if ct_h is not None:
        dx = dx + ct_h.astype(jnp.float32)
    return dx.astype(x.dtype), dscale, doffset


# ----------------------------------------------------------------------------------------
# The kernel calls; under a multi-device jit, row-partitioned.


def _forward_call(x, scale, offset, *, epsilon, center):
    rows = x.shape[0]
    out = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct((rows,), jnp.float32),
        jax.ShapeDtypeStruct((rows,), jnp.float32),
    )
    return jax.ffi.ffi_call(_FORWARD, out)(
        x, scale, offset, epsilon=np.float32(epsilon), center=center
    )


def _backward_call(x, scale, mean_shift, rstd, ct, *, center, groups, want_dx):
    d = x.shape[1]
    out = (
        jax.ShapeDtypeStruct(x.shape if want_dx else (0, d), x.dtype),
        jax.ShapeDtypeStruct((groups, d), jnp.float32),
        jax.ShapeDtypeStruct((groups, d), jnp.float32),
    )
    return jax.ffi.ffi_call(_BACKWARD, out)(
        x, scale, mean_shift, rstd, ct, center=center, groups=np.int64(groups), want_dx=want_dx
    )


_forward_partitioned = _partitioned(
    _forward_call, "mrr", "mvv", ("epsilon", "center"), "r d, d, d -> r d, r, r"
)


# dscale/doffset carry no row factor: the partition psums them itself
def _backward_squeezed(x, scale, mean_shift, rstd, ct, *, center):
    dx, dscale, doffset = _backward_call(
        x, scale, mean_shift, rstd, ct, center=center, groups=1, want_dx=True
    )
    return dx, dscale[0], doffset[0]


_backward_partitioned = _partitioned(
    _backward_squeezed,
    "mrvvm",
    "mrr",
    ("center",),
    "r d, d, r, r, r d -> r d, d, d",
    psum_outputs=(1, 2),
)


def _backward_partitioned_call(x, scale, mean_shift, rstd, ct, *, center, groups, want_dx):
    """The row-partitioned backward (``groups == 1``; it always writes dx)."""
    dx, dscale, doffset = _backward_partitioned(x, scale, mean_shift, rstd, ct, center=center)
    return (dx if want_dx else dx[:0]), dscale[None], doffset[None]


# ----------------------------------------------------------------------------------------
# The primitives.


_forward_p = hooks.define_primitive(
    "eqx_norm_rows_forward",
    abstract_eval=_abstract(
        lambda x, s, o, **_: [
            (x.shape, x.dtype),
            (x.shape[:1], jnp.float32),
            (x.shape[:1], jnp.float32),
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
    "eqx_norm_rows_backward",
    abstract_eval=_abstract(
        lambda x, s, m, r, ct, *, center, groups, want_dx: [
            (x.shape if want_dx else (0, x.shape[1]), x.dtype),
            ((groups, x.shape[1]), jnp.float32),
            ((groups, x.shape[1]), jnp.float32),
        ]
    ),
    reference=_jnp_backward,
    lowering=_kernel_or_reference(
        _backward_call,
        lambda **p: functools.partial(_backward_partitioned_call, **p),
        _jnp_backward,
    ),
    jvp=lambda *a, **p: _jvp_of(_jnp_backward, _backward_p)(*a, **p),
    batch=_batch_rule(lambda: _backward_p, _jnp_backward, (0, 2, 3, 4), (1,), _backward_fold),
)


def _tangent_transpose(cts, x, scale, mean_shift, rstd, *linear, center, which):
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
        center=center,
        groups=1,
        want_dx="dx" in which,
    )
    found = {"dx": dx, "dscale": dscale[0], "doffset": doffset[0]}
    return [None] * 4 + [found[name] for name in which]


def _tangent_fold(params, size):
    return params, lambda outs, n: [outs[0].reshape(n, -1, outs[0].shape[-1])]


_tangent_p = hooks.define_primitive(
    "eqx_norm_rows_tangent",
    abstract_eval=_abstract(lambda x, *rest, **_: [(x.shape, x.dtype)]),
    reference=_jnp_tangent,
    # evaluated only in forward mode: plain jnp, fused by XLA
    lowering=lambda for_export, devices, **params: functools.partial(_jnp_tangent, **params),
    jvp=lambda *a, **p: _jvp_of(_jnp_tangent, _tangent_p)(*a, **p),
    batch=lambda args, dims, *, center, which: _tangent_batch(args, dims, center, which),
    transpose=_tangent_transpose,
)


def _tangent_batch(args, dims, center, which):
    """Fold when only ``dx`` among the linear operands is batched (like ``x``)."""
    shared = [1] + [4 + i for i, name in enumerate(which) if name != "dx"]
    rows = (0, 2, 3, *(4 + i for i, name in enumerate(which) if name == "dx"))
    if dims[0] is None:  # x unbatched, a tangent batched (jacfwd): vmap the jnp formula
        shared = range(len(args))
    rule = _batch_rule(lambda: _tangent_p, _jnp_tangent, rows, shared, _tangent_fold)
    return rule(args, dims, center=center, which=which)


# ----------------------------------------------------------------------------------------
# The differentiable function.


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _normalize(x, scale, offset, epsilon, center):
    return hooks.bind(_forward_p, x, scale, offset, epsilon=epsilon, center=center)[0]


@functools.partial(_normalize.defjvp, symbolic_zeros=True)
def _normalize_jvp(epsilon, center, primals, tangents):
    x, scale, offset = primals
    y, mean_shift, rstd = hooks.bind(_forward_p, x, scale, offset, epsilon=epsilon, center=center)
    names = ("dx", "dscale", "doffset")
    present = [(n, t) for n, t in zip(names, tangents, strict=True) if not is_zero_tangent(t)]
    if not present:
        return y, jnp.zeros_like(y)
    which = tuple(name for name, _ in present)
    linear = (t for _, t in present)
    (dy,) = hooks.bind(_tangent_p, x, scale, mean_shift, rstd, *linear, center=center, which=which)
    return y, dy


# ----------------------------------------------------------------------------------------
# The fused residual add + norm: h = x + r (float32 sum, stored in r's dtype), y = norm(h);
# the forward reads x and r and writes h and y in one pass, the backward reads h and both
# cotangents and writes dh = (dy/dh)^T ct_y + ct_h once (dx is dh in x's dtype).


def residual_unavailable_reason(x: jax.Array, residual: jax.Array) -> str | None:
    """None when the fused kernel serves ``(x, residual)``, else why it cannot."""
    reason = unavailable_reason(x) or unavailable_reason(residual)
    if reason is None and (jnp.dtype(x.dtype), jnp.dtype(residual.dtype)) not in _RESIDUAL_PAIRS:
        reason = (
            f"the fused residual kernel does not serve x of {x.dtype} with a residual of "
            f"{residual.dtype} (h would be narrower than x)"
        )
    return reason


def normalize_rows_residual(
    x: Float[Array, "rows d"],
    residual: Float[Array, "rows d"],
    scale: Float[Array, " d"] | None,
    offset: Float[Array, " d"] | None,
    *,
    epsilon: float,
    center: bool,
) -> tuple[Float[Array, "rows d"], Float[Array, "rows d"]]:
    """``(normalize_rows(h), h)`` with ``h = (x + residual)`` summed in float32 and stored
    in the residual's dtype, in one pass over memory; ``y`` has x's dtype."""
    d = x.shape[1]
    scale = jnp.ones((d,), jnp.float32) if scale is None else scale
    offset = jnp.zeros((d,), jnp.float32) if offset is None else offset
    return _normalize_residual(x, residual, scale, offset, float(epsilon), bool(center))


def _residual_sum(x, r):
    return (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(r.dtype)


def _jnp_res_forward(x, r, scale, offset, *, epsilon, center):
    h = _residual_sum(x, r)
    y, mean_shift, rstd = _jnp_forward(h, scale, offset, epsilon=epsilon, center=center)
    return y.astype(x.dtype), h, mean_shift, rstd


def _jnp_res_tangent(h, scale, mean_shift, rstd, *linear, center, which, y_dtype):
    """Tangents ``(dy, dh)``, linear in the operands named by ``which`` (dx, dr, dscale,
    doffset)."""
    named = dict(zip(which, linear, strict=True))
    dh = jnp.zeros(h.shape, jnp.float32)
    for name in ("dx", "dr"):
        if name in named:
            dh = dh + named[name].astype(jnp.float32)
    dh = dh.astype(h.dtype)
    rest = [n for n in ("dscale", "doffset") if n in named]
    (dy,) = _jnp_tangent(
        h, scale, mean_shift, rstd, dh, *(named[n] for n in rest),
        center=center, which=("dx", *rest),
    )  # fmt: skip
    return [dy.astype(y_dtype), dh]


def _jnp_res_backward(h, scale, mean_shift, rstd, ct, ct_h, *, center, groups):
    return _jnp_backward(h, scale, mean_shift, rstd, ct, ct_h, center=center, groups=groups)


def _res_forward_call(x, r, scale, offset, *, epsilon, center):
    rows = x.shape[0]
    out = (
        jax.ShapeDtypeStruct(x.shape, x.dtype),
        jax.ShapeDtypeStruct(r.shape, r.dtype),
        jax.ShapeDtypeStruct((rows,), jnp.float32),
        jax.ShapeDtypeStruct((rows,), jnp.float32),
    )
    return jax.ffi.ffi_call(_RES_FORWARD, out)(
        x, r, scale, offset, epsilon=np.float32(epsilon), center=center
    )


def _res_backward_call(h, scale, mean_shift, rstd, ct, ct_h, *, center, groups):
    d = h.shape[1]
    out = (
        jax.ShapeDtypeStruct(h.shape, h.dtype),
        jax.ShapeDtypeStruct((groups, d), jnp.float32),
        jax.ShapeDtypeStruct((groups, d), jnp.float32),
    )
    return jax.ffi.ffi_call(_RES_BACKWARD, out)(
        h, scale, mean_shift, rstd, ct, ct_h, center=center, groups=np.int64(groups)
    )


def _res_backward_squeezed(h, scale, mean_shift, rstd, ct, ct_h, *, center):
    dh, dscale, doffset = _res_backward_call(
        h, scale, mean_shift, rstd, ct, ct_h, center=center, groups=1
    )
    return dh, dscale[0], doffset[0]


_res_forward_partitioned = _partitioned(
    _res_forward_call, "mmrr", "mmvv", ("epsilon", "center"), "r d, r d, d, d -> r d, r d, r, r"
)
_res_backward_partitioned = _partitioned(
    _res_backward_squeezed,
    "mrvvmm",
    "mrr",
    ("center",),
    "r d, d, r, r, r d, r d -> r d, d, d",
    psum_outputs=(1, 2),
)


def _res_backward_partitioned_call(*args, center, groups):
    dh, dscale, doffset = _res_backward_partitioned(*args, center=center)
    return dh, dscale[None], doffset[None]


_res_forward_p = hooks.define_primitive(
    "eqx_norm_residual_forward",
    abstract_eval=_abstract(
        lambda x, r, s, o, **_: [
            (x.shape, x.dtype),
            (r.shape, r.dtype),
            (x.shape[:1], jnp.float32),
            (x.shape[:1], jnp.float32),
        ]
    ),
    reference=_jnp_res_forward,
    lowering=_kernel_or_reference(
        _res_forward_call,
        lambda **p: functools.partial(_res_forward_partitioned, **p),
        _jnp_res_forward,
    ),
    jvp=lambda *a, **p: _jvp_of(_jnp_res_forward, _res_forward_p)(*a, **p),
    batch=_batch_rule(
        lambda: _res_forward_p, _jnp_res_forward, (0, 1), (2, 3), lambda p, n: (p, _rows_unfold)
    ),
)

_res_backward_p = hooks.define_primitive(
    "eqx_norm_residual_backward",
    abstract_eval=_abstract(
        lambda h, s, m, r, ct, ct_h, *, center, groups: [
            (h.shape, h.dtype),
            ((groups, h.shape[1]), jnp.float32),
            ((groups, h.shape[1]), jnp.float32),
        ]
    ),
    reference=_jnp_res_backward,
    lowering=_kernel_or_reference(
        _res_backward_call,
        lambda **p: functools.partial(_res_backward_partitioned_call, **p),
        _jnp_res_backward,
    ),
    jvp=lambda *a, **p: _jvp_of(_jnp_res_backward, _res_backward_p)(*a, **p),
    batch=_batch_rule(
        lambda: _res_backward_p, _jnp_res_backward, (0, 2, 3, 4, 5), (1,), _backward_fold
    ),
)


def _res_tangent_transpose(cts, h, scale, mean_shift, rstd, *linear, center, which, y_dtype):
    ct_y, ct_h = cts
    if type(ct_h) is hooks.Zero:
        ct_h = jnp.zeros(h.shape, h.dtype)
    if type(ct_y) is hooks.Zero:
        d = h.shape[1]
        dh, dscale, doffset = ct_h, jnp.zeros((1, d), jnp.float32), jnp.zeros((1, d), jnp.float32)
    else:
        dh, dscale, doffset = hooks.bind(
            _res_backward_p, h, scale, mean_shift, rstd, ct_y, ct_h, center=center, groups=1
        )
    found = {"dx": dh.astype(y_dtype), "dr": dh, "dscale": dscale[0], "doffset": doffset[0]}
    return [None] * 4 + [found[name] for name in which]


def _res_tangent_fold(params, size):
    return params, lambda outs, n: [o.reshape(n, -1, o.shape[-1]) for o in outs]


def _res_tangent_batch(args, dims, **params):
    which = params["which"]
    shared = [1] + [4 + i for i, name in enumerate(which) if name in ("dscale", "doffset")]
    rows = (0, 2, 3, *(4 + i for i, name in enumerate(which) if name in ("dx", "dr")))
    if dims[0] is None:  # h unbatched, a tangent batched (jacfwd): vmap the jnp formula
        shared = range(len(args))
    rule = _batch_rule(lambda: _res_tangent_p, _jnp_res_tangent, rows, shared, _res_tangent_fold)
    return rule(args, dims, **params)


_res_tangent_p = hooks.define_primitive(
    "eqx_norm_residual_tangent",
    abstract_eval=_abstract(
        lambda h, *rest, y_dtype, **_: [(h.shape, y_dtype), (h.shape, h.dtype)]
    ),
    reference=_jnp_res_tangent,
    lowering=lambda for_export, devices, **params: functools.partial(_jnp_res_tangent, **params),
    jvp=lambda *a, **p: _jvp_of(_jnp_res_tangent, _res_tangent_p)(*a, **p),
    batch=_res_tangent_batch,
    transpose=_res_tangent_transpose,
)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5))
def _normalize_residual(x, r, scale, offset, epsilon, center):
    y, h, _, _ = hooks.bind(_res_forward_p, x, r, scale, offset, epsilon=epsilon, center=center)
    return y, h


@functools.partial(_normalize_residual.defjvp, symbolic_zeros=True)
def _normalize_residual_jvp(epsilon, center, primals, tangents):
    x, r, scale, offset = primals
    y, h, mean_shift, rstd = hooks.bind(
        _res_forward_p, x, r, scale, offset, epsilon=epsilon, center=center
    )
    names = ("dx", "dr", "dscale", "doffset")
    present = [(n, t) for n, t in zip(names, tangents, strict=True) if not is_zero_tangent(t)]
    if not present:
        return (y, h), (jnp.zeros_like(y), jnp.zeros_like(h))
    which = tuple(name for name, _ in present)
    dy, dh = hooks.bind(
        _res_tangent_p,
        h,
        scale,
        mean_shift,
        rstd,
        *(t for _, t in present),
        center=center,
        which=which,
        y_dtype=jnp.dtype(x.dtype),
    )
    return (y, h), (dy, dh)
