"""GroupNorm and InstanceNorm: per-example statistics over space and groups of channels.

Both layers, and :func:`eqx_norm.functional.group_norm` / ``instance_norm``, run
:func:`group_normalize`, which checks the layout, splits the channel axis into
``(num_groups, channels_per_group)`` and hands the result to the shared core.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._base import AffineNorm
from ._core import (
    DTypeLike,
    check_floating,
    check_mask,
    check_parameter,
    is_int,
    normalize,
    positive_int,
)
from .initializers import InitializerLike, OneInit, ZeroInit

_SPATIAL_NAMES = {0: (), 1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def check_layout(
    spatial_ndim: int, channel_axis: int, layer: str, *, min_spatial_ndim: int
) -> tuple[int, int]:
    """``(spatial_ndim, channel_axis)`` checked: a count of spatial axes, and an axis of one
    example. GroupNorm accepts ``spatial_ndim=0`` (one example is ``(C,)``, torch's
    ``(N, C)`` input); InstanceNorm needs at least one spatial axis, since each channel of
    an example without one is a single element and would normalize to 0."""
    if not is_int(spatial_ndim) or spatial_ndim < min_spatial_ndim:
        kind = "a positive int" if min_spatial_ndim else "a non-negative int"
        why = " (one example needs a spatial axis to normalize over)" if min_spatial_ndim else ""
        raise ValueError(f"`spatial_ndim` must be {kind}, got {spatial_ndim!r}{why}.")
    spatial_ndim = int(spatial_ndim)
    n = spatial_ndim + 1
    if not is_int(channel_axis) or not -n <= channel_axis < n:
        raise ValueError(
            f"{layer}: `channel_axis` is the position of the channel axis within one example "
            f"of {n} axes, so it must be an int in [{-n}, {n - 1}]: -1 for channels-last "
            f"{_layout(spatial_ndim, n - 1, None)}, 0 for channels-first "
            f"{_layout(spatial_ndim, 0, None)}; got {channel_axis!r}."
        )
    return spatial_ndim, int(channel_axis)


def _layout(spatial_ndim: int, position: int, channels: int | None) -> str:
    """The expected input shape in words, e.g. ``(*batch, H, W, C=6)``."""
    names = list(_SPATIAL_NAMES.get(spatial_ndim, [f"S{i + 1}" for i in range(spatial_ndim)]))
    names.insert(position, "C" if channels is None else f"C={channels}")
    return f"(*batch, {', '.join(names)})"


def group_normalize(
    x: Array,
    num_groups: int | None,
    gamma: Array | None,
    beta: Array | None,
    *,
    num_channels: int | None,
    spatial_ndim: int,
    channel_axis: int,
    epsilon: float,
    mask: Array | None,
    zero_centered_scale: bool,
    dtype: DTypeLike | None,
    layer: str,
) -> Array:
    """Group normalization of ``x`` with checked layout; the one path of GN and IN.

    ``num_groups=None`` means one group per channel (instance normalization), and
    ``num_channels=None`` takes the channel count from ``x``. ``layer`` names the caller in
    error messages. Returns an array of x's shape.
    """
    x = check_floating(x, layer)
    n = spatial_ndim + 1
    position = channel_axis % n
    described = f"{layer}(spatial_ndim={spatial_ndim}, channel_axis={channel_axis})"
    expected = _layout(spatial_ndim, position, num_channels)
    if x.ndim < n:
        raise ValueError(
            f"{described} expects x of shape {expected} with any number of leading batch "
            f"axes, got shape {x.shape}: {x.ndim} axes, fewer than the {n} of one example. "
            "Set `spatial_ndim` to the number of spatial axes of your data."
        )
    axis = x.ndim - n + position
    channels = x.shape[axis]
    if num_channels is not None and channels != num_channels:
        hint = ""
        other = x.ndim - 1 if position == 0 else x.ndim - n
        if x.shape[other] == num_channels:
            layout = "channels-last" if position == 0 else "channels-first"
            fix = -1 if position == 0 else 0
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
    check_parameter(gamma, (channels,), "gamma", layer)
    check_parameter(beta, (channels,), "beta", layer)
    mask = check_mask(mask, x.shape, layer)

    # Split the channel axis into (groups, channels per group); statistics run over the
    # spatial axes and the channels within a group.
    grouped = (*x.shape[:axis], groups, channels // groups, *x.shape[axis + 1 :])
    spatial = [i for i in range(x.ndim - n, x.ndim) if i != axis]
    axes = tuple(sorted([i + 1 if i > axis else i for i in spatial] + [axis + 1]))
    per_channel = (groups, channels // groups) + (1,) * (x.ndim - axis - 1)
    y = normalize(
        x.reshape(grouped),
        axes,
        None if gamma is None else gamma.reshape(per_channel),
        None if beta is None else beta.reshape(per_channel),
        epsilon=epsilon,
        mask=None if mask is None else mask.reshape(grouped),
        zero_centered_scale=zero_centered_scale,
        dtype=dtype,
    )
    return y.reshape(x.shape)


class ChannelNorm(AffineNorm):
    """Base of GroupNorm and InstanceNorm: per-channel parameters, statistics per group.

    Subclasses provide ``num_groups`` (GroupNorm as a field, InstanceNorm as a property).
    """

    _min_spatial_ndim: ClassVar[int] = 0

    num_channels: int = eqx.field(static=True)
    spatial_ndim: int = eqx.field(static=True)
    channel_axis: int = eqx.field(static=True)

    def _init_channels(self, num_channels: int, spatial_ndim: int, channel_axis: int, **affine):
        self.num_channels = positive_int(num_channels, "num_channels")
        layer = type(self).__name__
        self.spatial_ndim, self.channel_axis = check_layout(
            spatial_ndim, channel_axis, layer, min_spatial_ndim=self._min_spatial_ndim
        )
        self._init_affine((self.num_channels,), **affine)

    def __call__(
        self,
        x: Float[Array, "*batch *example"],
        *,
        mask: Bool[Array, "..."] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch *example"]:
        """Normalize ``x`` of shape ``(*batch, *spatial, C)`` (or ``(*batch, C, *spatial)``).

        Args:
            x: floating-point input; integer and boolean inputs are an error.
            mask: optional boolean array of x's rank (size-1 axes broadcast, e.g.
                ``(*batch, *spatial, 1)`` for padded images). False elements take no part
                in the statistics and their output is ``beta`` (0 without ``beta``); a
                fully masked group gives ``beta``, not NaN.
            key: ignored; accepted so the layer fits ``eqx.nn.Sequential``.

        Returns:
            An array of x's shape, in x's dtype (or ``dtype`` if set).
        """
        del key
        layer = type(self).__name__
        with jax.named_scope(f"eqx_norm.{layer}"):
            return group_normalize(
                x,
                self.num_groups,
                self.gamma,
                self.beta,
                num_channels=self.num_channels,
                spatial_ndim=self.spatial_ndim,
                channel_axis=self.channel_axis,
                epsilon=self.epsilon,
                mask=mask,
                zero_centered_scale=self.zero_centered_scale,
                dtype=self.dtype,
                layer=layer,
            )


class GroupNorm(ChannelNorm):
    r"""Group normalization: statistics over space and groups of channels, per example.

    .. math:: y = \frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}} \gamma_c
        + \beta_c

    where the mean and variance of group ``g`` run over every spatial position and the
    ``num_channels // num_groups`` channels of that group, and ``gamma``/``beta`` hold one
    value per channel, shape ``(num_channels,)``.

    Layout: one example has ``spatial_ndim + 1`` axes, channels last by default,
    ``(*spatial, C)`` (as brainpy, flax and haiku), or channels first, ``(C, *spatial)``,
    with ``channel_axis=0`` (torch's ``(N, C, H, W)``). Any number of leading batch axes
    (none included) come before the example, so the input's rank says unambiguously where
    the batch is: ``(*batch, H, W, C)`` for the default ``spatial_ndim=2``. An input with
    fewer axes, or whose channel axis is not ``num_channels`` long, is an error. Output has
    the shape and dtype of ``x``; statistics are computed in at least float32.

    ``GroupNorm(1, C)`` is LayerNorm over ``(*spatial, C)`` with per-channel parameters,
    and ``GroupNorm(C, C)`` is :class:`InstanceNorm`.

    Args:
        num_groups: number of channel groups; must divide ``num_channels``.
        num_channels: number of channels, the size of the channel axis.
        epsilon: added to the variance for numerical stability, ``>= 0``.
        bias_initializer: initializer of ``beta`` (see :mod:`eqx_norm.initializers`): an
            instance, a class with default arguments, a ``(key, shape, dtype)`` callable,
            or an array of shape ``(num_channels,)``.
        scale_initializer: initializer of ``gamma``, accepted in the same forms.
        elementwise_affine: False switches off both ``gamma`` and ``beta``.
        spatial_ndim: number of spatial axes of one example (1, 2 or 3 for 1-D signals,
            images, volumes; default 2; 0 for feature vectors ``(*batch, C)``, as
            ``torch.nn.GroupNorm`` on ``(N, C)``).
        channel_axis: position of the channel axis within one example: -1 (default,
            channels-last) or 0 (channels-first).
        use_scale: False switches off ``gamma`` alone.
        use_bias: False switches off ``beta`` alone.
        zero_centered_scale: scale by ``1 + gamma`` instead of ``gamma``, with ``gamma``
            initialised to zero by default, so that weight decay pulls towards identity.
        param_dtype: storage dtype of ``gamma``/``beta`` (default float32).
        dtype: output dtype (default: the input's).
        key: PRNG key, needed only by random initializers.

    Example:
        >>> import jax
        >>> from eqx_norm import GroupNorm
        >>> x = jax.random.normal(jax.random.key(0), (20, 10, 10, 6))  # (N, H, W, C)
        >>> GroupNorm(3, 6)(x).shape  # 3 groups of 2 channels
        (20, 10, 10, 6)
        >>> x_torch_layout = x.transpose(0, 3, 1, 2)  # (N, C, H, W)
        >>> GroupNorm(3, 6, channel_axis=0)(x_torch_layout).shape
        (20, 6, 10, 10)

    References:
        Wu and He, "Group Normalization", ECCV 2018. arXiv:1803.08494.
    """

    num_groups: int = eqx.field(static=True)

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        epsilon: float = 1e-5,
        bias_initializer: InitializerLike = ZeroInit,
        scale_initializer: InitializerLike = OneInit(value=1.0),
        elementwise_affine: bool = True,
        *,
        spatial_ndim: int = 2,
        channel_axis: int = -1,
        use_scale: bool = True,
        use_bias: bool = True,
        zero_centered_scale: bool = False,
        param_dtype: DTypeLike | None = None,
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray | None = None,
    ):
        self.num_groups = positive_int(num_groups, "num_groups")
        num_channels = positive_int(num_channels, "num_channels")
        if num_channels % self.num_groups:
            raise ValueError(
                f"GroupNorm: `num_groups`={self.num_groups} must divide `num_channels`="
                f"{num_channels} (groups hold equal numbers of channels); choose a "
                f"divisor of {num_channels}."
            )
        self._init_channels(
            num_channels,
            spatial_ndim,
            channel_axis,
            epsilon=epsilon,
            scale_initializer=scale_initializer,
            bias_initializer=bias_initializer,
            elementwise_affine=elementwise_affine,
            use_scale=use_scale,
            use_bias=use_bias,
            zero_centered_scale=zero_centered_scale,
            param_dtype=param_dtype,
            dtype=dtype,
            key=key,
        )


class InstanceNorm(ChannelNorm):
    r"""Instance normalization: statistics over space, per example and per channel.

    .. math:: y = \frac{x - \mathrm{E}_c[x]}{\sqrt{\mathrm{Var}_c[x] + \epsilon}} \gamma_c
        + \beta_c

    where the mean and variance of channel ``c`` run over every spatial position of one
    example. This is :class:`GroupNorm` with ``num_groups == num_channels`` (it runs the
    same code), and ``torch.nn.InstanceNorm1d/2d/3d(affine=True)`` for ``spatial_ndim``
    1/2/3 after moving the channel axis (or with ``channel_axis=0``). Unlike torch, the
    parameters are on by default, as in every eqx_norm layer.

    Layout as :class:`GroupNorm`: ``(*batch, *spatial, C)`` by default, ``(*batch, C,
    *spatial)`` with ``channel_axis=0``; ``gamma``/``beta`` have shape ``(num_channels,)``.

    Args:
        num_channels: number of channels, the size of the channel axis.
        epsilon: added to the variance for numerical stability, ``>= 0``.
        bias_initializer: initializer of ``beta``, in any form :class:`GroupNorm` accepts.
        scale_initializer: initializer of ``gamma``, in the same forms.
        elementwise_affine: False switches off both ``gamma`` and ``beta``.
        spatial_ndim: number of spatial axes of one example (default 2).
        channel_axis: position of the channel axis within one example: -1 (default,
            channels-last) or 0 (channels-first).
        use_scale: False switches off ``gamma`` alone.
        use_bias: False switches off ``beta`` alone.
        zero_centered_scale: scale by ``1 + gamma``, with ``gamma`` initialised to zero.
        param_dtype: storage dtype of ``gamma``/``beta`` (default float32).
        dtype: output dtype (default: the input's).
        key: PRNG key, needed only by random initializers.

    Example:
        >>> import jax
        >>> from eqx_norm import InstanceNorm
        >>> x = jax.random.normal(jax.random.key(0), (8, 32, 32, 3))  # (N, H, W, C)
        >>> y = InstanceNorm(3)(x)
        >>> y.shape, bool(abs(float(y.mean(axis=(1, 2)).max())) < 1e-5)
        ((8, 32, 32, 3), True)

    References:
        Ulyanov, Vedaldi and Lempitsky, "Instance Normalization: The Missing Ingredient
        for Fast Stylization", 2016. arXiv:1607.08022.
    """

    def __init__(
        self,
        num_channels: int,
        epsilon: float = 1e-5,
        bias_initializer: InitializerLike = ZeroInit,
        scale_initializer: InitializerLike = OneInit(value=1.0),
        elementwise_affine: bool = True,
        *,
        spatial_ndim: int = 2,
        channel_axis: int = -1,
        use_scale: bool = True,
        use_bias: bool = True,
        zero_centered_scale: bool = False,
        param_dtype: DTypeLike | None = None,
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray | None = None,
    ):
        self._init_channels(
            num_channels,
            spatial_ndim,
            channel_axis,
            epsilon=epsilon,
            scale_initializer=scale_initializer,
            bias_initializer=bias_initializer,
            elementwise_affine=elementwise_affine,
            use_scale=use_scale,
            use_bias=use_bias,
            zero_centered_scale=zero_centered_scale,
            param_dtype=param_dtype,
            dtype=dtype,
            key=key,
        )

    _min_spatial_ndim: ClassVar[int] = 1

    @property
    def num_groups(self) -> int:
        """One group per channel."""
        return self.num_channels
