"""Argument checks shared by every function in :mod:`eqx_norm.functional` and every layer.

Each check returns the value in canonical form or raises a ``TypeError``/``ValueError``
whose message names the argument, what was expected and what was given.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array

DTypeLike = Any
IMPLEMENTATIONS = (None, "xla", "kernel")
Implementation = Literal["xla", "kernel"] | None
MAX_ELEMENTS = 2**56  # times 16 bytes (complex128) still fits an int64 byte count


def is_int(value: Any) -> bool:
    """Whether ``value`` is a Python or NumPy integer (booleans excluded)."""
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def canonical_shape(value: int | Sequence[int], argument: str) -> tuple[int, ...]:
    """``value`` as a non-empty tuple of positive ints, or a ValueError/TypeError naming it."""
    if is_int(value):
        items = (value,)
    elif isinstance(value, Sequence) and not isinstance(value, str) and all(map(is_int, value)):
        items = tuple(value)
    else:
        raise TypeError(
            f"`{argument}` must be a positive int or a sequence of positive ints, got {value!r}."
        )
    if not items or any(v <= 0 for v in items):
        raise ValueError(
            f"`{argument}` must be a positive int or a non-empty sequence of positive ints, "
            f"got {value!r}."
        )
    if math.prod(int(v) for v in items) > MAX_ELEMENTS:
        # XLA aborts the process (not an exception) when a shape's byte size overflows int64.
        raise ValueError(
            f"`{argument}`={value!r} has {math.prod(int(v) for v in items)} elements, more than "
            "the 2**56 an array may have."
        )
    return tuple(int(v) for v in items)


def positive_int(value: Any, argument: str) -> int:
    """``value`` as a positive int, or an error naming ``argument``."""
    if not is_int(value):
        raise TypeError(f"`{argument}` must be a positive int, got {value!r}.")
    if value <= 0:
        raise ValueError(f"`{argument}` must be a positive int, got {value!r}.")
    if value > MAX_ELEMENTS:
        raise ValueError(f"`{argument}` must be at most 2**56, got {value!r}.")
    return int(value)


def check_epsilon(epsilon: Any) -> float:
    """``epsilon`` as a finite, non-negative float."""
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float, np.integer, np.floating)):
        raise TypeError(f"`epsilon` must be a finite non-negative float, got {epsilon!r}.")
    if not math.isfinite(epsilon) or epsilon < 0:
        raise ValueError(f"`epsilon` must be a finite non-negative float, got {epsilon!r}.")
    return float(epsilon)


def check_flag(value: Any, argument: str) -> bool:
    """``value`` as a bool; anything but a Python or NumPy bool is a TypeError."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{argument}` must be True or False, got {value!r}.")
    return bool(value)


def optional_dtype(dtype: DTypeLike | None, argument: str) -> np.dtype | None:
    """``dtype`` as a floating NumPy dtype (or None), or an error naming ``argument``."""
    if dtype is None:
        return None
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise TypeError(f"`{argument}` must be a floating-point dtype, got {dtype!r}.") from None
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{argument}` must be a floating-point dtype, got {dtype}.")
    return dtype


def check_implementation(implementation: Any) -> str | None:
    """``implementation`` as one of None, ``"xla"``, ``"kernel"``."""
    if implementation is None:
        return None
    if not isinstance(implementation, str) or implementation not in IMPLEMENTATIONS:
        raise ValueError(
            "`implementation` must be None (the compiled kernel where it serves, else XLA), "
            f'"xla" or "kernel", got {implementation!r}.'
        )
    return str(implementation)  # a plain str, also for a NumPy string: it is a static field


def check_floating(x: Any, layer: str) -> Array:
    """``x`` as a JAX array of a floating dtype; integer, boolean or complex input is an error."""
    try:
        x = jnp.asarray(x)
    except (TypeError, ValueError):  # e.g. a string, None, a ragged list
        raise TypeError(
            f"{layer} expects a floating-point array `x`, got {type(x).__name__} {x!r:.80}."
        ) from None
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x
    if x.dtype == jnp.bool_:
        why = "Boolean input has no meaningful mean and variance"
    elif jnp.issubdtype(x.dtype, jnp.complexfloating):
        why = "Complex input is not supported"
    else:
        why = "Normalizing integers would truncate the result"
    raise TypeError(
        f"{layer} expects a floating-point input `x`, got dtype {x.dtype}. {why}: cast "
        "first, e.g. `x.astype(jnp.float32)`."
    )


def check_mask(mask: Any, x_shape: tuple[int, ...], layer: str) -> Array | None:
    """A boolean mask of the rank of ``x``, each axis equal to x's or 1, or an error."""
    if mask is None:
        return None
    try:
        mask = jnp.asarray(mask)
    except (TypeError, ValueError):
        raise TypeError(f"{layer}: `mask` must be a boolean array, got {mask!r:.80}.") from None
    if mask.dtype != jnp.bool_:
        raise TypeError(
            f"{layer}: `mask` must be boolean (True = take part in the statistics), got dtype "
            f"{mask.dtype}; use `mask.astype(bool)`."
        )
    if not _fits(mask.shape, x_shape):
        fix = _mask_fix(tuple(mask.shape), tuple(x_shape))
        raise ValueError(
            f"{layer}: `mask` must have the rank of `x` with each axis equal to x's or 1; "
            f"x has shape {x_shape}, mask has shape {mask.shape}."
            + (f" Use `{fix}`, which has the rank of `x`." if fix else "")
        )
    return jnp.broadcast_to(mask, x_shape)


def check_modulation(value: Any, argument: str, x: Array, example: str, layer: str) -> Any:
    """None, or a per-example ``scale``/``shift`` (``argument``) as a floating array of x's
    rank whose every axis is x's size or 1 (broadcast, never added); ``example`` is the
    shape to suggest, e.g. ``"(B, 1, D)"``."""
    value = _floating_array(
        value, f"{layer}: `{argument}` must be None or a floating array of x's rank",
        f"{layer}: `{argument}` must be a floating array (a per-example modulation, e.g. "
        "float32), got dtype {dtype}.",
    )  # fmt: skip
    if value is None:
        return None
    if not _fits(value.shape, x.shape):
        fix = _mask_fix(tuple(value.shape), tuple(x.shape), argument)
        raise ValueError(
            f"{layer}: `{argument}` must have x's rank with each axis x's size or 1, such as "
            f"{example} for x of shape {x.shape}; got shape {value.shape}."
            + (f" Use `{fix}`, which has the rank of `x`." if fix else "")
        )
    return value


def _floating_array(value: Any, expected: str, not_floating: str) -> Array | None:
    """None, or ``value`` as an array of a floating dtype: a TypeError ``expected`` + what was
    given where it is no array, and ``not_floating`` (with ``{dtype}``) where it is not
    floating."""
    if value is None:
        return None
    try:
        value = jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(f"{expected}, got {type(value).__name__} {value!r:.80}.") from None
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(not_floating.format(dtype=value.dtype))
    return value


def _fits(mask_shape: tuple[int, ...], x_shape: tuple[int, ...]) -> bool:
    """Whether a mask of ``mask_shape`` broadcasts to ``x_shape`` without new axes."""
    return len(mask_shape) == len(x_shape) and all(m in (1, s) for m, s in zip(mask_shape, x_shape))


def _mask_fix(
    mask_shape: tuple[int, ...], x_shape: tuple[int, ...], name: str = "mask"
) -> str | None:
    """An expression that gives ``mask`` the rank of ``x`` (size-1 axes added where it has
    fewer axes, dropped where it has more), aligned to x's trailing axes first as NumPy
    broadcasting would; None when no such expression fits."""
    m, n = len(mask_shape), len(x_shape)
    if m < n:  # keep the mask's axes at positions `kept` of x, add None elsewhere
        for kept in reversed(list(itertools.combinations(range(n), m))):
            if _fits(mask_shape, tuple(x_shape[i] for i in kept)):
                items = [":" if i in kept else "None" for i in range(n)]
                return _index_expression(items, name)
    elif m > n:  # drop size-1 axes, the leading ones first
        for dropped in itertools.combinations(range(m), m - n):
            kept = tuple(s for i, s in enumerate(mask_shape) if i not in dropped)
            if all(mask_shape[i] == 1 for i in dropped) and _fits(kept, x_shape):
                axes = dropped[0] if len(dropped) == 1 else dropped
                return f"{name}.squeeze({axes})"
    return None


def _index_expression(items: list[str], name: str = "mask") -> str:
    """``mask[...]`` for per-axis ``items`` (":" keeps an axis, "None" adds one), shortest
    form: ``mask[None]``, ``mask[..., None]``, ``mask[None, ..., None]``."""
    kept = [i for i, item in enumerate(items) if item == ":"]
    if kept and kept == list(range(kept[0], kept[-1] + 1)):  # one run of kept axes
        after = items[kept[-1] + 1 :]
        items = items[: kept[0]] + (["...", *after] if after else [])
    while items[-1] == ":":
        items = items[:-1]
    return f"{name}[{', '.join(items)}]"


def check_parameter(value: Any, expected: tuple[int, ...], argument: str, layer: str) -> Any:
    """``value`` as None or a floating array of exactly ``expected`` shape."""
    if value is None:
        return None
    try:
        value = jnp.asarray(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"{layer}: `{argument}` must be None or a floating array of shape {expected}, "
            f"got {value!r:.80}."
        ) from None
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(f"{layer}: `{argument}` must be a floating array, got dtype {value.dtype}.")
    if tuple(value.shape) != expected:
        raise ValueError(
            f"{layer}: `{argument}` must have shape {expected}, got {tuple(value.shape)}."
        )
    return value


def how_to_set(caller: str) -> str:
    """How ``caller`` changes an argument, in its own vocabulary: a layer (named in
    CamelCase, ``LayerNorm``) is built with it, a function (``layer_norm``) is passed it."""
    return "build the layer with" if caller[:1].isupper() else "pass"


def check_trailing_shape(
    x_shape: tuple[int, ...], normalized_shape: tuple[int, ...], layer: str
) -> tuple[int, ...]:
    """The axes of ``x`` that ``normalized_shape`` covers; an error when x does not end with it."""
    k = len(normalized_shape)
    if len(x_shape) < k or tuple(x_shape[len(x_shape) - k :]) != normalized_shape:
        fix = (
            f" To normalize over the last {k} axes of this input, {how_to_set(layer)} "
            f"normalized_shape={tuple(x_shape[len(x_shape) - k :])}; for channels-first data, "
            "move the normalized axes last with `jnp.moveaxis`."
            if len(x_shape) >= k
            else f" Pass x of shape (*batch, {', '.join(map(str, normalized_shape))}), with any "
            "number of leading batch axes (none for one example); a scalar or an array of "
            f"fewer than {k} axes has no {normalized_shape} to normalize over. If x holds "
            f"{math.prod(normalized_shape)} values per example, reshape it, e.g. "
            f"`x.reshape(-1, {', '.join(map(str, normalized_shape))})`."
        )
        raise ValueError(
            f"{layer} with normalized_shape={normalized_shape} expects an input `x` whose last "
            f"{k} axes are {normalized_shape}, got x of shape {tuple(x_shape)}.{fix}"
        )
    return tuple(range(len(x_shape) - k, len(x_shape)))


_SPATIAL_NAMES = {0: (), 1: ("L",), 2: ("H", "W"), 3: ("D", "H", "W")}


def describe_layout(spatial_ndim: int | None, channel_axis: int, channels: int | None) -> str:
    """The expected input shape in words, e.g. ``(*batch, H, W, C=6)``; for
    ``spatial_ndim=None`` (one example of any rank), ``(*spatial, C=6)``."""
    channel = "C" if channels is None else f"C={channels}"
    if spatial_ndim is None:
        return f"({channel}, *spatial)" if channel_axis == 0 else f"(*spatial, {channel})"
    names = list(_SPATIAL_NAMES.get(spatial_ndim, [f"S{i + 1}" for i in range(spatial_ndim)]))
    names.insert(channel_axis % (spatial_ndim + 1), channel)
    return f"(*batch, {', '.join(names)})"


def check_layout(
    spatial_ndim: Any, channel_axis: Any, layer: str, *, min_spatial_ndim: int
) -> tuple[int | None, int]:
    """``(spatial_ndim, channel_axis)`` checked: a count of spatial axes (or None: the input
    is one example of any rank, equinox's convention), and -1 or 0.

    ``min_spatial_ndim`` is 1 for InstanceNorm (each channel of an example without a spatial
    axis is a single element and would normalize to 0) and 0 otherwise.
    """
    if spatial_ndim is not None and (not is_int(spatial_ndim) or spatial_ndim < min_spatial_ndim):
        kind = "a positive int" if min_spatial_ndim else "a non-negative int"
        why = " (one example needs a spatial axis to normalize over)" if min_spatial_ndim else ""
        error = ValueError if is_int(spatial_ndim) else TypeError
        raise error(
            f"{layer}: `spatial_ndim` must be {kind}, got {spatial_ndim!r}{why}; or None, "
            "for an input that is one example of any rank."
        )
    spatial_ndim = None if spatial_ndim is None else int(spatial_ndim)
    if not is_int(channel_axis) or channel_axis not in (-1, 0):
        raise (ValueError if is_int(channel_axis) else TypeError)(
            f"{layer}: `channel_axis` must be -1 (channels-last, "
            f"{describe_layout(spatial_ndim, -1, None)}) or 0 (channels-first, "
            f"{describe_layout(spatial_ndim, 0, None)}), got {channel_axis!r}."
        )
    return spatial_ndim, int(channel_axis)


def check_momentum(momentum: Any) -> float:
    """``momentum`` as a float in ``[0, 1]``: the fraction of the running statistics kept."""
    if isinstance(momentum, bool) or not isinstance(
        momentum, (int, float, np.integer, np.floating)
    ):
        raise TypeError(f"`momentum` must be a float in [0, 1], got {momentum!r}.")
    if not 0 <= momentum <= 1:  # NaN fails too
        raise ValueError(
            f"`momentum` must be a float in [0, 1], the fraction of the running statistics "
            f"kept at each step, got {momentum!r}. torch's momentum=0.1 is momentum=0.9 here."
        )
    return float(momentum)


def check_channel_axis(channel_axis: Any, owner: str) -> int:
    """``channel_axis`` as an int (checked against the input's rank at call time)."""
    if not is_int(channel_axis):
        raise TypeError(
            f"{owner}: `channel_axis` must be an int, an axis of the input (-1 for "
            f"channels-last, 1 for torch's (N, C, *spatial)), got {channel_axis!r}."
        )
    return int(channel_axis)


def check_groups(num_groups: Any, group_size: Any, owner: str) -> tuple[int | None, int | None]:
    """``(num_groups, group_size)`` with exactly one of them a positive int, the other None."""
    if (num_groups is None) == (group_size is None):
        given = (
            "neither"
            if num_groups is None
            else f"num_groups={num_groups!r} and group_size={group_size!r}"
        )
        raise ValueError(
            f"{owner}: pass exactly one of `num_groups` (the number of groups) and "
            f"`group_size` (channels per group), got {given}."
        )
    if num_groups is not None:
        return positive_int(num_groups, "num_groups"), None
    return None, positive_int(group_size, "group_size")


def check_residual(residual: Any, x: Array, layer: str, argument: str = "residual") -> Array | None:
    """None, or ``residual`` (the argument named ``argument``: the residual stream, or a
    gate) as a floating array of exactly x's shape."""
    residual = _floating_array(
        residual, f"{layer}: `{argument}` must be None or a floating array of x's shape {x.shape}",
        f"{layer}: `{argument}` must be a floating array (e.g. float32), got dtype {{dtype}}. "
        f"Cast it first, e.g. `{argument}.astype(jnp.float32)`.",
    )  # fmt: skip
    if residual is None:
        return None
    if residual.shape != x.shape:
        use = "added to" if argument == "residual" else "multiplied with"
        raise ValueError(
            f"{layer}: `{argument}` must have x's shape {x.shape} (it is {use} x, never "
            f"broadcast), got shape {residual.shape}."
        )
    return residual


ACTIVATIONS = ("silu",)


def check_activation(activation: Any, layer: str) -> str | None:
    """None, or the name of an activation applied after the norm (and its modulation)."""
    if activation is None or (isinstance(activation, str) and activation in ACTIVATIONS):
        return activation
    raise ValueError(
        f"{layer}: `activation` must be None or one of {', '.join(map(repr, ACTIVATIONS))} "
        f"(applied after the affine and the modulation, fused into the norm), got "
        f"{activation!r}. Apply any other activation to the output."
    )


def check_steps(steps: Any, layer: str) -> Array | None:
    """None, or ``steps`` as an integer scalar array (the running statistics' update count)."""
    if steps is None:
        return None
    try:
        value = jnp.asarray(steps)
    except (TypeError, ValueError):
        value = None
    if value is None or value.shape != () or not jnp.issubdtype(value.dtype, jnp.integer):
        raise TypeError(
            f"{layer}: `steps` must be None or an integer scalar, the number of updates the "
            f"running statistics have had (0 for fresh ones), got {steps!r:.80}."
        )
    return value


def batch_channel_axis(channel_axis: Any, x: Array, layer: str) -> int:
    """The non-negative channel axis of ``x``, or an error naming the valid range."""
    channel_axis = check_channel_axis(channel_axis, layer)
    if not -x.ndim <= channel_axis < x.ndim:
        raise ValueError(
            f"{layer}: `channel_axis`={channel_axis} is not an axis of x of shape {x.shape} "
            f"(rank {x.ndim}); it counts the axes of x as passed, batch included: -1 for "
            "channels-last, 1 for torch's (N, C, *spatial)."
        )
    return channel_axis % x.ndim


def check_running(value: Any, argument: str, x: Array, axis: int, layer: str) -> Array:
    """A running statistic of shape ``(C,)``; a size that matches another axis of ``x`` gets
    a hint to move ``channel_axis`` there."""
    channels = x.shape[axis]
    if value is None:
        raise TypeError(
            f"{layer}: `{argument}` must be an array of shape ({channels},), got None. Start "
            "from zeros for the mean and ones for the variance."
        )
    shape = np.shape(value)
    if len(shape) == 1 and shape[0] != channels:
        others = [i for i in range(x.ndim) if i != axis and x.shape[i] == shape[0]]
        hint = (
            f" If the channels are on axis {others[0]} (torch's (N, C, *spatial) is axis 1), "
            f"pass channel_axis={others[0]}: it counts the axes of x, batch included."
            if others
            else ""
        )
        has = (
            f"the layer has num_features={shape[0]}"
            if layer == "BatchNorm"  # the layer's user passed num_features, not the statistics
            else f"`{argument}` has shape {shape} (num_features={shape[0]})"
        )
        raise ValueError(
            f"{layer}: x of shape {x.shape} has {channels} channels on axis {axis}, but "
            f"{has}.{hint}"
        )
    return check_parameter(value, (channels,), argument, layer)


def axis_size(axis_name: Hashable, layer: str) -> int:
    """The number of examples or shards along the mapped axis ``axis_name``."""
    try:
        return lax.psum(1, axis_name)
    except NameError:
        raise NameError(
            f"{layer}: axis_name={axis_name!r} is not a mapped axis here. Call it inside "
            f"`jax.vmap`/`jax.pmap`/`shard_map` with axis_name={axis_name!r}, or pass "
            "axis_name=None and the whole batch (under `jit`, sharded or not)."
        ) from None


# Other libraries' names for our arguments, by the layers that take ours: each unknown keyword
# a user brings from equinox, flax, haiku or torch gets a pointer to ours.
_PEER_NAMES = {
    "eps": "`epsilon` (equinox's, torch's and flax's `eps`/`epsilon`)",
    "weight": "`scale_initializer` (an array or initializer for `gamma`, torch's `weight`)",
    "bias": "`bias_initializer` (an array or initializer for `beta`, torch's `bias`)",
    "use_weight": "`use_scale` (equinox's `use_weight`)",
    "channelwise_affine": "`elementwise_affine` (equinox's `channelwise_affine`)",
    "affine": "`elementwise_affine` (torch's `affine`)",
    "elementwise_affine_shape": "`normalized_shape`",
    "create_scale": "`use_scale` (haiku's `create_scale`)",
    "create_offset": "`use_bias` (haiku's `create_offset`)",
    "scale_init": "`scale_initializer` (haiku's and flax's `scale_init`)",
    "offset_init": "`bias_initializer` (haiku's `offset_init`)",
    "bias_init": "`bias_initializer` (flax's `bias_init`)",
    "use_fast_variance": (
        "nothing: the variance is always two-pass, E[(x - E[x])^2] (flax's "
        "`use_fast_variance=True` loses the variance at large means); drop it"
    ),
    "decay_rate": "`momentum` (haiku's `decay_rate`, the same meaning: the share kept)",
    "use_running_average": "`inference` (flax's `use_running_average`)",
    "mode": "`debias` (equinox's `mode='batch'` is `debias=True`, 'ema' is `debias=False`)",
    "input_size": "`num_features` (equinox's `input_size`)",
    "device": "nothing: JAX places arrays (`jax.device_put`); drop it",
}
_LAYER_PEER_NAMES = {
    "LayerNorm": {
        "shape": "`normalized_shape` (equinox's `shape`)",
        "num_features": "`normalized_shape` (flax's `num_features`)",
        "axis": "`normalized_shape` (haiku's `axis`: eqx_norm normalizes the trailing axes)",
        "reduction_axes": "`normalized_shape` (flax's `reduction_axes`: the trailing axes)",
    },
    "GroupNorm": {
        "groups": "`num_groups` (equinox's `groups`)",
        "channels": "`num_channels` (equinox's `channels`)",
        "num_features": "`num_channels` (flax's `num_features`)",
        "axis": "`channel_axis` and `spatial_ndim`",
    },
    "BatchNorm": {
        "track_running_stats": (
            "nothing: BatchNorm always keeps running statistics (torch's "
            "`track_running_stats`); normalize by the batch's with `inference=False`, by the "
            "running ones with `inference=True`"
        ),
        "axis": "`channel_axis` (flax's and haiku's `axis`)",
    },
}
_LAYER_PEER_NAMES["RMSNorm"] = _LAYER_PEER_NAMES["LayerNorm"]
_LAYER_PEER_NAMES["DyT"] = {
    **_LAYER_PEER_NAMES["LayerNorm"],
    "eps": "nothing: DyT computes no statistics, so it has no epsilon; drop it",
    "init_alpha": "`alpha_init` (the DyT paper's code's `init_alpha`)",
}
_LAYER_PEER_NAMES["Derf"] = {
    **_LAYER_PEER_NAMES["LayerNorm"],
    "eps": "nothing: Derf computes no statistics, so it has no epsilon; drop it",
    "alpha_init_value": "`alpha_init` (the Derf paper's code's `alpha_init_value`)",
    "shift_init_value": "`shift_init` (the Derf paper's code's `shift_init_value`)",
    "init_alpha": "`alpha_init`",
    "init_shift": "`shift_init`",
}
_LAYER_PEER_NAMES["InstanceNorm"] = {
    "channels": "`num_channels` (equinox's `channels`)",
    "num_features": "`num_channels` (torch's and flax's `num_features`)",
    "axis": "`channel_axis` and `spatial_ndim`",
    "track_running_stats": "nothing: InstanceNorm keeps no running statistics; drop it",
}


def reject_unknown_keywords(layer: str, unknown: dict[str, Any], cls: type) -> None:
    """A ``TypeError`` for keyword arguments ``layer`` (of class ``cls``) does not take,
    pointing to ours where the name is another library's for one of them."""
    if not unknown:
        return
    known = [n for n in inspect.signature(cls.__init__).parameters if n not in ("self", "unknown")]
    name = sorted(unknown)[0]
    ours = _LAYER_PEER_NAMES.get(layer, {}).get(name) or _PEER_NAMES.get(name)
    if ours is not None and ours.startswith("nothing: "):
        hint = f" eqx_norm has no such argument: {ours.removeprefix('nothing: ')}."
    elif ours is not None:
        hint = f" eqx_norm's name for it is {ours}."
    else:
        close = difflib.get_close_matches(name, list(known), n=1)
        hint = f" Did you mean `{close[0]}`?" if close else ""
    raise TypeError(f"{layer} got an unexpected keyword argument `{name}`.{hint}")
