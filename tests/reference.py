"""Independent float64 NumPy references for the normalization layers.

Written from the formulas, not from eqx_norm's code: two-pass statistics in float64 over
the elements that the mask keeps.
"""

import numpy as np


def standardize(x, axes, epsilon, mask=None, center=True):
    """(x - mean) / sqrt(var + eps) over `axes` in float64; masked-out outputs are 0."""
    x = np.asarray(x, dtype=np.float64)
    keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
    count = np.maximum(keep.sum(axis=axes, keepdims=True), 1)
    mean = np.where(keep, x, 0).sum(axis=axes, keepdims=True) / count if center else 0.0
    centered = x - mean
    var = np.where(keep, centered**2, 0).sum(axis=axes, keepdims=True) / count
    with np.errstate(divide="ignore", invalid="ignore"):
        x_hat = centered / np.sqrt(var + epsilon)
    return np.where(keep, x_hat, 0.0)


def layer_norm(x, ndim, gamma=None, beta=None, epsilon=1e-5, mask=None):
    """LayerNorm over the last `ndim` axes, in float64."""
    x = np.asarray(x, dtype=np.float64)
    y = standardize(x, tuple(range(x.ndim - ndim, x.ndim)), epsilon, mask)
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64)
    if beta is not None:
        y = y + np.asarray(beta, np.float64)
    return y


def rms_norm(x, ndim, gamma=None, beta=None, epsilon=1e-6, mask=None):
    """RMSNorm over the last `ndim` axes in float64: x / sqrt(mean(x**2) + eps) * gamma + beta."""
    x = np.asarray(x, dtype=np.float64)
    axes = tuple(range(x.ndim - ndim, x.ndim))
    keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
    count = np.maximum(keep.sum(axis=axes, keepdims=True), 1)
    mean_square = np.where(keep, x**2, 0).sum(axis=axes, keepdims=True) / count
    y = np.where(keep, x / np.sqrt(mean_square + epsilon), 0.0)
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64)
    if beta is not None:
        y = y + np.asarray(beta, np.float64)
    return y


def group_norm(
    x, num_groups, spatial_ndim, gamma=None, beta=None, epsilon=1e-5, mask=None, channel_axis=-1
):
    """GroupNorm in float64, one group at a time: the statistics of each group run over the
    `spatial_ndim` spatial axes and the group's channels. One example is the last
    `spatial_ndim + 1` axes of `x`, with channels at `channel_axis` within it; gamma and
    beta are per channel. Masked-out outputs are beta."""
    x = np.asarray(x, dtype=np.float64)
    n = spatial_ndim + 1
    axis = x.ndim - n + channel_axis % n
    keep = np.ones(x.shape, bool) if mask is None else np.broadcast_to(np.asarray(mask), x.shape)
    x, keep = np.moveaxis(x, axis, -1), np.moveaxis(keep, axis, -1)  # channels last
    channels = x.shape[-1]
    size = channels // num_groups
    example_axes = tuple(range(x.ndim - n, x.ndim))
    y = np.zeros_like(x)
    for g in range(num_groups):
        group = slice(g * size, (g + 1) * size)
        y[..., group] = standardize(x[..., group], example_axes, epsilon, keep[..., group])
    if gamma is not None:
        y = y * np.asarray(gamma, np.float64)
    if beta is not None:
        y = y + np.asarray(beta, np.float64)
    return np.moveaxis(y, -1, axis)


def instance_norm(x, spatial_ndim, gamma=None, beta=None, epsilon=1e-5, mask=None, channel_axis=-1):
    """InstanceNorm in float64: GroupNorm with one group per channel."""
    n = spatial_ndim + 1
    channels = np.shape(x)[np.ndim(x) - n + channel_axis % n]
    return group_norm(x, channels, spatial_ndim, gamma, beta, epsilon, mask, channel_axis)


def group_norm_vjp(x, num_groups, spatial_ndim, gamma, cotangent, epsilon=1e-5, channel_axis=-1):
    """The gradients ``(dx, dgamma, dbeta)`` of ``sum(cotangent * group_norm(x, ...))`` in
    float64, by formula: within each group, with x_hat the standardized x, r its
    1 / sqrt(var + eps) and v = cotangent * gamma, dx = r (v - mean(v) - x_hat mean(v x_hat));
    dgamma and dbeta sum cotangent * x_hat and cotangent over all but the channel axis."""
    x = np.asarray(x, dtype=np.float64)
    n = spatial_ndim + 1
    axis = x.ndim - n + channel_axis % n
    x = np.moveaxis(x, axis, -1)  # channels last
    cotangent = np.moveaxis(np.asarray(cotangent, np.float64), axis, -1)
    gamma = np.asarray(gamma, np.float64)
    size = x.shape[-1] // num_groups
    example_axes = tuple(range(x.ndim - n, x.ndim))
    x_hat, dx = np.zeros_like(x), np.zeros_like(x)
    for g in range(num_groups):
        group = slice(g * size, (g + 1) * size)
        centered = x[..., group] - x[..., group].mean(axis=example_axes, keepdims=True)
        r = 1 / np.sqrt((centered**2).mean(axis=example_axes, keepdims=True) + epsilon)
        x_hat[..., group] = centered * r
        v = cotangent[..., group] * gamma[group]
        mean_v = v.mean(axis=example_axes, keepdims=True)
        mean_vx = (v * x_hat[..., group]).mean(axis=example_axes, keepdims=True)
        dx[..., group] = r * (v - mean_v - x_hat[..., group] * mean_vx)
    others = tuple(range(x.ndim - 1))
    dgamma = (cotangent * x_hat).sum(axis=others)
    return np.moveaxis(dx, -1, axis), dgamma, cotangent.sum(axis=others)
