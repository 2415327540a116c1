"""eqx_norm.functional: equal to the modules (one code path), and its own argument checks.

The modules and the functions both run the shared core, so with the same parameters their
outputs must agree bit for bit and their traced programs must be the same.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOL, random_input, random_params

from eqx_norm import GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from eqx_norm import functional as F

import reference

# (name, module built from (gamma, beta, **options), function of (x, gamma, beta, **options),
#  input shape, parameter shape, per-layer options)
PAIRS = [
    (
        "layer_norm",
        lambda g, b, **o: LayerNorm((5, 8), scale_initializer=g, bias_initializer=b, **o),
        lambda x, g, b, **o: F.layer_norm(x, (5, 8), g, b, **o),
        (3, 5, 8),
        (5, 8),
    ),
    (
        "rms_norm",
        lambda g, b, **o: RMSNorm(8, scale_initializer=g, bias_initializer=b, use_bias=True, **o),
        lambda x, g, b, **o: F.rms_norm(x, 8, g, b, **o),
        (3, 5, 8),
        (8,),
    ),
    (
        "group_norm",
        lambda g, b, **o: GroupNorm(
            2, 6, scale_initializer=g, bias_initializer=b, channel_axis=0, **o
        ),
        lambda x, g, b, **o: F.group_norm(x, 2, g, b, channel_axis=0, **o),
        (3, 6, 4, 5),
        (6,),
    ),
    (
        "instance_norm",
        lambda g, b, **o: InstanceNorm(
            6, scale_initializer=g, bias_initializer=b, spatial_ndim=1, **o
        ),
        lambda x, g, b, **o: F.instance_norm(x, g, b, spatial_ndim=1, **o),
        (3, 7, 6),
        (6,),
    ),
]
IDS = [pair[0] for pair in PAIRS]

OPTIONS = [
    {},
    {"epsilon": 0.1},
    {"zero_centered_scale": True},
    {"dtype": jnp.bfloat16},
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "module", "function", "shape", "param_shape"), PAIRS, ids=IDS)
@pytest.mark.parametrize("options", OPTIONS)
def test_function_equals_module(name, module, function, shape, param_shape, options):
    gamma, beta = random_params(param_shape)
    layer = module(gamma, beta, **options)
    x = random_input(shape, mean=1.0)
    mask = jax.random.bernoulli(jax.random.key(2), 0.7, shape)
    jitted_function = jax.jit(lambda x, g, b, m: function(x, g, b, mask=m, **options))
    jitted_module = jax.jit(lambda x, g, b, m: with_parameters(layer, g, b)(x, mask=m))
    for m in [None, mask]:
        y = function(x, gamma, beta, mask=m, **options)
        assert y.dtype == options.get("dtype", x.dtype)
        np.testing.assert_array_equal(y, layer(x, mask=m))
        jitted = jitted_function(x, gamma, beta, m)
        np.testing.assert_array_equal(jitted, jitted_module(x, gamma, beta, m))
        # XLA may fuse differently from eager dispatch: equal up to the output's rounding
        # (float32 ~1e-7; bf16 keeps 8 bits, so one last-bit flip of |y| < 4 is < 2e-2)
        tolerance = 1e-6 if y.dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(
            np.asarray(jitted, np.float32), np.asarray(y, np.float32), atol=tolerance
        )


def with_parameters(layer, gamma, beta):
    return eqx.tree_at(lambda m: (m.gamma, m.beta), layer, (gamma, beta))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "module", "function", "shape", "param_shape"), PAIRS, ids=IDS)
def test_one_code_path(name, module, function, shape, param_shape):
    # the module and the function trace to the same program
    gamma, beta = random_params(param_shape)
    layer = module(gamma, beta)
    x = random_input(shape, mean=1.0)
    from_module = jax.make_jaxpr(lambda x, g, b: with_parameters(layer, g, b)(x))
    from_function = jax.make_jaxpr(function)
    assert str(from_module(x, gamma, beta)) == str(from_function(x, gamma, beta))


@pytest.mark.slow
def test_without_parameters_against_float64_numpy():
    x = random_input((4, 6, 5, 8), mean=2.0)
    tolerance = dict(
        atol=TOL[jnp.float32], rtol=TOL[jnp.float32]
    )  # float32 over groups of <= 240 elements
    np.testing.assert_allclose(F.layer_norm(x, (5, 8)), reference.layer_norm(x, 2), **tolerance)
    np.testing.assert_allclose(F.rms_norm(x, 8), reference.rms_norm(x, 1), **tolerance)
    np.testing.assert_allclose(F.group_norm(x, 4), reference.group_norm(x, 4, 2), **tolerance)
    np.testing.assert_allclose(F.instance_norm(x), reference.instance_norm(x, 2), **tolerance)
    np.testing.assert_allclose(
        F.group_norm(x, 3, channel_axis=0),
        reference.group_norm(x, 3, 2, channel_axis=0),
        **tolerance,
    )


@pytest.mark.slow
def test_group_norm_infers_channels_from_the_input():
    x = random_input((2, 4, 4, 12), mean=1.0)
    gamma, beta = random_params((12,))
    expected = reference.group_norm(x, 3, 2, gamma, beta)
    np.testing.assert_allclose(F.group_norm(x, 3, gamma, beta), expected, atol=TOL[jnp.float32])
    np.testing.assert_allclose(F.group_norm(x, 12), F.instance_norm(x), atol=1e-6)


@pytest.mark.slow
def test_gradients_flow_to_all_arguments():
    x = random_input((2, 5, 6), mean=1.0)
    gamma, beta = random_params((6,))

    def loss(x, g, b):
        return jnp.sum(
            F.group_norm(x, 3, g, b, spatial_ndim=1) ** 2 * jnp.arange(6.0)[None, None, :]
        )

    grads = jax.grad(loss, argnums=(0, 1, 2))(x, gamma, beta)
    # beta's gradient is exactly sum(2 * y * weights) over batch and space: check it
    y = F.group_norm(x, 3, gamma, beta, spatial_ndim=1)
    np.testing.assert_allclose(
        grads[2], (2 * y * jnp.arange(6.0)[None, None, :]).sum((0, 1)), rtol=TOL[jnp.float32]
    )
    assert all(np.abs(np.asarray(g)).max() > 0 for g in grads)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda x: F.layer_norm(x, 8, jnp.ones(7)),
            ValueError,
            r"layer_norm: `gamma` must have shape \(8,\), got \(7,\)",
        ),
        (
            lambda x: F.rms_norm(x, 8, jnp.ones(8), jnp.ones((1, 8))),
            ValueError,
            r"rms_norm: `beta` must have shape \(8,\), got \(1, 8\)",
        ),
        (
            lambda x: F.rms_norm(x, 7),
            ValueError,
            r"rms_norm with normalized_shape=\(7,\) expects an input `x` whose last 1 axes",
        ),
        (
            lambda x: F.rms_norm(x.astype(jnp.int32), 8),
            TypeError,
            r"rms_norm expects a floating-point input `x`, got dtype int32",
        ),
        (
            lambda x: F.rms_norm(x, 8, epsilon=-1.0),
            ValueError,
            r"`epsilon` must be a finite non-negative float",
        ),
        (
            lambda x: F.rms_norm(x, 8, dtype=jnp.int32),
            TypeError,
            r"`dtype` must be a floating-point dtype, got int32",
        ),
        (
            lambda x: F.group_norm(x, 3),
            ValueError,
            r"group_norm: num_groups=3 must divide the number of channels, but x of shape "
            r"\(2, 3, 4, 8\) has 8 channels on axis 3 \(layout \(\*batch, H, W, C\)\)",
        ),
        (
            lambda x: F.group_norm(x, 0),
            ValueError,
            r"`num_groups` must be a positive int, got 0",
        ),
        (
            lambda x: F.group_norm(x, 2, jnp.ones(4)),
            ValueError,
            r"group_norm: `gamma` must have shape \(8,\), got \(4,\)",
        ),
        (
            lambda x: F.group_norm(x, 2, spatial_ndim=4),
            ValueError,
            r"group_norm\(spatial_ndim=4, channel_axis=-1\) expects x of shape "
            r"\(\*batch, S1, S2, S3, S4, C\).*fewer than the 5",
        ),
        (
            lambda x: F.instance_norm(x, channel_axis=5),
            ValueError,
            r"instance_norm: `channel_axis` must be -1 \(channels-last.* or 0 .*got 5",
        ),
        (
            lambda x: F.instance_norm(x, beta=jnp.ones(3)),
            ValueError,
            r"instance_norm: `beta` must have shape \(8,\), got \(3,\)",
        ),
        (
            lambda x: F.instance_norm(x, mask=jnp.ones((2, 3, 4), bool)),
            ValueError,
            r"instance_norm: `mask` must have the rank of `x`",
        ),
        (
            lambda x: F.group_norm(x.astype(bool), 2),
            TypeError,
            r"group_norm expects a floating-point input `x`, got dtype bool",
        ),
    ],
)
def test_bad_arguments_are_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call(random_input((2, 3, 4, 8), mean=1.0))
