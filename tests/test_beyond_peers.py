"""What no peer library offers (issue 19): the residual add + norm in one call, statistics
across a sharded feature axis (``axis_name``) and GroupNorm's ``group_size``. DyT has its
own file, tests/test_dyt.py.

Oracles: float64 NumPy (tests/reference.py) and the unfused composition ``norm(x + r)``,
on both implementations (the compiled kernel where it serves, and XLA). The sharded checks
here split the feature axis with ``jax.vmap(..., axis_name=...)`` on one device; the same
on 8 simulated devices under ``shard_map`` is tests/_sharded_feature_checks.py, run in a
subprocess by the last test.

Tolerances: float32 results within 1e-5 of float64 (relative to the largest value);
bfloat16 outputs within 1e-2 (one bf16 ulp is 2**-8 = 3.9e-3); the fused call against the
unfused composition within a few float32 ulps (2e-6): the two compute the same expression.
"""

from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    assert_checks_pass_on_simulated_devices,
    max_relative_error,
    random_input,
    random_layer,
)
from jax.test_util import check_grads

from eqx_norm import GroupNorm, InstanceNorm, LayerNorm, RMSNorm, functional

import reference

IMPLEMENTATIONS = [None, "xla"]  # None: the kernel where it serves (CPU float32/bfloat16)
TRAILING = [
    (LayerNorm, functional.layer_norm, reference.layer_norm),
    (RMSNorm, functional.rms_norm, reference.rms_norm),
]
# (x dtype, residual dtype): a float32 stream, a bf16 branch beside a float32 stream, all bf16
DTYPE_PAIRS = [
    (jnp.float32, jnp.float32),
    (jnp.bfloat16, jnp.float32),
    (jnp.bfloat16, jnp.bfloat16),
]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 1e-2}


def as64(a):
    return np.asarray(a, np.float64)


def unfused(layer, x, r):
    """The composition the fused call must equal: the float32 sum stored in r's dtype, then
    the layer, its output in x's dtype."""
    h = (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(r.dtype)
    return layer(h).astype(x.dtype)


# ------------------------------------------------------------------------------- residual


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("x_dtype", "r_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize(("cls", "_", "ref"), TRAILING)
def test_residual_matches_float64(cls, _, ref, x_dtype, r_dtype, implementation):
    layer = random_layer(cls, 64, implementation=implementation)
    x = random_input((6, 5, 64), seed=1, dtype=x_dtype)
    r = random_input((6, 5, 64), seed=2, mean=3.0, std=2.0, dtype=r_dtype)
    y, h = layer(x, residual=r)
    assert (y.shape, y.dtype, h.shape, h.dtype) == (x.shape, x_dtype, x.shape, r_dtype)
    h_want = as64(x) + as64(r)
    assert max_relative_error(h, h_want) <= TOLERANCE[r_dtype]
    # y is the norm of h as stored (in r's dtype), the stream the next block adds to
    y_want = ref(as64(h), 1, layer.gamma, layer.beta, epsilon=layer.epsilon)
    assert max_relative_error(y, y_want) <= TOLERANCE[x_dtype]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("x_dtype", "r_dtype"), DTYPE_PAIRS)
@pytest.mark.parametrize(("cls", "_", "__"), TRAILING)
def test_residual_equals_unfused_with_gradients(cls, _, __, x_dtype, r_dtype, implementation):
    layer = random_layer(cls, 32, implementation=implementation)
    x = random_input((8, 32), seed=3, dtype=x_dtype)
    r = random_input((8, 32), seed=4, mean=1.0, dtype=r_dtype)
    cy = random_input((8, 32), seed=5)
    ch = random_input((8, 32), seed=6)

    def grads(fused):
        def f(params, x, r):
            g, b = params
            m = eqx.tree_at(lambda m: (m.gamma, m.beta), layer, (g, b), is_leaf=lambda v: v is None)
            if fused:
                y, h = m(x, residual=r)
            else:
                h = (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(r.dtype)
                y = m(h).astype(x.dtype)  # y in x's dtype, as the fused call's
            return jnp.sum(y.astype(jnp.float32) * cy) + jnp.sum(h.astype(jnp.float32) * ch)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))((layer.gamma, layer.beta), x, r)

    got, want = grads(True), grads(False)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert g.dtype == w.dtype
        # a bf16 gradient of the fused kernel rounds once, the composition's twice
        assert max_relative_error(g, w) <= (1e-2 if g.dtype == jnp.bfloat16 else 1e-5)
    y, _ = layer(x, residual=r)
    np.testing.assert_allclose(as64(y), as64(unfused(layer, x, r)), rtol=2e-6, atol=2e-6)


@pytest.mark.slow
def test_residual_gradients_match_finite_differences(x64):
    x = random_input((3, 7), seed=7, dtype=jnp.float64)
    r = random_input((3, 7), seed=8, mean=2.0, dtype=jnp.float64)
    gamma = random_input((7,), seed=9, mean=1.0, dtype=jnp.float64)
    beta = random_input((7,), seed=10, dtype=jnp.float64)
    for fn in (functional.layer_norm, functional.rms_norm):

        def f(x, r, gamma, beta, fn=fn):
            y, h = fn(x, 7, gamma, beta, residual=r, implementation="xla")
            return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.cos(h))

        check_grads(f, (x, r, gamma, beta), order=2, modes=["rev", "fwd"])


@pytest.mark.slow
@pytest.mark.parametrize(("cls", "fn", "_"), TRAILING)
def test_residual_call_forms(cls, fn, _):
    layer = random_layer(cls, 16)
    x, r = random_input((4, 16), seed=1), random_input((4, 16), seed=2)
    y, h = layer(x, residual=r)
    (y_state, h_state), state = layer(x, "state", residual=r)
    assert state == "state"
    np.testing.assert_array_equal(y_state, y)
    np.testing.assert_array_equal(h_state, h)
    y_fn, h_fn = fn(x, 16, layer.gamma, layer.beta, residual=r)
    np.testing.assert_array_equal(y_fn, y)
    np.testing.assert_array_equal(h_fn, h)
    # under jit and vmap (a batch of examples equals the batched call)
    y_jit, h_jit = eqx.filter_jit(lambda m, x, r: m(x, residual=r))(layer, x, r)
    np.testing.assert_allclose(y_jit, y, atol=1e-6)
    np.testing.assert_array_equal(h_jit, h)
    y_vmap, h_vmap = jax.vmap(lambda x, r: layer(x, residual=r))(x, r)
    np.testing.assert_allclose(y_vmap, y, atol=1e-6)
    np.testing.assert_array_equal(h_vmap, h)
    # dtype sets y's dtype, not h's
    y16, h32 = cls(16, dtype=jnp.bfloat16)(x, residual=r)
    assert (y16.dtype, h32.dtype) == (jnp.bfloat16, jnp.float32)


@pytest.mark.parametrize(("cls", "_", "ref"), TRAILING)
def test_residual_with_mask_masks_only_the_statistics(cls, _, ref):
    layer = random_layer(cls, 16, use_bias=True)
    x, r = random_input((4, 16), seed=1), random_input((4, 16), seed=2, mean=5.0)
    mask = jnp.arange(16)[None, :] % 3 != 0
    y, h = layer(x, residual=r, mask=mask)
    np.testing.assert_allclose(h, x + r, rtol=1e-6)  # h is the whole sum, mask or not
    want = ref(as64(x) + as64(r), 1, layer.gamma, layer.beta, epsilon=layer.epsilon, mask=mask)
    want = np.where(mask, want, as64(layer.beta))
    assert max_relative_error(y, want) <= 1e-5


@pytest.mark.parametrize(
    ("residual", "error", "match"),
    [
        (jnp.zeros((4, 8)), ValueError, r"`residual` must have x's shape \(4, 16\).*\(4, 8\)"),
        (jnp.zeros((16,)), ValueError, r"`residual` must have x's shape .*never broadcast"),
        (jnp.zeros((4, 16), jnp.int32), TypeError, r"`residual` must be a floating .*int32"),
        ("abc", TypeError, r"`residual` must be None or a floating array"),
    ],
)
@pytest.mark.parametrize(("cls", "_", "__"), TRAILING)
def test_bad_residual_is_an_error_naming_it(cls, _, __, residual, error, match):
    with pytest.raises(error, match=match):
        cls(16)(jnp.zeros((4, 16)), residual=residual)


def test_kernel_with_residual_serves_or_says_why():
    x = random_input((8, 32), dtype=jnp.bfloat16)
    y, h = functional.layer_norm(x, 32, residual=jnp.zeros((8, 32)), implementation="kernel")
    assert (y.dtype, h.dtype) == (jnp.bfloat16, jnp.float32)
    with pytest.raises(ValueError, match=r"x of float32 with a residual of bfloat16"):
        functional.layer_norm(x.astype(jnp.float32), 32, residual=x, implementation="kernel")


# ------------------------------------------------------------------------------ axis_name


def split_features(fn, x, params, shards, axis_name="features"):
    """``fn(x_shard, *param_shards)`` on ``shards`` feature shards of ``x`` (last axis),
    mapped by ``jax.vmap`` with ``axis_name``, joined back into x's shape."""
    xs = x.reshape(*x.shape[:-1], shards, x.shape[-1] // shards)
    ps = [None if p is None else p.reshape(shards, -1) for p in params]
    out = jax.vmap(
        fn, in_axes=(x.ndim - 1, *(0 for _ in ps)), out_axes=x.ndim - 1, axis_name=axis_name
    )(xs, *ps)
    return out.reshape(x.shape)


@pytest.mark.parametrize(("cls", "fn", "ref"), TRAILING)
def test_axis_name_equals_unsharded_with_gradients(cls, fn, ref):
    layer = random_layer(cls, 64, use_bias=True)
    x = random_input((5, 64), seed=2, mean=1e3, std=3.0)  # a large mean: merged two-pass
    cotangent = random_input((5, 64), seed=3)

    def sharded(x, gamma, beta):
        return split_features(
            lambda x, g, b: fn(x, 16, g, b, axis_name="features"), x, (gamma, beta), 4
        )

    def whole(x, gamma, beta):
        return fn(x, 64, gamma, beta)

    y = jax.jit(sharded)(x, layer.gamma, layer.beta)
    assert max_relative_error(y, ref(x, 1, layer.gamma, layer.beta)) <= 1e-5
    np.testing.assert_allclose(y, whole(x, layer.gamma, layer.beta), atol=2e-5)

    def grads(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2)))(
            x, layer.gamma, layer.beta
        )

    for got, want in zip(grads(sharded), grads(whole), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_axis_name_layer_with_mask_and_residual():
    layer = LayerNorm(8, axis_name="features")
    x, r = random_input((3, 32), seed=1), random_input((3, 32), seed=2)
    mask = jnp.arange(32) % 5 != 0
    gamma, beta = random_input((32,), seed=3, mean=1.0), random_input((32,), seed=4)

    xs, rs = x.reshape(3, 4, 8), r.reshape(3, 4, 8)

    def one(x, r, m, g, b):
        model = eqx.tree_at(lambda mod: (mod.gamma, mod.beta), layer, (g, b))
        return model(x, residual=r, mask=m[None, :])

    y, h = jax.vmap(one, in_axes=(1, 1, 0, 0, 0), out_axes=1, axis_name="features")(
        xs, rs, mask.reshape(4, 8), gamma.reshape(4, 8), beta.reshape(4, 8)
    )
    want_y, want_h = functional.layer_norm(x, 32, gamma, beta, residual=r, mask=mask[None, :])
    np.testing.assert_allclose(y.reshape(3, 32), want_y, atol=1e-5)
    np.testing.assert_allclose(h.reshape(3, 32), want_h, atol=1e-6)


@pytest.mark.parametrize(
    ("shards", "kwargs"),
    [
        (4, {"num_groups": 2}),  # each group spans 2 shards
        (4, {"num_groups": 8}),  # each shard holds 2 whole groups
        (2, {"num_groups": 1}),  # one group over every shard: LayerNorm with per-channel affine
        (4, {"group_size": 8}),  # group_size is the same sharded or not
    ],
)
@pytest.mark.slow
def test_group_norm_axis_name_equals_unsharded_with_gradients(shards, kwargs):
    channels = 16
    x = random_input((2, 3, 3, channels), seed=4, mean=50.0, std=2.0)
    gamma = random_input((channels,), seed=5, mean=1.0)
    beta = random_input((channels,), seed=6)
    cotangent = random_input(x.shape, seed=7)
    layer = GroupNorm(**kwargs, num_channels=channels // shards, axis_name="channels")
    whole_layer = GroupNorm(**kwargs, num_channels=channels)

    def sharded(x, gamma, beta):
        def one(x, g, b):
            return eqx.tree_at(lambda m: (m.gamma, m.beta), layer, (g, b))(x)

        return split_features(one, x, (gamma, beta), shards, axis_name="channels")

    def whole(x, gamma, beta):
        return eqx.tree_at(lambda m: (m.gamma, m.beta), whole_layer, (gamma, beta))(x)

    y = jax.jit(sharded)(x, gamma, beta)
    want = reference.group_norm(x, whole_layer.num_groups, 2, gamma, beta)
    assert max_relative_error(y, want) <= 1e-5

    def grads(f):
        return jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) * cotangent), argnums=(0, 1, 2)))(
            x, gamma, beta
        )

    for got, w in zip(grads(sharded), grads(whole), strict=True):
        np.testing.assert_allclose(got, w, rtol=1e-4, atol=1e-4)


def test_group_norm_axis_name_groups_that_straddle_shards_are_an_error():
    layer = GroupNorm(num_channels=6, group_size=4, axis_name="channels")  # 4 ∤ 6, 6 ∤ 4
    x = jnp.zeros((2, 4, 4, 2, 6))
    with pytest.raises(ValueError, match=r"each shard's 6 channels must hold whole groups"):
        jax.vmap(layer, in_axes=3, axis_name="channels")(x)


def test_axis_name_errors():
    x = jnp.zeros((4, 16))
    with pytest.raises(ValueError, match=r"`axis_name`='f' needs the XLA path"):
        LayerNorm(16, axis_name="f", implementation="kernel")
    with pytest.raises(ValueError, match=r"implementation='kernel' cannot serve .*axis_name"):
        jax.vmap(
            lambda x: functional.rms_norm(x, 16, axis_name="f", implementation="kernel"),
            axis_name="f",
        )(x[None])
    with pytest.raises(NameError, match=r"axis_name='f' is not a mapped axis here"):
        LayerNorm(16, axis_name="f")(x)
    with pytest.raises(NameError, match=r"axis_name='f' is not a mapped axis here"):
        GroupNorm(2, 16, spatial_ndim=0, axis_name="f")(x)


@pytest.mark.slow  # a subprocess that imports jax afresh; CI runs it
def test_axis_name_on_eight_devices_under_shard_map():
    """tests/_sharded_feature_checks.py in a subprocess with 8 simulated CPU devices."""
    checks = Path(__file__).resolve().parent / "_sharded_feature_checks.py"
    assert_checks_pass_on_simulated_devices(checks, devices=8, timeout=300)


# ----------------------------------------------------------------------------- group_size


@pytest.mark.slow
@pytest.mark.parametrize(("channels", "group_size"), [(12, 1), (12, 3), (12, 12), (8, 4)])
def test_group_size_equals_num_groups_and_float64(channels, group_size):
    x = random_input((2, 5, 5, channels), seed=1, mean=3.0)
    gamma = random_input((channels,), seed=2, mean=1.0)
    beta = random_input((channels,), seed=3)
    layer = GroupNorm(
        num_channels=channels, group_size=group_size, scale_initializer=gamma, bias_initializer=beta
    )
    assert (layer.num_groups, layer.group_size) == (channels // group_size, group_size)
    y = layer(x)
    by_count = eqx.tree_at(
        lambda m: (m.gamma, m.beta), GroupNorm(channels // group_size, channels), (gamma, beta)
    )
    np.testing.assert_array_equal(y, by_count(x))
    want = reference.group_norm(x, channels // group_size, 2, gamma, beta)
    assert max_relative_error(y, want) <= 1e-5
    y_fn = functional.group_norm(x, None, gamma, beta, group_size=group_size)
    np.testing.assert_array_equal(y_fn, y)
    if group_size == 1:
        np.testing.assert_allclose(
            y, InstanceNorm(channels, scale_initializer=gamma, bias_initializer=beta)(x), atol=1e-6
        )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"num_channels": 8},
            ValueError,
            r"exactly one of `num_groups` .* and `group_size`.*neither",
        ),
        (
            {"num_groups": 2, "num_channels": 8, "group_size": 4},
            ValueError,
            r"exactly one of `num_groups`.*got num_groups=2 and group_size=4",
        ),
        (
            {"num_channels": 8, "group_size": 3},
            ValueError,
            r"`group_size`=3 must divide `num_channels`=8",
        ),
        ({"num_channels": 8, "group_size": 0}, ValueError, r"group_size"),
        (
            {"group_size": 2},
            TypeError,
            r"`num_channels`, the size of the channel axis, is required",
        ),
    ],
)
def test_group_size_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        GroupNorm(**kwargs)


def test_functional_group_size_errors():
    x = jnp.zeros((2, 4, 4, 6))
    with pytest.raises(ValueError, match=r"group_norm: pass exactly one of `num_groups`"):
        functional.group_norm(x)
    with pytest.raises(
        ValueError, match=r"group_norm: pass exactly one of .*num_groups=3 and group_size=2"
    ):
        functional.group_norm(x, 3, group_size=2)
    with pytest.raises(
        ValueError, match=r"`group_size`=4 must divide the number of channels.*6 channels"
    ):
        functional.group_norm(x, group_size=4)
