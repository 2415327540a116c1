"""LayerNorm and RMSNorm: normalization over the trailing axes of each example.

The two differ in one flag, ``center`` (and in their defaults), so they share one
implementation, :class:`_TrailingNorm`: its ``__init__`` body and ``__call__``.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from . import _core
from ._base import NO_STATE, AffineNorm, with_state
from ._checks import (
    DTypeLike,
    Implementation,
    axis_size,
    canonical_shape,
    check_epsilon,
    check_flag,
    check_floating,
    check_implementation,
    check_mask,
    check_modulation,
    check_parameter,
    check_residual,
    check_trailing_shape,
    optional_dtype,
    reject_unknown_keywords,
)
from ._dispatch import common_reason, use_kernel
from .initializers import InitializerLike
from .kernels import rows as _kernel


class _TrailingNorm(AffineNorm):
    """The fields, checks and call that LayerNorm and RMSNorm share; ``_center`` differs."""

    normalized_shape: tuple[int, ...] = eqx.field(static=True)
    implementation: Implementation = eqx.field(static=True)
    axis_name: Hashable | None = eqx.field(static=True)
    _name: ClassVar[str]
    _center: ClassVar[bool]

    def _init_trailing(
        self,
        normalized_shape: int | Sequence[int],
        *,
        implementation: Implementation,
        axis_name: Hashable | None,
        **affine: Any,
    ) -> None:
        """Check and set the fields; called once from LayerNorm's and RMSNorm's ``__init__``."""
        self.normalized_shape = canonical_shape(normalized_shape, "normalized_shape")
        self.implementation = check_implementation(implementation)
        if axis_name is not None and self.implementation == "kernel":
            raise ValueError(
                f"{self._name}: `axis_name`={axis_name!r} needs the XLA path (the kernel cannot "
                "see the other shards), but `implementation`='kernel' was given. Pass "
                "implementation=None or 'xla'."
            )
        self.axis_name = axis_name
        self._init_affine(self.normalized_shape, **affine)

    def __call__(
        self,
        x: Float[Array, "*shape"],
        state: Any = NO_STATE,
        *,
        mask: Bool[Array, "*shape"] | None = None,
        residual: Float[Array, "*shape"] | None = None,
        scale: Float[Array, "*shape"] | None = None,
        shift: Float[Array, "*shape"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """Normalize ``x`` of shape ``(*batch, *normalized_shape)``.

        Args:
            x: floating-point input; integer and boolean inputs are an error.
            state: optional, returned unchanged: ``layer(x, state)`` gives ``(y, state)``,
                equinox's call form, so the layer sits in ``eqx.nn.Sequential`` beside
                stateful layers.
            mask: optional boolean array of x's rank (size-1 axes broadcast). False
                elements take no part in the statistics and their output is ``beta``
                (0 without ``beta``); a fully masked example gives ``beta``, not NaN.
            residual: optional floating array of x's shape, the residual stream: the
                layer normalizes ``h = x + residual`` (added in float32, stored in
                residual's dtype) and returns ``(y, h)``, a pre-norm block's add and norm
                in one call. A mask applies to ``y``'s statistics only.
            scale: optional per-example modulation (adaLN, as in DiT): the result is
                ``y * (1 + scale) + shift``, after ``gamma``/``beta``, in the same single
                pass. A floating array of x's rank whose axes are x's sizes or 1, e.g.
                ``(B, 1, D)`` for x of ``(B, T, D)``; anything else is an error (never a
                silent broadcast). Gradients reach it.
            shift: optional per-example shift, shaped as ``scale`` (either may be given
                alone). Masked elements give the modulated ``beta``.
            key: ignored, as in equinox.

        Returns:
            An array of x's shape, in x's dtype (or ``dtype`` if set); ``(y, h)`` with
            ``residual``; either of them paired with ``state`` when it is given:
            ``((y, h), state)``.
        """
        del key
        with jax.named_scope(f"eqx_norm.{self._name}"):
            y = trailing_norm(
                self._name,  # errors name the layer and its arguments
                x,
                self.normalized_shape,
                self.gamma,
                self.beta,
                epsilon=self.epsilon,
                mask=mask,
                zero_centered_scale=self.zero_centered_scale,
                dtype=self.dtype,
                implementation=self.implementation,
                center=self._center,
                residual=residual,
                axis_name=self.axis_name,
                scale=scale,
                shift=shift,
            )
        return with_state(y, state)


class LayerNorm(_TrailingNorm):
    r"""Layer normalization over the trailing ``normalized_shape`` axes of each example.

    .. math:: y = \frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}} \gamma + \beta

    The mean and variance are taken over the last ``len(normalized_shape)`` axes, and
    ``gamma``/``beta`` hold one value per element of ``normalized_shape``. Input has shape
    ``(*batch, *normalized_shape)`` with any number of leading axes (none included), so
    calling on a batch equals ``jax.vmap`` over it. Output has the shape and dtype of ``x``.

    Statistics are computed in at least float32 (bf16/fp16 inputs are upcast), with a
    two-pass variance ``E[(x - E[x])^2]``; a constant input gives exactly ``beta``.

    Args:
        normalized_shape: int or sequence of ints: the trailing axes to normalize over.
        epsilon: added to the variance for numerical stability, ``>= 0``.
        bias_initializer: initializer of ``beta`` (see :mod:`eqx_norm.initializers`): an
            instance, a class with default arguments, a ``(key, shape, dtype)`` callable,
            or an array of exactly ``normalized_shape``; None (default) means zeros.
        scale_initializer: initializer of the stored ``gamma``, accepted in the same forms;
            None (default) means ones, or zeros with ``zero_centered_scale=True``.
        elementwise_affine: False switches off both ``gamma`` and ``beta``. An initializer
            given for a parameter that is switched off is an error, unless it is that
            parameter's default written out (``OneInit(1.0)``, ``ZeroInit``).
        use_scale: False switches off ``gamma`` alone; None (default) follows
            ``elementwise_affine``, and True beside ``elementwise_affine=False`` is an error.
        use_bias: False switches off ``beta`` alone; None (default) follows
            ``elementwise_affine``, and True beside ``elementwise_affine=False`` is an error.
        zero_centered_scale: scale by ``1 + gamma`` instead of ``gamma``, with ``gamma``
            initialised to zero by default, so that weight decay pulls towards identity.
            An explicit ``scale_initializer`` initializes ``gamma`` as given: ``OneInit()``
            then means a scale of 2.
        param_dtype: storage dtype of ``gamma``/``beta`` (default float32).
        dtype: output dtype (default: the input's).
        implementation: which code runs the call: None (default), ``"xla"`` or
            ``"kernel"``; see "Implementations" in :mod:`eqx_norm.functional`.
        axis_name: the name of a mapped axis (``shard_map``, ``pmap`` or ``vmap``) across
            which the normalized axes are split (tensor or sequence parallelism): each
            shard holds part of every row and the matching part of ``gamma``/``beta``
            (build the layer with the shard's ``normalized_shape``), and the statistics
            are the whole row's, equal to the unsharded call. Runs the XLA path.
        key: PRNG key, needed only by random initializers.

    Example:
        >>> import jax
        >>> from eqx_norm import LayerNorm
        >>> x = jax.random.normal(jax.random.key(0), (20, 5, 10))
        >>> layer = LayerNorm(10)
        >>> layer(x).shape
        (20, 5, 10)
        >>> LayerNorm([10, 10, 5])(jax.random.normal(jax.random.key(1), (20, 10, 10, 5))).shape
        (20, 10, 10, 5)

    References:
        Ba, Kiros and Hinton, "Layer Normalization", 2016. arXiv:1607.06450.
    """

    _name = "LayerNorm"
    _center = True

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        epsilon: float = 1e-5,
        bias_initializer: InitializerLike | None = None,
        scale_initializer: InitializerLike | None = None,
        elementwise_affine: bool = True,
        *,
        use_scale: bool | None = None,
        use_bias: bool | None = None,
        zero_centered_scale: bool = False,
        param_dtype: DTypeLike | None = None,
        dtype: DTypeLike | None = None,
        implementation: Implementation = None,
        axis_name: Hashable | None = None,
        key: PRNGKeyArray | None = None,
        **unknown: Any,
    ):
        reject_unknown_keywords("LayerNorm", unknown, type(self))
        self._init_trailing(
            normalized_shape,
            implementation=implementation,
            axis_name=axis_name,
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


class RMSNorm(_TrailingNorm):
    r"""Root-mean-square normalization over the trailing ``normalized_shape`` axes.

    .. math:: y = \frac{x}{\sqrt{\mathrm{E}[x^2] + \epsilon}} \gamma \; (+ \beta)

    The mean of ``x**2`` is taken over the last ``len(normalized_shape)`` axes; the input
    is not centred. ``gamma`` (and ``beta``, off by default) hold one value per element of
    ``normalized_shape``. Input has shape ``(*batch, *normalized_shape)`` with any number
    of leading axes (none included); output has the shape and dtype of ``x``. Statistics
    are computed in at least float32. This is ``torch.nn.RMSNorm`` with ``eps=epsilon``.

    Args:
        normalized_shape: int or sequence of ints: the trailing axes to normalize over.
        epsilon: added to the mean square for numerical stability, ``>= 0``.
        scale_initializer: initializer of the stored ``gamma`` (see
            :mod:`eqx_norm.initializers`): an instance, a class with default arguments, a
            ``(key, shape, dtype)`` callable, or an array of exactly ``normalized_shape``;
            None (default) means ones, or zeros with ``zero_centered_scale=True``.
        bias_initializer: initializer of ``beta``, accepted in the same forms, with
            ``use_bias=True``; None (default) means zeros.
        elementwise_affine: False switches off both ``gamma`` and ``beta``. An initializer
            given for a parameter that is switched off is an error, unless it is that
            parameter's default written out (``OneInit(1.0)``, ``ZeroInit``).
        use_scale: False switches off ``gamma`` alone; None (default) follows
            ``elementwise_affine``, and True beside ``elementwise_affine=False`` is an error.
        use_bias: True adds a learnable offset ``beta`` (default False, as in the paper).
        zero_centered_scale: scale by ``1 + gamma`` instead of ``gamma``, with ``gamma``
            initialised to zero by default, so that weight decay pulls towards identity.
            An explicit ``scale_initializer`` initializes ``gamma`` as given: ``OneInit()``
            then means a scale of 2.
        param_dtype: storage dtype of ``gamma``/``beta`` (default float32).
        dtype: output dtype (default: the input's).
        implementation: which code runs the call: None (default), ``"xla"`` or
            ``"kernel"``; see "Implementations" in :mod:`eqx_norm.functional`.
        axis_name: the name of a mapped axis (``shard_map``, ``pmap`` or ``vmap``) across
            which the normalized axes are split (tensor or sequence parallelism): each
            shard holds part of every row and the matching part of ``gamma``/``beta``
            (build the layer with the shard's ``normalized_shape``), and the statistics
            are the whole row's, equal to the unsharded call. Runs the XLA path.
        key: PRNG key, needed only by random initializers.

    Example:
        >>> import jax
        >>> from eqx_norm import RMSNorm
        >>> x = jax.random.normal(jax.random.key(0), (4, 16, 64))
        >>> layer = RMSNorm(64)
        >>> y = layer(x)
        >>> y.shape, layer.beta is None
        ((4, 16, 64), True)
        >>> bool(abs(float((y**2).mean(-1).max()) - 1) < 1e-3)
        True

    References:
        Zhang and Sennrich, "Root Mean Square Layer Normalization", NeurIPS 2019.
        arXiv:1910.07467.
    """

    _name = "RMSNorm"
    _center = False

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        epsilon: float = 1e-6,
        *,
        scale_initializer: InitializerLike | None = None,
        bias_initializer: InitializerLike | None = None,
        elementwise_affine: bool = True,
        use_scale: bool | None = None,
        use_bias: bool = False,
        zero_centered_scale: bool = False,
        param_dtype: DTypeLike | None = None,
        dtype: DTypeLike | None = None,
        implementation: Implementation = None,
        axis_name: Hashable | None = None,
        key: PRNGKeyArray | None = None,
        **unknown: Any,
    ):
        reject_unknown_keywords("RMSNorm", unknown, type(self))
        self._init_trailing(
            normalized_shape,
            implementation=implementation,
            axis_name=axis_name,
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


def trailing_norm(
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
    scale: Array | None = None,
    shift: Array | None = None,
) -> Array | tuple[Array, Array]:
    """The body of :func:`~eqx_norm.functional.layer_norm`, :func:`~eqx_norm.functional.rms_norm`
    (``center=False``) and the layers' ``__call__``: checks (errors name ``layer``), then the
    kernel on ``(rows, D)``, or :func:`eqx_norm._core.normalize`. With ``residual``:
    ``(y, h)``, ``y`` the norm of ``h = x + residual``. ``scale``/``shift`` modulate the
    result per example, ``y * (1 + scale) + shift``, folded into the affine (one pass)."""
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
    batch_ndim = x.ndim - len(shape)
    example = "(" + ", ".join(map(str, (*x.shape[:1], *(1,) * (batch_ndim - 1), *shape))) + ")"
    example = example if batch_ndim else str(shape)
    modulation = [
        check_modulation(m, n, x, example, layer) for m, n in ((scale, "scale"), (shift, "shift"))
    ]
    # their normalized axes made whole (a size-1 one broadcast), the batch axes as given
    modulation = [
        None if m is None else jnp.broadcast_to(m, (*m.shape[:batch_ndim], *shape))
        for m in modulation
    ]
    if axis_name is not None:
        axis_size(axis_name, layer)  # a NameError naming axis_name where it is not mapped
    reason = common_reason(x, masked=mask is not None, out_dtype=out_dtype, axis_name=axis_name)
    if reason is None:
        reason = (
            _kernel.unavailable_reason(x)
            if residual is None
            else _kernel.residual_unavailable_reason(x, residual)
        )
    kernel = use_kernel(check_implementation(implementation), layer, reason)
    d = math.prod(shape)
    compute = _core.compute_dtype(x.dtype if residual is None else residual.dtype)
    if kernel:  # on a free (rows, D) view
        scale, offset = _core.affine(gamma, beta, zero_centered_scale, compute, (d,))
        if any(m is not None for m in modulation):  # (E, D): E examples of contiguous rows
            per_example = [
                None if m is None else _core.per_example(m, x.shape[:batch_ndim], d)
                for m in modulation
            ]
            scale, offset = _core.modulate(scale, offset, *per_example, compute)
        rows = x.reshape(-1, d)
        if residual is None:
            y = _kernel.normalize_rows(rows, scale, offset, epsilon=epsilon, center=center)
            return y.reshape(x.shape)
        y, hidden = _kernel.normalize_rows_residual(
            rows, residual.reshape(-1, d), scale, offset, epsilon=epsilon, center=center
        )
        return y.reshape(x.shape), hidden.reshape(x.shape)
    hidden = None
    if residual is not None:  # the sum, then the norm: XLA fuses them
        hidden = x = _core.add_residual(x, residual)
    if mask is None and axis_name is None:
        # A free (*batch, D) view: one reduced axis, and one example under vmap keeps the
        # batch's shape, not one with a size-1 rows axis (which XLA:CPU reduced 4x slower).
        view, axes, parameter_shape = (*x.shape[:batch_ndim], d), (-1,), (d,)
        modulation = [
            None if m is None else m.reshape(*m.shape[:batch_ndim], d) for m in modulation
        ]
    else:
        view, parameter_shape = x.shape, shape
    scale, offset = _core.affine(gamma, beta, zero_centered_scale, compute, parameter_shape)
    if any(m is not None for m in modulation):
        scale, offset = _core.modulate(scale, offset, *modulation, compute)
    y = _core.normalize(
        x.reshape(view),
        axes,
        scale,
        offset,
        epsilon=epsilon,
        center=center,
        mask=mask,
        axis_name=axis_name,
    )
    y = y.astype(out_dtype).reshape(x.shape)
    return y if residual is None else (y, hidden)
