"""Saving and loading LayerNorm: equinox's leaf serialisation, pickle, and eqx_norm.load_leaves.

Round trips must be bit-exact (compared as raw bytes, so bf16 and -0.0 count). A template
that does not fit the saved model must raise, never return a model with wrong parameters.
"""

import io
import pickle

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqx_norm import LayerNorm, Normal, load_leaves

CONFIGS = {  # name: (normalized_shape, LayerNorm keyword arguments)
    "float32": ((8,), {}),
    "bfloat16": ((8,), {"param_dtype": jnp.bfloat16}),
    "float16_two_axes": ((3, 4), {"param_dtype": jnp.float16}),
    "no_scale": ((8,), {"use_scale": False}),
    "no_bias": ((8,), {"use_bias": False}),
    "no_affine": ((8,), {"elementwise_affine": False}),
    "zero_centered_eps": ((8,), {"zero_centered_scale": True, "epsilon": 1e-3}),
}


def trained_layer(normalized_shape, seed=0, **kwargs):
    """A layer whose parameters are not the defaults (as after training); an initializer is
    passed only for a parameter the layer has (one that is switched off is an error)."""
    affine = kwargs.get("elementwise_affine", True)
    inits = {
        argument: Normal(mean, 0.5)
        for argument, switch, mean in (
            ("scale_initializer", "use_scale", 1.0),
            ("bias_initializer", "use_bias", 0.0),
        )
        if affine and kwargs.get(switch, True)
    }
    return LayerNorm(normalized_shape, **inits, key=jax.random.key(seed), **kwargs)


def assert_bit_identical(got, expected):
    got_leaves, got_def = jax.tree.flatten(got)
    expected_leaves, expected_def = jax.tree.flatten(expected)
    assert got_def == expected_def  # same structure and static configuration
    for a, b in zip(got_leaves, expected_leaves):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()


def saved(model):
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, model)
    buffer.seek(0)
    return buffer


@pytest.mark.parametrize("config", list(CONFIGS))
def test_serialise_round_trip_is_bit_exact(tmp_path, config):
    normalized_shape, kwargs = CONFIGS[config]
    layer = trained_layer(normalized_shape, **kwargs)
    path = tmp_path / "layer.eqx"
    eqx.tree_serialise_leaves(path, layer)
    template = LayerNorm(normalized_shape, **kwargs)  # default parameters, same config
    loaded = eqx.tree_deserialise_leaves(path, template)
    assert_bit_identical(loaded, layer)
    assert_bit_identical(load_leaves(path, template), layer)
    # a template of shapes only (no arrays allocated) loads the same
    abstract = eqx.filter_eval_shape(LayerNorm, normalized_shape, **kwargs)
    assert_bit_identical(load_leaves(path, abstract), layer)
    x = jax.random.normal(jax.random.key(1), (2, *normalized_shape))
    assert np.asarray(loaded(x)).tobytes() == np.asarray(layer(x)).tobytes()


def test_round_trip_of_a_model_with_layer_norms(tmp_path):
    keys = jax.random.split(jax.random.key(0), 3)
    model = eqx.nn.Sequential(
        [
            eqx.nn.Linear(4, 8, key=keys[0]),
            trained_layer(8, seed=1),
            eqx.nn.Lambda(jax.nn.relu),
            trained_layer(8, seed=2, use_bias=False, param_dtype=jnp.bfloat16),
        ]
    )
    path = tmp_path / "model.eqx"
    eqx.tree_serialise_leaves(path, model)
    template = eqx.nn.Sequential(
        [
            eqx.nn.Linear(4, 8, key=keys[2]),
            LayerNorm(8),
            eqx.nn.Lambda(jax.nn.relu),
            LayerNorm(8, use_bias=False, param_dtype=jnp.bfloat16),
        ]
    )
    assert_bit_identical(load_leaves(path, template), model)
    assert_bit_identical(eqx.tree_deserialise_leaves(path, template), model)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_pickle_round_trip(config):
    normalized_shape, kwargs = CONFIGS[config]
    layer = trained_layer(normalized_shape, **kwargs)
    loaded = pickle.loads(pickle.dumps(layer))
    assert_bit_identical(loaded, layer)
    assert (loaded.normalized_shape, loaded.epsilon, loaded.zero_centered_scale) == (
        layer.normalized_shape,
        layer.epsilon,
        layer.zero_centered_scale,
    )
    x = jax.random.normal(jax.random.key(1), (2, *normalized_shape))
    assert np.asarray(loaded(x)).tobytes() == np.asarray(layer(x)).tobytes()


@pytest.mark.parametrize("template_shape", [(6,), (2, 4), (8, 1)])
def test_wrong_normalized_shape_is_a_clear_error(template_shape):
    layer = trained_layer(8)
    # equinox itself refuses a leaf that changed shape
    with pytest.raises(Exception, match=r"changed shape from .* in `like` to \(8,\) on disk"):
        eqx.tree_deserialise_leaves(saved(layer), LayerNorm(template_shape))
    shape = str(template_shape).replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(
        ValueError,
        match=rf"leaf `.gamma` of the template has shape {shape} and dtype float32, but the "
        r"file holds shape \(8,\) and dtype float32 there. .*shape of its normalized_shape",
    ):
        load_leaves(saved(layer), LayerNorm(template_shape))


def test_wrong_dtype_is_a_clear_error():
    layer = trained_layer(8)
    with pytest.raises(
        ValueError,
        match=r"leaf `.gamma` of the template has shape \(8,\) and dtype bfloat16, but the file "
        r"holds shape \(8,\) and dtype float32 there\. Only the dtype differs: build the "
        r"template with param_dtype=float32",
    ):
        load_leaves(saved(layer), LayerNorm(8, param_dtype=jnp.bfloat16))


def test_switched_off_parameter_in_template_is_an_error_not_silent_garbage():
    first, second = trained_layer(8, seed=1), trained_layer(8, seed=2)
    template = [LayerNorm(8, use_bias=False), LayerNorm(8)]
    # what equinox does: the second layer silently gets the first layer's beta as gamma
    wrong = eqx.tree_deserialise_leaves(saved([first, second]), template)
    np.testing.assert_array_equal(wrong[1].gamma, first.beta)
    with pytest.raises(
        ValueError,
        match=r"^load_leaves: the template differs from the saved model in `\[0\]`: the file "
        r"holds 4 arrays where the template has 3 leaves, and the extra array \(of shape and "
        r"dtype \(8,\) float32\) fits where `\[0\]` has `beta` switched off \(None\)\.",
    ):
        load_leaves(saved([first, second]), template)
    with pytest.raises(ValueError, match=r"differs from the saved model in `like`: the file "):
        load_leaves(saved(first), LayerNorm(8, use_bias=False))
    with pytest.raises(ValueError, match=r"in `\[1\]`: .* 2 extra arrays .* `gamma`, `beta` sw"):
        load_leaves(saved([first, second]), [LayerNorm(8), LayerNorm(8, elementwise_affine=False)])


class _Block(eqx.Module):
    l1: LayerNorm
    l2: eqx.nn.Linear


def test_template_lacking_an_inner_beta_names_that_layer_not_the_next_leaf():
    """The file has no names: the message places the extra array where the template has a
    parameter switched off, and names that layer, before comparing any shape (leaf by leaf,
    the first mismatch is `.l2.weight`, of shape (3, 32), against the file's beta (32,))."""
    key = jax.random.key(0)
    model = _Block(LayerNorm(32), eqx.nn.Linear(32, 3, key=key))
    template = _Block(LayerNorm(32, use_bias=False), eqx.nn.Linear(32, 3, key=key))
    with pytest.raises(
        ValueError,
        match=r"in `\.l1`: the file holds 4 arrays where the template has 3 leaves, and the "
        r"extra array \(of shape and dtype \(32,\) float32\) fits where `\.l1` has `beta` "
        r"switched off \(None\)\. Build the template with the configuration the model was "
        r"saved with \(`\.l1` with `beta`\)\.$",
    ) as raised:
        load_leaves(saved(model), template)
    assert "l2" not in str(raised.value) and "(3, 32)" not in str(raised.value)
    # a switched-off bias of equinox's own Linear is found the same way
    other = _Block(LayerNorm(32), eqx.nn.Linear(32, 3, use_bias=False, key=key))
    with pytest.raises(
        ValueError, match=r"in `\.l2`: .* \(3,\) float32\) fits where `\.l2` has `bias`"
    ):
        load_leaves(saved(model), other)
    # the reverse: the template has a beta the file lacks
    with pytest.raises(
        ValueError,
        match=r"in `\.l1`: the file holds 3 arrays where the template has 4 leaves, and the "
        r"file lacks 1 of `\.l1\.gamma`, `\.l1\.beta`\. Was the model saved with gamma or beta",
    ):
        load_leaves(saved(template), model)


def test_missing_parameter_in_file_is_an_error():
    with pytest.raises(
        ValueError,
        match=r"in `like`: the file holds 1 array where the template has 2 leaves, and the file "
        r"lacks 1 of `\.gamma`, `\.beta`",
    ):
        load_leaves(saved(trained_layer(8, use_bias=False)), LayerNorm(8))
    with pytest.raises(ValueError, match=r"lacks `\[1\]\.gamma`, `\[1\]\.beta`\."):
        load_leaves(saved([trained_layer(8)]), [LayerNorm(8), LayerNorm(4)])
    # where shapes cannot tell which layer lacks its leaves, the subtree holding them all
    with pytest.raises(
        ValueError, match=r"in `like`: .* lacks 2 of `\[0\]\.gamma`, .*`\[1\]\.beta`"
    ):
        load_leaves(saved([trained_layer(8)]), [LayerNorm(8), LayerNorm(8)])


def test_truncated_file_names_the_leaf_where_it_ends():
    data = saved([trained_layer(8), trained_layer(8)]).getvalue()
    with pytest.raises(ValueError, match=r"the file ends before the template's leaf `\[1\]\.beta`"):
        load_leaves(io.BytesIO(data[:-10]), [LayerNorm(8), LayerNorm(8)])
