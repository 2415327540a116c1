"""The benchmark cases and the implementations timed on each.

eqx_norm's layers appear twice: with the default implementation (the compiled CPU kernel
when it is built) and with ``implementation="xla"`` (pure JAX).

GroupNorm and InstanceNorm run in both layouts. Channels-first ``(N, C, H, W)`` is torch's
contiguous layout. For a channels-last case every library gets the same ``(N, H, W, C)``
array: torch as the ``(N, C, H, W)`` view of it (``permute``, torch's ``channels_last``
memory format, what a torch user with that data runs), equinox (which takes one
channels-first example) with a transpose in and out, flax as it is; torch also as a
contiguous ``(N, C, H, W)`` copy made before timing (``torch NCHW``); on a channels-first
case torch also runs its ``channels_last`` memory format of the same data (``torch
channels_last``). Each ratio to torch is to the faster of its two rows.

Every JAX implementation is a pure ``apply(x, params) -> y`` with its parameters as a
pytree, so that forward and forward+backward (gradients with respect to x and every
parameter) are jitted the same way for all of them. torch modules are called as users
call them: forward under ``torch.no_grad()``, forward+backward as ``y.backward(dy)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import eqx_norm

EPSILON = 1e-5
# LayerNorm/RMSNorm run twice: "eqx_norm" with the default implementation (the compiled CPU
# kernel where it is built and serves) and this row with implementation="xla".
XLA_NAME = "eqx_norm (xla)"
OURS = ("eqx_norm", XLA_NAME)


@dataclasses.dataclass(frozen=True)
class Case:
    """One benchmark input: ``shape`` normalized over its last ``ndim`` axes."""

    name: str
    family: str  # "layer_norm", "rms_norm", "group_norm", "instance_norm" or "batch_norm"
    shape: tuple[int, ...]
    ndim: int
    dtype: str = "float32"
    groups: int = 0  # group_norm / instance_norm (groups == channels)
    # group_norm / instance_norm / batch_norm: (N, H, W, C), else (N, C, H, W)
    channels_last: bool = False

    @property
    def channels(self) -> int:
        return self.shape[-1] if self.channels_last else self.shape[1]

    @property
    def normalized(self) -> tuple[int, ...]:
        return self.shape[len(self.shape) - self.ndim :]


FULL_CASES = (
    Case("(8192, 1024)", "layer_norm", (8192, 1024), 1),
    Case("(64, 128, 768)", "layer_norm", (64, 128, 768), 1),
    Case("(32, 28, 28, 256) last 3", "layer_norm", (32, 28, 28, 256), 3),
    Case("(64, 128, 768) bf16", "layer_norm", (64, 128, 768), 1, "bfloat16"),
    Case("(32, 64)", "layer_norm", (32, 64), 1),
    Case("RMSNorm (8192, 1024)", "rms_norm", (8192, 1024), 1),
    Case("GroupNorm (32, 256, 28, 28) G=32", "group_norm", (32, 256, 28, 28), 3, groups=32),
    Case(
        "GroupNorm (32, 28, 28, 256) G=32 channels-last",
        "group_norm",
        (32, 28, 28, 256),
        3,
        groups=32,
        channels_last=True,
    ),
    Case("InstanceNorm (32, 64, 28, 28)", "instance_norm", (32, 64, 28, 28), 3, groups=64),
    Case(
        "InstanceNorm (32, 28, 28, 64) channels-last",
        "instance_norm",
        (32, 28, 28, 64),
        3,
        groups=64,
        channels_last=True,
    ),
)
# BatchNorm in training mode: batch statistics over (N, H, W) per channel
FULL_CASES += (
    Case("BatchNorm (32, 256, 28, 28)", "batch_norm", (32, 256, 28, 28), 3),
    Case(
        "BatchNorm (32, 28, 28, 256) channels-last",
        "batch_norm",
        (32, 28, 28, 256),
        3,
        channels_last=True,
    ),
)
QUICK_CASES = (
    Case("(256, 128)", "layer_norm", (256, 128), 1),
    Case("(4, 6, 6, 16) last 3", "layer_norm", (4, 6, 6, 16), 3),
    Case("(4, 16, 128) bf16", "layer_norm", (4, 16, 128), 1, "bfloat16"),
    Case("RMSNorm (64, 128)", "rms_norm", (64, 128), 1),
    Case("GroupNorm (4, 16, 6, 6) G=4", "group_norm", (4, 16, 6, 6), 3, groups=4),
    Case(
        "GroupNorm (4, 6, 6, 16) G=4 channels-last",
        "group_norm",
        (4, 6, 6, 16),
        3,
        groups=4,
        channels_last=True,
    ),
    Case("InstanceNorm (4, 8, 6, 6)", "instance_norm", (4, 8, 6, 6), 3, groups=8),
    Case(
        "BatchNorm (4, 6, 6, 16) channels-last", "batch_norm", (4, 6, 6, 16), 3, channels_last=True
    ),
)


@dataclasses.dataclass
class JaxImpl:
    name: str
    apply: Callable[[Any, Any], Any]
    params: Any


@dataclasses.dataclass
class TorchImpl:
    name: str
    module: torch.nn.Module
    # the layout this row is fed, made from the case's input once, outside the timed call
    prepare: Callable[[torch.Tensor], torch.Tensor] | None = None


# torch's rows: on a channels-last case torch runs twice, on the channels_last view of the
# data and on a contiguous NCHW copy (the faster layout, what a torch user would pick);
# every ratio "x torch" is to the faster of its rows
TORCH_NAMES = ("torch", "torch NCHW", "torch channels_last")


def _eqx(module: eqx.Module, batch_axes: int = 0) -> tuple[Callable, Any]:
    """An equinox-style module as ``apply(x, params)``, vmapped over ``batch_axes``."""
    params, static = eqx.partition(module, eqx.is_inexact_array)

    def apply(x, params):
        layer = eqx.combine(params, static)
        for _ in range(batch_axes):
            layer = jax.vmap(layer)
        return layer(x)

    return apply, params


def _nnx(module: nnx.Module) -> tuple[Callable, Any]:
    graphdef, state = nnx.split(module)
    return (lambda x, state: nnx.merge(graphdef, state)(x)), state


def _jnp_two_pass(case: Case, center: bool) -> Callable:
    """The plain jnp reference: two-pass statistics in float32, then the affine step."""

    def apply(x, params):
        gamma, beta = params
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        grouped = case.family in ("group_norm", "instance_norm")
        axes = tuple(range(xf.ndim - case.ndim, xf.ndim))
        if grouped and case.channels_last:  # (N, S, G, C / G) over S and C / G
            xf = xf.reshape(x.shape[0], -1, case.groups, case.channels // case.groups)
            axes = (1, 3)
        elif grouped:
            xf = xf.reshape(x.shape[0], case.groups, -1)
            axes = (2,)
        mean = jnp.mean(xf, axis=axes, keepdims=True) if center else 0.0
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + EPSILON)
        if grouped:
            y = y.reshape(x.shape)
        y = y * gamma
        if beta is not None:
            y = y + beta
        return y.astype(x.dtype)

    return apply


def _batch_norm(case: Case, gamma: np.ndarray, beta: np.ndarray):
    """BatchNorm's rows in training mode: eqx_norm's function (the layer's call without its
    state), flax.nnx's module, the jnp two-pass formula; torch's BatchNorm2d."""
    from eqx_norm.functional import batch_norm

    c, axis = case.channels, (-1 if case.channels_last else 1)
    axes = (0, 1, 2) if case.channels_last else (0, 2, 3)
    per_channel = (1, 1, 1, c) if case.channels_last else (1, c, 1, 1)

    def ours(implementation):
        def apply(x, params):
            stats = (jnp.zeros(c), jnp.ones(c))
            return batch_norm(
                x, *stats, *params, training=True, channel_axis=axis, epsilon=EPSILON,
                implementation=implementation,
            )[0]  # fmt: skip

        return apply

    def plain(x, params):
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + EPSILON)
        return y * params[0].reshape(per_channel) + params[1].reshape(per_channel)

    params = (jnp.asarray(gamma), jnp.asarray(beta))
    jax_impls = [
        JaxImpl("eqx_norm", ours(None), params),
        JaxImpl(XLA_NAME, ours("xla"), params),
        JaxImpl("jnp two-pass", plain, params),
    ]
    if case.channels_last:  # flax.nnx normalizes channels-last inputs
        module = nnx.BatchNorm(c, epsilon=EPSILON, use_running_average=False, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(module)
        apply = lambda x, state: nnx.merge(graphdef, state)(x)  # noqa: E731
        jax_impls.insert(2, JaxImpl("flax.nnx", apply, state))
    return jax_impls, torch.nn.BatchNorm2d(c, eps=EPSILON)


def implementations(case: Case) -> tuple[list[JaxImpl], list[TorchImpl]]:
    """The JAX implementations (eqx_norm first) and torch's, with identical parameters."""
    rng = np.random.default_rng(1)
    ns = case.normalized
    grouped = case.family in ("group_norm", "instance_norm")
    pshape = (case.channels,) if grouped or case.family == "batch_norm" else ns
    gamma = (1 + 0.1 * rng.standard_normal(pshape)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(pshape)).astype(np.float32)
    tdt = torch.bfloat16 if case.dtype == "bfloat16" else torch.float32
    batch_axes = len(case.shape) - case.ndim
    jax_impls: list[JaxImpl] = []
    torch_impls: list[TorchImpl] = []
    # grouped norms' parameters broadcast over (C, H, W) or (H, W, C) in the jnp reference
    ref_shape = (case.channels,) if case.family == "batch_norm" else ns
    if grouped:
        ref_shape = (case.channels,) if case.channels_last else (case.channels, 1, 1)
    ref_params = (jnp.asarray(gamma).reshape(ref_shape), jnp.asarray(beta).reshape(ref_shape))
    if case.family == "batch_norm":
        jax_impls, tm = _batch_norm(case, gamma, beta)
    elif case.family == "layer_norm":
        ours = eqx_norm.LayerNorm(ns, EPSILON, scale_initializer=gamma, bias_initializer=beta)
        peer = eqx.nn.LayerNorm(ns, eps=EPSILON)
        peer = eqx.tree_at(lambda m: (m.weight, m.bias), peer, (jnp.asarray(gamma), beta))
        flax_axes = tuple(range(-case.ndim, 0))
        fl = nnx.LayerNorm(
            int(np.prod(ns)),
            epsilon=EPSILON,
            reduction_axes=flax_axes,
            feature_axes=flax_axes,
            rngs=nnx.Rngs(0),
        )  # use_fast_variance=True, flax's default: the one users get
        fl.scale.value = jnp.asarray(gamma).reshape(-1)
        fl.bias.value = jnp.asarray(beta).reshape(-1)
        xla = eqx_norm.LayerNorm(
            ns, EPSILON, scale_initializer=gamma, bias_initializer=beta, implementation="xla"
        )
        jax_impls += [
            JaxImpl("eqx_norm", *_eqx(ours)),
            JaxImpl(XLA_NAME, *_eqx(xla)),
            JaxImpl("equinox (vmap)", *_eqx(peer, batch_axes)),
            JaxImpl("flax.nnx", *_nnx(fl)),
            JaxImpl("jnp two-pass", _jnp_two_pass(case, True), ref_params),
        ]
        tm = torch.nn.LayerNorm(ns, eps=EPSILON)
    elif case.family == "rms_norm":
        ours = eqx_norm.RMSNorm(ns, EPSILON, scale_initializer=gamma)
        peer = eqx.nn.RMSNorm(ns, eps=EPSILON, use_bias=False)
        peer = eqx.tree_at(lambda m: m.weight, peer, jnp.asarray(gamma))
        fl = nnx.RMSNorm(ns[-1], epsilon=EPSILON, rngs=nnx.Rngs(0))
        fl.scale.value = jnp.asarray(gamma)
        xla = eqx_norm.RMSNorm(ns, EPSILON, scale_initializer=gamma, implementation="xla")
        jax_impls += [
            JaxImpl("eqx_norm", *_eqx(ours)),
            JaxImpl(XLA_NAME, *_eqx(xla)),
            JaxImpl("equinox (vmap)", *_eqx(peer, batch_axes)),
            JaxImpl("flax.nnx", *_nnx(fl)),
            JaxImpl("jnp two-pass", _jnp_two_pass(case, False), (ref_params[0], None)),
        ]
        tm = torch.nn.RMSNorm(ns, eps=EPSILON)
        beta = None
    else:
        channels = case.channels
        layout = dict(channel_axis=-1 if case.channels_last else 0, spatial_ndim=case.ndim - 1)
        affine = dict(scale_initializer=gamma, bias_initializer=beta)
        if case.family == "instance_norm":
            ours, xla = (
                eqx_norm.InstanceNorm(channels, EPSILON, **affine, **layout, implementation=i)
                for i in (None, "xla")
            )
        else:
            ours, xla = (
                eqx_norm.GroupNorm(
                    case.groups, channels, EPSILON, **affine, **layout, implementation=i
                )
                for i in (None, "xla")
            )
        # equinox has no InstanceNorm: GroupNorm with one group per channel
        peer = eqx.nn.GroupNorm(case.groups, channels, eps=EPSILON)
        peer = eqx.tree_at(lambda m: (m.weight, m.bias), peer, (jnp.asarray(gamma), beta))
        if case.channels_last:  # equinox takes one (C, *spatial) example: transpose in, out
            peer_apply, peer_params = _eqx(peer)
            one = lambda x, p: jnp.moveaxis(peer_apply(jnp.moveaxis(x, -1, 0), p), 0, -1)  # noqa: E731
            peer_impl = JaxImpl("equinox (vmap)", jax.vmap(one, in_axes=(0, None)), peer_params)
        else:
            peer_impl = JaxImpl("equinox (vmap)", *_eqx(peer, batch_axes))
        jax_impls += [
            JaxImpl("eqx_norm", *_eqx(ours)),
            JaxImpl(XLA_NAME, *_eqx(xla)),
            peer_impl,
            JaxImpl("jnp two-pass", _jnp_two_pass(case, True), ref_params),
        ]
        if case.channels_last:  # flax.nnx normalizes channels-last inputs
            if case.family == "instance_norm":
                fl = nnx.InstanceNorm(channels, epsilon=EPSILON, rngs=nnx.Rngs(0))
            else:
                fl = nnx.GroupNorm(channels, case.groups, epsilon=EPSILON, rngs=nnx.Rngs(0))
            fl.scale.value = jnp.asarray(gamma)
            fl.bias.value = jnp.asarray(beta)
            jax_impls.insert(3, JaxImpl("flax.nnx", *_nnx(fl)))
        if case.family == "instance_norm":
            tm = torch.nn.InstanceNorm2d(channels, eps=EPSILON, affine=True)
        else:
            tm = torch.nn.GroupNorm(case.groups, channels, eps=EPSILON)
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(gamma))
        if beta is not None:
            tm.bias.copy_(torch.from_numpy(beta))
    tm = tm.to(tdt)
    if case.channels_last:
        torch_impls.append(TorchImpl("torch", _ChannelsLast(tm)))
        contiguous = lambda t: t.permute(0, 3, 1, 2).contiguous()  # noqa: E731
        torch_impls.append(TorchImpl("torch NCHW", tm, prepare=contiguous))
    else:
        torch_impls.append(TorchImpl("torch", tm))
        if len(case.shape) == 4 and case.family in ("group_norm", "instance_norm", "batch_norm"):
            # torch's other layout for the same data: its channels_last memory format
            to_last = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
            torch_impls.append(TorchImpl("torch channels_last", tm, prepare=to_last))
    return jax_impls, torch_impls


class _ChannelsLast(torch.nn.Module):
    """A torch norm over ``(N, C, H, W)`` applied to ``(N, H, W, C)`` data as its
    ``permute`` view (torch's ``channels_last`` memory format), output back as ``(N, H, W,
    C)``; ``weight``/``bias`` are the wrapped module's."""

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = module

    @property
    def weight(self) -> torch.nn.Parameter:
        return self.module.weight

    @property
    def bias(self) -> torch.nn.Parameter:
        return self.module.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
