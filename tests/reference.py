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
