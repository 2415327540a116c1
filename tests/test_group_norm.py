"""GroupNorm and InstanceNorm against float64 NumPy, torch.nn, equinox.nn and brainpy's examples.

Tolerances: outputs are O(1) after normalization, so float32 results are compared at 1e-5
(a few float32 roundings over groups of up to ~1e4 elements, eps_f32 = 1.2e-7; 2e-5 for
the largest torch comparisons); gradients at 1e-3 relative to float64 torch autograd.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOL, jitted_gradients, max_relative_error, random_input, random_layer

from eqx_norm import GroupNorm, InstanceNorm

import reference


def random_group_norm(num_groups, num_channels, seed=0, **kwargs):
    """A GroupNorm with non-trivial per-channel gamma and beta."""
    return random_layer(
        GroupNorm, num_groups, num_channels, seed=seed, param_shape=num_channels, **kwargs
    )


def random_instance_norm(num_channels, seed=0, **kwargs):
    return random_layer(InstanceNorm, num_channels, seed=seed, **kwargs)


def to_torch(a, dtype=None):
    torch = pytest.importorskip("torch")
    return torch.tensor(np.asarray(a, dtype))


# ----------------------------------------------------------------------------- brainpy


@pytest.mark.slow
def test_brainpy_examples():
    # brainpy.dnn.GroupNorm's documented examples, channels-last (N, H, W, C)
    x = random_input((20, 10, 10, 6), mean=1.0, std=2.0)
    # separate 6 channels into 3 groups
    layer = random_group_norm(3, 6)
    np.testing.assert_allclose(
        layer(x), reference.group_norm(x, 3, 2, layer.gamma, layer.beta), atol=TOL[jnp.float32]
    )
    # separate 6 channels into 6 groups (equivalent to InstanceNorm)
    six = random_group_norm(6, 6)
    instance = random_instance_norm(6)
    np.testing.assert_allclose(eqx.filter_jit(six)(x), eqx.filter_jit(instance)(x), atol=1e-6)
    np.testing.assert_allclose(
        instance(x), reference.instance_norm(x, 2, six.gamma, six.beta), atol=TOL[jnp.float32]
    )
    # put all 6 channels into one group (equivalent to LayerNorm over (H, W, C), with
    # per-channel parameters broadcast over space)
    one = random_group_norm(1, 6)
    gamma = np.broadcast_to(np.asarray(one.gamma), (10, 10, 6))
    beta = np.broadcast_to(np.asarray(one.beta), (10, 10, 6))
    np.testing.assert_allclose(
        eqx.filter_jit(one)(x), reference.layer_norm(x, 3, gamma, beta), atol=TOL[jnp.float32]
    )


# ----------------------------------------------------------------------------- float64


LAYOUTS = [  # (input shape, num_groups, num_channels, spatial_ndim, channel_axis)
    ((20, 10, 10, 6), 3, 6, 2, -1),  # batched image, channels-last
    ((10, 10, 6), 2, 6, 2, -1),  # unbatched image
    ((2, 3, 5, 7, 8), 4, 8, 2, -1),  # two batch axes
    ((4, 16, 6), 3, 6, 1, -1),  # 1-D signals
    ((2, 4, 5, 6, 4), 2, 4, 3, -1),  # volumes
    ((4, 6, 7, 5), 3, 6, 2, 0),  # channels-first (torch layout)
    ((6, 7, 5), 2, 6, 2, 0),  # unbatched channels-first
]


@pytest.mark.parametrize(
    ("shape", "groups", "channels", "spatial_ndim", "channel_axis", "affine"),
    [(*layout, True) for layout in LAYOUTS] + [(*LAYOUTS[0], False), (*LAYOUTS[5], False)],
)
@pytest.mark.slow
def test_group_norm_matches_float64_numpy(
    shape, groups, channels, spatial_ndim, channel_axis, affine
):
    layer = random_group_norm(
        groups,
        channels,
        spatial_ndim=spatial_ndim,
        channel_axis=channel_axis,
        elementwise_affine=affine,
    )
    x = random_input(shape, mean=3.0, std=2.0)
    y = eqx.filter_jit(layer)(x)
    expected = reference.group_norm(
        x, groups, spatial_ndim, layer.gamma, layer.beta, channel_axis=channel_axis
    )
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y, expected, atol=TOL[jnp.float32], rtol=TOL[jnp.float32])
    assert (layer.gamma is None) == (not affine)


@pytest.mark.parametrize(("shape", "groups", "channels", "spatial_ndim", "channel_axis"), LAYOUTS)
def test_instance_norm_matches_float64_numpy(shape, groups, channels, spatial_ndim, channel_axis):
    del groups
    layer = random_instance_norm(channels, spatial_ndim=spatial_ndim, channel_axis=channel_axis)
    x = random_input(shape, mean=-2.0, std=0.5)
    expected = reference.instance_norm(
        x, spatial_ndim, layer.gamma, layer.beta, channel_axis=channel_axis
    )
    np.testing.assert_allclose(
        eqx.filter_jit(layer)(x), expected, atol=TOL[jnp.float32], rtol=TOL[jnp.float32]
    )
    assert layer.num_groups == channels


@pytest.mark.slow
def test_batched_equals_vmap_over_examples():
    layer = random_group_norm(2, 4, channel_axis=0)
    x = random_input((3, 5, 4, 6, 7))  # (*batch, C, H, W)
    y = layer(x)
    np.testing.assert_allclose(eqx.filter_jit(jax.vmap(jax.vmap(layer)))(x), y, atol=1e-6)
    np.testing.assert_allclose(eqx.filter_jit(layer)(x), y, atol=1e-6)


@pytest.mark.parametrize("mean", [1e3, 1e4])
def test_accurate_at_large_offsets(mean):
    layer = GroupNorm(4, 32)
    x = random_input((4, 8, 8, 32), mean=mean)
    error = np.abs(eqx.filter_jit(layer)(x) - reference.group_norm(x, 4, 2)).max()
    # float32 spacing at 1e4 is 1e-3: the deviations x - mean carry that absolute error
    assert error < 2e-3 * max(1.0, mean / 1e4), error


def test_constant_group_gives_beta_exactly():
    layer = random_group_norm(2, 4)
    x = jnp.full((2, 3, 3, 4), 1e4, jnp.float32)
    np.testing.assert_array_equal(layer(x), jnp.broadcast_to(layer.beta, x.shape))


# ----------------------------------------------------------------------------- torch


def torch_channels_first(x):
    return to_torch(x).movedim(-1, 1)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "groups"), [((16, 32, 32, 128), 32), ((2, 7, 9, 6), 3), ((4, 12, 10), 1)]
)
def test_group_norm_matches_torch(shape, groups):
    torch = pytest.importorskip("torch")
    channels = shape[-1]
    spatial_ndim = len(shape) - 2
    layer = random_group_norm(groups, channels, spatial_ndim=spatial_ndim)
    x = random_input(shape, mean=0.5, std=1.5)
    torch_layer = torch.nn.GroupNorm(groups, channels, eps=layer.epsilon)
    with torch.no_grad():
        torch_layer.weight.copy_(to_torch(layer.gamma))
        torch_layer.bias.copy_(to_torch(layer.beta))
        expected = torch_layer(torch_channels_first(x)).movedim(1, -1).numpy()
    np.testing.assert_allclose(eqx.filter_jit(layer)(x), expected, atol=2e-5, rtol=TOL[jnp.float32])
    # the same layer in torch's own layout
    channels_first = random_group_norm(groups, channels, spatial_ndim=spatial_ndim, channel_axis=0)
    y = eqx.filter_jit(channels_first)(jnp.moveaxis(x, -1, 1))
    np.testing.assert_allclose(jnp.moveaxis(y, 1, -1), expected, atol=2e-5, rtol=TOL[jnp.float32])


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "torch_class"),
    [
        ((8, 64, 16), "InstanceNorm1d"),
        ((8, 32, 32, 16), "InstanceNorm2d"),
        ((2, 6, 7, 8, 5), "InstanceNorm3d"),
        ((32, 32, 16), "InstanceNorm2d"),  # unbatched: torch takes (C, H, W) too
    ],
)
def test_instance_norm_matches_torch(shape, torch_class):
    torch = pytest.importorskip("torch")
    channels = shape[-1]
    spatial_ndim = {"InstanceNorm1d": 1, "InstanceNorm2d": 2, "InstanceNorm3d": 3}[torch_class]
    torch_class = getattr(torch.nn, torch_class)
    layer = random_instance_norm(channels, spatial_ndim=spatial_ndim)
    x = random_input(shape, mean=-1.0, std=3.0)
    torch_layer = torch_class(channels, eps=layer.epsilon, affine=True)
    with torch.no_grad():
        torch_layer.weight.copy_(to_torch(layer.gamma))
        torch_layer.bias.copy_(to_torch(layer.beta))
        channel_axis = len(shape) - spatial_ndim - 1
        expected = torch_layer(to_torch(x).movedim(-1, channel_axis)).movedim(channel_axis, -1)
    np.testing.assert_allclose(
        eqx.filter_jit(layer)(x), expected.numpy(), atol=TOL[jnp.float32], rtol=TOL[jnp.float32]
    )


def float64_torch_gradients(torch_fn, x, gamma, beta, cotangent):
    """Gradients of sum(cotangent * f(x)) by torch autograd in float64, channels-last."""
    torch = pytest.importorskip("torch")
    tx, tg, tb = (
        torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (x, gamma, beta)
    )
    y = torch_fn(tx.movedim(-1, 1), tg, tb).movedim(1, -1)
    (y * to_torch(cotangent, np.float64)).sum().backward()
    return tx.grad.numpy(), tg.grad.numpy(), tb.grad.numpy()


def assert_gradients_close(ours, expected):
    for got, want, name in zip(ours, expected, ["dx", "dgamma", "dbeta"]):
        error = max_relative_error(got, want)
        # float32 sums over up to ~1e5 terms per group: relative error well under 1e-3
        assert error < 1e-3, (name, error)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "groups", "mean"),
    [((16, 32, 32, 128), 32, 0.0), ((8, 16, 16, 64), 8, 1e3), ((3, 5, 4, 6), 2, 0.0)],
)
def test_group_norm_jitted_gradients_match_float64_torch(shape, groups, mean):
    torch = pytest.importorskip("torch")
    layer = random_group_norm(groups, shape[-1])
    x = random_input(shape, mean=mean)
    cotangent = random_input(shape, seed=7)
    expected = float64_torch_gradients(
        lambda x, g, b: torch.nn.functional.group_norm(x, groups, g, b, layer.epsilon),
        x,
        layer.gamma,
        layer.beta,
        cotangent,
    )
    assert_gradients_close(jitted_gradients(layer, x, cotangent), expected)


@pytest.mark.slow
def test_instance_norm_jitted_gradients_match_float64_torch():
    torch = pytest.importorskip("torch")
    shape = (8, 32, 32, 64)
    layer = random_instance_norm(shape[-1])
    x = random_input(shape, mean=2.0)
    cotangent = random_input(shape, seed=7)
    expected = float64_torch_gradients(
        lambda x, g, b: torch.nn.functional.instance_norm(x, weight=g, bias=b, eps=layer.epsilon),
        x,
        layer.gamma,
        layer.beta,
        cotangent,
    )
    assert_gradients_close(jitted_gradients(layer, x, cotangent), expected)


def test_group_norm_matches_equinox_channels_first_under_vmap():
    ours = random_group_norm(4, 8, channel_axis=0)
    theirs = eqx.nn.GroupNorm(4, 8, eps=ours.epsilon)
    theirs = eqx.tree_at(lambda m: (m.weight, m.bias), theirs, (ours.gamma, ours.beta))
    x = random_input((5, 8, 6, 7), mean=1.0)  # (N, C, H, W): equinox needs vmap over N
    np.testing.assert_allclose(
        eqx.filter_jit(ours)(x),
        eqx.filter_jit(jax.vmap(theirs))(x),
        atol=TOL[jnp.float32],
        rtol=TOL[jnp.float32],
    )


# ----------------------------------------------------------------------------- masks


@pytest.mark.slow
@pytest.mark.parametrize("channel_axis", [-1, 0])
def test_padded_images_mask(channel_axis):
    # each image of a batch is padded to 8x8; the mask has one entry per pixel
    layer = random_group_norm(2, 6, channel_axis=channel_axis)
    x = random_input((3, 8, 8, 6), mean=1.0)
    valid = np.zeros((3, 8, 8, 1), bool)
    valid[0, :5, :6] = valid[1, :8, :3] = valid[2] = True
    if channel_axis == 0:
        x, valid = jnp.moveaxis(x, -1, 1), np.moveaxis(valid, -1, 1)
    y = jax.jit(lambda x, m: layer(x, mask=m))(x, jnp.asarray(valid))
    expected = reference.group_norm(
        x, 2, 2, layer.gamma, layer.beta, mask=valid, channel_axis=channel_axis
    )
    np.testing.assert_allclose(y, expected, atol=TOL[jnp.float32])
    # the statistics of the valid region do not depend on the padding's values
    padded = jnp.where(valid, x, 1e6)
    np.testing.assert_allclose(
        jax.jit(lambda x, m: layer(x, mask=m))(padded, jnp.asarray(valid)), y, atol=TOL[jnp.float32]
    )


# ----------------------------------------------------------------------------- structure


def test_parameters_are_per_channel_and_the_only_leaves():
    layer = GroupNorm(2, 6, spatial_ndim=3)
    assert [a.shape for a in jax.tree_util.tree_leaves(layer)] == [(6,), (6,)]
    np.testing.assert_array_equal(layer.gamma, np.ones(6))
    np.testing.assert_array_equal(layer.beta, np.zeros(6))
    assert jax.tree_util.tree_leaves(InstanceNorm(6, elementwise_affine=False)) == []
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.gamma = jnp.zeros(6)
    assert "GroupNorm(" in repr(layer) and "num_groups=2" in repr(layer)


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (
            lambda: GroupNorm(4, 6),
            ValueError,
            r"GroupNorm: `num_groups`=4 must divide `num_channels`=6",
        ),
        (lambda: GroupNorm(0, 6), ValueError, r"`num_groups` must be a positive int, got 0"),
        (lambda: GroupNorm(2, -4), ValueError, r"`num_channels` must be a positive int, got -4"),
        (lambda: GroupNorm(2.0, 4), TypeError, r"`num_groups` must be a positive int, got 2.0"),
        (lambda: InstanceNorm(0), ValueError, r"`num_channels` must be a positive int, got 0"),
        (
            lambda: GroupNorm(2, 4, spatial_ndim=-1),
            ValueError,
            r"`spatial_ndim` must be a non-negative int, got -1",
        ),
        (
            lambda: InstanceNorm(4, spatial_ndim=0),
            ValueError,
            r"`spatial_ndim` must be a positive int, got 0 \(one example needs a spatial axis",
        ),
        (
            lambda: InstanceNorm(4, spatial_ndim=-1),
            ValueError,
            r"`spatial_ndim` must be a positive int, got -1",
        ),
        (
            lambda: GroupNorm(2, 4, channel_axis=3),
            ValueError,
            r"GroupNorm: `channel_axis` must be -1 \(channels-last, \(\*batch, H, W, C\)\) or 0 "
            r"\(channels-first, \(\*batch, C, H, W\)\), got 3",
        ),
        (
            lambda: InstanceNorm(4, spatial_ndim=1, channel_axis=-3),
            ValueError,
            r"InstanceNorm: `channel_axis` must be -1 \(channels-last, \(\*batch, L, C\)\).*got -3",
        ),
        (
            lambda: GroupNorm(2, 4, scale_initializer=np.ones((2, 2))),
            ValueError,
            r"`scale_initializer` is an array of shape \(2, 2\).*shape \(4,\)",
        ),
        (
            lambda: InstanceNorm(4, bias_initializer=np.ones(3)),
            ValueError,
            r"`bias_initializer` is an array of shape \(3,\).*shape \(4,\)",
        ),
        (lambda: GroupNorm(2, 4, epsilon=-1.0), ValueError, r"`epsilon` must be"),
    ],
)
def test_bad_construction_is_a_clear_error(build, error, match):
    with pytest.raises(error, match=match):
        build()


@pytest.mark.parametrize(
    ("layer", "x", "kwargs", "error", "match"),
    [
        (
            GroupNorm(3, 6),
            jnp.zeros((20, 10, 10, 5)),
            {},
            ValueError,
            r"GroupNorm\(spatial_ndim=2, channel_axis=-1\) expects x of shape "
            r"\(\*batch, H, W, C=6\), got shape \(20, 10, 10, 5\), whose channel axis 3 has "
            r"size 5, not num_channels=6\.$",
        ),
        (
            GroupNorm(3, 6),
            jnp.zeros((20, 6, 10, 10)),
            {},
            ValueError,
            r"channel axis 3 has size 10, not num_channels=6\. If your data is channels-first, "
            r"build the layer with channel_axis=0",
        ),
        (
            InstanceNorm(6, channel_axis=0),
            jnp.zeros((2, 10, 10, 6)),
            {},
            ValueError,
            r"InstanceNorm\(spatial_ndim=2, channel_axis=0\) expects x of shape "
            r"\(\*batch, C=6, H, W\).*If your data is channels-last, build the layer with "
            r"channel_axis=-1",
        ),
        (
            GroupNorm(3, 6),
            jnp.zeros((10, 6)),
            {},
            ValueError,
            r"expects x of shape \(\*batch, H, W, C=6\) with any number of leading batch "
            r"axes, got shape \(10, 6\): 2 axes, fewer than the 3 of one example\. Set "
            r"`spatial_ndim`",
        ),
        (
            InstanceNorm(6, spatial_ndim=3),
            jnp.zeros((4, 4, 6)),
            {},
            ValueError,
            r"InstanceNorm\(spatial_ndim=3, channel_axis=-1\) expects x of shape "
            r"\(\*batch, D, H, W, C=6\).*fewer than the 4",
        ),
        (
            GroupNorm(3, 6),
            jnp.zeros((2, 4, 4, 6), jnp.int32),
            {},
            TypeError,
            r"GroupNorm expects a floating-point input `x`, got dtype int32",
        ),
        (
            InstanceNorm(6),
            jnp.zeros((2, 4, 4, 6), bool),
            {},
            TypeError,
            r"InstanceNorm expects a floating-point input `x`, got dtype bool",
        ),
        (
            GroupNorm(3, 6),
            jnp.zeros((2, 4, 4, 6)),
            {"mask": jnp.ones((2, 4, 4, 1), jnp.float32)},
            TypeError,
            r"GroupNorm: `mask` must be boolean",
        ),
        (
            GroupNorm(3, 6),
            jnp.zeros((2, 4, 4, 6)),
            {"mask": jnp.ones((2, 4, 4), bool)},
            ValueError,
            r"GroupNorm: `mask` must have the rank of `x`.*mask\[\.\.\., None\]",
        ),
        (
            InstanceNorm(6),
            jnp.zeros((2, 4, 4, 6)),
            {"mask": jnp.ones((2, 4, 4, 3), bool)},
            ValueError,
            r"InstanceNorm: `mask` must have the rank of `x`.*mask has shape \(2, 4, 4, 3\)",
        ),
    ],
)
def test_bad_call_is_a_clear_error(layer, x, kwargs, error, match):
    with pytest.raises(error, match=match):
        layer(x, **kwargs)


def test_feature_vectors_with_spatial_ndim_zero_match_torch():
    torch = pytest.importorskip("torch")
    # torch.nn.GroupNorm accepts (N, C): groups of features with no spatial axes
    layer = random_group_norm(4, 32, spatial_ndim=0)
    x = 2.0 + jax.random.normal(jax.random.key(3), (64, 32))
    torch_layer = torch.nn.GroupNorm(4, 32, eps=layer.epsilon)
    with torch.no_grad():
        torch_layer.weight.copy_(torch.tensor(np.asarray(layer.gamma)))
        torch_layer.bias.copy_(torch.tensor(np.asarray(layer.beta)))
        expected = torch_layer(torch.tensor(np.asarray(x))).numpy()
    np.testing.assert_allclose(layer(x), expected, atol=TOL[jnp.float32])
    # one example (C,) is its own batch of none; vmap over examples agrees
    np.testing.assert_allclose(jax.vmap(layer)(x), layer(x), atol=1e-6)
    grouped = np.asarray(x, np.float64).reshape(64, 4, 8)
    x_hat = reference.standardize(grouped, (2,), layer.epsilon).reshape(64, 32)
    np.testing.assert_allclose(
        layer(x), x_hat * np.asarray(layer.gamma) + np.asarray(layer.beta), atol=TOL[jnp.float32]
    )
    with pytest.raises(ValueError, match=r"GroupNorm\(spatial_ndim=0, channel_axis=-1\) expects"):
        layer(jnp.zeros((64, 31)))
