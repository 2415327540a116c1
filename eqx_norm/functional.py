"""Normalization as pure functions of arrays and configuration: the library's spine.

Every layer's ``__call__`` is one call of its function's body here (``_trailing_norm``,
``_grouped_norm``) with the layer's fields and name, so errors name the layer. These
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

import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Bool, Float

from . import _xla, _xla_batch_norm
from ._checks import (
    DTypeLike,
    axis_size,
    batch_channel_axis,
    canonical_shape,
    check_batch_norm_implementation,
    check_epsilon,
    check_flag,
    check_floating,
    check_groups,
    check_implementation,
    check_layout,
    check_mask,
    check_momentum,
    check_parameter,
    check_residual,
    check_running,
    check_steps,
    check_trailing_shape,
    describe_layout,
    how_to_set,
    optional_dtype,
    positive_int,
)
from ._sharded import normalize_across
from ._statistics import compute_dtype
from .kernels import groups as _kernel_groups
from .kernels import rows as _kernel_rows

__all__ = ["batch_norm", "dyt", "group_norm", "instance_norm", "layer_norm", "rms_norm"]

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
    residual: Float[Array, "*shape"] | None = None,
    axis_name: Hashable | None = None,
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
        implementation: None (default) runs the compiled CPU kernel where it serves (CPU,
            float32/bfloat16, no mask) and XLA everywhere else; ``"xla"`` always runs the
            pure-JAX path; ``"kernel"`` requires the kernel and raises a ``ValueError``
            saying why where it cannot serve.
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
        residual=residual,
        axis_name=axis_name,
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
        implementation: None (default) runs the compiled CPU kernel where it serves (CPU,
            float32/bfloat16, no mask) and XLA everywhere else; ``"xla"`` always runs the
            pure-JAX path; ``"kernel"`` requires the kernel and raises a ``ValueError``
            saying why where it cannot serve.
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
        residual=residual,
        axis_name=axis_name,
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
    layer = "dyt"
    shape = canonical_shape(normalized_shape, "normalized_shape")
    x = check_floating(x, layer)
    check_trailing_shape(x.shape, shape, layer)
    residual = check_residual(residual, x, layer)
    if alpha is None:
        raise TypeError(f"{layer}: `alpha` must be a floating scalar array, got None.")
    alpha = check_parameter(alpha, (), "alpha", layer)
    gamma = check_parameter(gamma, shape, "gamma", layer)
    beta = check_parameter(beta, shape, "beta", layer)
    mask = check_mask(mask, x.shape, layer)
    out_dtype = optional_dtype(dtype, "dtype") or x.dtype
    hidden = None
    if residual is not None:
        hidden = x = _add_residual(x, residual)
    compute = compute_dtype(x.dtype)
    full = (1,) * (x.ndim - len(shape)) + shape  # explicit broadcast against x
    scale, offset = _affine(gamma, beta, False, compute, full)
    y = jnp.tanh(alpha.astype(compute) * x.astype(compute))
    if scale is not None:
        y = y * scale
    if offset is not None:
        y = y + offset
    if mask is not None:
        y = jnp.where(mask, y, 0 if offset is None else offset)
    y = y.astype(out_dtype)
    return y if residual is None else (y, hidden)


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
        implementation: None (default) runs the compiled CPU kernel where it serves (CPU,
            float32/bfloat16, no mask, no ``axis_name``, output in x's dtype) and XLA
            everywhere else; ``"xla"`` always runs the pure-JAX path; ``"kernel"``
            requires the kernel and raises a ``ValueError`` saying why where it cannot
            serve. The kernel's output for one example is bitwise the same whatever else
            is in the batch.

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
    return _grouped_norm(
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
        implementation: None (default) runs the compiled CPU kernel where it serves (CPU,
            float32/bfloat16, no mask, no ``axis_name``, output in x's dtype) and XLA
            everywhere else; ``"xla"`` always runs the pure-JAX path; ``"kernel"``
            requires the kernel and raises a ``ValueError`` saying why where it cannot
            serve. The kernel's output for one example is bitwise the same whatever else
            is in the batch.

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
    float32. Training without a mask or ``axis_name`` has a hand-written derivative (see
    ``eqx_norm._xla_batch_norm``); forward mode works on every path.

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
        implementation: None (default) or ``"xla"``: both run the pure-JAX path; there is
            no compiled BatchNorm kernel, so ``"kernel"`` is an error.

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
    return _batch_norm(
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
    implementation: str | None,
    x: Array,
    masked: bool,
    out_dtype: DTypeLike,
    layer: str,
    *,
    residual: Array | None = None,
    axis_name: Hashable | None = None,
) -> bool:
    """Whether the compiled kernel runs this call; ``"kernel"`` where it cannot is an error."""
    if implementation == "xla":
        return False
    if masked:
        reason = "a `mask` is given"
    elif axis_name is not None:
        reason = f"`axis_name`={axis_name!r} is given: the kernel cannot see the other shards"
    elif out_dtype != x.dtype:  # the kernel writes x's dtype: a wider output would lose bits
        reason = f"the output dtype {out_dtype} differs from x's dtype {x.dtype}"
    elif residual is not None:
        reason = _kernel_rows.residual_unavailable_reason(x, residual)
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
    residual: Array | None = None,
    axis_name: Hashable | None = None,
) -> Array | tuple[Array, Array]:
    """The body of :func:`layer_norm` and :func:`rms_norm` (``center=False``): checks, then
    the kernel or XLA on a ``(rows, D)`` view; masked calls and ``axis_name`` run the
    general XLA path. With ``residual``: ``(y, h)``, ``y`` the norm of ``h = x + residual``."""
    shape = canonical_shape(normalized_shape, "normalized_shape")
    x = check_floating(x, layer)
    axes = check_trailing_shape(x.shape, shape, layer)
    residual = check_residual(residual, x, layer)
    gamma = check_parameter(gamma, shape, "gamma", layer)
    beta = check_parameter(beta, shape, "beta", layer)
    epsilon = check_epsilon(epsilon)
    mask = check_mask(mask, x.shape, layer)
    zero_centered_scale = check_flag(zero_centered_scale, "zero_centered_scale")
    out_dtype = optional_dtype(dtype, "dtype") or x.dtype
    if axis_name is not None:
        axis_size(axis_name, layer)  # a NameError naming axis_name where it is not mapped
    use_kernel = _use_kernel(
        check_implementation(implementation),
        x,
        mask is not None,
        out_dtype,
        layer,
        residual=residual,
        axis_name=axis_name,
    )
    hidden = None
    if residual is not None and not use_kernel:  # XLA: the sum, then the norm; XLA fuses
        hidden = x = _add_residual(x, residual)
    compute = compute_dtype(x.dtype if residual is None else residual.dtype)
    if mask is not None or axis_name is not None:
        full = (1,) * (x.ndim - len(shape)) + shape  # explicit broadcast against x
        scale, offset = _affine(gamma, beta, zero_centered_scale, compute, full)
        if axis_name is None:
            y = _xla.normalize(x, axes, scale, offset, epsilon=epsilon, center=center, mask=mask)
        else:
            y = normalize_across(
                x,
                axes,
                scale,
                offset,
                epsilon=epsilon,
                center=center,
                mask=mask,
                axis_name=axis_name,
            )
        y = y.astype(out_dtype)
        return y if residual is None else (y, hidden)
    d = math.prod(shape)
    scale, offset = _affine(gamma, beta, zero_centered_scale, compute, (d,))
    # Free bitcasts: the kernel takes (rows, D); the XLA path (*batch, D), so that one example
    # under vmap gets no size-1 rows axis (see _xla.normalize_rows).
    batch_shape = (-1,) if use_kernel else x.shape[: x.ndim - len(shape)]
    rows = x.reshape(*batch_shape, d)
    if use_kernel and residual is not None:
        y, hidden = _kernel_rows.normalize_rows_residual(
            rows, residual.reshape(-1, d), scale, offset, epsilon=epsilon, center=center
        )
        hidden = hidden.reshape(x.shape)
    else:
        run = _kernel_rows.normalize_rows if use_kernel else _xla.normalize_rows
        y = run(rows, scale, offset, epsilon=epsilon, center=center)
    y = y.astype(out_dtype).reshape(x.shape)
    return y if residual is None else (y, hidden)


def _add_residual(x: Array, residual: Array) -> Array:
    """``x + residual``, added in at least float32 and stored in residual's dtype."""
    wide = jnp.promote_types(compute_dtype(x.dtype), compute_dtype(residual.dtype))
    return (x.astype(wide) + residual.astype(wide)).astype(residual.dtype)


def _grouped_norm(
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
) -> Array:
    """The body of :func:`group_norm` and :func:`instance_norm` (``group_size=1``); exactly
    one of ``num_groups``/``group_size`` is given; ``num_channels=None`` takes the channel
    count from ``x``. With ``axis_name`` the channel axis is split across its shards."""
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
    use_kernel = _use_kernel(
        check_implementation(implementation),
        x,
        mask is not None,
        out_dtype,
        layer,
        axis_name=axis_name,
    )
    if use_kernel:  # on a free 3-D view: (N, S, C) channels-last, (N, C, S) channels-first
        batch = math.prod(x.shape[: x.ndim - n])
        positions = math.prod(x.shape[i] for i in range(x.ndim - n, x.ndim) if i != axis)
        last = channel_axis != 0
        view = (batch, positions, channels) if last else (batch, channels, positions)
        scale, offset = _affine(gamma, beta, zero_centered_scale, jnp.float32, (channels,))
        y = _kernel_groups.normalize_groups(
            x.reshape(view), scale, offset, num_groups=groups, channels_last=last, epsilon=epsilon
        )
        return y.reshape(x.shape)

    # Split the channel axis into (groups, channels per group); the statistics run over the
    # spatial axes and the channels within a group.
    grouped = (*x.shape[:axis], groups, channels // groups, *x.shape[axis + 1 :])
    spatial = [i for i in range(x.ndim - n, x.ndim) if i != axis]
    axes = tuple(sorted([i + 1 if i > axis else i for i in spatial] + [axis + 1]))
    per_channel = (1,) * axis + (groups, channels // groups) + (1,) * (x.ndim - axis - 1)
    scale, offset = _affine(gamma, beta, zero_centered_scale, compute_dtype(x.dtype), per_channel)
    grouped_mask = None if mask is None else mask.reshape(grouped)
    if axis_name is None:
        y = _xla.normalize(
            x.reshape(grouped),
            axes,
            scale,
            offset,
            epsilon=epsilon,
            center=True,
            mask=grouped_mask,
        )
    else:  # this shard's groups are groups start, start + 1, ... of whole // group_size
        start = (lax.axis_index(axis_name) * channels) // group_size
        y = normalize_across(
            x.reshape(grouped),
            axes,
            scale,
            offset,
            epsilon=epsilon,
            center=True,
            mask=grouped_mask,
            axis_name=axis_name,
            groups=(axis, start, whole // group_size),
        )
    return y.astype(out_dtype).reshape(x.shape)


# ----------------------------------------------------------------------------- batch_norm


def _batch_norm(
    x: Any,
    running_mean: Any,
    running_var: Any,
    gamma: Any,
    beta: Any,
    *,
    training: Any,
    momentum: Any,
    epsilon: Any,
    channel_axis: Any,
    axis_name: Hashable | None,
    mask: Any,
    zero_centered_scale: Any,
    dtype: Any,
    steps: Any,
    implementation: Any,
    layer: str,
    inference_switch: str,
) -> tuple[Array, Array, Array]:
    """The body of :func:`batch_norm` and of ``BatchNorm.__call__``: errors name ``layer``
    and, for a batch too small to train on, the caller's switch to inference
    (``inference_switch``)."""
    x = check_floating(x, layer)
    training = check_flag(training, "training")
    momentum = check_momentum(momentum)
    check_batch_norm_implementation(implementation, layer)
    axis = batch_channel_axis(channel_axis, x, layer)
    channels = x.shape[axis]
    running_mean = check_running(running_mean, "running_mean", x, axis, layer)
    running_var = check_running(running_var, "running_var", x, axis, layer)
    gamma = check_parameter(gamma, (channels,), "gamma", layer)
    beta = check_parameter(beta, (channels,), "beta", layer)
    epsilon = check_epsilon(epsilon)
    mask = check_mask(mask, x.shape, layer)
    zero_centered_scale = check_flag(zero_centered_scale, "zero_centered_scale")
    out_dtype = optional_dtype(dtype, "dtype") or x.dtype
    steps = check_steps(steps, layer)

    axes = tuple(i for i in range(x.ndim) if i != axis)
    per_channel = tuple(channels if i == axis else 1 for i in range(x.ndim))
    x = x.astype(compute_dtype(x.dtype))
    scale, offset = _affine(gamma, beta, zero_centered_scale, x.dtype, per_channel)
    if training:
        per_device = math.prod(x.shape[i] for i in axes)
        values = per_device * (1 if axis_name is None else axis_size(axis_name, layer))
        if values < 2:
            raise ValueError(
                f"{layer}: training needs at least 2 values per channel to estimate a "
                f"variance, but x of shape {x.shape} (channel_axis={channel_axis}"
                f"{'' if axis_name is None else f', axis_name={axis_name!r}'}) gives "
                f"{values}: the variance of one value is 0. Use a batch of at least 2 "
                f"examples, or {inference_switch} to normalize by the running statistics."
            )
        y, mean, var, count = _xla_batch_norm.train(
            x, scale, offset, axes=axes, epsilon=epsilon, mask=mask, axis_name=axis_name
        )
        new_mean, new_var = _xla_batch_norm.update_running(
            running_mean, running_var, mean, var, count, momentum=momentum, steps=steps
        )
    else:
        y = _xla_batch_norm.infer(
            x,
            running_mean.astype(x.dtype).reshape(per_channel),
            running_var.astype(x.dtype).reshape(per_channel),
            scale,
            offset,
            epsilon=epsilon,
            mask=mask,
        )
        new_mean, new_var = running_mean, running_var
    return y.astype(out_dtype), new_mean, new_var
