r"""LayerNorm and RMSNorm rows, plain and with a fused residual add, on the compiled CPU
kernel: :func:`normalize_rows` and :func:`normalize_rows_residual`, differentiable in every
mode and batchable through the primitive pair of :mod:`eqx_norm.kernels._binding`; below
are what these two kernels add to it: their ``jnp`` formulas and their FFI calls.

The fused kernel sums ``h = x + residual`` (float32, stored in the residual's dtype) and
normalizes it in one pass; its backward reads both cotangents and writes
``dh = (dy/dh)^T ct_y + ct_h`` once (``dx`` is ``dh`` in x's dtype).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._statistics import centered_statistics
from ._binding import Kernel, normalize, result
from ._library import unavailable_reason

__all__ = [
    "normalize_rows",
    "normalize_rows_residual",
    "residual_unavailable_reason",
    "unavailable_reason",
]

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


def _served(reason: str | None) -> None:
    if reason is not None:
        raise ValueError(f"the eqx_norm CPU kernel cannot serve this call: {reason}")


def _affine(scale, offset, d):
    scale = jnp.ones((d,), jnp.float32) if scale is None else scale
    offset = jnp.zeros((d,), jnp.float32) if offset is None else offset
    return scale, offset


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

    Raises:
        ValueError: where the kernel cannot serve ``x`` (the message says why).
    """
    _served(unavailable_reason(x))
    attrs = (("center", bool(center)), ("epsilon", float(epsilon)))
    return normalize(ROWS, attrs, x, *_affine(scale, offset, x.shape[1]))[0]


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
    _served(residual_unavailable_reason(x, residual))
    attrs = (("center", bool(center)), ("dtype", jnp.dtype(x.dtype)), ("epsilon", float(epsilon)))
    y, h = normalize(RESIDUAL, attrs, x, residual, *_affine(scale, offset, x.shape[1]))
    return y, h


# ----------------------------------------------------------------------------------------
# The jnp formulas: the kernels' reference, their derivatives, and their lowering where the
# kernel may not run (jax.export, other platforms). Each takes every attribute.


def _xhat(x, mean_shift, rstd, center):
    """``((x - x[:, :1]) - mean_shift) * rstd`` in float32 (``x * rstd`` for RMSNorm)."""
    xf = x.astype(jnp.float32)
    if center:
        xf = (xf - xf[:, :1]) - mean_shift[:, None]
    return xf * rstd[:, None]


def _jnp_forward(x, scale, offset, *, epsilon, center, **_):
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


def _jnp_tangent(x, scale, mean_shift, rstd, *linear, center, which, **_):
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


def _jnp_backward(x, scale, mean_shift, rstd, ct, ct_h=None, *, center, groups, want_dx=True, **_):
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


def _residual_sum(x, r):
    return (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(r.dtype)


def _jnp_res_forward(x, r, scale, offset, *, epsilon, center, **_):
    h = _residual_sum(x, r)
    y, mean_shift, rstd = _jnp_forward(h, scale, offset, epsilon=epsilon, center=center)
    return y.astype(x.dtype), h, mean_shift, rstd


def _jnp_res_tangent(h, scale, mean_shift, rstd, *linear, center, which, dtype, **_):
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
    return [dy.astype(dtype), dh]


def _jnp_res_backward(h, scale, mean_shift, rstd, ct, ct_h, *, center, groups, **_):
    return _jnp_backward(h, scale, mean_shift, rstd, ct, ct_h, center=center, groups=groups)


# ----------------------------------------------------------------------------------------
# The FFI calls (targets, attributes and buffers as cpu/layer_norm.cc declares them).


def _forward_call(x, scale, offset, *, epsilon, center, **_):
    stats = result(x, x.shape[:1], jnp.float32)
    out = (result(x, x.shape, x.dtype), stats, stats)
    return jax.ffi.ffi_call("eqx_norm_rows_forward", out)(
        x, scale, offset, epsilon=np.float32(epsilon), center=center
    )


def _sums(x, groups):
    return result(x, (groups, x.shape[1]), jnp.float32)


def _backward_call(x, scale, mean_shift, rstd, ct, *, center, groups, want_dx, **_):
    dx = result(x, x.shape if want_dx else (0, x.shape[1]), x.dtype)
    return jax.ffi.ffi_call("eqx_norm_rows_backward", (dx, _sums(x, groups), _sums(x, groups)))(
        x, scale, mean_shift, rstd, ct, center=center, groups=np.int64(groups), want_dx=want_dx
    )


def _res_forward_call(x, r, scale, offset, *, epsilon, center, **_):
    stats = result(x, x.shape[:1], jnp.float32)
    out = (result(x, x.shape, x.dtype), result(x, r.shape, r.dtype), stats, stats)
    return jax.ffi.ffi_call("eqx_norm_residual_forward", out)(
        x, r, scale, offset, epsilon=np.float32(epsilon), center=center
    )


def _res_backward_call(h, scale, mean_shift, rstd, ct, ct_h, *, center, groups, **_):
    out = (result(h, h.shape, h.dtype), _sums(h, groups), _sums(h, groups))
    return jax.ffi.ffi_call("eqx_norm_residual_backward", out)(
        h, scale, mean_shift, rstd, ct, ct_h, center=center, groups=np.int64(groups)
    )


def _sums_of(outs):
    return {"dscale": outs[1][0], "doffset": outs[2][0]}


ROWS = Kernel(
    name="rows",
    forward=_jnp_forward,
    tangent=_jnp_tangent,
    backward=_jnp_backward,
    forward_call=_forward_call,
    backward_call=_backward_call,
    linear=("dx", "dscale", "doffset"),
    visible=1,
    saved=lambda inputs, outs: (inputs[0], inputs[1], outs[1], outs[2]),
    cotangents=lambda outs, attrs: {"dx": outs[0], **_sums_of(outs)},
)
RESIDUAL = Kernel(
    name="residual",
    forward=_jnp_res_forward,
    tangent=_jnp_res_tangent,
    backward=_jnp_res_backward,
    forward_call=_res_forward_call,
    backward_call=_res_backward_call,
    linear=("dx", "dr", "dscale", "doffset"),
    visible=2,
    saved=lambda inputs, outs: (outs[1], inputs[2], outs[2], outs[3]),
    cotangents=lambda outs, attrs: {
        "dx": outs[0].astype(attrs["dtype"]),
        "dr": outs[0],
        **_sums_of(outs),
    },
)
