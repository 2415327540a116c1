"""What every eqx_norm layer holds: ``gamma``/``beta`` and the config they share.

``AffineNorm`` only stores fields and builds them in ``__init__``; each layer's
``__call__`` is one call of its function's body in :mod:`eqx_norm.functional`, given the
layer's name so that errors speak of the layer.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from ._checks import DTypeLike, check_epsilon, check_flag, optional_dtype
from .initializers import InitializerLike, OneInit, ZeroInit, constant_value, make_parameter


class _NoState:
    """The default of ``__call__``'s ``state``: no state given, return ``y`` alone."""

    def __repr__(self) -> str:
        return "<no state>"


NO_STATE: Any = _NoState()


def with_state(y: Array, state: Any) -> Any:
    """``y``, or ``(y, state)`` when a state was passed (equinox's stateful call form)."""
    return y if state is NO_STATE else (y, state)


def _split_key(key: Any) -> tuple[Any, Any]:
    """Two keys from ``key``, or a TypeError naming ``key``."""
    try:
        return tuple(jax.random.split(key))
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`key` must be a PRNG key such as `jax.random.key(0)`, got {key!r:.80} ({error})."
        ) from None


class AffineNorm(eqx.Module):
    """Learnable ``gamma``/``beta`` (None when switched off) and the shared static config."""

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
        scale_initializer: InitializerLike | None,
        bias_initializer: InitializerLike | None,
        elementwise_affine: bool,
        use_scale: bool | None,
        use_bias: bool | None,
        zero_centered_scale: bool,
        param_dtype: DTypeLike | None,
        dtype: DTypeLike | None,
        key: PRNGKeyArray | None,
    ) -> None:
        """Check and set the shared fields; called once from a layer's ``__init__``.

        ``scale_initializer`` initializes the stored ``gamma``, whatever it is; None means
        ones, or zeros under ``zero_centered_scale`` (where the scale is ``1 + gamma``).
        ``bias_initializer`` None means zeros. The switches follow :func:`affine_switches`.
        """
        self.epsilon = check_epsilon(epsilon)
        self.zero_centered_scale = check_flag(zero_centered_scale, "zero_centered_scale")
        self.dtype = optional_dtype(dtype, "dtype")
        self.gamma, self.beta = affine_parameters(
            parameter_shape,
            scale_initializer=scale_initializer,
            bias_initializer=bias_initializer,
            elementwise_affine=elementwise_affine,
            use_scale=use_scale,
            use_bias=use_bias,
            default_scale=0.0 if self.zero_centered_scale else 1.0,
            param_dtype=param_dtype,
            key=key,
        )

    @property
    def elementwise_affine(self) -> bool:
        """Whether the layer has any learnable parameter."""
        return self.gamma is not None or self.beta is not None


def affine_parameters(
    shape: tuple[int, ...],
    *,
    scale_initializer: InitializerLike | None,
    bias_initializer: InitializerLike | None,
    elementwise_affine: bool,
    use_scale: bool | None,
    use_bias: bool | None,
    default_scale: float,
    param_dtype: DTypeLike | None,
    key: PRNGKeyArray | None,
) -> tuple[Array | None, Array | None]:
    """``(gamma, beta)`` of ``shape`` in ``param_dtype`` (default float32), each None where
    :func:`affine_switches` switches it off. ``scale_initializer`` None means the constant
    ``default_scale`` (ones, or zeros for a zero-centred scale), ``bias_initializer`` None
    zeros; errors name the initializer argument."""
    param_dtype = optional_dtype(param_dtype, "param_dtype") or np.dtype(np.float32)
    has_scale, has_bias = affine_switches(
        elementwise_affine=elementwise_affine,
        use_scale=use_scale,
        use_bias=use_bias,
        scale_initializer=scale_initializer,
        bias_initializer=bias_initializer,
        default_scale=default_scale,
    )
    if scale_initializer is None:
        scale_initializer = ZeroInit() if default_scale == 0 else OneInit()
    if bias_initializer is None:
        bias_initializer = ZeroInit()
    scale_key, bias_key = (None, None) if key is None else _split_key(key)
    gamma = beta = None
    if has_scale:
        gamma = make_parameter(
            scale_initializer,
            argument="scale_initializer",
            key=scale_key,
            shape=shape,
            dtype=param_dtype,
        )
    if has_bias:
        beta = make_parameter(
            bias_initializer,
            argument="bias_initializer",
            key=bias_key,
            shape=shape,
            dtype=param_dtype,
        )
    return gamma, beta


def affine_switches(
    *,
    elementwise_affine: bool,
    use_scale: bool | None,
    use_bias: bool | None,
    scale_initializer: InitializerLike | None,
    bias_initializer: InitializerLike | None,
    default_scale: float,
) -> tuple[bool, bool]:
    """``(has gamma, has beta)`` from the switches, or an error naming the two arguments
    that contradict.

    ``use_scale``/``use_bias`` None follow ``elementwise_affine``; True beside
    ``elementwise_affine=False`` is an error. An initializer for a parameter that is
    switched off is an error too (it would be dropped silently), as in haiku, unless it is
    that parameter's default written out (the seed's ``OneInit(value=1.0)`` or ``ZeroInit``,
    class or instance, or ``Constant`` of the same value): the same value means the same
    thing whichever object gives it.
    """
    affine = check_flag(elementwise_affine, "elementwise_affine")
    flags = {}
    for switch, value, parameter in (
        ("use_scale", use_scale, "gamma"),
        ("use_bias", use_bias, "beta"),
    ):
        if value is None:
            flags[switch] = affine
            continue
        flags[switch] = check_flag(value, switch)
        if flags[switch] and not affine:
            raise ValueError(
                f"`elementwise_affine=False` switches off `gamma` and `beta`, but `{switch}=True` "
                f"asks for `{parameter}`: they contradict. Drop `{switch}`, or set "
                "`elementwise_affine=True`."
            )
    for argument, initializer, switch, default in (
        ("scale_initializer", scale_initializer, "use_scale", default_scale),
        ("bias_initializer", bias_initializer, "use_bias", 0.0),
    ):
        if initializer is None or flags[switch] or constant_value(initializer) == default:
            continue
        off = switch if affine else "elementwise_affine"
        raise ValueError(
            f"Cannot set `{argument}` if `{off}=False`: the parameter it initializes does not "
            f"exist. Drop `{argument}`, or set `{off}=True`."
        )
    return flags["use_scale"], flags["use_bias"]
