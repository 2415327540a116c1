r"""GroupNorm and InstanceNorm on the compiled CPU kernel: :func:`normalize_groups`,
differentiable in every mode and batchable through the primitive pair of
:mod:`eqx_norm.kernels._binding` (as rows.py is); below are what this kernel adds to it:
its ``jnp`` formulas and its FFI calls.

``x`` arrives as a 3-D view: channels-last ``(N, S, C)`` (each group is ``C / G`` strided
channels at every position) or channels-first ``(N, C, S)`` (each group is contiguous).
The binding's rows are the examples ``N``: ``vmap`` folds into them, a multi-device
``jit`` splits them. The kernel's results for one example do not depend on the rest of
the batch or on the thread count (bitwise): see ``cpu/group_norm.cc``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from .._core import centered_statistics
from ._binding import Kernel, affine, normalize, result
from ._library import served, unavailable_reason

__all__ = ["normalize_groups", "unavailable_reason"]


def normalize_groups(
    x: Float[Array, "n a b"],
    scale: Float[Array, " c"] | None,
    offset: Float[Array, " c"] | None,
    *,
    num_groups: int,
    channels_last: bool,
    epsilon: float,
    activation: str | None = None,
) -> Float[Array, "n a b"]:
    """GroupNorm of each ``(n, g)`` group of ``x`` ``(N, S, C)`` (``channels_last``) or
    ``(N, C, S)``, by the compiled kernel, in x's dtype: ``(x - mean) * rsqrt(var + eps) *
    scale[c] + offset[c]`` over each example's ``C / num_groups`` channels at all positions
    (``num_groups = C``: InstanceNorm). ``scale``/``offset`` are ``(C,)`` float32 or None,
    or ``(E, C)``: one per example, E examples of ``N / E`` each; ``activation="silu"``
    applies ``silu`` to the result.
    Statistics are float32 and two-pass after subtracting the group's first element; a
    constant group gives exactly ``offset``. A ValueError says why where the kernel cannot
    serve ``x`` (see :func:`unavailable_reason`).
    """
    served(unavailable_reason(x))
    attrs = dict(
        channels_last=bool(channels_last), epsilon=float(epsilon), num_groups=int(num_groups)
    )
    attrs["activation"] = activation
    scale, offset = affine(scale, offset, x.shape[2] if channels_last else x.shape[1])
    return normalize(GROUPS, tuple(sorted(attrs.items())), x, scale, offset)[0]


# ----------------------------------------------------------------------------------------
# The jnp formulas (the kernels' reference, their derivatives, and their lowering where the
# kernel may not run), rows.py's too, on the grouped view (N, S, G, K) or (N, G, K, S);
# ``center=False`` is RMSNorm's (rows.py).


def _grouped(a, num_groups, channels_last):
    """``a`` of x's 3-D shape as ``(N, S, G, K)`` or ``(N, G, K, S)``, and the group axes."""
    n, first, second = a.shape
    if channels_last:
        return a.reshape(n, first, num_groups, second // num_groups), (1, 3)
    return a.reshape(n, num_groups, first // num_groups, second), (2, 3)


def _per_channel(v, num_groups, channels_last, n=1):
    """A ``(C,)`` vector, or ``(E, C)`` one per example of ``n / E`` consecutive ones,
    broadcastable against the grouped view of ``n`` examples."""
    if v.ndim == 2 and v.shape[0] > 1:
        v = jnp.repeat(v, n // v.shape[0], axis=0)  # one per example: (n, C)
    lead = v.shape[0] if v.ndim == 2 else 1
    shape = (lead, 1, num_groups, -1) if channels_last else (lead, num_groups, -1, 1)
    return v.reshape(shape)


def _per_group(v, channels_last):
    """An ``(N, G)`` statistic broadcastable against the grouped view."""
    return v[:, None, :, None] if channels_last else v[:, :, None, None]


def _first(xg, axes):
    """Each group's first element, kept as size-1 axes: the kernel's shift."""
    return xg[tuple(slice(0, 1) if i in axes else slice(None) for i in range(xg.ndim))]


def _xhat(x, mean_shift, rstd, num_groups, channels_last, center):
    xg, axes = _grouped(x.astype(jnp.float32), num_groups, channels_last)
    if center:
        xg = (xg - _first(xg, axes)) - _per_group(mean_shift, channels_last)
    return xg * _per_group(rstd, channels_last), axes


def _mean(a, axes):
    return jnp.mean(a, axis=axes, keepdims=True)


def _jnp_forward(
    x, scale, offset, *, epsilon, num_groups, channels_last, center=True, activation=None,
    keep=True, **_,
):  # fmt: skip
    xg, axes = _grouped(x.astype(jnp.float32), num_groups, channels_last)
    n = x.shape[0]
    # the library's one copy of the statistics; `mean_shift` is the residual the tangent
    # and the backward rebuild xhat from, as the kernel saves it
    centered, rstd = centered_statistics(xg, axes, epsilon=epsilon, center=center)
    mean_shift = jnp.mean(xg - _first(xg, axes), axis=axes)
    if not center:
        mean_shift = jnp.zeros(mean_shift.shape, jnp.float32)
    y = centered * rstd * _per_channel(scale, num_groups, channels_last, n)
    y = y + _per_channel(offset, num_groups, channels_last, n)
    kept = jnp.zeros(_sigmoid_shape(x.shape, activation, keep), jnp.float32)
    if activation == "silu":  # sigmoid(u) is kept for the derivative, as autodiff keeps it
        sigmoid = jax.nn.sigmoid(y)
        y = y * sigmoid
        kept = sigmoid.reshape(x.shape) if keep else kept
    y = y.reshape(x.shape).astype(x.dtype)
    return y, mean_shift, rstd.reshape(mean_shift.shape), kept


def _sigmoid_shape(shape, activation, keep=True):
    """The kept ``sigmoid(u)``: x's shape with the SiLU (where a derivative will read it,
    ``keep``), else a placeholder ``(N, 1, 1)``."""
    return shape if activation == "silu" and keep else (shape[0], 1, 1)


def _silu_slope(pre, sigmoid):
    """``silu'(pre) = sigmoid(pre) * (1 + pre * (1 - sigmoid(pre)))``."""
    return sigmoid * (1 + pre * (1 - sigmoid))


def _jnp_tangent(
    x, scale, offset, mean_shift, rstd, sigmoid, *linear, num_groups, channels_last, which,
    center=True, activation=None, **_,
):  # fmt: skip
    """The forward pass's tangent, linear in the operands named by ``which``."""
    named = dict(zip(which, linear, strict=True))
    xhat, axes = _xhat(x, mean_shift, rstd, num_groups, channels_last, center)
    n = x.shape[0]
    dy = jnp.zeros(xhat.shape, jnp.float32)
    if "dx" in named:
        dxg, _ = _grouped(named["dx"].astype(jnp.float32), num_groups, channels_last)
        inner = (dxg - _mean(dxg, axes) if center else dxg) - xhat * _mean(dxg * xhat, axes)
        dy = dy + _per_group(rstd, channels_last) * inner * _per_channel(
            scale, num_groups, channels_last, n
        )
    if "dscale" in named:
        dy = dy + xhat * _per_channel(named["dscale"], num_groups, channels_last, n)
    if "doffset" in named:
        dy = dy + _per_channel(named["doffset"], num_groups, channels_last, n)
    if activation == "silu":
        dy = dy * _slope(xhat, scale, offset, sigmoid, num_groups, channels_last)
    return [dy.reshape(x.shape).astype(x.dtype)]


def _slope(xhat, scale, offset, sigmoid, num_groups, channels_last):
    """silu's slope at the affine's output ``u`` (rebuilt from ``xhat``), on the grouped
    view, from the kept ``sigmoid(u)``."""
    n = xhat.shape[0]
    pre = xhat * _per_channel(scale, num_groups, channels_last, n)
    pre = pre + _per_channel(offset, num_groups, channels_last, n)
    return _silu_slope(pre, _grouped(sigmoid, num_groups, channels_last)[0])


def _jnp_backward(
    x, scale, offset, mean_shift, rstd, sigmoid, ct, ct_h=None, *, num_groups, channels_last,
    groups, want_dx=True, center=True, activation=None, **_,
):  # fmt: skip
    """The tangent's transpose: ``(dx, dscale, doffset)``, the last two ``(groups, C)``,
    summed over each group of ``N / groups`` examples; ``dx`` is empty unless ``want_dx``,
    and has ``ct_h`` added (the fused residual's backward)."""
    xhat, axes = _xhat(x, mean_shift, rstd, num_groups, channels_last, center)
    g, _ = _grouped(ct.astype(jnp.float32), num_groups, channels_last)
    if activation == "silu":  # the cotangent of the affine's output
        g = g * _slope(xhat, scale, offset, sigmoid, num_groups, channels_last)
    space = 1 if channels_last else 3  # the position axis of the grouped view
    c = scale.shape[-1]
    dscale = jnp.sum(jnp.sum(g * xhat, axis=space).reshape(groups, -1, c), axis=1)
    doffset = jnp.sum(jnp.sum(g, axis=space).reshape(groups, -1, c), axis=1)
    if not want_dx:
        return jnp.zeros((0, *x.shape[1:]), x.dtype), dscale, doffset
    v = g * _per_channel(scale, num_groups, channels_last, x.shape[0])
    inner = (v - _mean(v, axes) if center else v) - xhat * _mean(v * xhat, axes)
    dx = (_per_group(rstd, channels_last) * inner).reshape(x.shape)
    if ct_h is not None:
        dx = dx + ct_h.astype(jnp.float32)
    return dx.astype(x.dtype), dscale, doffset


# ----------------------------------------------------------------------------------------
# The FFI calls (targets, attributes and buffers as cpu/group_norm.cc declares them).


def _layout(num_groups, channels_last, activation):
    return dict(num_groups=np.int64(num_groups), channels_last=channels_last,
                silu=activation == "silu")  # fmt: skip


def _forward_call(
    x, scale, offset, *, epsilon, num_groups, channels_last, activation, keep=True, **_
):
    stats = result(x, (x.shape[0], num_groups), jnp.float32)
    sigmoid = result(x, _sigmoid_shape(x.shape, activation, keep), jnp.float32)
    out = (result(x, x.shape, x.dtype), stats, stats, sigmoid)
    return jax.ffi.ffi_call("eqx_norm_groups_forward", out)(
        x, scale, offset, epsilon=np.float32(epsilon),
        **_layout(num_groups, channels_last, activation),
    )  # fmt: skip


def _backward_call(
    x, scale, *offset_stats_ct, num_groups, channels_last, activation, groups, want_dx, **_
):
    """``offset_stats_ct``: ``(offset, mean_shift, rstd, sigmoid, ct)``."""
    sums = result(x, (groups, scale.shape[-1]), jnp.float32)
    out = (result(x, x.shape if want_dx else (0, *x.shape[1:]), x.dtype), sums, sums)
    return jax.ffi.ffi_call("eqx_norm_groups_backward", out)(
        x, scale, *offset_stats_ct, **_layout(num_groups, channels_last, activation),
        groups=np.int64(groups), want_dx=want_dx,
    )  # fmt: skip


GROUPS = Kernel(
    "groups", _jnp_forward, _jnp_tangent, _jnp_backward, _forward_call, _backward_call,
    visible=1, saved=3,  # mean_shift, rstd, and the SiLU's sigmoid(u) (a placeholder without it)
)  # fmt: skip
