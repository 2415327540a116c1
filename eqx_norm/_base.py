"""What every eqx_norm layer shares as a module: its parameters, its config and their set-up.

``AffineNorm`` holds the fields common to all layers (``gamma``, ``beta``, ``epsilon``,
``zero_centered_scale``, ``dtype``) and builds them from the constructor's arguments;
``TrailingAxesNorm`` adds ``normalized_shape`` and the call shared by LayerNorm and RMSNorm.
"""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._core import DTypeLike, check_epsilon, optional_dtype, trailing_normalize
from .initializers import InitializerLike, OneInit, ZeroInit, make_parameter


def make_affine_parameters(
    shape: tuple[int, ...],
    *,
    scale_initializer: InitializerLike,
    bias_initializer: InitializerLike,
    use_scale: bool,
    use_bias: bool,
    zero_centered_scale: bool,
    param_dtype: DTypeLike | None,
    key: PRNGKeyArray | None,
) -> tuple[Array | None, Array | None]:
    """``(gamma, beta)`` of ``shape`` in ``param_dtype`` (float32 if None), None where off."""
    param_dtype = optional_dtype(param_dtype, "param_dtype") or jnp.dtype(jnp.float32)
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


class AffineNorm(eqx.Module):
    """Base of every layer: learnable ``gamma``/``beta`` (None when off) and shared config."""

    gamma: Float[Array, "..."] | None
    beta: Float[Array, "..."] | None
    epsilon: float = eqx.field(static=True)
    zero_centered_scale: bool = eqx.field(static=True)
    dtype: np.dtype | None = eqx.field(static=True)

    def _init_affine(
        self,
        parameter_shape: tuple[int, ...],
        *,
        epsilon: float,
        scale_initializer: InitializerLike,
        bias_initializer: InitializerLike,
        elementwise_affine: bool,
        use_scale: bool,
        use_bias: bool,
        zero_centered_scale: bool,
        param_dtype: DTypeLike | None,
        dtype: DTypeLike | None,
        key: PRNGKeyArray | None,
    ) -> None:
        """Check and set the shared fields; called once from a subclass's ``__init__``."""
        self.epsilon = check_epsilon(epsilon)
        self.zero_centered_scale = bool(zero_centered_scale)
        self.dtype = optional_dtype(dtype, "dtype")
        self.gamma, self.beta = make_affine_parameters(
            parameter_shape,
            scale_initializer=scale_initializer,
            bias_initializer=bias_initializer,
            use_scale=elementwise_affine and use_scale,
            use_bias=elementwise_affine and use_bias,
            zero_centered_scale=self.zero_centered_scale,
            param_dtype=param_dtype,
            key=key,
        )

    @property
    def elementwise_affine(self) -> bool:
        """Whether the layer has any learnable parameter."""
        return self.gamma is not None or self.beta is not None


class TrailingAxesNorm(AffineNorm):
    """Base of LayerNorm and RMSNorm: statistics over the trailing ``normalized_shape`` axes."""

    normalized_shape: tuple[int, ...] = eqx.field(static=True)
    _center: ClassVar[bool] = True

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
        layer = type(self).__name__
        with jax.named_scope(f"eqx_norm.{layer}"):
            return trailing_normalize(
                layer,
                x,
                self.normalized_shape,
                self.gamma,
                self.beta,
                epsilon=self.epsilon,
                mask=mask,
                zero_centered_scale=self.zero_centered_scale,
                dtype=self.dtype,
                center=self._center,
            )
