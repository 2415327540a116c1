"""DyT (Dynamic Tanh) and Derf (Dynamic erf): elementwise drop-ins for LayerNorm, with no
statistics."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from . import _core
from ._base import NO_STATE, affine_parameters, with_state
from ._checks import (
    DTypeLike,
    canonical_shape,
    check_floating,
    check_mask,
    check_parameter,
    check_residual,
    check_trailing_shape,
    optional_dtype,
    reject_unknown_keywords,
)
from .initializers import InitializerLike


class _Pointwise(eqx.Module):
    """What DyT and Derf share: ``gamma``/``beta`` over the trailing ``normalized_shape``, an
    output ``dtype``, and the call, which applies Derf's ``erf(alpha * x + shift)`` where
    the subclass has a ``shift`` (``_shift``), else DyT's ``tanh(alpha * x)``."""

    alpha: eqx.AbstractVar[Float[Array, ""]]
    gamma: eqx.AbstractVar[Float[Array, "..."] | None]
    beta: eqx.AbstractVar[Float[Array, "..."] | None]
    normalized_shape: eqx.AbstractVar[tuple[int, ...]]
    dtype: eqx.AbstractVar[np.dtype | None]

    def _shift(self) -> Array | None:
        """The shift inside Derf's erf; None for DyT, whose function has none."""
        return None

    @property
    def elementwise_affine(self) -> bool:
        """Whether the layer has ``gamma`` or ``beta``."""
        return self.gamma is not None or self.beta is not None

    def __call__(
        self,
        x: Float[Array, "*shape"],
        state: Any = NO_STATE,
        *,
        mask: Bool[Array, "*shape"] | None = None,
        residual: Float[Array, "*shape"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """Apply the layer to ``x`` of shape ``(*batch, *normalized_shape)``: DyT's ``gamma *
        tanh(alpha * x) + beta``, Derf's ``gamma * erf(alpha * x + shift) + beta``.

        Args:
            x: floating-point input; integer and boolean inputs are an error.
            state: optional, returned unchanged: ``layer(x, state)`` gives ``(y, state)``,
                equinox's call form.
            mask: optional boolean array of x's rank (size-1 axes broadcast); where False
                the output is ``beta`` (0 without ``beta``), as a masked LayerNorm's.
            residual: optional floating array of x's shape: the layer is applied to
                ``h = x + residual`` (added in float32, stored in residual's dtype) and
                returns ``(y, h)``, as LayerNorm's ``residual``.
            key: ignored, as in equinox.

        Returns:
            An array of x's shape, in x's dtype (or ``dtype`` if set); ``(y, h)`` with
            ``residual``; either paired with ``state`` when it is given.
        """
        del key
        name, shift = type(self).__name__, self._shift()
        with jax.named_scope(f"eqx_norm.{name}"):
            y = apply_dyt(
                name,
                x,
                self.normalized_shape,
                self.alpha,
                self.gamma,
                self.beta,
                erf=shift is not None,
                shift=shift,
                mask=mask,
                dtype=self.dtype,
                residual=residual,
            )
        return with_state(y, state)


class DyT(_Pointwise):
    r"""Dynamic Tanh: ``gamma * tanh(alpha * x) + beta``, elementwise, in place of a norm.

    .. math:: y = \gamma \tanh(\alpha x) + \beta

    ``alpha`` is one learnable scalar (a ``()`` array), initialised to ``alpha_init``;
    ``gamma``/``beta`` hold one value per element of the trailing ``normalized_shape``, as
    a :class:`LayerNorm`'s. There are no statistics: each element is squashed on its own,
    so the layer costs one elementwise pass and needs no reduction. Input has shape
    ``(*batch, *normalized_shape)``; output has x's shape and dtype. Computed in at least
    float32 (bf16/fp16 inputs are upcast). The call forms are LayerNorm's (``state``,
    ``mask``, ``residual``, ``key``), so it drops in wherever a LayerNorm stands.

    Args:
        normalized_shape: int or sequence of ints: the trailing axes ``gamma``/``beta``
            cover.
        alpha_init: initial value of ``alpha``, a finite float (the paper's default 0.5;
            it suggests smaller values for wider or deeper models).
        scale_initializer: initializer of ``gamma`` (see :mod:`eqx_norm.initializers`):
            an instance, a class with default arguments, a ``(key, shape, dtype)``
            callable, or an array of exactly ``normalized_shape``; None (default) means
            ones.
        bias_initializer: initializer of ``beta``, accepted in the same forms; None
            (default) means zeros.
        elementwise_affine: False switches off both ``gamma`` and ``beta`` (``alpha``
            stays). An initializer given for a parameter that is switched off is an error,
            unless it is that parameter's default written out (``OneInit(1.0)``,
            ``ZeroInit``).
        use_scale: False switches off ``gamma`` alone; None (default) follows
            ``elementwise_affine``, and True beside ``elementwise_affine=False`` is an error.
        use_bias: False switches off ``beta`` alone; None (default) follows
            ``elementwise_affine``, and True beside ``elementwise_affine=False`` is an error.
        param_dtype: storage dtype of ``alpha``/``gamma``/``beta`` (default float32).
        dtype: output dtype (default: the input's).
        key: PRNG key, needed only by random initializers.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm import DyT
        >>> x = jax.random.normal(jax.random.key(0), (4, 16, 64))
        >>> layer = DyT(64)
        >>> layer.alpha.shape, layer.gamma.shape
        ((), (64,))
        >>> bool(jnp.allclose(layer(x), jnp.tanh(0.5 * x)))
        True

    References:
        Zhu, Chen, He, LeCun and Liu, "Transformers without Normalization", CVPR 2025.
        arXiv:2503.10622.
    """

    alpha: Float[Array, ""]
    gamma: Float[Array, "..."] | None
    beta: Float[Array, "..."] | None
    normalized_shape: tuple[int, ...] = eqx.field(static=True)
    dtype: np.dtype | None = eqx.field(static=True)

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        *,
        alpha_init: float = 0.5,
        scale_initializer: InitializerLike | None = None,
        bias_initializer: InitializerLike | None = None,
        elementwise_affine: bool = True,
        use_scale: bool | None = None,
        use_bias: bool | None = None,
        param_dtype: DTypeLike | None = None,
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray | None = None,
        **unknown: Any,
    ):
        reject_unknown_keywords("DyT", unknown, type(self))
        self.normalized_shape = canonical_shape(normalized_shape, "normalized_shape")
        self.dtype = optional_dtype(dtype, "dtype")
        (self.alpha,), self.gamma, self.beta = _pointwise_parameters(
            "DyT",
            self.normalized_shape,
            {"alpha_init": alpha_init},
            scale_initializer=scale_initializer,
            bias_initializer=bias_initializer,
            elementwise_affine=elementwise_affine,
            use_scale=use_scale,
            use_bias=use_bias,
            param_dtype=param_dtype,
            key=key,
        )


class Derf(_Pointwise):
    r"""Dynamic erf: ``gamma * erf(alpha * x + shift) + beta``, elementwise, in place of a
    norm; DyT's successor by the same group.

    .. math:: y = \gamma\, \mathrm{erf}(\alpha x + s) + \beta

    ``alpha`` and ``shift`` (the paper's ``s``) are learnable scalars (``()`` arrays),
    initialised to ``alpha_init`` and ``shift_init``; ``gamma``/``beta`` hold one value per
    element of the trailing ``normalized_shape``, as a :class:`LayerNorm`'s. There are no
    statistics: one elementwise pass, no reduction. Input has shape ``(*batch,
    *normalized_shape)``; output has x's shape and dtype. Computed in at least float32
    (bf16/fp16 inputs are upcast). The call forms are LayerNorm's and :class:`DyT`'s
    (``state``, ``mask``, ``residual``, ``key``).

    Args:
        normalized_shape: int or sequence of ints: the trailing axes ``gamma``/``beta``
            cover.
        alpha_init: initial value of ``alpha``, a finite float (the paper's default 0.5).
        shift_init: initial value of ``shift``, a finite float (the paper's default 0).
        scale_initializer: initializer of ``gamma``, in every form :class:`DyT` takes;
            None (default) means ones.
        bias_initializer: initializer of ``beta``; None (default) means zeros.
        elementwise_affine: False switches off both ``gamma`` and ``beta`` (``alpha`` and
            ``shift`` stay).
        use_scale: False switches off ``gamma`` alone; None (default) follows
            ``elementwise_affine``.
        use_bias: False switches off ``beta`` alone; None (default) follows
            ``elementwise_affine``.
        param_dtype: storage dtype of the parameters (default float32).
        dtype: output dtype (default: the input's).
        key: PRNG key, needed only by random initializers.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from eqx_norm import Derf
        >>> x = jax.random.normal(jax.random.key(0), (4, 16, 64))
        >>> layer = Derf(64)
        >>> layer.alpha.shape, layer.shift.shape, layer.gamma.shape
        ((), (), (64,))
        >>> bool(jnp.allclose(layer(x), jax.scipy.special.erf(0.5 * x)))
        True

    References:
        Chen, Lu, Zhu, Sun and Liu, "Stronger Normalization-Free Transformers", 2025.
        arXiv:2512.10938.
    """

    alpha: Float[Array, ""]
    shift: Float[Array, ""]
    gamma: Float[Array, "..."] | None
    beta: Float[Array, "..."] | None
    normalized_shape: tuple[int, ...] = eqx.field(static=True)
    dtype: np.dtype | None = eqx.field(static=True)

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        *,
        alpha_init: float = 0.5,
        shift_init: float = 0.0,
        scale_initializer: InitializerLike | None = None,
        bias_initializer: InitializerLike | None = None,
        elementwise_affine: bool = True,
        use_scale: bool | None = None,
        use_bias: bool | None = None,
        param_dtype: DTypeLike | None = None,
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray | None = None,
        **unknown: Any,
    ):
        reject_unknown_keywords("Derf", unknown, type(self))
        self.normalized_shape = canonical_shape(normalized_shape, "normalized_shape")
        self.dtype = optional_dtype(dtype, "dtype")
        (self.alpha, self.shift), self.gamma, self.beta = _pointwise_parameters(
            "Derf",
            self.normalized_shape,
            {"alpha_init": alpha_init, "shift_init": shift_init},
            scale_initializer=scale_initializer,
            bias_initializer=bias_initializer,
            elementwise_affine=elementwise_affine,
            use_scale=use_scale,
            use_bias=use_bias,
            param_dtype=param_dtype,
            key=key,
        )

    def _shift(self) -> Array:
        return self.shift


def _pointwise_parameters(
    layer: str,
    shape: tuple[int, ...],
    scalars: dict[str, float],
    *,
    scale_initializer: InitializerLike | None,
    bias_initializer: InitializerLike | None,
    elementwise_affine: bool,
    use_scale: bool | None,
    use_bias: bool | None,
    param_dtype: DTypeLike | None,
    key: PRNGKeyArray | None,
) -> tuple[tuple[Array, ...], Array | None, Array | None]:
    """DyT's and Derf's parameters: the learnable scalars from their ``*_init`` values
    (checked, errors naming ``layer`` and the argument), then ``gamma``/``beta``."""
    param_dtype = optional_dtype(param_dtype, "param_dtype") or np.dtype(np.float32)
    values = []
    for argument, value in scalars.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise TypeError(
                f"{layer}: `{argument}` must be a real number, got {type(value).__name__} "
                f"{value!r:.80}."
            )
        if not math.isfinite(value):
            raise ValueError(f"{layer}: `{argument}` must be finite, got {value}.")
        values.append(jnp.asarray(value, param_dtype))
    gamma, beta = affine_parameters(
        shape,
        scale_initializer=scale_initializer,
        bias_initializer=bias_initializer,
        elementwise_affine=elementwise_affine,
        use_scale=use_scale,
        use_bias=use_bias,
        default_scale=1.0,
        param_dtype=param_dtype,
        key=key,
    )
    return tuple(values), gamma, beta


def apply_dyt(
    layer: str,
    x: Array,
    normalized_shape: int | Sequence[int],
    alpha: Array,
    gamma: Array | None,
    beta: Array | None,
    *,
    erf: bool = False,
    shift: Array | None = None,
    mask: Array | None,
    dtype: DTypeLike | None,
    residual: Array | None,
) -> Array | tuple[Array, Array]:
    """The body of :func:`~eqx_norm.functional.dyt`, :func:`~eqx_norm.functional.derf` and
    the layers' ``__call__``: checks (errors name ``layer``), then ``gamma * tanh(alpha *
    x) + beta``, or with ``erf`` (Derf) ``gamma * erf(alpha * x + shift) + beta``, in at
    least float32."""
    shape = canonical_shape(normalized_shape, "normalized_shape")
    x = check_floating(x, layer)
    check_trailing_shape(x.shape, shape, layer)
    residual = check_residual(residual, x, layer)
    if alpha is None:
        raise TypeError(f"{layer}: `alpha` must be a floating scalar array, got None.")
    alpha = check_parameter(alpha, (), "alpha", layer)
    if erf:
        if shift is None:
            raise TypeError(f"{layer}: `shift` must be a floating scalar array, got None.")
        shift = check_parameter(shift, (), "shift", layer)
    gamma = check_parameter(gamma, shape, "gamma", layer)
    beta = check_parameter(beta, shape, "beta", layer)
    mask = check_mask(mask, x.shape, layer)
    out_dtype = optional_dtype(dtype, "dtype") or x.dtype
    hidden = None
    if residual is not None:
        hidden = x = _core.add_residual(x, residual)
    compute = _core.compute_dtype(x.dtype)
    full = (1,) * (x.ndim - len(shape)) + shape  # explicit broadcast against x
    scale, offset = _core.affine(gamma, beta, False, compute, full)
    pre = alpha.astype(compute) * x.astype(compute)
    y = jax.scipy.special.erf(pre + shift.astype(compute)) if erf else jnp.tanh(pre)
    if scale is not None:
        y = y * scale
    if offset is not None:
        y = y + offset
    if mask is not None:
        y = jnp.where(mask, y, 0 if offset is None else offset)
    y = y.astype(out_dtype)
    return y if residual is None else (y, hidden)
