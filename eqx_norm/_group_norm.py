"""GroupNorm and InstanceNorm: per-example statistics over space and groups of channels.

Each layer's ``__call__`` is one call of the body of :func:`eqx_norm.functional.group_norm`
(and :func:`~eqx_norm.functional.instance_norm`) with its fields and its name.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from . import _core
from ._base import NO_STATE, AffineNorm, with_state
from ._checks import (
    DTypeLike,
    Implementation,
    axis_size,
    check_activation,
    check_epsilon,
    check_flag,
    check_floating,
    check_groups,
    check_implementation,
    check_layout,
    check_mask,
    check_modulation,
    check_parameter,
    describe_layout,
    how_to_set,
    optional_dtype,
    positive_int,
    reject_unknown_keywords,
)
from ._dispatch import common_reason, use_kernel
from .initializers import InitializerLike
from .kernels import groups as _kernel
from .kernels import rows as _rows_kernel

_CALL_DOC = """Normalize ``x`` of shape ``(*batch, *spatial, C)`` (or ``(*batch, C, *spatial)``).

        Args:
            x: floating-point input; integer and boolean inputs are an error.
            state: optional, returned unchanged: ``layer(x, state)`` gives ``(y, state)``,
                equinox's call form, so the layer sits in ``eqx.nn.Sequential`` beside
                stateful layers.
            mask: optional boolean array of x's rank (size-1 axes broadcast, e.g.
                ``(*batch, *spatial, 1)`` for padded images). False elements take no part
                in the statistics and their output is ``beta`` (0 without ``beta``); a
                fully masked group gives ``beta``, not NaN.
            scale: optional per-example modulation (the AdaGN of diffusion U-Nets): the
                result is ``y * (1 + scale) + shift``, after ``gamma``/``beta`` and before
                the layer's ``activation``, in the norm's one pass. A floating array of x's
                rank whose axes are x's sizes or 1, e.g. ``(N, 1, 1, C)`` for x of ``(N, H,
                W, C)``; anything else is an error (never a silent broadcast).
            shift: optional per-example shift, shaped as ``scale`` (either may be given
                alone).
            key: ignored, as in equinox.

        Returns:
            An array of x's shape, in x's dtype (or ``dtype`` if set); ``(y, state)`` when
            ``state`` is given.
        """


class _GroupedNorm(AffineNorm):
    """The call and layout checks that GroupNorm and InstanceNorm (one channel per group)
    share; each subclass gives the call's ``num_groups``, ``group_size`` (exactly one of
    them) and ``axis_name`` with ``_groups``, and its least ``spatial_ndim``."""

    num_channels: eqx.AbstractVar[int]
    spatial_ndim: eqx.AbstractVar[int | None]
    channel_axis: eqx.AbstractVar[int]
    implementation: eqx.AbstractVar[Implementation]
    activation: eqx.AbstractVar[str | None]

    _name: ClassVar[str]

    def __call__(
        self,
        x: Float[Array, "*shape"],
        state: Any = NO_STATE,
        *,
        mask: Bool[Array, "*shape"] | None = None,
        scale: Float[Array, "*shape"] | None = None,
        shift: Float[Array, "*shape"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        del key
        num_groups, group_size, axis_name = self._groups()
        with jax.named_scope(f"eqx_norm.{self._name}"):
            y = grouped_norm(
                self._name,  # errors name the layer and its arguments
                x,
                num_groups,
                group_size,
                self.gamma,
                self.beta,
                num_channels=self.num_channels,
                spatial_ndim=self.spatial_ndim,
                channel_axis=self.channel_axis,
                min_spatial_ndim=self._min_spatial_ndim,
                epsilon=self.epsilon,
                mask=mask,
                zero_centered_scale=self.zero_centered_scale,
                dtype=self.dtype,
                axis_name=axis_name,
                implementation=self.implementation,
                scale=scale,
                shift=shift,
                activation=self.activation,
            )
        return with_state(y, state)

    __call__.__doc__ = _CALL_DOC


class GroupNorm(_GroupedNorm):
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
    fewer axes, or whose channel axis is not ``num_channels`` long, is an error. With
    ``spatial_ndim=None`` the whole input is one example of any rank, equinox's convention
    (what :func:`~eqx_norm.from_equinox` builds). Output has the shape and dtype of ``x``;
    statistics are computed in at least float32.

    ``GroupNorm(1, C)`` is LayerNorm over ``(*spatial, C)`` with per-channel parameters,
    and ``GroupNorm(C, C)`` is :class:`InstanceNorm`.

    Args:
        num_groups: number of channel groups; must divide ``num_channels``. Give exactly
            one of ``num_groups`` and ``group_size``.
        num_channels: number of channels, the size of the channel axis (required).
        epsilon: added to the variance for numerical stability, ``>= 0``.
        bias_initializer: initializer of ``beta`` (see :mod:`eqx_norm.initializers`): an
            instance, a class with default arguments, a ``(key, shape, dtype)`` callable,
            or an array of shape ``(num_channels,)``; None (default) means zeros.
        scale_initializer: initializer of the stored ``gamma``, accepted in the same forms;
            None (default) means ones, or zeros with ``zero_centered_scale=True``.
        elementwise_affine: False switches off both ``gamma`` and ``beta``. An initializer
            given for a parameter that is switched off is an error, unless it is that
            parameter's default written out (``OneInit(1.0)``, ``ZeroInit``).
        spatial_ndim: number of spatial axes of one example (1, 2 or 3 for 1-D signals,
            images, volumes; default 2; 0 for feature vectors ``(*batch, C)``, as
            ``torch.nn.GroupNorm`` on ``(N, C)``); None: the input is one example of any
            rank, without batch axes, as ``eqx.nn.GroupNorm`` takes it.
        channel_axis: position of the channel axis within one example: -1 (default,
            channels-last) or 0 (channels-first).
        use_scale: False switches off ``gamma`` alone; None (default) follows
            ``elementwise_affine``, and True beside ``elementwise_affine=False`` is an error.
        use_bias: False switches off ``beta`` alone; None (default) follows
            ``elementwise_affine``, and True beside ``elementwise_affine=False`` is an error.
        zero_centered_scale: scale by ``1 + gamma`` instead of ``gamma``, with ``gamma``
            initialised to zero by default, so that weight decay pulls towards identity.
        param_dtype: storage dtype of ``gamma``/``beta`` (default float32).
        dtype: output dtype (default: the input's).
        implementation: which code runs the call: None (default), ``"xla"`` or
            ``"kernel"``; see "Implementations" in :mod:`eqx_norm.functional`.
        group_size: number of channels per group (flax's), instead of ``num_groups``;
            must divide ``num_channels``.
        axis_name: the name of a mapped axis (``shard_map``, ``pmap`` or ``vmap``) across
            which the channel axis is split in contiguous blocks, one per shard in axis
            order (tensor parallelism). ``num_channels`` and ``gamma``/``beta`` are the
            shard's, ``num_groups`` counts the groups of all channels (``group_size`` is
            the same either way), and each group's statistics are the whole group's,
            equal to the unsharded call. Each shard's channels must hold whole groups or
            lie within one group (checked at call time, when the shard count is known).
        activation: None (default), or ``"silu"``: ``silu`` applied to the output (after
            ``gamma``/``beta`` and any per-example modulation), fused into the norm's pass
            forward and backward, as Stable Diffusion's ``GroupNorm`` then ``SiLU``.
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
        >>> GroupNorm(num_channels=6, group_size=2).num_groups  # flax's way to say it
        3

    References:
        Wu and He, "Group Normalization", ECCV 2018. arXiv:1803.08494.
    """

    _name = "GroupNorm"

    num_groups: int | None = eqx.field(static=True)
    num_channels: int = eqx.field(static=True)
    spatial_ndim: int | None = eqx.field(static=True)
    channel_axis: int = eqx.field(static=True)
    group_size: int | None = eqx.field(static=True)
    axis_name: Hashable | None = eqx.field(static=True)
    implementation: Implementation = eqx.field(static=True)
    activation: str | None = eqx.field(static=True)

    def __init__(
        self,
        num_groups: int | None = None,
        num_channels: int | None = None,
        epsilon: float = 1e-5,
        *,
        group_size: int | None = None,
        bias_initializer: InitializerLike | None = None,
        scale_initializer: InitializerLike | None = None,
        elementwise_affine: bool = True,
        spatial_ndim: int | None = 2,
        channel_axis: int = -1,
        use_scale: bool | None = None,
        use_bias: bool | None = None,
        zero_centered_scale: bool = False,
        param_dtype: DTypeLike | None = None,
        dtype: DTypeLike | None = None,
        axis_name: Hashable | None = None,
        implementation: Implementation = None,
        activation: str | None = None,
        key: PRNGKeyArray | None = None,
        **unknown: Any,
    ):
        reject_unknown_keywords("GroupNorm", unknown, type(self))
        self.activation = check_activation(activation, "GroupNorm")
        num_groups, group_size = check_groups(num_groups, group_size, "GroupNorm")
        if num_channels is None:
            raise TypeError("GroupNorm: `num_channels`, the size of the channel axis, is required.")
        num_channels = positive_int(num_channels, "num_channels")
        self.axis_name = axis_name
        self.implementation = check_implementation(implementation)
        if axis_name is None:  # sharded, the groups are counted over all shards' channels
            if num_groups is not None and num_channels % num_groups:
                raise ValueError(
                    f"GroupNorm: `num_groups`={num_groups} must divide `num_channels`="
                    f"{num_channels} (groups hold equal numbers of channels); choose a "
                    f"divisor of {num_channels}."
                )
            if group_size is not None and num_channels % group_size:
                raise ValueError(
                    f"GroupNorm: `group_size`={group_size} must divide `num_channels`="
                    f"{num_channels} (groups hold equal numbers of channels); choose a "
                    f"divisor of {num_channels}."
                )
            num_groups = num_groups or num_channels // group_size
            group_size = group_size or num_channels // num_groups
        self.num_groups, self.group_size = num_groups, group_size
        self.num_channels = num_channels
        self.spatial_ndim, self.channel_axis = check_layout(
            spatial_ndim, channel_axis, "GroupNorm", min_spatial_ndim=0
        )
        self._init_affine(
            (num_channels,),
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

    def _groups(self) -> tuple[int | None, int | None, Hashable | None]:
        """The call's groups: by count or by size, as they were given."""
        group_size = None if self.num_groups is not None else self.group_size
        return self.num_groups, group_size, self.axis_name

    @property
    def _min_spatial_ndim(self) -> int:
        return 0


class InstanceNorm(_GroupedNorm):
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
        bias_initializer: initializer of ``beta``, in any form :class:`GroupNorm` accepts;
            None (default) means zeros.
        scale_initializer: initializer of the stored ``gamma``, in the same forms; None
            (default) means ones, or zeros with ``zero_centered_scale=True``.
        elementwise_affine: False switches off both ``gamma`` and ``beta``. An initializer
            given for a parameter that is switched off is an error, unless it is that
            parameter's default written out (``OneInit(1.0)``, ``ZeroInit``).
        spatial_ndim: number of spatial axes of one example (default 2); None: the input
            is one example of any rank, without batch axes.
        channel_axis: position of the channel axis within one example: -1 (default,
            channels-last) or 0 (channels-first).
        use_scale: False switches off ``gamma`` alone; None (default) follows
            ``elementwise_affine``, and True beside ``elementwise_affine=False`` is an error.
        use_bias: False switches off ``beta`` alone; None (default) follows
            ``elementwise_affine``, and True beside ``elementwise_affine=False`` is an error.
        zero_centered_scale: scale by ``1 + gamma``, with ``gamma`` initialised to zero.
        param_dtype: storage dtype of ``gamma``/``beta`` (default float32).
        dtype: output dtype (default: the input's).
        implementation: which code runs the call: None (default), ``"xla"`` or
            ``"kernel"``; see "Implementations" in :mod:`eqx_norm.functional`.
        activation: None (default), or ``"silu"``: ``silu`` applied to the output (after
            ``gamma``/``beta`` and any per-example modulation), fused into the norm's pass
            forward and backward, as Stable Diffusion's ``GroupNorm`` then ``SiLU``.
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

    _name = "InstanceNorm"

    num_channels: int = eqx.field(static=True)
    spatial_ndim: int | None = eqx.field(static=True)
    channel_axis: int = eqx.field(static=True)
    implementation: Implementation = eqx.field(static=True)
    activation: str | None = eqx.field(static=True)

    def __init__(
        self,
        num_channels: int,
        epsilon: float = 1e-5,
        *,
        bias_initializer: InitializerLike | None = None,
        scale_initializer: InitializerLike | None = None,
        elementwise_affine: bool = True,
        spatial_ndim: int | None = 2,
        channel_axis: int = -1,
        use_scale: bool | None = None,
        use_bias: bool | None = None,
        zero_centered_scale: bool = False,
        param_dtype: DTypeLike | None = None,
        dtype: DTypeLike | None = None,
        implementation: Implementation = None,
        activation: str | None = None,
        key: PRNGKeyArray | None = None,
        **unknown: Any,
    ):
        reject_unknown_keywords("InstanceNorm", unknown, type(self))
        self.activation = check_activation(activation, "InstanceNorm")
        self.num_channels = positive_int(num_channels, "num_channels")
        self.implementation = check_implementation(implementation)
        self.spatial_ndim, self.channel_axis = check_layout(
            spatial_ndim, channel_axis, "InstanceNorm", min_spatial_ndim=1
        )
        self._init_affine(
            (self.num_channels,),
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

    def _groups(self) -> tuple[int | None, int | None, Hashable | None]:
        """One channel per group, not sharded."""
        return None, 1, None

    @property
    def _min_spatial_ndim(self) -> int:
        return 1

    @property
    def num_groups(self) -> int:
        """One group per channel."""
        return self.num_channels


def grouped_norm(
    layer: str,
    x: Array,
    num_groups: int | None,
    group_size: int | None,
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
    axis_name: Hashable | None = None,
    implementation: Implementation = None,
    scale: Array | None = None,
    shift: Array | None = None,
    activation: str | None = None,
) -> Array:
    """The body of :func:`~eqx_norm.functional.group_norm`,
    :func:`~eqx_norm.functional.instance_norm` (``group_size=1``) and the layers' ``__call__``
    (errors name ``layer``): checks, then the kernel on a free 3-D view or
    :func:`eqx_norm._core.normalize` on the grouped view. Exactly
    one of ``num_groups``/``group_size`` is given; ``num_channels=None`` takes the channel
    count from ``x``. With ``axis_name`` the channel axis is split across its shards.
    ``scale``/``shift`` modulate the result per example and ``activation`` follows, all
    folded into the norm's pass."""
    spatial_ndim, channel_axis = check_layout(
        spatial_ndim, channel_axis, layer, min_spatial_ndim=min_spatial_ndim
    )
    x = check_floating(x, layer)
    described = f"{layer}(spatial_ndim={spatial_ndim}, channel_axis={channel_axis})"
    expected = describe_layout(spatial_ndim, channel_axis, num_channels)
    if spatial_ndim is None:  # x is one example (equinox's convention), of any rank
        if x.ndim < 1 + min_spatial_ndim:
            raise ValueError(
                f"{described} takes x as one example {expected}, got shape {x.shape}: it "
                f"needs at least {1 + min_spatial_ndim} axes."
            )
        spatial_ndim = x.ndim - 1
    n = spatial_ndim + 1
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
            hint = f" If your data is {layout}, {how_to_set(layer)} channel_axis={fix}."
        raise ValueError(
            f"{described} expects x of shape {expected}, got shape {x.shape}, whose channel "
            f"axis {axis} has size {channels}, not num_channels={num_channels}.{hint}"
        )
    shards = 1 if axis_name is None else axis_size(axis_name, layer)
    whole = channels * shards  # the channels of all shards
    across = "" if axis_name is None else f", {whole} across the {shards} shards of {axis_name!r}"
    if group_size is None:
        if whole % num_groups:
            raise ValueError(
                f"{layer}: num_groups={num_groups} must divide the number of channels, but x "
                f"of shape {x.shape} has {channels} channels on axis {axis} (layout "
                f"{expected}){across}."
            )
        group_size = whole // num_groups
    elif whole % group_size:
        raise ValueError(
            f"{layer}: `group_size`={group_size} must divide the number of channels, but x of "
            f"shape {x.shape} has {channels} channels on axis {axis} (layout {expected})"
            f"{across}."
        )
    groups = max(channels // group_size, 1)  # this shard's (part of a) group count
    if axis_name is not None and channels % group_size and group_size % channels:
        raise ValueError(
            f"{layer}: with axis_name={axis_name!r}, each shard's {channels} channels must "
            f"hold whole groups or lie within one group, but groups hold {group_size} "
            f"channels{across}. Choose a group size that divides {channels} or that "
            f"{channels} divides."
        )
    gamma = check_parameter(gamma, (channels,), "gamma", layer)
    beta = check_parameter(beta, (channels,), "beta", layer)
    epsilon = check_epsilon(epsilon)
    mask = check_mask(mask, x.shape, layer)
    zero_centered_scale = check_flag(zero_centered_scale, "zero_centered_scale")
    out_dtype = optional_dtype(dtype, "dtype") or x.dtype
    activation = check_activation(activation, layer)
    batch_ndim = x.ndim - n
    example = tuple(channels if i == axis else 1 for i in range(batch_ndim, x.ndim))
    example = str((*x.shape[:1], *example) if batch_ndim else example)
    modulation = [
        check_modulation(m, name, x, example, layer)
        for m, name in ((scale, "scale"), (shift, "shift"))
    ]
    # the channel axis made whole (a size-1 one broadcast), the rest as given
    modulation = [
        None
        if m is None
        else jnp.broadcast_to(m, (*m.shape[:axis], channels, *m.shape[axis + 1 :]))
        for m in modulation
    ]
    reason = common_reason(x, masked=mask is not None, out_dtype=out_dtype, axis_name=axis_name)
    reason = _rows_kernel.unavailable_reason(x) if reason is None else reason
    if reason is None and any(
        m is not None and math.prod(m.shape[batch_ndim:]) != channels for m in modulation
    ):
        reason = (
            "a `scale` or `shift` varies over the spatial axes (the kernel takes one per "
            "example and channel)"
        )
    if use_kernel(
        check_implementation(implementation), layer, reason
    ):  # on a free 3-D view: (N, S, C) channels-last, (N, C, S) channels-first
        batch = math.prod(x.shape[: x.ndim - n])
        positions = math.prod(x.shape[i] for i in range(x.ndim - n, x.ndim) if i != axis)
        last = channel_axis != 0
        view = (batch, positions, channels) if last else (batch, channels, positions)
        scale, offset = _core.affine(gamma, beta, zero_centered_scale, jnp.float32, (channels,))
        if any(m is not None for m in modulation):  # (E, C): E examples of N / E each
            per_example = [
                None if m is None else _core.per_example(m, x.shape[:batch_ndim], channels)
                for m in modulation
            ]
            scale, offset = _core.modulate(scale, offset, *per_example, jnp.float32)
        y = _kernel.normalize_groups(
            x.reshape(view),
            scale,
            offset,
            num_groups=groups,
            channels_last=last,
            epsilon=epsilon,
            activation=activation,
        )
        return y.reshape(x.shape)

    # Split the channel axis into (groups, channels per group); the statistics run over the
    # spatial axes and the channels within a group.
    grouped = (*x.shape[:axis], groups, channels // groups, *x.shape[axis + 1 :])
    spatial = [i for i in range(x.ndim - n, x.ndim) if i != axis]
    axes = tuple(sorted([i + 1 if i > axis else i for i in spatial] + [axis + 1]))
    per_channel = (1,) * axis + (groups, channels // groups) + (1,) * (x.ndim - axis - 1)
    compute = _core.compute_dtype(x.dtype)
    scale, offset = _core.affine(gamma, beta, zero_centered_scale, compute, per_channel)
    if any(m is not None for m in modulation):
        modulation = [
            None
            if m is None
            else m.reshape(*m.shape[:axis], groups, channels // groups, *m.shape[axis + 1 :])
            for m in modulation
        ]
        scale, offset = _core.modulate(scale, offset, *modulation, compute)
    groups_across = None
    if axis_name is not None:  # this shard's groups are start, start + 1, ... of the whole
        start = (lax.axis_index(axis_name) * channels) // group_size
        groups_across = _core.Groups(axis, start, whole // group_size)
    y = _core.normalize(
        x.reshape(grouped),
        axes,
        scale,
        offset,
        epsilon=epsilon,
        mask=None if mask is None else mask.reshape(grouped),
        axis_name=axis_name,
        groups=groups_across,
    )
    if activation == "silu":  # in the compute dtype, where XLA fuses it into the last pass
        y = jax.nn.silu(y)
    return y.astype(out_dtype).reshape(x.shape)
