"""Normalization as pure functions of arrays and configuration.

Each function here is its family's body (:mod:`eqx_norm._layer_norm`,
:mod:`eqx_norm._group_norm`, :mod:`eqx_norm._batch_norm`, :mod:`eqx_norm._dyt`) given the
function's name, which the layers call with theirs, so that errors name the caller. The body
checks the arguments, then runs the compiled CPU kernel (:mod:`eqx_norm.kernels`) where it
serves or the one pure-JAX normalization, :func:`eqx_norm._core.normalize`. Every function
computes statistics in at least float32 and returns an array of ``x``'s shape and (unless
``dtype`` is given) ``x``'s dtype; :func:`batch_norm` also returns the updated running
statistics.

Implementations: every function and layer takes ``implementation=``.

* None (default): the compiled CPU kernel where it serves the call, XLA everywhere else.
  The kernel serves LayerNorm, RMSNorm (with or without ``residual=``), GroupNorm and
  InstanceNorm on the CPU, for float32, bfloat16 and float16 inputs (float16 where the
  compiler that built it has ``_Float16``), without a mask or ``axis_name``, with the output
  in x's dtype. Its output for one example is bitwise the same whatever else is in the
  batch, and the same at every thread count.
* ``"xla"``: always the pure-JAX path, on any backend.
* ``"kernel"``: the kernel, or a ``ValueError`` saying why it cannot serve this call.

BatchNorm's training step takes the kernel's per-channel sums (and XLA's elementwise
passes) on the CPU without a mask or ``axis_name`` and with ``epsilon > 0``, at any output
dtype; its sums are bitwise the same at every thread count (its statistics are the whole
batch's, so no example is independent of the batch). Inference is one elementwise pass.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

from jaxtyping import Array, Bool, Float

from ._batch_norm import batch_norm_body
from ._checks import DTypeLike, Implementation, check_groups, positive_int
from ._dyt import apply_dyt
from ._gated_rms_norm import gated_rms_norm as gated_rms_norm_body
from ._group_norm import grouped_norm
from ._layer_norm import trailing_norm

__all__ = [
    "batch_norm",
    "derf",
    "dyt",
    "gated_rms_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
]


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
    residual: Float[Array, "*shape"] | None = None,
    axis_name: Hashable | None = None,
    scale: Float[Array, "*shape"] | None = None,
    shift: Float[Array, "*shape"] | None = None,
) -> Float[Array, "*shape"] | tuple[Float[Array, "*shape"], Float[Array, "*shape"]]:
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
        implementation: which code runs the call: None (default), ``"xla"`` or
            ``"kernel"``; see "Implementations" in :mod:`eqx_norm.functional`.
        residual: optional floating array of x's shape, the residual stream. Given, the
            call returns ``(y, h)``: ``h = x + residual``, added in (at least) float32 and
            stored in residual's dtype (a float32 ``residual`` beside a bfloat16 ``x`` is
            flash-attn's ``residual_in_fp32``), and ``y`` the norm of ``h`` as stored, in
            ``dtype`` (default x's). This equals ``norm(x + residual)`` with both outputs
            and their gradients; a mask applies to ``y``'s statistics only.
        axis_name: the name of a mapped axis (``shard_map``, ``pmap`` or ``vmap``) across
            which the normalized axes are split: each call holds one shard of every row,
            with the matching shard of ``gamma``/``beta``, and the statistics are the
            whole row's (each shard's two-pass moments merged, count-weighted, as
            :func:`batch_norm` merges them), equal to the unsharded call. Runs the XLA
            path: the kernel cannot see the other shards.
        scale: optional per-example modulation (adaLN): the result is ``y * (1 + scale)
            + shift``, after ``gamma``/``beta``, folded into the same single pass. A
            floating array of x's rank whose axes are x's sizes or 1, such as ``(B, 1, D)``
            for x of ``(B, T, D)`` (the "Conditional normalization" page shows a DiT block).
        shift: optional per-example shift, shaped as ``scale``; either may come alone.

    Returns:
        An array of ``x``'s shape; ``(y, h)`` with ``residual``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm.functional import layer_norm
        >>> x = jax.random.normal(jax.random.key(0), (20, 5, 10))
        >>> y = layer_norm(x, 10, jnp.ones(10), jnp.zeros(10))
        >>> bool(jnp.allclose(y.mean(-1), 0, atol=1e-6))
        True
        >>> r = jnp.ones((20, 5, 10))  # the residual stream
        >>> y, h = layer_norm(x, 10, residual=r)
        >>> bool(jnp.allclose(h, x + r)), bool(jnp.allclose(y, layer_norm(x + r, 10)))
        (True, True)

    References:
        Ba, Kiros and Hinton, "Layer Normalization", 2016. arXiv:1607.06450.
    """
    return trailing_norm(
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
        residual=residual,
        axis_name=axis_name,
        scale=scale,
        shift=shift,
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
    residual: Float[Array, "*shape"] | None = None,
    axis_name: Hashable | None = None,
    scale: Float[Array, "*shape"] | None = None,
    shift: Float[Array, "*shape"] | None = None,
) -> Float[Array, "*shape"] | tuple[Float[Array, "*shape"], Float[Array, "*shape"]]:
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
        implementation: which code runs the call: None (default), ``"xla"`` or
            ``"kernel"``; see "Implementations" in :mod:`eqx_norm.functional`.
        residual: optional floating array of x's shape, the residual stream. Given, the
            call returns ``(y, h)``: ``h = x + residual``, added in (at least) float32 and
            stored in residual's dtype (a float32 ``residual`` beside a bfloat16 ``x`` is
            flash-attn's ``residual_in_fp32``), and ``y`` the norm of ``h`` as stored, in
            ``dtype`` (default x's). This equals ``norm(x + residual)`` with both outputs
            and their gradients; a mask applies to ``y``'s statistics only.
        axis_name: the name of a mapped axis (``shard_map``, ``pmap`` or ``vmap``) across
            which the normalized axes are split: each call holds one shard of every row,
            with the matching shard of ``gamma``/``beta``, and the statistics are the
            whole row's (each shard's two-pass moments merged, count-weighted, as
            :func:`batch_norm` merges them), equal to the unsharded call. Runs the XLA
            path: the kernel cannot see the other shards.
        scale: optional per-example modulation (adaLN): the result is ``y * (1 + scale)
            + shift``, after ``gamma``/``beta``, folded into the same single pass. A
            floating array of x's rank whose axes are x's sizes or 1, such as ``(B, 1, D)``
            for x of ``(B, T, D)`` (the "Conditional normalization" page shows a DiT block).
        shift: optional per-example shift, shaped as ``scale``; either may come alone.

    Returns:
        An array of ``x``'s shape; ``(y, h)`` with ``residual``.

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
    return trailing_norm(
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
        residual=residual,
        axis_name=axis_name,
        scale=scale,
        shift=shift,
    )


def gated_rms_norm(
    x: Float[Array, "*shape"],
    gate: Float[Array, "*shape"] | None,
    normalized_shape: int | Sequence[int],
    gamma: Float[Array, "*normalized"] | None = None,
    beta: Float[Array, "*normalized"] | None = None,
    *,
    epsilon: float = 1e-5,
    group_size: int | None = None,
    norm_before_gate: bool = False,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
    implementation: Implementation = None,
) -> Float[Array, "*shape"]:
    r"""The gated RMSNorm of Mamba-2: ``rms_norm(x * silu(gate)) * gamma``, or with
    ``norm_before_gate`` ``rms_norm(x) * gamma * silu(gate)``.

    .. math:: y = \frac{u}{\sqrt{\mathrm{E}[u^2] + \epsilon}} \gamma, \quad
        u = x \cdot \mathrm{silu}(z)

    Args:
        x: floating array of shape ``(*batch, *normalized_shape)``.
        gate: ``z``, a floating array of x's shape, or None (no gate).
        normalized_shape: the trailing axes to normalize over, an int or a sequence.
        gamma: scale of shape ``normalized_shape``, or None for no scale.
        beta: offset of shape ``normalized_shape``, or None (Mamba-2 has none).
        epsilon: added to the mean square, ``>= 0``.
        group_size: normalize each run of ``group_size`` consecutive features on its own
            (Mamba-2's ``d_inner // ngroups``); None: all features together.
        norm_before_gate: gate after the norm instead of before it.
        zero_centered_scale: use ``1 + gamma`` as the scale.
        dtype: output dtype; default ``x.dtype``.
        implementation: which code runs the norm: None (default), ``"xla"`` or
            ``"kernel"``; see "Implementations" above. The gate is an elementwise
            product that XLA fuses beside it.

    Returns:
        An array of x's shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm.functional import gated_rms_norm, rms_norm
        >>> x, z = jax.random.normal(jax.random.key(0), (2, 4, 64))
        >>> y = gated_rms_norm(x, z, 64, jnp.ones(64))
        >>> want = rms_norm(x * jax.nn.silu(z), 64, jnp.ones(64), epsilon=1e-5)  # Mamba-2's
        >>> bool(jnp.allclose(y, want, atol=1e-5))
        True
    """
    return gated_rms_norm_body(
        "gated_rms_norm",
        x,
        gate,
        normalized_shape,
        gamma,
        beta,
        epsilon=epsilon,
        group_size=group_size,
        norm_before_gate=norm_before_gate,
        zero_centered_scale=zero_centered_scale,
        dtype=dtype,
        implementation=implementation,
    )


def dyt(
    x: Float[Array, "*shape"],
    normalized_shape: int | Sequence[int],
    alpha: Float[Array, ""],
    gamma: Float[Array, "*normalized"] | None = None,
    beta: Float[Array, "*normalized"] | None = None,
    *,
    mask: Bool[Array, "..."] | None = None,
    dtype: DTypeLike | None = None,
    residual: Float[Array, "*shape"] | None = None,
) -> Float[Array, "*shape"] | tuple[Float[Array, "*shape"], Float[Array, "*shape"]]:
    r"""Dynamic Tanh: an elementwise stand-in for a norm layer, with no statistics.

    .. math:: y = \gamma \tanh(\alpha x) + \beta

    ``alpha`` is one learnable scalar; ``gamma``/``beta`` hold one value per element of the
    trailing ``normalized_shape``. Computed in at least float32 (bf16/fp16 are upcast).

    Args:
        x: floating array of shape ``(*batch, *normalized_shape)``; ``batch`` may be empty.
        normalized_shape: the trailing axes that ``gamma``/``beta`` cover.
        alpha: the scale inside the tanh, a floating scalar (shape ``()``).
        gamma: scale of shape ``normalized_shape``, or None for no scale.
        beta: offset of shape ``normalized_shape``, or None for no offset.
        mask: optional boolean array of x's rank (axes of size 1 broadcast); where False
            the output is ``beta`` (0 without beta), as a masked LayerNorm's. There are no
            statistics for the mask to keep elements out of.
        dtype: output dtype; default ``x.dtype``.
        residual: optional floating array of x's shape: returns ``(y, h)`` with ``h = x +
            residual`` added in float32 and stored in residual's dtype, and ``y`` computed
            from ``h``, as :func:`layer_norm`'s ``residual``.

    Returns:
        An array of ``x``'s shape; ``(y, h)`` with ``residual``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm.functional import dyt
        >>> x = jax.random.normal(jax.random.key(0), (4, 8))
        >>> y = dyt(x, 8, jnp.asarray(0.5), jnp.ones(8), jnp.zeros(8))
        >>> bool(jnp.allclose(y, jnp.tanh(0.5 * x)))
        True

    References:
        Zhu, Chen, He, LeCun and Liu, "Transformers without Normalization", CVPR 2025.
        arXiv:2503.10622.
    """
    return apply_dyt(
        "dyt", x, normalized_shape, alpha, gamma, beta, mask=mask, dtype=dtype, residual=residual
    )


def derf(
    x: Float[Array, "*shape"],
    normalized_shape: int | Sequence[int],
    alpha: Float[Array, ""],
    shift: Float[Array, ""],
    gamma: Float[Array, "*normalized"] | None = None,
    beta: Float[Array, "*normalized"] | None = None,
    *,
    mask: Bool[Array, "..."] | None = None,
    dtype: DTypeLike | None = None,
    residual: Float[Array, "*shape"] | None = None,
) -> Float[Array, "*shape"] | tuple[Float[Array, "*shape"], Float[Array, "*shape"]]:
    r"""Dynamic erf: an elementwise stand-in for a norm layer, with no statistics.

    .. math:: y = \gamma\, \mathrm{erf}(\alpha x + s) + \beta

    ``alpha`` and ``shift`` (``s``) are learnable scalars; ``gamma``/``beta`` hold one
    value per element of the trailing ``normalized_shape``. Computed in at least float32
    (bf16/fp16 are upcast). The arguments are :func:`dyt`'s, with ``shift``.

    Args:
        x: floating array of shape ``(*batch, *normalized_shape)``; ``batch`` may be empty.
        normalized_shape: the trailing axes that ``gamma``/``beta`` cover.
        alpha: the scale inside the erf, a floating scalar (shape ``()``).
        shift: the offset inside the erf, a floating scalar (shape ``()``).
        gamma: scale of shape ``normalized_shape``, or None for no scale.
        beta: offset of shape ``normalized_shape``, or None for no offset.
        mask: as :func:`dyt`'s: where False the output is ``beta`` (0 without beta).
        dtype: output dtype; default ``x.dtype``.
        residual: as :func:`dyt`'s: returns ``(y, h)`` with ``h = x + residual``.

    Returns:
        An array of ``x``'s shape; ``(y, h)`` with ``residual``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm.functional import derf
        >>> x = jax.random.normal(jax.random.key(0), (4, 8))
        >>> y = derf(x, 8, jnp.asarray(0.5), jnp.asarray(0.1), jnp.ones(8), jnp.zeros(8))
        >>> bool(jnp.allclose(y, jax.scipy.special.erf(0.5 * x + 0.1)))
        True

    References:
        Chen, Lu, Zhu, Sun and Liu, "Stronger Normalization-Free Transformers", 2025.
        arXiv:2512.10938.
    """
    return apply_dyt(
        "derf",
        x,
        normalized_shape,
        alpha,
        gamma,
        beta,
        erf=True,
        shift=shift,
        mask=mask,
        dtype=dtype,
        residual=residual,
    )


def group_norm(
    x: Float[Array, "*shape"],
    num_groups: int | None = None,
    gamma: Float[Array, " channels"] | None = None,
    beta: Float[Array, " channels"] | None = None,
    *,
    group_size: int | None = None,
    num_channels: int | None = None,
    spatial_ndim: int | None = 2,
    channel_axis: int = -1,
    epsilon: float = 1e-5,
    mask: Bool[Array, "..."] | None = None,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
    axis_name: Hashable | None = None,
    implementation: Implementation = None,
    scale: Float[Array, "*shape"] | None = None,
    shift: Float[Array, "*shape"] | None = None,
    activation: str | None = None,
) -> Float[Array, "*shape"]:
    r"""Group normalization: statistics over space and each group of channels, per example.

    .. math:: y = \frac{x - \mathrm{E}_g[x]}{\sqrt{\mathrm{Var}_g[x] + \epsilon}}
        \gamma_c + \beta_c

    One example has ``spatial_ndim + 1`` axes, ``(*spatial, C)`` with ``channel_axis=-1``
    or ``(C, *spatial)`` with ``channel_axis=0``; any leading axes are batch axes.

    Args:
        x: floating array of shape ``(*batch, *spatial, C)`` (or ``(*batch, C, *spatial)``).
        num_groups: number of channel groups; must divide ``C``. Give exactly one of
            ``num_groups`` and ``group_size``.
        gamma: per-channel scale of shape ``(C,)``, or None.
        beta: per-channel offset of shape ``(C,)``, or None.
        group_size: number of channels per group (flax's), instead of ``num_groups``;
            must divide ``C``.
        num_channels: the expected size of the channel axis (checked), or None.
        spatial_ndim: number of spatial axes of one example, ``>= 0`` (0: ``(*batch, C)``);
            None: ``x`` is one example of any rank, without batch axes (as in equinox).
        channel_axis: position of the channel axis within one example (-1 or 0).
        epsilon: added to the variance, ``>= 0``.
        mask: optional boolean array of x's rank (axes of size 1 broadcast, e.g.
            ``(*batch, *spatial, 1)``); False elements take no part in the statistics and
            their output is ``beta`` (0 without beta).
        zero_centered_scale: use ``1 + gamma`` as the scale.
        dtype: output dtype; default ``x.dtype``.
        axis_name: the name of a mapped axis (``shard_map``, ``pmap`` or ``vmap``) across
            which the channel axis is split in contiguous blocks, one per shard in axis
            order: ``x``, ``gamma`` and ``beta`` hold this shard's channels, ``num_groups``
            counts the groups of all channels (``group_size`` is the same either way),
            and each group's statistics are merged over the shards that hold part of it,
            equal to the unsharded call. Each shard's channels must hold whole groups or
            lie within one group.
        implementation: which code runs the call: None (default), ``"xla"`` or
            ``"kernel"``; see "Implementations" in :mod:`eqx_norm.functional`.

        scale: optional per-example modulation (AdaGN): the result is ``y * (1 + scale)
            + shift``, after ``gamma``/``beta``, in the norm's one pass. A floating array
            of x's rank whose axes are x's sizes or 1, such as ``(N, 1, 1, C)`` for x of
            ``(N, H, W, C)``.
        shift: optional per-example shift, shaped as ``scale``; either may come alone.
        activation: None, or ``"silu"`` applied last (after the modulation), fused.
    Returns:
        An array of ``x``'s shape.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm.functional import group_norm
        >>> x = jax.random.normal(jax.random.key(0), (2, 8, 8, 6))
        >>> y = group_norm(x, 3, jnp.ones(6), jnp.zeros(6))
        >>> bool(jnp.allclose(y[..., :2].mean(), 0, atol=1e-5))
        True
        >>> bool(jnp.allclose(group_norm(x, group_size=2), group_norm(x, 3)))
        True

    References:
        Wu and He, "Group Normalization", ECCV 2018. arXiv:1803.08494.
    """
    return grouped_norm(
        "group_norm",
        x,
        *check_groups(num_groups, group_size, "group_norm"),
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
        axis_name=axis_name,
        implementation=implementation,
        scale=scale,
        shift=shift,
        activation=activation,
    )


def instance_norm(
    x: Float[Array, "*shape"],
    gamma: Float[Array, " channels"] | None = None,
    beta: Float[Array, " channels"] | None = None,
    *,
    num_channels: int | None = None,
    spatial_ndim: int | None = 2,
    channel_axis: int = -1,
    epsilon: float = 1e-5,
    mask: Bool[Array, "..."] | None = None,
    zero_centered_scale: bool = False,
    dtype: DTypeLike | None = None,
    implementation: Implementation = None,
    scale: Float[Array, "*shape"] | None = None,
    shift: Float[Array, "*shape"] | None = None,
    activation: str | None = None,
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
        spatial_ndim: number of spatial axes of one example, ``>= 1``; None: ``x`` is one
            example of any rank, without batch axes (as in equinox).
        channel_axis: position of the channel axis within one example (-1 or 0).
        epsilon: added to the variance, ``>= 0``.
        mask: optional boolean array of x's rank (axes of size 1 broadcast); False elements
            take no part in the statistics and their output is ``beta`` (0 without beta).
        zero_centered_scale: use ``1 + gamma`` as the scale.
        dtype: output dtype; default ``x.dtype``.
        implementation: which code runs the call: None (default), ``"xla"`` or
            ``"kernel"``; see "Implementations" in :mod:`eqx_norm.functional`.

        scale: optional per-example modulation (AdaGN): the result is ``y * (1 + scale)
            + shift``, after ``gamma``/``beta``, in the norm's one pass. A floating array
            of x's rank whose axes are x's sizes or 1, such as ``(N, 1, 1, C)`` for x of
            ``(N, H, W, C)``.
        shift: optional per-example shift, shaped as ``scale``; either may come alone.
        activation: None, or ``"silu"`` applied last (after the modulation), fused.
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
    return grouped_norm(
        "instance_norm",
        x,
        None,
        1,
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
        implementation=implementation,
        scale=scale,
        shift=shift,
        activation=activation,
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
    steps: int | Array | None = None,
    implementation: Implementation = None,
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
    weight of the *new* value, so torch's ``momentum`` is ``1 - momentum`` here. With
    ``steps`` (the number of updates the running statistics have had, 0 for fresh ones)
    the update is zero-debiased, as haiku's and equinox's ``mode="batch"`` averages: the
    weight ``1 - \mu`` becomes ``(1 - \mu) / (1 - \mu^{t})`` at the ``t = steps + 1``-th
    update, so the running statistics are the ``\mu``-weighted average of the batches seen,
    with no pull towards their initial values (the first update takes the batch's). The
    caller keeps ``steps`` and adds 1 after each training call, as :class:`eqx_norm.BatchNorm`
    does. The running statistics carry no gradient. Inference (``training=False``): the
    running statistics normalize, and are returned unchanged.

    Without ``axis_name``, ``x`` is the whole batch; under ``jit`` with ``x`` sharded over
    devices, XLA reduces across them, so the statistics are the global batch's. With
    ``axis_name`` (inside ``vmap``, ``pmap`` or ``shard_map``), ``x`` is one example or one
    device's shard and each shard's count, mean and variance are combined over that axis
    (Chan et al.), equal to the whole-batch call. Statistics are two-pass in at least
    float32, with the hand-written derivative every pure-JAX path shares (see
    :mod:`eqx_norm._core`); forward mode works on every path.

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
        steps: None (default) for the plain moving average above, or an integer scalar,
            the number of updates the running statistics have had, for the zero-debiased
            one.
        implementation: None (default) runs the compiled CPU kernel's per-channel sums
            where it serves (training on the CPU with ``epsilon > 0``; a ``mask`` and an
            ``axis_name`` included), else the pure-JAX path; ``"xla"`` always the pure-JAX path;
            ``"kernel"`` where it cannot serve is an error that says why.

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
        >>> _, mean, _ = batch_norm(x, jnp.zeros(3), jnp.ones(3), training=True, steps=0)
        >>> bool(jnp.allclose(mean, x.mean(0)))  # debiased: the first update is the batch's
        True

    References:
        Ioffe and Szegedy, "Batch Normalization: Accelerating Deep Network Training by
        Reducing Internal Covariate Shift", ICML 2015. arXiv:1502.03167.
    """
    return batch_norm_body(
        x,
        running_mean,
        running_var,
        gamma,
        beta,
        training=training,
        momentum=momentum,
        epsilon=epsilon,
        channel_axis=channel_axis,
        axis_name=axis_name,
        mask=mask,
        zero_centered_scale=zero_centered_scale,
        dtype=dtype,
        steps=steps,
        implementation=implementation,
        layer="batch_norm",
        inference_switch="training=False",
    )
