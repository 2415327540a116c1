"""Normalization as pure functions of arrays and configuration: the library's spine.

Every layer's ``__call__`` is one call of its function here with the layer's fields. These
functions are the only places that check arguments and choose an implementation; the
arithmetic lives in :mod:`eqx_norm._xla` (pure JAX), :mod:`eqx_norm._cpu_kernel` (the
compiled CPU kernel) and the statistics they share, :mod:`eqx_norm._statistics`. Every
function computes statistics in at least float32 and returns an array of ``x``'s shape and
(unless ``dtype`` is given) ``x``'s dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from jaxtyping import Array, Bool, Float

from . import _cpu_kernel, _xla
from ._checks import (
    DTypeLike,
    canonical_shape,
    check_epsilon,
    check_flag,
    check_floating,
    check_implementation,
    check_layout,
    check_mask,
    check_parameter,
    check_trailing_shape,
    describe_layout,
    optional_dtype,
    positive_int,
)
from ._statistics import compute_dtype

__all__ = ["group_norm", "instance_norm", "layer_norm", "rms_norm"]

Implementation = Literal["xla", "kernel"] | None


def layer_norm(
    x: Float[Array, "*shape"],
    normalized_shape: int | Sequence[int],
    gamma: Float[Array, "*normalized"] | None = None,
    beta: Float[Array, "*normalized"] | None = None,
    *,
    epsilon: float = 1e-5,
    mask: Bool[Array, "..."] | None = None,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
    implementation: Implementation = None,
) -> Float[Array, "*shape"]:
    r"""Layer normalization over the trailing ``normalized_shape`` axes of ``x``.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    Args:
        x: floating array of shape ``(*batch, *normalized_shape)``; ``batch`` may be empty.
        normalized_shape: the trailing axes to normalize over, an int or a sequence.
        gamma: scale of shape ``normalized_shape``, or None for no scale.
        beta: offset of shape ``normalized_shape``, or None for no offset.
        epsilon: added to the variance, ``>= 0``.
        mask: optional boolean array of x's rank (axes of size 1 broadcast); False elements
            take no part in the statistics and their output is ``beta`` (0 without beta).
        zero_centered_scale: use ``1 + gamma`` as the scale.
        dtype: output dtype; default ``x.dtype``.
        implementation: None (default) runs the compiled CPU kernel where it serves (CPU,
            float32/bfloat16, no mask) and XLA everywhere else; ``"xla"`` always runs the
            pure-JAX path; ``"kernel"`` requires the kernel and raises a ``ValueError``
            saying why where it cannot serve.

    Returns:
        An array of ``x``'s shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm.functional import layer_norm
        >>> x = jax.random.normal(jax.random.key(0), (20, 5, 10))
        >>> y = layer_norm(x, 10, jnp.ones(10), jnp.zeros(10))
        >>> bool(jnp.allclose(y.mean(-1), 0, atol=1e-6))
        True

    References:
        Ba, Kiros and Hinton, "Layer Normalization", 2016. arXiv:1607.06450.
    """
    return _trailing_norm(
        "layer_norm",
        x,
        normalized_shape,
        gamma,
        beta,
        epsilon=epsilon,
        mask=mask,
        zero_centered_scale=zero_centered_scale,
        dtype=dtype,
        implementation=implementation,
        center=True,
    )


def rms_norm(
    x: Float[Array, "*shape"],
    normalized_shape: int | Sequence[int],
    gamma: Float[Array, "*normalized"] | None = None,
    beta: Float[Array, "*normalized"] | None = None,
    *,
    epsilon: float = 1e-6,
    mask: Bool[Array, "..."] | None = None,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
    implementation: Implementation = None,
) -> Float[Array, "*shape"]:
    r"""Root-mean-square normalization over the trailing ``normalized_shape`` axes of ``x``.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \gamma \; (+ \beta)

    Args:
        x: floating array of shape ``(*batch, *normalized_shape)``; ``batch`` may be empty.
        normalized_shape: the trailing axes to normalize over, an int or a sequence.
        gamma: scale of shape ``normalized_shape``, or None for no scale.
        beta: offset of shape ``normalized_shape``, or None (the usual RMSNorm).
        epsilon: added to the mean square, ``>= 0``.
        mask: optional boolean array of x's rank (axes of size 1 broadcast); False elements
            take no part in the mean square and their output is ``beta`` (0 without beta).
        zero_centered_scale: use ``1 + gamma`` as the scale.
        dtype: output dtype; default ``x.dtype``.
        implementation: None (default) runs the compiled CPU kernel where it serves (CPU,
            float32/bfloat16, no mask) and XLA everywhere else; ``"xla"`` always runs the
            pure-JAX path; ``"kernel"`` requires the kernel and raises a ``ValueError``
            saying why where it cannot serve.

    Returns:
        An array of ``x``'s shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm.functional import rms_norm
        >>> x = jax.random.normal(jax.random.key(0), (4, 64))
        >>> y = rms_norm(x, 64, jnp.ones(64))
        >>> bool(jnp.allclose((y**2).mean(-1), 1, atol=1e-4))
        True

    References:
        Zhang and Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
        arXiv:1910.07467.
    """
    return _trailing_norm(
        "rms_norm",
        x,
        normalized_shape,
        gamma,
        beta,
        epsilon=epsilon,
        mask=mask,
        zero_centered_scale=zero_centered_scale,
        dtype=dtype,
        implementation=implementation,
        center=False,
    )


def group_norm(
    x: Float[Array, "*shape"],
    num_groups: int,
    gamma: Float[Array, " channels"] | None = None,
    beta: Float[Array, " channels"] | None = None,
    *,
    num_channels: int | None = None,
    spatial_ndim: int = 2,
    channel_axis: int = -1,
    epsilon: float = 1e-5,
    mask: Bool[Array, "..."] | None = None,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
) -> Float[Array, "*shape"]:
    r"""Group normalization: statistics over space and each group of channels, per example.

    .. math:: y = \frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}}
        \gamma_c + \beta_c

    One example has ``spatial_ndim + 1`` axes, ``(*spatial, C)`` with ``channel_axis=-1``
    or ``(C, *spatial)`` with ``channel_axis=0``; any leading axes are batch axes.

    Args:
        x: floating array of shape ``(*batch, *spatial, C)`` (or ``(*batch, C, *spatial)``).
        num_groups: number of channel groups; must divide ``C``.
        gamma: per-channel scale of shape ``(C,)``, or None.
        beta: per-channel offset of shape ``(C,)``, or None.
        num_channels: the expected size of the channel axis (checked), or None.
        spatial_ndim: number of spatial axes of one example, ``>= 0`` (0: ``(*batch, C)``).
        channel_axis: position of the channel axis within one example (-1 or 0).
        epsilon: added to the variance, ``>= 0``.
        mask: optional boolean array of x's rank (axes of size 1 broadcast, e.g.
            ``(*batch, *spatial, 1)``); False elements take no part in the statistics and
            their output is ``beta`` (0 without beta).
        zero_centered_scale: use ``1 + gamma`` as the scale.
        dtype: output dtype; default ``x.dtype``.

    Returns:
        An array of ``x``'s shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm.functional import group_norm
        >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 6))
        >>> y = group_norm(x, 3, jnp.ones(6), jnp.zeros(6))
        >>> bool(jnp.allclose(y[..., :2].mean(), 0, atol=1e-5))
        True

    References:
        Wu and He, "Group Normalization", ECCV 2018. arXiv:1803.08494.
    """
    return _grouped_norm(
        "group_norm",
        x,
        positive_int(num_groups, "num_groups"),
        gamma,
        beta,
        num_channels=None if num_channels is None else positive_int(num_channels, "num_channels"),
        spatial_ndim=spatial_ndim,
        channel_axis=channel_axis,
        min_spatial_ndim=0,
        epsilon=epsilon,
        mask=mask,
        zero_centered_scale=zero_centered_scale,
        dtype=dtype,
    )


def instance_norm(
    x: Float[Array, "*shape"],
    gamma: Float[Array, " channels"] | None = None,
    beta: Float[Array, " channels"] | None = None,
    *,
    num_channels: int | None = None,
    spatial_ndim: int = 2,
    channel_axis: int = -1,
    epsilon: float = 1e-5,
    mask: Bool[Array, "..."] | None = None,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
) -> Float[Array, "*shape"]:
    r"""Instance normalization: statistics over space, per example and per channel.

    .. math:: y = \frac{x - \mathrm{E}_c[x]}{\sqrt{\mathrm{Var}_c[x] + \epsilon}}
        \gamma_c + \beta_c

    :func:`group_norm` with one group per channel; same layout and arguments.

    Args:
        x: floating array of shape ``(*batch, *spatial, C)`` (or ``(*batch, C, *spatial)``).
        gamma: per-channel scale of shape ``(C,)``, or None.
        beta: per-channel offset of shape ``(C,)``, or None.
        num_channels: the expected size of the channel axis (checked), or None.
        spatial_ndim: number of spatial axes of one example, ``>= 1``.
        channel_axis: position of the channel axis within one example (-1 or 0).
        epsilon: added to the variance, ``>= 0``.
        mask: optional boolean array of x's rank (axes of size 1 broadcast); False elements
            take no part in the statistics and their output is ``beta`` (0 without beta).
        zero_centered_scale: use ``1 + gamma`` as the scale.
        dtype: output dtype; default ``x.dtype``.

    Returns:
        An array of ``x``'s shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm.functional import instance_norm
        >>> x = jax.random.normal(jax.random.key(0), (2, 3, 16, 16))  # (N, C, H, W)
        >>> y = instance_norm(x, channel_axis=0)
        >>> bool(jnp.allclose(y.std(axis=(2, 3)), 1, atol=1e-3))
        True

    References:
        Ulyanov, Vedaldi and Lempitsky, "Instance Normalization: The Missing Ingredient
        for Fast Stylization", 2016. arXiv:1607.08022.
    """
    return _grouped_norm(
        "instance_norm",
        x,
        None,
        gamma,
        beta,
        num_channels=None if num_channels is None else positive_int(num_channels, "num_channels"),
        spatial_ndim=spatial_ndim,
        channel_axis=channel_axis,
        min_spatial_ndim=1,
        epsilon=epsilon,
        mask=mask,
        zero_centered_scale=zero_centered_scale,
        dtype=dtype,
    )


def _affine(
    gamma: Array | None, beta: Array | None, zero_centered_scale: bool, dtype: DTypeLike, shape
) -> tuple[Array | None, Array | None]:
    """``(scale, offset)`` in the compute ``dtype`` and ``shape``: ``1 + gamma`` when
    zero-centred."""
    scale = offset = None
    if gamma is not None:
        scale = gamma.astype(dtype).reshape(shape)
        scale = 1 + scale if zero_centered_scale else scale
    if beta is not None:
        offset = beta.astype(dtype).reshape(shape)
    return scale, offset


def _use_kernel(implementation: str | None, x: Array, masked: bool, layer: str) -> bool:
    """Whether the compiled kernel runs this call; ``"kernel"`` where it cannot is an error."""
    if implementation == "xla":
        return False
    reason = "a `mask` is given" if masked else _cpu_kernel.unavailable_reason(x)
    if reason is None:
        return True
    if implementation == "kernel":
        raise ValueError(
            f"{layer}: implementation='kernel' cannot serve this call: {reason}. Use "
            "implementation=None to run the kernel where it serves and XLA elsewhere."
        )
    return False


def _trailing_norm(
    layer: str,
    x: Array,
    normalized_shape: int | Sequence[int],
    gamma: Array | None,
    beta: Array | None,
    *,
    epsilon: float,
    mask: Array | None,
    zero_centered_scale: bool,
    dtype: DTypeLike | None,
    implementation: Implementation,
    center: bool,
) -> Array:
    """The body of :func:`layer_norm` and :func:`rms_norm` (``center=False``): checks, then
    the kernel or XLA on a ``(rows, D)`` view; masked calls run the general XLA path."""
    shape = canonical_shape(normalized_shape, "normalized_shape")
    x = check_floating(x, layer)
    axes = check_trailing_shape(x.shape, shape, layer)
    gamma = check_parameter(gamma, shape, "gamma", layer)
    beta = check_parameter(beta, shape, "beta", layer)
    epsilon = check_epsilon(epsilon)
    mask = check_mask(mask, x.shape, layer)
    zero_centered_scale = check_flag(zero_centered_scale, "zero_centered_scale")
    out_dtype = optional_dtype(dtype, "dtype") or x.dtype
    use_kernel = _use_kernel(check_implementation(implementation), x, mask is not None, layer)
    if mask is not None:
        scale, offset = _affine(gamma, beta, zero_centered_scale, compute_dtype(x.dtype), shape)
        y = _xla.normalize(x, axes, scale, offset, epsilon=epsilon, center=center, mask=mask)
        return y.astype(out_dtype)
    d = math.prod(shape)
    scale, offset = _affine(gamma, beta, zero_centered_scale, compute_dtype(x.dtype), (d,))
    rows = x.reshape(-1, d)  # (*batch, *normalized) -> (rows, D), a free bitcast
    run = _cpu_kernel.normalize_rows if use_kernel else _xla.normalize_rows
    y = run(rows, scale, offset, epsilon=epsilon, center=center)
    return y.astype(out_dtype).reshape(x.shape)


def _grouped_norm(
    layer: str,
    x: Array,
    num_groups: int | None,
    gamma: Array | None,
    beta: Array | None,
    *,
    num_channels: int | None,
    spatial_ndim: int,
    channel_axis: int,
    min_spatial_ndim: int,
    epsilon: float,
    mask: Array | None,
    zero_centered_scale: bool,
    dtype: DTypeLike | None,
) -> Array:
    """The body of :func:`group_norm` and :func:`instance_norm` (``num_groups=None``: one
    group per channel); ``num_channels=None`` takes the channel count from ``x``."""
    spatial_ndim, channel_axis = check_layout(
        spatial_ndim, channel_axis, layer, min_spatial_ndim=min_spatial_ndim
    )
    x = check_floating(x, layer)
    n = spatial_ndim + 1
    described = f"{layer}(spatial_ndim={spatial_ndim}, channel_axis={channel_axis})"
    expected = describe_layout(spatial_ndim, channel_axis, num_channels)
    if x.ndim < n:
        raise ValueError(
            f"{described} expects x of shape {expected} with any number of leading batch "
            f"axes, got shape {x.shape}: {x.ndim} axes, fewer than the {n} of one example. "
            "Set `spatial_ndim` to the number of spatial axes of your data."
        )
    axis = x.ndim - n if channel_axis == 0 else x.ndim - 1
    channels = x.shape[axis]
    if num_channels is not None and channels != num_channels:
        other = x.ndim - 1 if channel_axis == 0 else x.ndim - n
        hint = ""
        if n > 1 and x.shape[other] == num_channels:
            layout, fix = ("channels-last", -1) if channel_axis == 0 else ("channels-first", 0)
            hint = f" If your data is {layout}, build the layer with channel_axis={fix}."
        raise ValueError(
            f"{described} expects x of shape {expected}, got shape {x.shape}, whose channel "
            f"axis {axis} has size {channels}, not num_channels={num_channels}.{hint}"
        )
    groups = channels if num_groups is None else num_groups
    if channels % groups:
        raise ValueError(
            f"{layer}: num_groups={groups} must divide the number of channels, but x of shape "
            f"{x.shape} has {channels} channels on axis {axis} (layout {expected})."
        )
    gamma = check_parameter(gamma, (channels,), "gamma", layer)
    beta = check_parameter(beta, (channels,), "beta", layer)
    epsilon = check_epsilon(epsilon)
    mask = check_mask(mask, x.shape, layer)
    zero_centered_scale = check_flag(zero_centered_scale, "zero_centered_scale")
    out_dtype = optional_dtype(dtype, "dtype") or x.dtype

    # Split the channel axis into (groups, channels per group); the statistics run over the
    # spatial axes and the channels within a group.
    grouped = (*x.shape[:axis], groups, channels // groups, *x.shape[axis + 1 :])
    spatial = [i for i in range(x.ndim - n, x.ndim) if i != axis]
    axes = tuple(sorted([i + 1 if i > axis else i for i in spatial] + [axis + 1]))
    per_channel = (groups, channels // groups) + (1,) * (x.ndim - axis - 1)
    scale, offset = _affine(gamma, beta, zero_centered_scale, compute_dtype(x.dtype), per_channel)
    y = _xla.normalize(
        x.reshape(grouped),
        axes,
        scale,
        offset,
        epsilon=epsilon,
        center=True,
        mask=None if mask is None else mask.reshape(grouped),
    )
    return y.astype(out_dtype).reshape(x.shape)
