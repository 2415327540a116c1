"""What the peers' own tests expect, ported to eqx_norm's API where it applies (issue 18).

- haiku (``layer_norm_test.py``): an initializer for a parameter that is switched off is an
  error naming both arguments ("Cannot set `scale_init` if `create_scale=False`"); a
  constant input normalizes to the offset; known values on a small input; bf16 kept.
- equinox (``tests/test_nn.py``): one example of any rank through ``eqx.nn.GroupNorm``, and
  LayerNorm/RMSNorm with and without weight and bias, give what equinox gives, after
  ``from_equinox`` too; a model of Conv1d, Conv2d and Conv3d GroupNorms keeps its outputs
  and gradients.
- flax (``normalization_test.py``): a masked LayerNorm equals LayerNorm of the kept
  elements alone; GroupNorm with one group per channel is InstanceNorm; a group count
  that does not divide the channels is an error.
- Our own messages: each names what its caller called (a layer or a function) in that
  caller's vocabulary, and the mask hint is an expression that, applied, is accepted.

Oracles: equinox itself, float64 NumPy (tests/reference.py), and slices of the input.
Tolerances: float32 outputs within 1e-5 of the oracle (unit-scale values); gradients of
sums over a few hundred unit terms within 1e-4.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_input

import eqx_norm
from eqx_norm import (
    BatchNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    RMSNorm,
    ZeroInit,
    from_equinox,
    functional,
)

import reference

# name: build(**kwargs); RMSNorm with its bias on, so that both parameters exist
BUILD = {
    "LayerNorm": lambda **kw: LayerNorm(8, **kw),
    # (elementwise_affine=False switches both off: use_bias=True beside it would contradict)
    "RMSNorm": lambda **kw: RMSNorm(8, **{"use_bias": kw.get("elementwise_affine", True), **kw}),
    "GroupNorm": lambda **kw: GroupNorm(2, 8, **kw),
    "InstanceNorm": lambda **kw: InstanceNorm(8, **kw),
    "BatchNorm": lambda **kw: BatchNorm(8, **kw),
}

# ----------------------------------------------------------------------------- haiku


@pytest.mark.parametrize("name", list(BUILD))
@pytest.mark.parametrize(
    ("kwargs", "argument", "switch"),
    [
        ({"use_scale": False, "scale_initializer": jax.nn.initializers.ones}, "scale", "use_scale"),
        ({"use_bias": False, "bias_initializer": jax.nn.initializers.zeros}, "bias", "use_bias"),
        ({"use_bias": False, "bias_initializer": eqx_norm.Constant(0.5)}, "bias", "use_bias"),
        (
            {"elementwise_affine": False, "scale_initializer": np.ones(8, np.float32)},
            "scale",
            "elementwise_affine",
        ),
        (
            {"elementwise_affine": False, "bias_initializer": eqx_norm.Constant(0.5)},
            "bias",
            "elementwise_affine",
        ),
    ],
    ids=["scale", "bias-jax", "bias-ours", "affine-scale", "affine-bias"],
)
def test_an_initializer_for_a_parameter_switched_off_is_an_error(name, kwargs, argument, switch):
    with pytest.raises(
        ValueError, match=rf"Cannot set `{argument}_initializer` if `{switch}=False`"
    ):
        BUILD[name](**kwargs)


@pytest.mark.parametrize("name", list(BUILD))
def test_switching_a_parameter_off_without_an_initializer_builds(name):
    build = BUILD[name]
    assert build(use_scale=False).gamma is None and build(use_scale=False).beta is not None
    assert build(use_bias=False).beta is None and build(use_bias=False).gamma is not None
    off = build(elementwise_affine=False)
    assert off.gamma is None and off.beta is None
    # an explicit None is the default, not an initializer
    assert build(use_bias=False, bias_initializer=None, scale_initializer=None).beta is None


def test_layer_norm_s_positional_defaults_are_not_contradictions():
    # the seed's positional signature: (normalized_shape, epsilon, bias_initializer,
    # scale_initializer, elementwise_affine)
    assert jax.tree_util.tree_leaves(LayerNorm(3, 1e-5, None, None, False)) == []
    # the defaults written out are the defaults (tests/test_arguments.py has the variants)
    assert jax.tree_util.tree_leaves(LayerNorm(3, 1e-5, ZeroInit(), None, False)) == []
    with pytest.raises(ValueError, match=r"`bias_initializer` if `elementwise_affine=False`"):
        LayerNorm(3, 1e-5, eqx_norm.Constant(0.5), None, False)
    # RMSNorm's bias is off by default: a bias initializer alone asks for use_bias=True
    # (ZeroInit, the default written out, builds no bias)
    assert RMSNorm(3, bias_initializer=ZeroInit()).beta is None
    with pytest.raises(ValueError, match=r"Cannot set `bias_initializer`.*set `use_bias=True`"):
        RMSNorm(3, bias_initializer=eqx_norm.Constant(0.5))


def test_haiku_simple_cases():
    # a constant input normalizes to the offset (haiku: test_simple_case)
    layer = LayerNorm(5, bias_initializer=eqx_norm.Constant(0.5))
    np.testing.assert_array_equal(layer(jnp.full((2, 5), 3.0)), np.full((2, 5), 0.5))
    # known values (haiku: test_simple_case_var): [1, 2, 3] has mean 2 and variance 2/3
    y = LayerNorm(3, epsilon=0.0)(jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))
    expected = np.array([-1.0, 0.0, 1.0]) * np.sqrt(1.5)
    np.testing.assert_allclose(y, np.stack([expected, expected]), atol=1e-6)
    # bf16 in, bf16 out (haiku: test_bf16), statistics in float32
    x = random_input((4, 64), mean=3.0, dtype=jnp.bfloat16)
    y = LayerNorm(64)(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        y.astype(jnp.float32), reference.layer_norm(x.astype(jnp.float32), 1), atol=2e-2
    )


# ----------------------------------------------------------------------------- equinox


@pytest.mark.parametrize(
    "equinox_layer",
    [
        eqx.nn.LayerNorm(8, use_bias=False),
        eqx.nn.LayerNorm(8, use_weight=False),
        eqx.nn.LayerNorm(8, use_weight=False, use_bias=False),
        eqx.nn.RMSNorm(8, use_bias=False),
        eqx.nn.RMSNorm(8, use_weight=False, use_bias=False),
        eqx.nn.GroupNorm(2, 8, channelwise_affine=False),
    ],
    ids=["ln-no-bias", "ln-no-weight", "ln-none", "rms-no-bias", "rms-none", "gn-none"],
)
def test_from_equinox_converts_layers_without_weight_or_bias(equinox_layer):
    ours = from_equinox(equinox_layer)
    assert (ours.gamma is None) == (equinox_layer.weight is None)
    assert (ours.beta is None) == (equinox_layer.bias is None)
    x = random_input((8, 5) if isinstance(equinox_layer, eqx.nn.GroupNorm) else (8,), mean=1.0)
    np.testing.assert_allclose(ours(x), equinox_layer(x), atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(128,), (128, 6), (128, 4, 5), (128, 2, 3, 4)])
def test_from_equinox_group_norm_takes_one_example_of_any_rank(shape):
    # equinox's test_group_norm: GroupNorm(groups=4, channels=128) on (128,), (128, 4, 5), ...
    theirs = eqx.nn.GroupNorm(4, 128)
    theirs = eqx.tree_at(lambda m: m.bias, theirs, 0.1 * random_input((128,), seed=5))
    ours = from_equinox(theirs)
    assert ours.spatial_ndim is None
    x = random_input(shape, mean=2.0)
    np.testing.assert_allclose(ours(x), theirs(x), atol=1e-5)
    # the batched layout is still there for whoever asks for it
    batched = from_equinox(theirs, spatial_ndim=len(shape) - 1)
    xs = random_input((3, *shape), seed=2)
    np.testing.assert_allclose(batched(xs), jax.vmap(theirs)(xs), atol=1e-5)


class ConvNet(eqx.Module):
    """One branch per rank: Conv1d, Conv2d and Conv3d, each followed by a GroupNorm."""

    convs: tuple
    norms: tuple

    def __init__(self, key):
        keys = jax.random.split(key, 6)
        self.convs = tuple(
            eqx.nn.Conv(d, 3, 8, 3, padding=1, key=k) for d, k in zip((1, 2, 3), keys[:3])
        )
        norms = (eqx.nn.GroupNorm(2, 8), eqx.nn.GroupNorm(4, 8), eqx.nn.GroupNorm(1, 8))
        self.norms = tuple(  # non-trivial parameters, so that a swapped one would show
            eqx.tree_at(
                lambda n: (n.weight, n.bias),
                norm,
                (1 + 0.3 * jax.random.normal(k, (8,)), 0.2 * jax.random.normal(k, (8,)) + 0.1),
            )
            for norm, k in zip(norms, keys[3:])
        )

    def __call__(self, signal, image, volume):  # one example of each: (3, T), (3, H, W), ...
        outs = [
            norm(conv(x)) for conv, norm, x in zip(self.convs, self.norms, (signal, image, volume))
        ]
        return sum(jnp.sum(jnp.sin(out)) for out in outs)


@pytest.mark.slow
def test_from_equinox_keeps_a_conv1d_conv2d_conv3d_model_s_outputs_and_gradients():
    model = ConvNet(jax.random.key(0))
    converted = from_equinox(model)
    assert all(type(norm) is GroupNorm for norm in converted.norms)
    inputs = (
        random_input((4, 3, 10), seed=1, mean=1.0),
        random_input((4, 3, 6, 5), seed=2, mean=1.0),
        random_input((4, 3, 4, 3, 5), seed=3, mean=1.0),
    )

    def loss(model, inputs):
        return jnp.sum(jax.vmap(model)(*inputs))

    value, grads = eqx.filter_jit(eqx.filter_value_and_grad(loss))(model, inputs)
    new_value, new_grads = eqx.filter_jit(eqx.filter_value_and_grad(loss))(converted, inputs)
    np.testing.assert_allclose(new_value, value, rtol=1e-5)
    for ours, theirs in zip(new_grads.norms, grads.norms):
        # float32 sums over <= 4 * 8 * 60 terms of unit size
        np.testing.assert_allclose(ours.gamma, theirs.weight, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(ours.beta, theirs.bias, rtol=1e-4, atol=1e-4)
    for ours, theirs in zip(new_grads.convs, grads.convs):
        np.testing.assert_allclose(ours.weight, theirs.weight, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(128,), (4, 16)])
@pytest.mark.parametrize(("use_weight", "use_bias"), [(True, True), (False, False)])
def test_equinox_layer_norm_and_rms_norm_cases(shape, use_weight, use_bias):
    # equinox's test_layer_norm/test_rms_norm: one example of the layer's shape
    x = random_input(shape, mean=1.0)
    for cls in (eqx.nn.LayerNorm, eqx.nn.RMSNorm):
        theirs = cls(shape, use_weight=use_weight, use_bias=use_bias)
        np.testing.assert_allclose(from_equinox(theirs)(x), theirs(x), atol=1e-5)
    # a shape that does not end the input is an error, as in equinox
    with pytest.raises(ValueError, match=r"LayerNorm with normalized_shape="):
        LayerNorm(shape)(random_input((*shape[:-1], shape[-1] - 1)))


# ----------------------------------------------------------------------------- flax


@pytest.mark.slow
def test_flax_masked_layer_norm_equals_layer_norm_of_the_kept_elements():
    x = random_input((3, 12), mean=2.0)
    lengths = [12, 7, 3]
    mask = jnp.arange(12)[None, :] < jnp.array(lengths)[:, None]
    layer = LayerNorm(12, bias_initializer=eqx_norm.Constant(0.25))
    y = layer(x, mask=mask)
    for row, n in enumerate(lengths):
        kept = LayerNorm(n)(x[row, :n]) + 0.25
        np.testing.assert_allclose(y[row, :n], kept, atol=1e-5)
        np.testing.assert_array_equal(y[row, n:], 0.25)  # masked out: beta


def test_flax_group_norm_cases():
    x = random_input((2, 5, 5, 6), mean=1.0)
    np.testing.assert_allclose(GroupNorm(6, 6)(x), InstanceNorm(6)(x), atol=1e-6)
    np.testing.assert_allclose(GroupNorm(3, 6)(x), reference.group_norm(x, 3, 2), atol=1e-5)
    with pytest.raises(ValueError, match=r"`num_groups`=4 must divide `num_channels`=6"):
        GroupNorm(4, 6)


# ----------------------------------------------------------------------------- messages


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (
            lambda: LayerNorm((5, 6))(jnp.ones((4, 6, 5))),
            r"^LayerNorm with normalized_shape=\(5, 6\) .* build the layer with "
            r"normalized_shape=\(6, 5\)",
        ),
        (
            lambda: functional.layer_norm(jnp.ones((4, 6, 5)), (5, 6)),
            r"^layer_norm with normalized_shape=\(5, 6\) .* pass normalized_shape=\(6, 5\)",
        ),
        (lambda: RMSNorm(4)(jnp.ones((2, 3))), r"^RMSNorm with normalized_shape=\(4,\)"),
        (
            lambda: GroupNorm(3, 6)(jnp.ones((2, 6, 4, 4))),
            r"^GroupNorm\(spatial_ndim=2, channel_axis=-1\) .* build the layer with channel_axis=0",
        ),
        (
            lambda: functional.group_norm(jnp.ones((2, 6, 4, 4)), 3, num_channels=6),
            r"^group_norm\(spatial_ndim=2, channel_axis=-1\) .* pass channel_axis=0",
        ),
        (
            lambda: InstanceNorm(6, spatial_ndim=None)(jnp.ones(6)),
            r"^InstanceNorm\(spatial_ndim=None, channel_axis=-1\) takes x as one example "
            r"\(\*spatial, C=6\), got shape \(6,\): it needs at least 2 axes",
        ),
        (lambda: GroupNorm(2, 4)(jnp.ones((2, 4), jnp.int32)), r"^GroupNorm expects a floating"),
        (lambda: LayerNorm(4)(jnp.ones(4), mask=jnp.ones(4)), r"^LayerNorm: `mask` must be"),
    ],
    ids=[
        "LayerNorm",
        "layer_norm",
        "RMSNorm",
        "GroupNorm",
        "group_norm",
        "one-example",
        "dtype",
        "mask",
    ],
)
def test_messages_name_what_the_caller_called(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


@pytest.mark.parametrize(
    ("x_shape", "mask_shape", "fix"),
    [
        ((4, 8), (8,), "mask[None]"),
        ((4, 8), (4,), "mask[..., None]"),
        ((2, 5, 8), (2, 5), "mask[..., None]"),
        ((2, 5, 8), (5, 8), "mask[None]"),
        ((2, 5, 8), (5,), "mask[None, ..., None]"),
        ((2, 5, 8), (2, 8), "mask[:, None]"),
        ((2, 5, 8), (), "mask[None, None, None]"),
        ((2, 5, 8), (1, 2, 5, 8), "mask.squeeze(0)"),
        ((2, 5, 8), (2, 1, 5, 1, 8), "mask.squeeze((1, 3))"),
    ],
)
@pytest.mark.slow
def test_the_mask_hint_is_an_expression_that_is_accepted(x_shape, mask_shape, fix):
    layer = LayerNorm(x_shape[-1], bias_initializer=eqx_norm.Constant(0.5))
    x = random_input(x_shape, mean=1.0)
    mask = np.asarray(jax.random.bernoulli(jax.random.key(0), 0.7, mask_shape))
    with pytest.raises(ValueError, match=r"`mask` must have the rank of `x`") as error:
        layer(x, mask=mask)
    assert f"Use `{fix}`" in str(error.value)
    fixed = eval(fix, {"mask": mask})  # the hint, applied as the user would
    y = layer(x, mask=fixed)
    np.testing.assert_allclose(y, reference.layer_norm(x, 1, beta=0.5, mask=fixed), atol=1e-5)


@pytest.mark.slow
def test_the_mask_hint_fits_grouped_layouts_and_is_left_out_when_nothing_fits():
    x = random_input((2, 4, 4, 6), mean=1.0)
    with pytest.raises(ValueError, match=r"Use `mask\[\.\.\., None\]`"):  # (N, H, W) on NHWC
        GroupNorm(3, 6)(x, mask=np.ones((2, 4, 4), bool))
    with pytest.raises(ValueError, match=r"Use `mask\[:, None\]`"):  # (N, H, W) on NCHW
        GroupNorm(3, 6, channel_axis=0)(x.transpose(0, 3, 1, 2), mask=np.ones((2, 4, 4), bool))
    with pytest.raises(ValueError, match=r"mask has shape \(3,\)\.$"):  # no axis of x is 3
        LayerNorm(8)(random_input((4, 8)), mask=np.ones(3, bool))
