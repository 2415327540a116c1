"""``from_equinox``: swap equinox's normalization layers in a model for eqx_norm's."""

from __future__ import annotations

from typing import Any, TypeVar

import equinox as eqx
import jax

from ._checks import Implementation
from ._group_norm import GroupNorm
from ._layer_norm import LayerNorm, RMSNorm

T = TypeVar("T")

_CONVERTED = (eqx.nn.LayerNorm, eqx.nn.RMSNorm, eqx.nn.GroupNorm)


def _affine(layer: Any) -> dict[str, Any]:
    """The parameters of an equinox layer as eqx_norm constructor arguments (an
    initializer is used only where its parameter exists)."""
    weight, bias = layer.weight, layer.bias
    dtype = next((p.dtype for p in (weight, bias) if p is not None), None)
    return {
        "scale_initializer": weight,
        "bias_initializer": bias,
        "use_scale": weight is not None,
        "use_bias": bias is not None,
        "param_dtype": dtype,
    }


def _convert(layer: Any, spatial_ndim: int | None, implementation: Implementation) -> Any:
    if isinstance(layer, eqx.nn.LayerNorm | eqx.nn.RMSNorm):
        if layer.shape is None:
            raise ValueError(
                f"from_equinox: an eqx.nn.{type(layer).__name__} with shape=None has no "
                "normalized shape to convert; build it with an explicit `shape`."
            )
        cls = LayerNorm if isinstance(layer, eqx.nn.LayerNorm) else RMSNorm
        return cls(layer.shape, layer.eps, **_affine(layer), implementation=implementation)
    if layer.channels is None:
        raise ValueError(
            "from_equinox: an eqx.nn.GroupNorm built with channels=None takes its channel "
            "count from each input, but eqx_norm.GroupNorm needs it at construction; build "
            "the equinox layer with `channels`."
        )
    return GroupNorm(
        layer.groups,
        layer.channels,
        layer.eps,
        **_affine(layer),
        spatial_ndim=spatial_ndim,
        channel_axis=0,
        implementation=implementation,
    )


def from_equinox(
    tree: T, *, spatial_ndim: int | None = None, implementation: Implementation = None
) -> T:
    """``tree`` with every ``eqx.nn.LayerNorm``/``RMSNorm``/``GroupNorm`` replaced by ours.

    Each replacement has the same weights (same arrays and dtype), epsilon and switches, and
    computes the same function of one example: ``eqx.nn.LayerNorm(shape)`` becomes
    ``LayerNorm(shape)``, ``eqx.nn.RMSNorm(shape)`` becomes ``RMSNorm(shape, use_bias=...)``
    and ``eqx.nn.GroupNorm(groups, channels)``, which takes one channels-first example
    ``(C, *spatial)`` of any rank, becomes ``GroupNorm(groups, channels, channel_axis=0,
    spatial_ndim=None)``, which takes it the same way. Equinox's single-example convention
    keeps working (under your ``jax.vmap``, or in ``eqx.nn.Sequential`` with a state), so a
    model that ran before runs after, with the same outputs and gradients; the converted
    LayerNorm/RMSNorm also take batches directly, and GroupNorms do with ``spatial_ndim``.
    Everything else in ``tree`` is returned as it is.

    Args:
        tree: any pytree holding equinox modules, e.g. a model.
        spatial_ndim: None (default): each converted GroupNorm takes one example
            ``(C, *spatial)`` of any rank, as equinox's does; an int: they take batches
            ``(*batch, C, *spatial)`` with that many spatial axes (e.g. 2 for images).
        implementation: the converted layers' ``implementation`` (None, the default: the
            compiled CPU kernel where it serves; ``"xla"`` or ``"kernel"`` to force one).

    Returns:
        The same pytree with the layers replaced.

    Example:
        >>> import equinox as eqx, jax
        >>> import eqx_norm
        >>> model = eqx.nn.Sequential([eqx.nn.Linear(4, 8, key=jax.random.key(0)),
        ...                            eqx.nn.LayerNorm(8)])
        >>> converted = eqx_norm.from_equinox(model)
        >>> type(converted.layers[1]).__name__
        'LayerNorm'
    """
    return jax.tree_util.tree_map(
        lambda leaf: (
            _convert(leaf, spatial_ndim, implementation) if isinstance(leaf, _CONVERTED) else leaf
        ),
        tree,
        is_leaf=lambda node: isinstance(node, _CONVERTED),
    )
