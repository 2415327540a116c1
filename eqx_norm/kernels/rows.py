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

from ._binding import Kernel, affine, normalize, result
from ._library import served, unavailable_reason
from .groups import _jnp_backward as _groups_backward
from .groups import _jnp_forward as _groups_forward
from .groups import _jnp_tangent as _groups_tangent

__all__ = [
    "normalize_rows",
    "normalize_rows_residual",
    "residual_unavailable_reason",
    "unavailable_reason",
]

# (x's, the residual's) dtypes the fused kernel serves: h is never narrower than x
_PAIRS = "float32/float32 bfloat16/bfloat16 bfloat16/float32 float16/float16 float16/float32"
_RESIDUAL_PAIRS = {tuple(map(jnp.dtype, pair.split("/"))) for pair in _PAIRS.split()}


def normalize_rows(
    x: Float[Array, "rows d"],
    scale: Float[Array, " d"] | None,
    offset: Float[Array, " d"] | None,
    *,
    epsilon: float,
    center: bool,
) -> Float[Array, "rows d"]:
    """``(x - mean) * rsqrt(var + eps) * scale + offset`` per row of ``x`` ``(rows, D)``
    (``center=False``: ``x * rsqrt(mean(x^2) + eps) * scale + offset``, RMSNorm), by the
    compiled kernel, in x's dtype. ``scale``/``offset`` are ``(D,)`` float32 or None (ones,
    zeros), or ``(E, D)``: one per example, E examples of ``rows / E`` rows each.
    Statistics are float32 and two-pass after subtracting each row's first element;
    with ``epsilon == 0`` a constant row gives exactly ``offset``. A ValueError says why
    where the kernel cannot serve ``x`` (see :func:`unavailable_reason`).
    """
    served(unavailable_reason(x))
    attrs = (("center", bool(center)), ("epsilon", float(epsilon)))
    return normalize(ROWS, attrs, x, *affine(scale, offset, x.shape[1]))[0]


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
    served(residual_unavailable_reason(x, residual))
    attrs = (("center", bool(center)), ("dtype", jnp.dtype(x.dtype)), ("epsilon", float(epsilon)))
    y, h = normalize(RESIDUAL, attrs, x, residual, *affine(scale, offset, x.shape[1]))
    return y, h


# ----------------------------------------------------------------------------------------
# The jnp formulas (the kernels' reference, their derivatives, and their lowering where the
# kernel may not run): groups.py's, a row being one example's one group of D channels.

_ROW = {"num_groups": 1, "channels_last": True}


def _jnp_forward(x, scale, offset, *, epsilon, center, **_):
    outs = _groups_forward(x[:, None], scale, offset, epsilon=epsilon, center=center, **_ROW)
    return [o[:, 0] for o in outs[:3]]  # (no activation: no sigmoid kept)


def _jnp_tangent(x, scale, offset, mean_shift, rstd, *linear, center, which, **_):
    linear = [t[:, None] if w == "dx" else t for w, t in zip(which, linear, strict=True)]
    rows = (x[:, None], scale, offset, mean_shift[:, None], rstd[:, None], None)
    return [_groups_tangent(*rows, *linear, center=center, which=which, **_ROW)[0][:, 0]]


def _jnp_backward(
    x, scale, offset, mean_shift, rstd, ct, ct_h=None, *, center, groups, want_dx=True, **_
):
    """``ct_h`` is added to ``dx`` (the fused residual's backward, ``x`` then ``h``)."""
    ct_h = None if ct_h is None else ct_h[:, None]
    rows = (x[:, None], scale, offset, mean_shift[:, None], rstd[:, None], None, ct[:, None], ct_h)
    dx, dscale, doffset = _groups_backward(
        *rows, center=center, groups=groups, want_dx=want_dx, **_ROW
    )
    return dx[:, 0], dscale, doffset


def _jnp_res_forward(x, r, scale, offset, *, epsilon, center, **_):
    h = (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(r.dtype)
    y, mean_shift, rstd = _jnp_forward(h, scale, offset, epsilon=epsilon, center=center)
    return y.astype(x.dtype), h, mean_shift, rstd


def _jnp_res_tangent(h, scale, offset, mean_shift, rstd, *linear, center, which, dtype, **_):
    """Tangents ``(dy, dh)``, linear in the operands named by ``which`` (dx, dr, dscale,
    doffset)."""
    named = dict(zip(which, linear, strict=True))
    dh = sum((named[n].astype(jnp.float32) for n in ("dx", "dr") if n in named), jnp.zeros(h.shape))
    dh = dh.astype(h.dtype)
    rest = [n for n in ("dscale", "doffset") if n in named]
    (dy,) = _jnp_tangent(
        h, scale, offset, mean_shift, rstd, dh, *(named[n] for n in rest),
        center=center, which=("dx", *rest),
    )  # fmt: skip
    return [dy.astype(dtype), dh]


def _jnp_res_backward(h, scale, offset, mean_shift, rstd, ct, ct_h, *, center, groups, **_):
    return _jnp_backward(h, scale, offset, mean_shift, rstd, ct, ct_h, center=center, groups=groups)


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


def _backward_call(x, scale, offset, mean_shift, rstd, ct, *, center, groups, want_dx, **_):
    """``offset`` is unused: the backward needs it only before an activation."""
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


def _res_backward_call(h, scale, offset, mean_shift, rstd, ct, ct_h, *, center, groups, **_):
    out = (result(h, h.shape, h.dtype), _sums(h, groups), _sums(h, groups))
    return jax.ffi.ffi_call("eqx_norm_residual_backward", out)(
        h, scale, mean_shift, rstd, ct, ct_h, center=center, groups=np.int64(groups)
    )


# saved: mean_shift and rstd
ROWS = Kernel("rows", _jnp_forward, _jnp_tangent, _jnp_backward, _forward_call, _backward_call,
              visible=1, saved=2)  # fmt: skip
RESIDUAL = Kernel("residual", _jnp_res_forward, _jnp_res_tangent, _jnp_res_backward,
                  _res_forward_call, _res_backward_call, visible=2, saved=2)  # fmt: skip
