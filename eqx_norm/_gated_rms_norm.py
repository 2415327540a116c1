"""The gated RMSNorm of Mamba-2: RMSNorm with a SiLU gate, before or after the norm, over
the whole feature axis or groups of it.

The norm itself is :func:`eqx_norm._layer_norm.trailing_norm`'s (the kernel where it
serves, else the core); the gate ``silu(z)`` is one elementwise product beside it, which
XLA fuses with the norm's input (gate first) or its output (norm first).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
from jaxtyping import Array, Float, PRNGKeyArray

from . import _core
from ._base import NO_STATE, AffineNorm, with_state
from ._checks import (
    DTypeLike,
    Implementation,
    canonical_shape,
    check_flag,
    check_floating,
    check_implementation,
    check_parameter,
    check_residual,
    check_trailing_shape,
    optional_dtype,
    positive_int,
    reject_unknown_keywords,
)
from ._layer_norm import trailing_norm
from .initializers import InitializerLike


class GatedRMSNorm(AffineNorm):
    r"""RMSNorm with a SiLU gate, as Mamba-2 ends each block (``RMSNormGated``).

    .. math::
        y = \mathrm{RMSNorm}(x \cdot \mathrm{silu}(z))\,\gamma \quad\text{or, normalizing}
        \text{ before the gate,}\quad y = \mathrm{RMSNorm}(x)\,\gamma \cdot \mathrm{silu}(z)

    where ``RMSNorm(u) = u / sqrt(mean(u^2) + epsilon)`` over the trailing
    ``normalized_shape`` axes, or over each run of ``group_size`` consecutive features of
    them (Mamba-2's ``ngroups``: ``group_size = d_inner // ngroups``). ``gamma`` (and
    ``beta``, off by default) hold one value per feature. Input and gate have shape
    ``(*batch, *normalized_shape)``; the output has x's shape and dtype. The gate is
    applied in float32 (at least), and statistics are float32.

    Args:
        normalized_shape: int or sequence of ints: the trailing axes to normalize over.
        epsilon: added to the mean square, ``>= 0`` (Mamba-2's 1e-5 by default).
        group_size: normalize each run of ``group_size`` features (of the flattened
            ``normalized_shape``) on its own; None (default) normalizes them all together.
            Must divide the number of features.
        norm_before_gate: False (default, Mamba-2's blocks): gate, then normalize. True:
            normalize, then gate (the default of mamba_ssm's ``RMSNormGated`` class).
        scale_initializer: initializer of ``gamma`` (an initializer, an array or a
            callable, as :class:`RMSNorm`'s); None (default) means ones.
        bias_initializer: initializer of ``beta``, with ``use_bias=True``; None means zeros.
        elementwise_affine: False switches off both ``gamma`` and ``beta``.
        use_scale: False switches off ``gamma`` alone; None (default) follows
            ``elementwise_affine``.
        use_bias: True adds a learnable ``beta`` (default False, as Mamba-2).
        zero_centered_scale: scale by ``1 + gamma`` instead of ``gamma``.
        param_dtype: storage dtype of ``gamma``/``beta`` (default float32).
        dtype: output dtype (default: the input's).
        implementation: which code runs the call: None (default), ``"xla"`` or
            ``"kernel"``; see "Implementations" in :mod:`eqx_norm.functional`.
        key: PRNG key, needed only by random initializers.

    Example:
        >>> import jax
        >>> from eqx_norm import GatedRMSNorm
        >>> x, z = jax.random.normal(jax.random.key(0), (2, 8, 2, 64))
        >>> norm = GatedRMSNorm(64, group_size=16)  # Mamba-2 with ngroups = 4
        >>> norm(x, gate=z).shape
        (8, 2, 64)

    References:
        Dao and Gu, "Transformers are SSMs: Generalized Models and Efficient Algorithms
        Through Structured State Space Duality" (Mamba-2), ICML 2024. arXiv:2405.21060.
    """

    normalized_shape: tuple[int, ...] = eqx.field(static=True)
    group_size: int | None = eqx.field(static=True)
    norm_before_gate: bool = eqx.field(static=True)
    implementation: Implementation = eqx.field(static=True)

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        epsilon: float = 1e-5,
        *,
        group_size: int | None = None,
        norm_before_gate: bool = False,
        scale_initializer: InitializerLike | None = None,
        bias_initializer: InitializerLike | None = None,
        elementwise_affine: bool = True,
        use_scale: bool | None = None,
        use_bias: bool = False,
        zero_centered_scale: bool = False,
        param_dtype: DTypeLike | None = None,
        dtype: DTypeLike | None = None,
        implementation: Implementation = None,
        key: PRNGKeyArray | None = None,
        **unknown: Any,
    ):
        reject_unknown_keywords("GatedRMSNorm", unknown, type(self))
        self.normalized_shape = canonical_shape(normalized_shape, "normalized_shape")
        self.group_size = check_group_size(group_size, self.normalized_shape, "GatedRMSNorm")
        self.norm_before_gate = check_flag(norm_before_gate, "norm_before_gate")
        self.implementation = check_implementation(implementation)
        self._init_affine(
            self.normalized_shape,
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

    def __call__(
        self,
        x: Float[Array, "*shape"],
        state: Any = NO_STATE,
        *,
        gate: Float[Array, "*shape"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Any:
        """Normalize ``x`` of shape ``(*batch, *normalized_shape)``, gated by ``gate``.

        Args:
            x: floating-point input.
            state: optional, returned unchanged (equinox's stateful call form).
            gate: ``z``, a floating array of x's shape; None gives the (grouped) RMSNorm
                alone.
            key: ignored, as in equinox.

        Returns:
            An array of x's shape, in x's dtype (or ``dtype`` if set); ``(y, state)`` when
            ``state`` is given.
        """
        del key
        with jax.named_scope("eqx_norm.GatedRMSNorm"):
            y = gated_rms_norm(
                "GatedRMSNorm",
                x,
                gate,
                self.normalized_shape,
                self.gamma,
                self.beta,
                epsilon=self.epsilon,
                group_size=self.group_size,
                norm_before_gate=self.norm_before_gate,
                zero_centered_scale=self.zero_centered_scale,
                dtype=self.dtype,
                implementation=self.implementation,
            )
        return with_state(y, state)


def check_group_size(group_size: Any, shape: tuple[int, ...], layer: str) -> int | None:
    """None, or a positive ``group_size`` that divides the number of features."""
    if group_size is None:
        return None
    group_size = positive_int(group_size, "group_size")
    features = math.prod(shape)
    if features % group_size:
        raise ValueError(
            f"{layer}: `group_size`={group_size} must divide the {features} features of "
            f"normalized_shape={shape} (groups hold equal numbers of features); choose a "
            f"divisor of {features}, e.g. d_inner // ngroups."
        )
    return group_size


def gated_rms_norm(
    layer: str,
    x: Array,
    gate: Array | None,
    normalized_shape: int | Sequence[int],
    gamma: Array | None,
    beta: Array | None,
    *,
    epsilon: float,
    group_size: int | None,
    norm_before_gate: bool,
    zero_centered_scale: bool,
    dtype: DTypeLike | None,
    implementation: Implementation,
) -> Array:
    """The body of :func:`~eqx_norm.functional.gated_rms_norm` and the layer's call
    (errors name ``layer``)."""
    shape = canonical_shape(normalized_shape, "normalized_shape")
    x = check_floating(x, layer)
    check_trailing_shape(x.shape, shape, layer)
    group_size = check_group_size(group_size, shape, layer)
    norm_before_gate = check_flag(norm_before_gate, "norm_before_gate")
    out_dtype = optional_dtype(dtype, "dtype") or x.dtype
    compute = _core.compute_dtype(x.dtype)
    if gate is not None:
        gate = check_residual(gate, x, layer, "gate")
        gate = jax.nn.silu(gate.astype(_core.compute_dtype(gate.dtype)).astype(compute))
    u = x.astype(compute)
    if gate is not None and not norm_before_gate:
        u = u * gate
    d = math.prod(shape)
    if group_size is None or group_size == d:  # gamma and beta in the norm's own pass
        y = trailing_norm(
            layer, u, shape, gamma, beta, epsilon=epsilon, mask=None,
            zero_centered_scale=zero_centered_scale, dtype=None,
            implementation=implementation, center=False,
        )  # fmt: skip
    else:  # each group a row of its own; gamma and beta follow, where XLA fuses them
        gamma = check_parameter(gamma, shape, "gamma", layer)
        beta = check_parameter(beta, shape, "beta", layer)
        batch = x.shape[: x.ndim - len(shape)]
        grouped = u.reshape(*batch, d // group_size, group_size)
        y = trailing_norm(
            layer, grouped, group_size, None, None, epsilon=epsilon, mask=None,
            zero_centered_scale=False, dtype=None, implementation=implementation,
            center=False,
        ).reshape(*batch, d)  # fmt: skip
        scale, offset = _core.affine(gamma, beta, zero_centered_scale, compute, (d,))
        y = y if scale is None else y * _core.expand(scale, y.ndim)
        y = y if offset is None else y + _core.expand(offset, y.ndim)
        y = y.reshape(x.shape)
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.astype(out_dtype)
