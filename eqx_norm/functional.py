"""Normalization as pure functions of arrays and configuration.

The layers in :mod:`eqx_norm` call these; use them directly when you keep the parameters
yourself. Every function checks its arguments, computes statistics in at least float32
and returns an array of ``x``'s shape and (unless ``dtype`` is given) ``x``'s dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxtyping import Array, Bool, Float

from ._core import DTypeLike, check_epsilon, optional_dtype, positive_int, trailing_normalize
from ._group_norm import check_layout, group_normalize

__all__ = ["group_norm", "instance_norm", "layer_norm", "rms_norm"]


def layer_norm(
    x: Float[Array, "*batch *normalized"],
    normalized_shape: int | Sequence[int],
    gamma: Float[Array, "*normalized"] | None = None,
    beta: Float[Array, "*normalized"] | None = None,
    *,
    epsilon: float = 1e-5,
    mask: Bool[Array, "..."] | None = None,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
) -> Float[Array, "*batch *normalized"]:
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
    return trailing_normalize(
        "layer_norm",
        x,
        normalized_shape,
        gamma,
        beta,
        epsilon=epsilon,
        mask=mask,
        zero_centered_scale=zero_centered_scale,
        dtype=dtype,
        center=True,
    )


def rms_norm(
    x: Float[Array, "*batch *normalized"],
    normalized_shape: int | Sequence[int],
    gamma: Float[Array, "*normalized"] | None = None,
    beta: Float[Array, "*normalized"] | None = None,
    *,
    epsilon: float = 1e-6,
    mask: Bool[Array, "..."] | None = None,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
) -> Float[Array, "*batch *normalized"]:
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
    return trailing_normalize(
        "rms_norm",
        x,
        normalized_shape,
        gamma,
        beta,
        epsilon=epsilon,
        mask=mask,
        zero_centered_scale=zero_centered_scale,
        dtype=dtype,
        center=False,
    )


def group_norm(
    x: Float[Array, "*batch *example"],
    num_groups: int,
    gamma: Float[Array, " channels"] | None = None,
    beta: Float[Array, " channels"] | None = None,
    *,
    spatial_ndim: int = 2,
    channel_axis: int = -1,
    epsilon: float = 1e-5,
    mask: Bool[Array, "..."] | None = None,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
) -> Float[Array, "*batch *example"]:
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
    name = "group_norm"
    spatial_ndim, channel_axis = check_layout(spatial_ndim, channel_axis, name, min_spatial_ndim=0)
    return group_normalize(
        x,
        positive_int(num_groups, "num_groups"),
        gamma,
        beta,
        num_channels=None,
        spatial_ndim=spatial_ndim,
        channel_axis=channel_axis,
        epsilon=check_epsilon(epsilon),
        mask=mask,
        zero_centered_scale=zero_centered_scale,
        dtype=optional_dtype(dtype, "dtype"),
        layer=name,
    )


def instance_norm(
    x: Float[Array, "*batch *example"],
    gamma: Float[Array, " channels"] | None = None,
    beta: Float[Array, " channels"] | None = None,
    *,
    spatial_ndim: int = 2,
    channel_axis: int = -1,
    epsilon: float = 1e-5,
    mask: Bool[Array, "..."] | None = None,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
) -> Float[Array, "*batch *example"]:
    r"""Instance normalization: statistics over space, per example and per channel.

    .. math:: y = \frac{x - \mathrm{E}_c[x]}{\sqrt{\mathrm{Var}_c[x] + \epsilon}}
        \gamma_c + \beta_c

    :func:`group_norm` with one group per channel; same layout and arguments.

    Args:
        x: floating array of shape ``(*batch, *spatial, C)`` (or ``(*batch, C, *spatial)``).
        gamma: per-channel scale of shape ``(C,)``, or None.
        beta: per-channel offset of shape ``(C,)``, or None.
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
    name = "instance_norm"
    spatial_ndim, channel_axis = check_layout(spatial_ndim, channel_axis, name, min_spatial_ndim=1)
    return group_normalize(
        x,
        None,
        gamma,
        beta,
        num_channels=None,
        spatial_ndim=spatial_ndim,
        channel_axis=channel_axis,
        epsilon=check_epsilon(epsilon),
        mask=mask,
        zero_centered_scale=zero_centered_scale,
        dtype=optional_dtype(dtype, "dtype"),
        layer=name,
    )
