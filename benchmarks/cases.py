"""The benchmark cases and the implementations timed on each.

eqx_norm's LayerNorm and RMSNorm appear twice: with the default implementation (the
compiled CPU kernel when it is built) and with ``implementation="xla"`` (pure JAX).

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
    family: str  # "layer_norm", "rms_norm" or "group_norm"
    shape: tuple[int, ...]
    ndim: int
    dtype: str = "float32"
    groups: int = 0  # group_norm only: channels-first (N, C, H, W)

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
)
QUICK_CASES = (
    Case("(256, 128)", "layer_norm", (256, 128), 1),
    Case("(4, 6, 6, 16) last 3", "layer_norm", (4, 6, 6, 16), 3),
    Case("(4, 16, 128) bf16", "layer_norm", (4, 16, 128), 1, "bfloat16"),
    Case("RMSNorm (64, 128)", "rms_norm", (64, 128), 1),
    Case("GroupNorm (4, 16, 6, 6) G=4", "group_norm", (4, 16, 6, 6), 3, groups=4),
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
        if case.family == "group_norm":
            xf = xf.reshape(x.shape[0], case.groups, -1)
        axes = tuple(range(xf.ndim - (1 if case.family == "group_norm" else case.ndim), xf.ndim))
        mean = jnp.mean(xf, axis=axes, keepdims=True) if center else 0.0
        var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + EPSILON)
        if case.family == "group_norm":
            y = y.reshape(x.shape)
        y = y * gamma
        if beta is not None:
            y = y + beta
        return y.astype(x.dtype)

    return apply


def implementations(case: Case) -> tuple[list[JaxImpl], list[TorchImpl]]:
    """The JAX implementations (eqx_norm first) and torch's, with identical parameters."""
    rng = np.random.default_rng(1)
    ns = case.normalized
    pshape = (case.shape[1],) if case.family == "group_norm" else ns
    gamma = (1 + 0.1 * rng.standard_normal(pshape)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(pshape)).astype(np.float32)
    tdt = torch.bfloat16 if case.dtype == "bfloat16" else torch.float32
    batch_axes = len(case.shape) - case.ndim
    jax_impls: list[JaxImpl] = []
    torch_impls: list[TorchImpl] = []
    # group_norm's parameters broadcast over (C, H, W) in the jnp reference
    ref_shape = (case.shape[1], 1, 1) if case.family == "group_norm" else ns
    ref_params = (jnp.asarray(gamma).reshape(ref_shape), jnp.asarray(beta).reshape(ref_shape))
    if case.family == "layer_norm":
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
        channels = case.shape[1]
        ours = eqx_norm.GroupNorm(
            case.groups,
            channels,
            EPSILON,
            scale_initializer=gamma,
            bias_initializer=beta,
            channel_axis=0,
            spatial_ndim=case.ndim - 1,
        )
        peer = eqx.nn.GroupNorm(case.groups, channels, eps=EPSILON)
        peer = eqx.tree_at(lambda m: (m.weight, m.bias), peer, (jnp.asarray(gamma), beta))
        jax_impls += [
            JaxImpl("eqx_norm", *_eqx(ours)),
            JaxImpl("equinox (vmap)", *_eqx(peer, batch_axes)),
            JaxImpl("jnp two-pass", _jnp_two_pass(case, True), ref_params),
        ]
        tm = torch.nn.GroupNorm(case.groups, channels, eps=EPSILON)
    with torch.no_grad():
        tm.weight.copy_(torch.from_numpy(gamma))
        if beta is not None:
            tm.bias.copy_(torch.from_numpy(beta))
    torch_impls.append(TorchImpl("torch", tm.to(tdt)))
    return jax_impls, torch_impls
