"""LayerNorm: normalization over the trailing axes of each example."""

from __future__ import annotations

from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._core import (
    DTypeLike,
    canonical_shape,
    check_epsilon,
    check_floating,
    check_mask,
    check_trailing_shape,
    normalize,
    optional_dtype,
)
from .initializers import InitializerLike, OneInit, ZeroInit, make_parameter


def make_affine_parameters(
    shape: tuple[int, ...],
    *,
    scale_initializer: InitializerLike,
    bias_initializer: InitializerLike,
    use_scale: bool,
    use_bias: bool,
    zero_centered_scale: bool,
    param_dtype: DTypeLike,
    key: PRNGKeyArray | None,
) -> tuple[Array | None, Array | None]:
    """``(gamma, beta)`` of ``shape``, each None where switched off. Shared by every layer."""
    # `is`/isinstance first: `array == OneInit()` would compare elementwise
    if zero_centered_scale and (
        scale_initializer is OneInit
        or (isinstance(scale_initializer, OneInit) and scale_initializer == OneInit())
    ):
        scale_initializer = ZeroInit()  # the default identity scale, stored as 1 + 0
    scale_key, bias_key = (None, None) if key is None else jax.random.split(key)
    gamma = beta = None
    if use_scale:
        gamma = make_parameter(
            scale_initializer,
            argument="scale_initializer",
            key=scale_key,
            shape=shape,
            dtype=param_dtype,
        )
    if use_bias:
        beta = make_parameter(
            bias_initializer,
            argument="bias_initializer",
            key=bias_key,
            shape=shape,
            dtype=param_dtype,
        )
    return gamma, beta


def resolve_param_dtype(param_dtype: DTypeLike | None) -> np.dtype:
    """The storage dtype of the parameters: float32 unless asked otherwise."""
    return optional_dtype(param_dtype, "param_dtype") or jnp.dtype(jnp.float32)


class LayerNorm(eqx.Module):
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
            or an array of exactly ``normalized_shape``.
        scale_initializer: initializer of ``gamma``, accepted in the same forms.
        elementwise_affine: False switches off both ``gamma`` and ``beta``.
        use_scale: False switches off ``gamma`` alone.
        use_bias: False switches off ``beta`` alone.
        zero_centered_scale: scale by ``1 + gamma`` instead of ``gamma``, with ``gamma``
            initialised to zero by default, so that weight decay pulls towards identity.
        param_dtype: storage dtype of ``gamma``/``beta`` (default float32).
        dtype: output dtype (default: the input's).
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

    gamma: Float[Array, "*normalized_shape"] | None
    beta: Float[Array, "*normalized_shape"] | None
    normalized_shape: tuple[int, ...] = eqx.field(static=True)
    epsilon: float = eqx.field(static=True)
    zero_centered_scale: bool = eqx.field(static=True)
    dtype: np.dtype | None = eqx.field(static=True)

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        epsilon: float = 1e-5,
        bias_initializer: InitializerLike = ZeroInit,
        scale_initializer: InitializerLike = OneInit(value=1.0),
        elementwise_affine: bool = True,
        *,
        use_scale: bool = True,
        use_bias: bool = True,
        zero_centered_scale: bool = False,
        param_dtype: DTypeLike | None = None,
        dtype: DTypeLike | None = None,
        key: PRNGKeyArray | None = None,
    ):
        self.normalized_shape = canonical_shape(normalized_shape, "normalized_shape")
        self.epsilon = check_epsilon(epsilon)
        self.zero_centered_scale = bool(zero_centered_scale)
        self.dtype = optional_dtype(dtype, "dtype")
        self.gamma, self.beta = make_affine_parameters(
            self.normalized_shape,
            scale_initializer=scale_initializer,
            bias_initializer=bias_initializer,
            use_scale=elementwise_affine and use_scale,
            use_bias=elementwise_affine and use_bias,
            zero_centered_scale=self.zero_centered_scale,
            param_dtype=resolve_param_dtype(param_dtype),
            key=key,
        )

    @property
    def elementwise_affine(self) -> bool:
        """Whether the layer has any learnable parameter."""
        return self.gamma is not None or self.beta is not None

    def __call__(
        self,
        x: Float[Array, "*batch *normalized_shape"],
        *,
        mask: Bool[Array, "..."] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "*batch *normalized_shape"]:
        """Normalize ``x`` of shape ``(*batch, *normalized_shape)``.

        Args:
            x: floating-point input; integer and boolean inputs are an error.
            mask: optional boolean array of x's rank (size-1 axes broadcast). False
                elements take no part in the statistics and their output is ``beta``
                (0 without ``beta``); a fully masked example gives ``beta``, not NaN.
            key: ignored; accepted so the layer fits ``eqx.nn.Sequential``.

        Returns:
            An array of x's shape, in x's dtype (or ``dtype`` if set).
        """
        del key
        with jax.named_scope("eqx_norm.LayerNorm"):
            x = check_floating(x, "LayerNorm")
            axes = check_trailing_shape(x.shape, self.normalized_shape, "LayerNorm")
            return normalize(
                x,
                axes,
                self.gamma,
                self.beta,
                epsilon=self.epsilon,
                mask=check_mask(mask, x.shape, "LayerNorm"),
                zero_centered_scale=self.zero_centered_scale,
                dtype=self.dtype,
            )
