"""One policy across LayerNorm, RMSNorm, GroupNorm and InstanceNorm, checked layer by layer.

dtypes (storage in ``param_dtype``, statistics in >= float32, output in the input's dtype,
integer/boolean input an error), every initializer kind, masks under ``jit`` and ``vmap``
against a float64 NumPy reference that drops the masked elements, and the zero-centred
scale. Small sizes: the per-layer files hold the large torch comparisons.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOL, random_input, random_layer

from eqx_norm import (
    Constant,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    Normal,
    OneInit,
    RMSNorm,
    TruncatedNormal,
    Uniform,
    ZeroInit,
)

import reference

# name: (build(**kwargs), input shape (batch first), parameter shape, float64 reference)
LAYERS = {
    "LayerNorm": (
        lambda **kw: LayerNorm((6, 8), **kw),
        (3, 6, 8),
        (6, 8),
        lambda x, g, b, eps, mask: reference.layer_norm(x, 2, g, b, eps, mask),
    ),
    "RMSNorm": (
        lambda **kw: RMSNorm(8, **{"use_bias": kw.get("elementwise_affine", True), **kw}),
        (3, 6, 8),
        (8,),
        lambda x, g, b, eps, mask: reference.rms_norm(x, 1, g, b, eps, mask),
    ),
    "GroupNorm": (
        lambda **kw: GroupNorm(2, 8, **kw),
        (3, 4, 5, 8),
        (8,),
        lambda x, g, b, eps, mask: reference.group_norm(x, 2, 2, g, b, eps, mask),
    ),
    "InstanceNorm": (  # channels-first 1-D signals, (N, C, L)
        lambda **kw: InstanceNorm(8, spatial_ndim=1, channel_axis=0, **kw),
        (3, 8, 10),
        (8,),
        lambda x, g, b, eps, mask: reference.instance_norm(x, 1, g, b, eps, mask, channel_axis=0),
    ),
}
NAMES = list(LAYERS)


def expected_output(name, layer, x, mask=None, gamma=None):
    """The float64 reference for `layer` on `x`, from the parameters the layer stores."""
    gamma = layer.gamma if gamma is None else gamma
    as64 = lambda a: None if a is None else np.asarray(a, np.float64)  # noqa: E731
    mask = None if mask is None else np.asarray(mask)
    return LAYERS[name][3](as64(x), as64(gamma), as64(layer.beta), layer.epsilon, mask)


# ----------------------------------------------------------------------------- dtypes


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_dtype_policy(name, dtype, param_dtype):
    layer = random_layer(LAYERS[name][0], param_dtype=param_dtype, param_shape=LAYERS[name][2])
    assert layer.gamma.dtype == param_dtype and layer.beta.dtype == param_dtype
    # mean 50, std 1: bf16 statistics would lose the deviations (bf16 spacing at 50 is 0.25)
    x = random_input(LAYERS[name][1], mean=50.0, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    # the reference sees the same rounded x and the same stored gamma/beta, in float64;
    # what remains is the rounding of the output (relative) plus float32 statistics (1e-5)
    expected = expected_output(name, layer, x)
    np.testing.assert_allclose(
        np.asarray(y, np.float64), expected, rtol=TOL[dtype], atol=TOL[jnp.float32]
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_output_dtype_option(name):
    layer = random_layer(LAYERS[name][0], dtype=jnp.bfloat16, param_shape=LAYERS[name][2])
    x = random_input(LAYERS[name][1], mean=1.0)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(
        np.asarray(y, np.float64),
        expected_output(name, layer, x),
        rtol=TOL[jnp.bfloat16],
        atol=TOL[jnp.float32],
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_])
def test_integer_and_boolean_input_is_an_error(name, dtype):
    layer = random_layer(LAYERS[name][0], param_shape=LAYERS[name][2])
    x = random_input(LAYERS[name][1], mean=1.0).astype(dtype)
    with pytest.raises(
        TypeError,
        match=rf"{name} expects a floating-point input `x`, got dtype "
        rf"{jnp.dtype(dtype)}\. {'Boolean' if dtype == jnp.bool_ else 'Normalizing integers'}.*"
        r"x\.astype\(jnp\.float32\)",
    ):
        layer(x)


# ----------------------------------------------------------------------------- initializers


DETERMINISTIC = [  # (initializer, its value)
    (OneInit(2.0), 2.0),
    (OneInit, 1.0),
    (Constant(0.5), 0.5),
    (ZeroInit, 0.0),
    (ZeroInit(), 0.0),
    (jax.nn.initializers.ones, 1.0),
    (jax.nn.initializers.constant(-1.5), -1.5),
    (lambda key, shape, dtype: jnp.full(shape, 3.0, dtype), 3.0),
]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(("initializer", "value"), DETERMINISTIC)
def test_every_deterministic_initializer_kind(name, initializer, value):
    param_shape = LAYERS[name][2]
    layer = LAYERS[name][0](scale_initializer=initializer, bias_initializer=initializer)
    for param in (layer.gamma, layer.beta):
        assert param.dtype == jnp.float32
        np.testing.assert_array_equal(param, np.full(param_shape, value))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("as_array", [np.asarray, jnp.asarray])
def test_array_initializers(name, as_array):
    param_shape = LAYERS[name][2]
    values = np.arange(np.prod(param_shape), dtype=np.float64).reshape(param_shape) / 7
    layer = LAYERS[name][0](
        scale_initializer=as_array(values),
        bias_initializer=as_array(-values),
        param_dtype=jnp.bfloat16,
    )
    assert layer.gamma.dtype == jnp.bfloat16
    np.testing.assert_array_equal(layer.gamma, values.astype(jnp.bfloat16))
    np.testing.assert_array_equal(layer.beta, (-values).astype(jnp.bfloat16))
    default = LAYERS[name][0](scale_initializer=as_array(values))  # float64 values: float32
    assert default.gamma.dtype == jnp.float32
    np.testing.assert_array_equal(default.gamma, values.astype(np.float32))
    with pytest.raises(ValueError, match=r"`scale_initializer` is an array of shape \(3,\)"):
        LAYERS[name][0](scale_initializer=np.ones(3))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "initializer",
    [
        Normal(1.0, 0.1),
        Uniform(0.5, 1.5),
        TruncatedNormal(1.0, 0.1),
        jax.nn.initializers.normal(0.1),
    ],
)
def test_random_initializers_use_the_key(name, initializer):
    build = LAYERS[name][0]
    a = build(scale_initializer=initializer, bias_initializer=initializer, key=jax.random.key(0))
    b = build(scale_initializer=initializer, bias_initializer=initializer, key=jax.random.key(0))
    c = build(scale_initializer=initializer, bias_initializer=initializer, key=jax.random.key(1))
    np.testing.assert_array_equal(a.gamma, b.gamma)
    assert not np.array_equal(a.gamma, c.gamma)
    assert len(np.unique(np.asarray(a.gamma))) > 1  # one draw per element, not one per layer
    assert not np.array_equal(a.gamma, a.beta)  # gamma and beta draw from different keys
    with pytest.raises(ValueError, match=r"`scale_initializer`.*key"):
        build(scale_initializer=initializer)


# ----------------------------------------------------------------------------- masks


def random_mask(name, seed=5):
    """About 70% kept, and example 1 fully masked."""
    shape = LAYERS[name][1]
    return jax.random.bernoulli(jax.random.key(seed), 0.7, shape).at[1].set(False)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_mask_under_jit_and_vmap(name):
    layer = random_layer(LAYERS[name][0], param_shape=LAYERS[name][2])
    x = random_input(LAYERS[name][1], mean=2.0)
    mask = random_mask(name)
    call = lambda x, m: layer(x, mask=m)  # noqa: E731
    y = jax.jit(call)(x, mask)
    # the reference drops masked elements from the statistics; their output is beta
    expected = expected_output(name, layer, x, mask)
    np.testing.assert_allclose(y, expected, atol=TOL[jnp.float32], rtol=TOL[jnp.float32])
    # one mask per example under vmap, and jit(vmap)
    np.testing.assert_allclose(jax.vmap(call)(x, mask), y, atol=1e-6)
    np.testing.assert_allclose(jax.jit(jax.vmap(call))(x, mask), y, atol=1e-6)
    # masked-out values do not matter
    np.testing.assert_allclose(call(jnp.where(mask, x, 1e4), mask), y, atol=TOL[jnp.float32])


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_fully_masked_example_is_beta_with_finite_gradients(name):
    layer = random_layer(LAYERS[name][0], param_shape=LAYERS[name][2])
    x = random_input(LAYERS[name][1], mean=1.0)
    mask = random_mask(name)
    y = layer(x, mask=mask)
    beta = np.asarray(expected_output(name, layer, np.zeros(x.shape), np.zeros(x.shape, bool)))
    np.testing.assert_array_equal(y[1], beta[1])
    grads = jax.grad(lambda x, m: layer(x, mask=m).sum(), argnums=0)(x, mask)
    grads_layer = eqx.filter_grad(lambda m, x: m(x, mask=mask).sum())(layer, x)
    for leaf in jax.tree_util.tree_leaves((grads, grads_layer)):
        assert np.isfinite(np.asarray(leaf)).all()
    # nothing flows back to the masked-out inputs
    np.testing.assert_array_equal(np.asarray(grads)[~np.asarray(mask)], 0.0)


# ----------------------------------------------------------------------------- zero-centred


@pytest.mark.parametrize("name", NAMES)
def test_zero_centered_scale(name):
    param_shape = LAYERS[name][2]
    layer = LAYERS[name][0](zero_centered_scale=True)
    np.testing.assert_array_equal(layer.gamma, np.zeros(param_shape))  # identity at init
    x = random_input(LAYERS[name][1], mean=1.0)
    ones = np.ones(param_shape)
    np.testing.assert_allclose(
        layer(x), expected_output(name, layer, x, gamma=ones), atol=TOL[jnp.float32]
    )
    gamma = jnp.linspace(-0.5, 0.5, int(np.prod(param_shape))).reshape(param_shape)
    layer = eqx.tree_at(lambda m: m.gamma, layer, gamma)
    np.testing.assert_allclose(
        layer(x), expected_output(name, layer, x, gamma=1 + gamma), atol=TOL[jnp.float32]
    )
    # an explicit initializer is kept as given (here: 0.25, so the scale is 1.25)
    layer = LAYERS[name][0](zero_centered_scale=True, scale_initializer=Constant(0.25))
    np.testing.assert_allclose(
        layer(x),
        expected_output(name, layer, x, gamma=np.full(param_shape, 1.25)),
        atol=TOL[jnp.float32],
    )


@pytest.mark.parametrize("name", NAMES)
def test_parameters_switch_off_alike(name):
    build = LAYERS[name][0]
    x = random_input(LAYERS[name][1], mean=1.0)
    assert jax.tree_util.tree_leaves(build(elementwise_affine=False)) == []
    scale_only = build(use_bias=False)
    assert scale_only.beta is None and scale_only.gamma is not None
    bias_only = build(use_scale=False, bias_initializer=Constant(0.5))
    assert bias_only.gamma is None
    np.testing.assert_allclose(
        bias_only(x), expected_output(name, bias_only, x), atol=TOL[jnp.float32]
    )
