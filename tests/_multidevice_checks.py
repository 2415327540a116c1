"""LayerNorm on 8 simulated CPU devices; run only through tests/test_devices.py.

test_devices.py runs ``pytest tests/_multidevice_checks.py`` in a subprocess whose
environment has ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be
set before jax is imported, which conftest.py does first), so the rest of the suite keeps
its one device. Every sharded result is compared with the same computation on one device.

Tolerance: outputs and parameters are O(1) float32; a sharded reduction adds its partial
sums in another order, which moves results by a few ulps (eps_f32 = 1.2e-7), so 1e-5
absolute (1e-5 relative for the loss) is tight yet robust.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import random_input, random_layer
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from eqx_norm import LayerNorm

import reference

if jax.device_count() != 8:  # pragma: no cover - run outside test_devices.py
    pytest.skip(
        "needs XLA_FLAGS=--xla_force_host_platform_device_count=8; run tests/test_devices.py",
        allow_module_level=True,
    )

DEVICES = np.array(jax.devices())
ONE_DEVICE = jax.devices()[0]
ATOL = 1e-5


# every layer check runs on both implementations: the compiled kernel and pure XLA
with_both_implementations = pytest.mark.parametrize("implementation", ["kernel", "xla"])


def on_one_device(fn, *args):
    """``fn(*args)`` compiled for a single device, the reference for every sharded run."""
    args = jax.device_put(args, ONE_DEVICE)
    out = jax.jit(fn)(*args)
    assert all(leaf.sharding.device_set == {ONE_DEVICE} for leaf in jax.tree.leaves(out))
    return out


def test_eight_devices():
    assert jax.device_count() == 8 and jax.devices()[0].platform == "cpu"


@with_both_implementations
def test_pmap_matches_one_device(implementation):
    layer = random_layer(LayerNorm, 16, implementation=implementation)
    x = random_input((8, 4, 16), mean=3.0, std=2.0)  # one (4, 16) slice per device
    y = jax.pmap(lambda m, x: m(x), in_axes=(None, 0))(layer, x)
    assert len(y.sharding.device_set) == 8
    expected = on_one_device(lambda m, x: m(x), layer, x)
    np.testing.assert_allclose(y, expected, atol=ATOL)
    np.testing.assert_allclose(y, reference.layer_norm(x, 1, layer.gamma, layer.beta), atol=ATOL)


@with_both_implementations
def test_jit_batch_sharded_in_batch_sharded_out(implementation):
    mesh = Mesh(DEVICES, ("batch",))
    layer = random_layer(LayerNorm, (5, 16), implementation=implementation)
    x = random_input((32, 5, 16), mean=3.0, std=2.0)
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("batch")))
    y = jax.jit(lambda m, x: m(x))(layer, x_sharded)
    np.testing.assert_allclose(y, on_one_device(lambda m, x: m(x), layer, x), atol=ATOL)
    # the sharding a user expects: each device keeps its own examples
    assert y.sharding.is_equivalent_to(x_sharded.sharding, y.ndim)
    assert {s.data.shape for s in y.addressable_shards} == {(4, 5, 16)}


@pytest.mark.parametrize(
    ("mesh_shape", "x_spec", "param_spec"),
    [
        ((8,), P(None, "model"), P("model")),  # the normalized axis split over 8 devices
        ((2, 4), P("data", "model"), P("model")),  # batch over 2, features over 4
        ((2, 4), P(None, "data", "model"), P("data", "model")),  # both normalized axes split
    ],
)
@with_both_implementations
def test_jit_normalized_axes_sharded(mesh_shape, x_spec, param_spec, implementation):
    # XLA must combine the per-device partial sums of the mean and the variance
    axes = ("model",) if len(mesh_shape) == 1 else ("data", "model")
    mesh = Mesh(DEVICES.reshape(mesh_shape), axes)
    if len(x_spec) == 3:
        layer, x = (
            random_layer(LayerNorm, (4, 64), implementation=implementation),
            random_input((6, 4, 64), mean=3.0, std=2.0),
        )
    else:
        layer, x = (
            random_layer(LayerNorm, 64, implementation=implementation),
            random_input((6, 64), mean=3.0, std=2.0),
        )
    x_sharded = jax.device_put(x, NamedSharding(mesh, x_spec))
    layer_sharded = jax.device_put(layer, NamedSharding(mesh, param_spec))
    y = jax.jit(lambda m, x: m(x))(layer_sharded, x_sharded)
    np.testing.assert_allclose(y, on_one_device(lambda m, x: m(x), layer, x), atol=ATOL)
    ndim = len(layer.normalized_shape)
    np.testing.assert_allclose(y, reference.layer_norm(x, ndim, layer.gamma, layer.beta), atol=ATOL)

    # and its gradient, which needs the same cross-device sums in the backward pass
    def loss(m, x):
        return jnp.sum(jnp.sin(m(x)))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(layer_sharded, x_sharded)
    expected = on_one_device(jax.grad(loss, argnums=(0, 1)), layer, x)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)  # sums over <= 384 terms


@with_both_implementations
def test_shard_map_matches_one_device(implementation):
    mesh = Mesh(DEVICES, ("batch",))
    layer = random_layer(LayerNorm, 16, implementation=implementation)
    x = random_input((16, 3, 16), mean=3.0, std=2.0)
    fn = jax.shard_map(lambda x: layer(x), mesh=mesh, in_specs=P("batch"), out_specs=P("batch"))
    y = jax.jit(fn)(jax.device_put(x, NamedSharding(mesh, P("batch"))))
    np.testing.assert_allclose(y, on_one_device(lambda m, x: m(x), layer, x), atol=ATOL)
    assert y.sharding.spec == P("batch")


def make_model():
    k1, k2 = jax.random.split(jax.random.key(0))
    return eqx.nn.Sequential(
        [
            eqx.nn.Linear(12, 32, key=k1),
            LayerNorm(32),
            eqx.nn.Lambda(jax.nn.gelu),
            eqx.nn.Linear(32, 3, key=k2),
        ]
    )


def make_batch(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, (n, 12)).astype(np.float32)
    y = np.stack([np.sin(x[:, 0]), x[:, 1] * x[:, 2], np.cos(x.sum(1))], 1).astype(np.float32)
    return x, y


OPTIMIZER = optax.adamw(1e-2)


def optimizer_update(grads, opt_state, params):
    # optax's Adam bias correction raises an int32 count to a float power, which the strict
    # promotion of conftest.py rejects (an optax matter); LayerNorm itself runs strict
    with jax.numpy_dtype_promotion("standard"):
        return OPTIMIZER.update(grads, opt_state, params)


def loss_fn(model, x, y):
    return jnp.mean(jnp.square(jax.vmap(model)(x) - y))


@eqx.filter_jit
def train_step(model, opt_state, x, y):
    loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
    updates, opt_state = optimizer_update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), opt_state, loss


def put(model, sharding):
    """The model with its arrays placed by ``sharding`` (its functions stay as they are)."""
    params, static = eqx.partition(model, eqx.is_array)
    return eqx.combine(jax.device_put(params, sharding), static)


def run_one_device(steps):
    model = put(make_model(), ONE_DEVICE)
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_array))
    x, y = jax.device_put(make_batch(), ONE_DEVICE)
    losses = []
    for _ in range(steps):
        model, opt_state, loss = train_step(model, opt_state, x, y)
        losses.append(loss)
    assert model[1].gamma.sharding.device_set == {ONE_DEVICE}
    return model, np.array(losses)


def assert_same_model(got, expected):
    got, expected = eqx.filter(got, eqx.is_array), eqx.filter(expected, eqx.is_array)
    assert jax.tree.structure(got) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, atol=ATOL, rtol=1e-5)


def test_sharded_training_step_matches_one_device():
    mesh = Mesh(DEVICES, ("batch",))
    replicated = NamedSharding(mesh, P())
    model = put(make_model(), replicated)  # parameters replicated
    opt_state = OPTIMIZER.init(eqx.filter(model, eqx.is_array))
    x, y = jax.device_put(make_batch(), NamedSharding(mesh, P("batch")))  # batch sharded
    losses = []
    for _ in range(2):
        model, opt_state, loss = train_step(model, opt_state, x, y)
        losses.append(loss)
    expected_model, expected_losses = run_one_device(2)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    assert_same_model(model, expected_model)
    # parameters stay replicated on all 8 devices, the loss too
    for leaf in jax.tree.leaves(eqx.filter(model, eqx.is_array)):
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    assert losses[-1].sharding.is_fully_replicated


def test_pmap_step_with_pmean_matches_one_device():
    params, static = eqx.partition(make_model(), eqx.is_array)
    opt_state = OPTIMIZER.init(params)

    @functools.partial(jax.pmap, axis_name="devices")
    def pmap_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, static), x, y))(params)
        # equal shards: the mean of the per-device means is the mean over the global batch
        grads = jax.lax.pmean(grads, "devices")
        loss = jax.lax.pmean(loss, "devices")
        updates, opt_state = optimizer_update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    def replicate(tree):
        return jax.tree.map(lambda a: jnp.broadcast_to(a, (8, *jnp.shape(a))), tree)

    x, y = make_batch()
    x, y = x.reshape(8, 8, 12), y.reshape(8, 8, 3)
    params, opt_state = replicate(params), replicate(opt_state)
    losses = []
    for _ in range(2):
        params, opt_state, loss = pmap_step(params, opt_state, x, y)
        np.testing.assert_array_equal(loss, loss[0])  # every device agrees
        losses.append(loss[0])
    expected_model, expected_losses = run_one_device(2)
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-5)
    for leaf in jax.tree.leaves(params):  # every replica holds the same parameters
        np.testing.assert_array_equal(leaf, jnp.broadcast_to(leaf[0], leaf.shape))
    assert_same_model(eqx.combine(jax.tree.map(lambda a: a[0], params), static), expected_model)
