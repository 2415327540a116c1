"""Normalization as pure functions of arrays and configuration: the library's spine.

Every layer's ``__call__`` is one call of its function here with the layer's fields. These
functions are the only places that check arguments and choose an implementation; the
arithmetic lives in :mod:`eqx_norm._xla` (pure JAX), :mod:`eqx_norm.kernels` (the
compiled CPU kernel) and the statistics they share, :mod:`eqx_norm._statistics`. Every
function computes statistics in at least float32 and returns an array of ``x``'s shape and
(unless ``dtype`` is given) ``x``'s dtype; :func:`batch_norm` also returns the updated
running statistics.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float

from . import _xla
from .kernels import rows as _kernel_rows
from ._checks import (
    DTypeLike,
    canonical_shape,
    check_channel_axis,
    check_epsilon,
    check_flag,
    check_floating,
    check_implementation,
    check_layout,
    check_mask,
    check_momentum,
    check_parameter,
    check_trailing_shape,
    describe_layout,
    optional_dtype,
    positive_int,
)
from ._statistics import compute_dtype, inverse_std, moments

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "rms_norm"]

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


def batch_norm(
    x: Float[Array, "*shape"],
    running_mean: Float[Array, " channels"],
    running_var: Float[Array, " channels"],
    gamma: Float[Array, " channels"] | None = None,
    beta: Float[Array, " channels"] | None = None,
    *,
    training: bool,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    channel_axis: int = -1,
    axis_name: Hashable | None = None,
    mask: Bool[Array, "..."] | None = None,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
) -> tuple[Float[Array, "*shape"], Float[Array, " channels"], Float[Array, " channels"]]:
    r"""Batch normalization: per-channel statistics over the batch and every spatial axis.

    .. math:: y = \frac{x - \mathrm{E}_c[x]}{\sqrt{\mathrm{Var}_c[x] + \epsilon}}
        \gamma_c + \beta_c

    Training (``training=True``): the mean and (biased) variance of channel ``c`` run over
    every axis of ``x`` except ``channel_axis``, and across the devices or examples of
    ``axis_name`` when it is given; the running statistics move towards them,

    .. math:: m' = \mu\, m + (1 - \mu)\, \mathrm{E}_c[x], \qquad
        v' = \mu\, v + (1 - \mu) \tfrac{n}{n - 1} \mathrm{Var}_c[x],

    with ``n`` the number of values per channel: the running variance is the unbiased
    (Bessel-corrected) batch variance, as torch and brainpy store it. ``momentum=0.99``
    keeps 99 % of the old value (flax, equinox, brainpy); torch's ``momentum=0.1`` is the
    weight of the *new* value, so torch's ``momentum`` is ``1 - momentum`` here. The running
    statistics carry no gradient. Inference (``training=False``): the running statistics
    normalize, and are returned unchanged.

    Without ``axis_name``, ``x`` is the whole batch; under ``jit`` with ``x`` sharded over
    devices, XLA reduces across them, so the statistics are the global batch's. With
    ``axis_name`` (inside ``vmap``, ``pmap`` or ``shard_map``), ``x`` is one example or one
    device's shard and the sums are combined with ``psum`` over that axis, equal to the
    whole-batch call. Statistics are two-pass in at least float32.

    Args:
        x: floating array with channels on ``channel_axis``, e.g. ``(N, H, W, C)``.
        running_mean: running mean of shape ``(C,)`` (starts at zeros).
        running_var: running variance of shape ``(C,)`` (starts at ones).
        gamma: per-channel scale of shape ``(C,)``, or None.
        beta: per-channel offset of shape ``(C,)``, or None.
        training: True normalizes by the batch statistics and updates the running ones;
            False normalizes by the running statistics.
        momentum: fraction of the running statistics kept at each step, in ``[0, 1]``.
        epsilon: added to the variance, ``>= 0``.
        channel_axis: the channel axis, counted in ``x`` as passed (batch axes included):
            -1 (default) for channels-last ``(N, *spatial, C)``, 1 for torch's ``(N, C,
            *spatial)``, 0 for one channels-first example under ``axis_name``.
        axis_name: None, or the name (or tuple of names) of the mapped axes whose examples
            or shards share the statistics.
        mask: optional boolean array of x's rank (axes of size 1 broadcast, e.g.
            ``(N, 1, 1, 1)`` for padded examples); False elements take no part in the
            statistics or the running statistics, and their output is ``beta`` (0 without
            beta). A channel left with one value keeps its running variance (one value
            estimates no variance), and with none its running mean too: never NaN.
        zero_centered_scale: use ``1 + gamma`` as the scale.
        dtype: output dtype; default ``x.dtype``.

    Returns:
        ``(y, new_mean, new_var)``: an array of x's shape, and the running statistics in
        their own dtype.

    Raises:
        ValueError: in training, when each channel has fewer than two values (a batch of
            one example without spatial axes): the variance of one value is 0.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm.functional import batch_norm
        >>> x = 5.0 + jax.random.normal(jax.random.key(0), (64, 3))
        >>> y, mean, var = batch_norm(x, jnp.zeros(3), jnp.ones(3), training=True)
        >>> bool(jnp.allclose(y.mean(0), 0, atol=1e-5)), bool(jnp.all(mean > 0.04))
        (True, True)

    References:
        Ioffe and Szegedy, "Batch Normalization: Accelerating Deep Network Training by
        Reducing Internal Covariate Shift", ICML 2015. arXiv:1502.03167.
    """
    layer = "batch_norm"
    x = check_floating(x, layer)
    training = check_flag(training, "training")
    momentum = check_momentum(momentum)
    axis = _batch_channel_axis(channel_axis, x, layer)
    channels = x.shape[axis]
    running_mean = _check_running(running_mean, "running_mean", x, axis, layer)
    running_var = _check_running(running_var, "running_var", x, axis, layer)
    gamma = check_parameter(gamma, (channels,), "gamma", layer)
    beta = check_parameter(beta, (channels,), "beta", layer)
    epsilon = check_epsilon(epsilon)
    mask = check_mask(mask, x.shape, layer)
    zero_centered_scale = check_flag(zero_centered_scale, "zero_centered_scale")
    out_dtype = optional_dtype(dtype, "dtype") or x.dtype

    axes = tuple(i for i in range(x.ndim) if i != axis)
    per_channel = tuple(channels if i == axis else 1 for i in range(x.ndim))
    x = x.astype(compute_dtype(x.dtype))
    if training:
        per_device = math.prod(x.shape[i] for i in axes)
        values = per_device * (1 if axis_name is None else _axis_size(axis_name, layer))
        if values < 2:
            raise ValueError(
                f"{layer}: training needs at least 2 values per channel to estimate a "
                f"variance, but x of shape {x.shape} (channel_axis={channel_axis}"
                f"{'' if axis_name is None else f', axis_name={axis_name!r}'}) gives "
                f"{values}: the variance of one value is 0. Use a batch of at least 2 "
                "examples, or training=False to normalize by the running statistics."
            )
        mean, var, count = _batch_moments(x, axes, mask, axis_name)
        new_mean, new_var = _update_running(
            running_mean, running_var, mean, var, count, momentum, channels
        )
    else:
        mean = running_mean.astype(x.dtype).reshape(per_channel)
        var = running_var.astype(x.dtype).reshape(per_channel)
        new_mean, new_var = running_mean, running_var
    scale, offset = _affine(gamma, beta, zero_centered_scale, x.dtype, per_channel)
    y = (x - mean) * inverse_std(var, epsilon)
    if scale is not None:
        y = y * scale
    if offset is not None:
        y = y + offset
    if mask is not None:
        y = jnp.where(mask, y, 0 if offset is None else offset)
    return y.astype(out_dtype), new_mean, new_var


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


def _use_kernel(
    implementation: str | None, x: Array, masked: bool, out_dtype: DTypeLike, layer: str
) -> bool:
    """Whether the compiled kernel runs this call; ``"kernel"`` where it cannot is an error."""
    if implementation == "xla":
        return False
    if masked:
        reason = "a `mask` is given"
    elif out_dtype != x.dtype:  # the kernel writes x's dtype: a wider output would lose bits
        reason = f"the output dtype {out_dtype} differs from x's dtype {x.dtype}"
    else:
        reason = _kernel_rows.unavailable_reason(x)
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
    use_kernel = _use_kernel(
        check_implementation(implementation), x, mask is not None, out_dtype, layer
    )
    if mask is not None:
        scale, offset = _affine(gamma, beta, zero_centered_scale, compute_dtype(x.dtype), shape)
        y = _xla.normalize(x, axes, scale, offset, epsilon=epsilon, center=center, mask=mask)
        return y.astype(out_dtype)
    d = math.prod(shape)
    scale, offset = _affine(gamma, beta, zero_centered_scale, compute_dtype(x.dtype), (d,))
    rows = x.reshape(-1, d)  # (*batch, *normalized) -> (rows, D), a free bitcast
    run = _kernel_rows.normalize_rows if use_kernel else _xla.normalize_rows
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


# ----------------------------------------------------------------------------- batch_norm


def _batch_channel_axis(channel_axis: Any, x: Array, layer: str) -> int:
    """The non-negative channel axis of ``x``, or an error naming the valid range."""
    channel_axis = check_channel_axis(channel_axis, layer)
    if not -x.ndim <= channel_axis < x.ndim:
        raise ValueError(
            f"{layer}: `channel_axis`={channel_axis} is not an axis of x of shape {x.shape} "
            f"(rank {x.ndim}); it counts the axes of x as passed, batch included: -1 for "
            "channels-last, 1 for torch's (N, C, *spatial)."
        )
    return channel_axis % x.ndim


def _check_running(value: Any, argument: str, x: Array, axis: int, layer: str) -> Array:
    """A running statistic of shape ``(C,)``; a size that matches another axis of ``x`` gets
    a hint to move ``channel_axis`` there."""
    channels = x.shape[axis]
    if value is None:
        raise TypeError(
            f"{layer}: `{argument}` must be an array of shape ({channels},), got None. Start "
            "from zeros for the mean and ones for the variance."
        )
    shape = np.shape(value)
    if len(shape) == 1 and shape[0] != channels:
        others = [i for i in range(x.ndim) if i != axis and x.shape[i] == shape[0]]
        hint = (
            f" If the channels are on axis {others[0]} (torch's (N, C, *spatial) is axis 1), "
            f"pass channel_axis={others[0]}: it counts the axes of x, batch included."
            if others
            else ""
        )
        raise ValueError(
            f"{layer}: x of shape {x.shape} has {channels} channels on axis {axis}, but "
            f"`{argument}` has shape {shape} (num_features={shape[0]}).{hint}"
        )
    return check_parameter(value, (channels,), argument, layer)


def _axis_size(axis_name: Hashable, layer: str) -> int:
    """The number of examples or shards along the mapped axis ``axis_name``."""
    try:
        return lax.psum(1, axis_name)
    except NameError:
        raise NameError(
            f"{layer}: axis_name={axis_name!r} is not a mapped axis here. Call it inside "
            f"`jax.vmap`/`jax.pmap`/`shard_map` with axis_name={axis_name!r}, or pass "
            "axis_name=None and the whole batch (under `jit`, sharded or not)."
        ) from None


def _batch_moments(
    x: Array, axes: tuple[int, ...], mask: Array | None, axis_name: Hashable | None
) -> tuple[Array, Array, Array]:
    """``(mean, var, count)`` per channel (size-1 ``axes`` kept), combined over ``axis_name``.

    Each shard's two-pass moments come from :func:`moments`; across shards, the mean is a
    count-weighted mean corrected by a second pass over the shards' deviations from it, and
    the variance adds the spread of the shards' means (Chan et al.), so no shard subtracts
    large squares.

    Under explicit sharding (``jax.make_mesh``'s default) with a reduced axis sharded,
    :func:`moments` cannot take its unmasked shift, the first element (JAX does not slice one
    element out of a sharded axis), so an all-True mask selects its masked path, which
    shifts by a first mean instead: one more pass over ``x``.
    """
    spec = jax.typeof(x).sharding.spec
    if mask is None and any(i < len(spec) and spec[i] is not None for i in axes):
        mean, var = moments(x, axes, mask=jnp.ones(x.shape, bool))
    else:
        mean, var = moments(x, axes, mask=mask)
    if mask is None:
        count = jnp.asarray(math.prod(x.shape[i] for i in axes), x.dtype)
    else:
        count = jnp.sum(mask, axis=axes, keepdims=True, dtype=x.dtype)
    if axis_name is None:
        return mean, var, count
    total, weighted = lax.psum((count, count * mean), axis_name)
    safe = jnp.maximum(total, 1)
    first = weighted / safe
    deviation = mean - first
    shift, spread = lax.psum((count * deviation, count * (var + jnp.square(deviation))), axis_name)
    shift = shift / safe
    return first + shift, jnp.maximum(spread / safe - jnp.square(shift), 0), total


def _update_running(
    running_mean: Array,
    running_var: Array,
    mean: Array,
    var: Array,
    count: Array,
    momentum: float,
    channels: int,
) -> tuple[Array, Array]:
    """The running statistics moved towards the batch's, the variance Bessel-corrected; a
    channel with no value keeps both, one with a single value keeps its variance."""
    count = jnp.broadcast_to(count, mean.shape).reshape(channels)
    mean = lax.stop_gradient(mean).reshape(channels)
    unbiased = lax.stop_gradient(var).reshape(channels) * (count / jnp.maximum(count - 1, 1))

    def move(old: Array, batch: Array, valid: Array) -> Array:
        dtype = jnp.promote_types(old.dtype, batch.dtype)
        new = momentum * old.astype(dtype) + (1 - momentum) * batch.astype(dtype)
        return jnp.where(valid, new, old.astype(dtype)).astype(old.dtype)

    return move(running_mean, mean, count >= 1), move(running_var, unbiased, count >= 2)
