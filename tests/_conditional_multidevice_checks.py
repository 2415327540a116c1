"""Conditional normalization on 8 simulated CPU devices; run only through
tests/test_conditional.py::test_batch_sharded_jit_on_eight_devices, which starts it in a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before jax
is imported), as tests/test_devices.py runs tests/_multidevice_checks.py.

A batch-sharded jit of LayerNorm with per-example scale/shift, and of GroupNorm with
``activation="silu"`` and per-example scale/shift, equals the same call on one device and
the float64 reference. Tolerance: O(1) float32 outputs; the sharded program may order its
sums differently, a few ulps (eps_f32 = 1.2e-7): 1e-5 absolute.
"""

import jax
import numpy as np
import pytest
from helpers import random_input, random_layer
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eqx_norm import GroupNorm, LayerNorm

import reference

if jax.device_count() != 8:  # pragma: no cover - run outside test_conditional.py
    pytest.skip(
        "needs XLA_FLAGS=--xla_force_host_platform_device_count=8; run "
        "tests/test_conditional.py::test_batch_sharded_jit_on_eight_devices",
        allow_module_level=True,
    )

DEVICES = np.array(jax.devices())
ONE_DEVICE = jax.devices()[0]
ATOL = 1e-5


def on_one_device(fn, *args):
    """``fn(*args)`` compiled for a single device, the reference for every sharded run."""
    args = jax.device_put(args, ONE_DEVICE)
    out = jax.jit(fn)(*args)
    assert all(leaf.sharding.device_set == {ONE_DEVICE} for leaf in jax.tree.leaves(out))
    return out


def modulated(y, scale, shift, activation=None):
    y = y * (1 + np.asarray(scale, np.float64)) + np.asarray(shift, np.float64)
    return y / (1 + np.exp(-y)) if activation == "silu" else y


def batch_sharded(*arrays):
    sharding = NamedSharding(Mesh(DEVICES, ("batch",)), P("batch"))
    return [jax.device_put(a, sharding) for a in arrays]


def call(m, x, s, t):
    return m(x, scale=s, shift=t)


@pytest.mark.parametrize("implementation", ["kernel", "xla"])
def test_layer_norm_with_per_example_modulation_batch_sharded(implementation):
    layer = random_layer(LayerNorm, 64, implementation=implementation)
    x = random_input((16, 8, 64), mean=1.0, std=2.0)
    scale = random_input((16, 1, 64), seed=2, std=0.5)
    shift = random_input((16, 1, 64), seed=3, std=0.5)
    args = batch_sharded(x, scale, shift)
    y = jax.jit(call)(layer, *args)
    np.testing.assert_allclose(y, on_one_device(call, layer, x, scale, shift), atol=ATOL)
    want = modulated(reference.layer_norm(x, 1, layer.gamma, layer.beta), scale, shift)
    np.testing.assert_allclose(y, want, atol=ATOL)
    assert y.sharding.is_equivalent_to(args[0].sharding, y.ndim)
    assert {s.data.shape for s in y.addressable_shards} == {(2, 8, 64)}


@pytest.mark.parametrize("implementation", ["kernel", "xla"])
def test_group_norm_with_silu_and_modulation_batch_sharded(implementation):
    layer = random_layer(
        GroupNorm, 4, 16, param_shape=16, activation="silu", implementation=implementation
    )
    x = random_input((16, 4, 4, 16), mean=-1.0, std=2.0)
    scale = random_input((16, 1, 1, 16), seed=2, std=0.5)
    shift = random_input((16, 1, 1, 16), seed=3, std=0.5)
    args = batch_sharded(x, scale, shift)
    y = jax.jit(call)(layer, *args)
    np.testing.assert_allclose(y, on_one_device(call, layer, x, scale, shift), atol=ATOL)
    norm = reference.group_norm(x, 4, 2, layer.gamma, layer.beta, layer.epsilon)
    np.testing.assert_allclose(y, modulated(norm, scale, shift, "silu"), atol=ATOL)
    assert y.sharding.is_equivalent_to(args[0].sharding, y.ndim)
