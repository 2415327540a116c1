"""Constructor arguments as a newcomer writes them: the seed's defaults written out, switches
that contradict, the peers' names for ours, torch's momentum, and the shape errors' fixes.

Each error text is checked against the call that raises it."""

import warnings

import equinox as eqx
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_norm import (
    BatchNorm,
    Constant,
    Derf,
    DyT,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    OneInit,
    RMSNorm,
    ZeroInit,
)

# every layer, built with its required arguments
LAYERS = {
    "LayerNorm": lambda **kw: LayerNorm(6, **kw),
    "RMSNorm": lambda **kw: RMSNorm(6, **kw),
    "GroupNorm": lambda **kw: GroupNorm(2, 6, **kw),
    "InstanceNorm": lambda **kw: InstanceNorm(6, **kw),
    "BatchNorm": lambda **kw: BatchNorm(6, **kw),
    "DyT": lambda **kw: DyT(6, **kw),
    "Derf": lambda **kw: Derf(6, **kw),
}


@pytest.mark.parametrize(
    "bias, scale",
    [
        (ZeroInit, OneInit(value=1.0)),  # the seed's signature, its defaults written out
        (ZeroInit(), OneInit),
        (Constant(0.0), Constant(1.0)),  # the same values from another object
        (ZeroInit(), OneInit(1.0)),
    ],
)
def test_the_seeds_defaults_written_out_are_accepted_with_the_parameters_off(bias, scale):
    layer = LayerNorm(7, 1e-5, bias, scale, False)
    assert layer.gamma is None and layer.beta is None
    x = jnp.arange(14.0).reshape(2, 7)
    centred = x - x.mean(-1, keepdims=True)
    expected = centred / jnp.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5)
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)  # float32 rounding
    assert LayerNorm(7, scale_initializer=scale, use_scale=False).gamma is None
    assert LayerNorm(7, bias_initializer=bias, use_bias=False).beta is None


def test_a_zero_centred_scales_default_is_zero():
    assert LayerNorm(7, scale_initializer=ZeroInit, zero_centered_scale=True, use_scale=False)
    with pytest.raises(ValueError, match=r"Cannot set `scale_initializer` if `use_scale=False`"):
        LayerNorm(7, scale_initializer=OneInit(), zero_centered_scale=True, use_scale=False)


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize(
    "argument, initializer, switch",
    [
        ("scale_initializer", OneInit(2.0), "elementwise_affine"),
        ("bias_initializer", Constant(0.5), "elementwise_affine"),
        ("scale_initializer", ZeroInit(), "use_scale"),
        ("bias_initializer", jnp.zeros(6), "use_bias"),  # an array is never "the default"
    ],
)
def test_a_non_default_initializer_for_a_parameter_that_is_off_stays_an_error(
    name, argument, initializer, switch
):
    with pytest.raises(ValueError, match=rf"Cannot set `{argument}` if `{switch}=False`"):
        LAYERS[name](**{argument: initializer, switch: False})


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("switch, parameter", [("use_scale", "gamma"), ("use_bias", "beta")])
def test_a_switch_on_beside_elementwise_affine_off_is_an_error_naming_both(name, switch, parameter):
    with pytest.raises(
        ValueError,
        match=rf"`elementwise_affine=False` switches off `gamma` and `beta`, but "
        rf"`{switch}=True` asks for `{parameter}`: they contradict",
    ):
        LAYERS[name](elementwise_affine=False, **{switch: True})


@pytest.mark.parametrize("name", LAYERS)
def test_switches_left_alone_follow_elementwise_affine(name):
    on, off = LAYERS[name](), LAYERS[name](elementwise_affine=False)
    assert on.gamma is not None and off.gamma is None and off.beta is None
    assert (on.beta is None) == (name == "RMSNorm")  # RMSNorm has no bias by default
    only_bias = LAYERS[name](use_scale=False, use_bias=True)
    assert only_bias.gamma is None and only_bias.beta is not None


PEER_NAMES = [
    ("LayerNorm", "eps", "`epsilon`"),
    ("LayerNorm", "use_weight", "`use_scale`"),
    ("LayerNorm", "weight", "`scale_initializer`"),
    ("LayerNorm", "bias", "`bias_initializer`"),
    ("LayerNorm", "num_features", "`normalized_shape`"),
    ("LayerNorm", "shape", "`normalized_shape`"),
    ("LayerNorm", "use_fast_variance", "always two-pass"),
    ("LayerNorm", "create_scale", "`use_scale`"),
    ("LayerNorm", "scale_init", "`scale_initializer`"),
    ("RMSNorm", "eps", "`epsilon`"),
    ("GroupNorm", "groups", "`num_groups`"),
    ("GroupNorm", "channelwise_affine", "`elementwise_affine`"),
    ("GroupNorm", "affine", "`elementwise_affine`"),
    ("GroupNorm", "num_features", "`num_channels`"),
    ("InstanceNorm", "affine", "`elementwise_affine`"),
    ("InstanceNorm", "track_running_stats", "keeps no running statistics"),
    ("BatchNorm", "eps", "`epsilon`"),
    ("BatchNorm", "affine", "`elementwise_affine`"),
    ("BatchNorm", "track_running_stats", "always keeps running statistics"),
    ("BatchNorm", "use_running_average", "`inference`"),
    ("BatchNorm", "decay_rate", "`momentum`"),
    ("BatchNorm", "input_size", "`num_features`"),
    ("DyT", "eps", "has no epsilon"),
    ("DyT", "init_alpha", "`alpha_init`"),
    ("Derf", "eps", "has no epsilon"),
    ("Derf", "shift_init_value", "`shift_init`"),
    ("InstanceNorm", "num_features", "`num_channels`"),
]


@pytest.mark.parametrize("name, peer, ours", PEER_NAMES)
def test_a_peers_name_points_to_ours(name, peer, ours):
    with pytest.raises(TypeError, match=rf"{name} got an unexpected keyword argument `{peer}`\."):
        LAYERS[name](**{peer: 1})
    with pytest.raises(TypeError) as raised:
        LAYERS[name](**{peer: 1})
    assert ours in str(raised.value)


def test_an_unknown_name_gets_the_closest_of_ours():
    with pytest.raises(TypeError, match=r"`epsillon`\. Did you mean `epsilon`\?"):
        LayerNorm(4, epsillon=1e-5)
    with pytest.raises(TypeError, match=r"unexpected keyword argument `colour`\.$"):
        LayerNorm(4, colour="red")


def test_torch_style_momentum_warns_with_its_meaning_here():
    with pytest.warns(UserWarning, match=r"momentum=0.1 keeps 10% .* torch's momentum=0.1 is "):
        eqx.nn.make_with_state(BatchNorm)(4, momentum=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eqx.nn.make_with_state(BatchNorm)(4, momentum=0.9)  # the usual values: no warning


def test_the_warning_points_at_the_callers_line():
    with pytest.warns(UserWarning) as record:
        BatchNorm(4, momentum=0.0)
    assert record[0].filename == __file__


@pytest.mark.parametrize("shape", [(), (5,), (15,)])
def test_an_input_with_too_few_axes_gets_the_fix(shape):
    layer = LayerNorm((3, 5))
    with pytest.raises(
        ValueError, match=r"Pass x of shape \(\*batch, 3, 5\).*x\.reshape\(-1, 3, 5\)"
    ):
        layer(jnp.zeros(shape))
