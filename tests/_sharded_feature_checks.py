"""``axis_name`` on 8 simulated CPU devices: the feature (channel) axis split under
``shard_map``; run only through tests/test_beyond_peers.py, which starts it in a subprocess
with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (set before jax is imported).

Each check splits the normalized axis of x, gamma and beta over a mesh axis "model" (with
the batch over "data" in the 2-D case) and compares the output and the gradients of x,
gamma and beta with the unsharded call on one device. Tolerance: float32 O(1) values; the
sharded statistics add partial sums in another order, a few ulps: 1e-5 for outputs, 1e-4
for gradients (sums over the batch of O(1) terms).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_input
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eqx_norm import GroupNorm, LayerNorm, RMSNorm

import reference

if jax.device_count() != 8:  # pragma: no cover - run outside test_beyond_peers.py
    pytest.skip(
        "needs XLA_FLAGS=--xla_force_host_platform_device_count=8; run "
        "tests/test_beyond_peers.py::test_axis_name_on_eight_devices_under_shard_map",
        allow_module_level=True,
    )

DEVICES = np.array(jax.devices())


def check_against_unsharded(sharded_layer, whole_layer, x, mesh, x_spec, param_spec, ref=None):
    """Output and gradients (x, gamma, beta) of the sharded layer under shard_map equal
    the unsharded layer's."""
    cotangent = random_input(x.shape, 99)

    def sharded(x, gamma, beta):
        def one(x, gamma, beta):
            return eqx.tree_at(lambda m: (m.gamma, m.beta), sharded_layer, (gamma, beta))(x)

        return jax.shard_map(
            one,
            mesh=mesh,
            in_specs=(x_spec, param_spec, param_spec),
            out_specs=x_spec,
        )(x, gamma, beta)

    def whole(x, gamma, beta):
        return eqx.tree_at(lambda m: (m.gamma, m.beta), whole_layer, (gamma, beta))(x)

    gamma, beta = (
        random_input(whole_layer.gamma.shape, 1, 1.0),
        random_input(whole_layer.gamma.shape, 2),
    )
    args = (
        jax.device_put(x, NamedSharding(mesh, x_spec)),
        jax.device_put(gamma, NamedSharding(mesh, param_spec)),
        jax.device_put(beta, NamedSharding(mesh, param_spec)),
    )
    y = jax.jit(sharded)(*args)
    assert y.sharding.spec == x_spec
    np.testing.assert_allclose(y, jax.jit(whole)(x, gamma, beta), atol=1e-5)
    if ref is not None:
        np.testing.assert_allclose(y, ref(x, gamma, beta), atol=1e-5)

    def grads(f, *a):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2)))(*a)

    for got, want in zip(grads(sharded, *args), grads(whole, x, gamma, beta), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_eight_devices():
    assert jax.device_count() == 8


@pytest.mark.parametrize("cls", [LayerNorm, RMSNorm])
def test_trailing_norm_feature_axis_split_over_eight(cls):
    mesh = Mesh(DEVICES, ("model",))
    x = random_input((6, 5, 64), 3, mean=100.0, std=3.0)
    ndim_ref = reference.layer_norm if cls is LayerNorm else reference.rms_norm
    check_against_unsharded(
        cls(8, use_bias=True, axis_name="model"),
        cls(64, use_bias=True),
        x,
        mesh,
        P(None, None, "model"),
        P("model"),
        ref=lambda x, g, b: ndim_ref(x, 1, g, b),
    )


def test_layer_norm_batch_and_feature_split_on_a_2x4_mesh():
    mesh = Mesh(DEVICES.reshape(2, 4), ("data", "model"))
    x = random_input((8, 32), 4, mean=5.0)
    check_against_unsharded(
        LayerNorm(8, axis_name="model"), LayerNorm(32), x, mesh, P("data", "model"), P("model")
    )


@pytest.mark.parametrize("num_groups", [1, 4, 16])  # groups over 8, over 2, within 1 shard
def test_group_norm_channel_axis_split_over_eight(num_groups):
    mesh = Mesh(DEVICES, ("model",))
    x = random_input((2, 4, 4, 32), 5, mean=20.0, std=2.0)
    check_against_unsharded(
        GroupNorm(num_groups, 4, axis_name="model"),
        GroupNorm(num_groups, 32),
        x,
        mesh,
        P(None, None, None, "model"),
        P("model"),
        ref=lambda x, g, b: reference.group_norm(x, num_groups, 2, g, b),
    )
