"""LayerNorm against float64 NumPy, torch.nn, equinox.nn and finite differences.

Tolerances: float32 outputs are O(1) after normalization, so 1e-5 absolute covers the
rounding of a few float32 operations over rows of up to ~1e3 elements (eps_f32 = 1.2e-7);
bf16/fp16 outputs are compared at their own resolution (bf16 has 8 bits: 1e-2 relative).
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TOL, jitted_gradients, max_relative_error, random_input, random_layer

from eqx_norm import Constant, LayerNorm, Normal

import reference

CASES = [  # (input shape, normalized_shape)
    ((10,), 10),
    ((4, 10), (10,)),
    ((20, 5, 10), 10),
    ((6, 5, 4, 3), (5, 4, 3)),
    ((5, 4, 3), [5, 4, 3]),
    ((2, 3, 7, 16), (7, 16)),
]


@pytest.mark.slow
@pytest.mark.parametrize(("shape", "normalized_shape"), CASES)
@pytest.mark.parametrize("affine", [True, False])
def test_matches_float64_numpy(shape, normalized_shape, affine):
    layer = random_layer(LayerNorm, normalized_shape, elementwise_affine=affine)
    x = random_input(shape, mean=3.0, std=2.0)
    y = layer(x)
    ndim = len(layer.normalized_shape)
    expected = reference.layer_norm(x, ndim, layer.gamma, layer.beta)
    assert y.shape == x.shape and y.dtype == x.dtype
    np.testing.assert_allclose(y, expected, atol=TOL[jnp.float32], rtol=TOL[jnp.float32])
    if not affine:
        assert layer.gamma is None and layer.beta is None


@pytest.mark.parametrize(("use_scale", "use_bias"), [(True, False), (False, True)])
def test_scale_and_bias_switch_off_separately(use_scale, use_bias):
    layer = random_layer(LayerNorm, 8, use_scale=use_scale, use_bias=use_bias)
    assert (layer.gamma is not None) == use_scale and (layer.beta is not None) == use_bias
    x = random_input((3, 8))
    np.testing.assert_allclose(
        layer(x), reference.layer_norm(x, 1, layer.gamma, layer.beta), atol=TOL[jnp.float32]
    )


@pytest.mark.parametrize("d", [64, 1024])
@pytest.mark.parametrize("mean", [1e3, 1e4, 1e5])
def test_accurate_at_large_offsets(d, mean):
    # the input itself is float32, so the reference sees exactly the same numbers
    x = random_input((16, d), mean=mean)
    error = np.abs(LayerNorm(d)(x) - reference.layer_norm(x, 1)).max()
    # float32 spacing at 1e4 is 1e-3: the deviations x - mean carry that absolute error
    assert error < 2e-3 * max(1.0, mean / 1e4), error


def test_constant_input_gives_beta_exactly_with_finite_gradients():
    layer = random_layer(LayerNorm, (4, 6))
    for value in [0.1, -3.7, 1e4, 0.0]:
        x = jnp.full((3, 4, 6), value, jnp.float32)
        np.testing.assert_array_equal(layer(x), jnp.broadcast_to(layer.beta, x.shape))
        grads = jax.grad(lambda x, layer: layer(x).sum(), argnums=(0, 1))(x, layer)
        for leaf in jax.tree_util.tree_leaves(grads):
            assert np.isfinite(np.asarray(leaf)).all()


def test_epsilon_zero_constant_row_is_finite():
    y = LayerNorm(5, epsilon=0.0)(jnp.full((2, 5), 2.0))
    np.testing.assert_array_equal(y, np.zeros((2, 5)))


@pytest.mark.parametrize(
    ("shape", "normalized_shape"), [((64, 128, 768), 768), ((32, 28, 28, 256), (28, 28, 256))]
)
@pytest.mark.slow
def test_matches_torch_layer_norm(shape, normalized_shape):
    torch = pytest.importorskip("torch")
    layer = random_layer(LayerNorm, normalized_shape)
    x = random_input(shape)
    torch_layer = torch.nn.LayerNorm(layer.normalized_shape, eps=layer.epsilon)
    with torch.no_grad():
        torch_layer.weight.copy_(torch.tensor(np.asarray(layer.gamma)))
        torch_layer.bias.copy_(torch.tensor(np.asarray(layer.beta)))
        expected = torch_layer(torch.tensor(np.asarray(x))).numpy()
    np.testing.assert_allclose(eqx.filter_jit(layer)(x), expected, atol=2e-5, rtol=TOL[jnp.float32])


@pytest.mark.slow
def test_matches_equinox_under_vmap():
    ours = random_layer(LayerNorm, (7, 16))
    theirs = eqx.nn.LayerNorm((7, 16), eps=ours.epsilon)
    theirs = eqx.tree_at(lambda m: (m.weight, m.bias), theirs, (ours.gamma, ours.beta))
    x = random_input((4, 3, 7, 16))
    expected = jax.vmap(jax.vmap(theirs))(x)
    np.testing.assert_allclose(ours(x), expected, atol=TOL[jnp.float32], rtol=TOL[jnp.float32])
    np.testing.assert_allclose(
        jax.vmap(ours)(x), expected, atol=TOL[jnp.float32], rtol=TOL[jnp.float32]
    )


def torch_float64_gradients(x, gamma, beta, cotangent, ndim, epsilon):
    """Gradients of sum(cotangent * LayerNorm(x)) by torch autograd in float64."""
    torch = pytest.importorskip("torch")
    tx, tg, tb = (
        torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in (x, gamma, beta)
    )
    y = torch.nn.functional.layer_norm(tx, tuple(x.shape[-ndim:]), tg, tb, epsilon)
    (y * torch.tensor(np.asarray(cotangent, np.float64))).sum().backward()
    return tx.grad.numpy(), tg.grad.numpy(), tb.grad.numpy()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("shape", "normalized_shape", "mean"),
    [
        ((64, 128, 768), 768, 0.0),  # the shape where XLA:CPU 0.10.2 has miscompiled LN grads
        ((8192, 1024), 1024, 0.0),
        ((32, 28, 28, 256), (28, 28, 256), 0.0),
        ((256, 512), 512, 1e4),
        ((5, 3, 10), 10, 0.0),
    ],
)
def test_jitted_gradients_match_float64_torch(shape, normalized_shape, mean):
    layer = random_layer(LayerNorm, normalized_shape)
    x = random_input(shape, mean=mean)
    cotangent = random_input(shape, seed=7)
    ours = jitted_gradients(layer, x, cotangent)
    expected = torch_float64_gradients(
        x, layer.gamma, layer.beta, cotangent, len(layer.normalized_shape), layer.epsilon
    )
    for got, want, name in zip(ours, expected, ["dx", "dgamma", "dbeta"]):
        error = max_relative_error(got, want)
        # float32 sums over up to 1e6 terms: relative error stays well under 1e-3
        assert error < 1e-3, (name, error)


@pytest.mark.slow
def test_hessian_against_finite_differences_of_the_gradient(x64):
    layer = LayerNorm(6)
    x = random_input((6,), dtype=jnp.float64)

    def f(x):
        return jnp.sum(jnp.sin(layer(x)) * jnp.arange(6.0))

    hessian = jax.hessian(f)(x)
    step = 1e-6
    grad = jax.grad(f)
    fd = np.stack(
        [(grad(x + step * e) - grad(x - step * e)) / (2 * step) for e in jnp.eye(6)], axis=1
    )
    np.testing.assert_allclose(hessian, fd, atol=1e-6)


@pytest.mark.slow
def test_jit_vmap_grad_together():
    layer = random_layer(LayerNorm, 10)
    x = random_input((20, 5, 10))

    def per_example(x):
        return jnp.sum(layer(x) ** 2 * jnp.arange(10.0)[None, :])

    batched = jax.jit(jax.vmap(jax.grad(per_example)))(x)
    eager = jnp.stack([jax.grad(per_example)(row) for row in x])
    whole = jax.grad(lambda x: jnp.sum(layer(x) ** 2 * jnp.arange(10.0)[None, None, :]))(x)
    # gradients here reach ~1e2: compare at float32 relative precision with headroom
    np.testing.assert_allclose(batched, eager, rtol=TOL[jnp.float32], atol=1e-4)
    np.testing.assert_allclose(batched, whole, rtol=TOL[jnp.float32], atol=1e-4)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("param_dtype", [jnp.float32, jnp.bfloat16])
def test_half_precision_inputs(dtype, param_dtype):
    layer = random_layer(LayerNorm, 256, param_dtype=param_dtype)
    assert layer.gamma.dtype == param_dtype
    x = random_input((8, 256), mean=50.0, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == x.shape
    expected = reference.layer_norm(np.asarray(x, np.float64), 1, layer.gamma, layer.beta)
    # statistics in float32: only the final rounding to the 8-bit (bf16) or 11-bit (fp16)
    # mantissa remains, |y| < 4 here, so 2 ** -7 * 4 bounds the bf16 error
    np.testing.assert_allclose(np.asarray(y, np.float64), expected, atol=4 * 2.0**-7)
    # and the float32 statistics are what makes it accurate: bf16 statistics would be off by ~1
    assert np.isfinite(np.asarray(y, np.float64)).all()


@pytest.mark.slow
def test_mask_drops_elements_from_the_statistics():
    layer = random_layer(LayerNorm, (6, 8))
    x = random_input((4, 6, 8), mean=2.0)
    mask = jax.random.bernoulli(jax.random.key(5), 0.7, (4, 6, 8)).at[1].set(False)
    y = jax.jit(lambda x, m: layer(x, mask=m))(x, mask)
    x_hat = reference.standardize(x, (1, 2), layer.epsilon, np.asarray(mask))
    expected = x_hat * np.asarray(layer.gamma) + np.asarray(layer.beta)
    np.testing.assert_allclose(y, expected, atol=TOL[jnp.float32])
    # a fully masked example is beta, and finite
    np.testing.assert_array_equal(y[1], jnp.broadcast_to(layer.beta, (6, 8)))
    # under vmap, one mask per example
    np.testing.assert_allclose(jax.vmap(lambda x, m: layer(x, mask=m))(x, mask), y, atol=1e-6)


def test_seed_examples():
    # NLP example
    batch, sentence_length, embedding_dim = 20, 5, 10
    embedding = jax.random.normal(jax.random.key(0), (batch, sentence_length, embedding_dim))
    layer_norm = LayerNorm(embedding_dim)
    out = layer_norm(embedding)
    np.testing.assert_allclose(out, reference.layer_norm(embedding, 1), atol=TOL[jnp.float32])
    # Image example
    N, C, H, W = 20, 5, 10, 10
    input = jax.random.normal(jax.random.key(1), (N, H, W, C))
    layer_norm = LayerNorm([H, W, C])
    output = layer_norm(input)
    assert output.shape == (N, H, W, C)
    np.testing.assert_allclose(output, reference.layer_norm(input, 3), atol=TOL[jnp.float32])


def test_immutable_and_updated_with_tree_at():
    layer = LayerNorm(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        layer.gamma = jnp.zeros(4)
    new = eqx.tree_at(lambda m: m.gamma, layer, jnp.full(4, 2.0))
    np.testing.assert_array_equal(new.gamma, np.full(4, 2.0))
    np.testing.assert_array_equal(layer.gamma, np.ones(4))
    assert "LayerNorm(" in repr(layer) and "gamma=f32[4]" in repr(layer)


def test_only_gamma_and_beta_are_leaves():
    leaves = jax.tree_util.tree_leaves(LayerNorm((3, 4)))
    assert [leaf.shape for leaf in leaves] == [(3, 4), (3, 4)]
    assert jax.tree_util.tree_leaves(LayerNorm(3, elementwise_affine=False)) == []


def test_initializer_dtype_follows_param_dtype():
    layer = LayerNorm(4, scale_initializer=np.ones(4, np.int32), param_dtype=jnp.bfloat16)
    assert layer.gamma.dtype == jnp.bfloat16 and layer.beta.dtype == jnp.bfloat16


BAD_CONSTRUCTION = [
    (dict(normalized_shape=0), ValueError, r"`normalized_shape` must be a positive int.*got 0"),
    (dict(normalized_shape=()), ValueError, r"`normalized_shape` must be .*non-empty.*got \(\)"),
    (dict(normalized_shape=(4, -1)), ValueError, r"`normalized_shape`.*got \(4, -1\)"),
    (dict(normalized_shape=2.5), TypeError, r"`normalized_shape` must be a positive int.*got 2.5"),
    (
        dict(normalized_shape=4, epsilon=-1e-5),
        ValueError,
        r"`epsilon` must be a finite non-negative.*-1e-05",
    ),
    (dict(normalized_shape=4, epsilon=float("inf")), ValueError, r"`epsilon`.*got inf"),
    (dict(normalized_shape=4, epsilon=float("nan")), ValueError, r"`epsilon`.*got nan"),
    (
        dict(normalized_shape=4, scale_initializer=np.ones(5)),
        ValueError,
        r"`scale_initializer` is an array of shape \(5,\).*shape \(4,\)",
    ),
    (
        dict(normalized_shape=4, bias_initializer=lambda k, s, d: jnp.zeros((2,), d)),
        ValueError,
        r"`bias_initializer`=.*returned an array of shape \(2,\), expected shape \(4,\)",
    ),
    (
        dict(normalized_shape=4, scale_initializer=Normal()),
        ValueError,
        r"`scale_initializer`=Normal\(mean=0.0, stddev=1.0\) is random and needs a PRNG key",
    ),
    (
        dict(normalized_shape=4, scale_initializer=jax.nn.initializers.normal()),
        ValueError,
        r"`scale_initializer`=.*failed when called with key=None.*pass `key=",
    ),
    (
        dict(normalized_shape=4, scale_initializer=2.0),
        TypeError,
        r"`scale_initializer` must be .*For a constant, pass `Constant\(2.0\)`",
    ),
    (
        dict(normalized_shape=4, bias_initializer="zeros"),
        TypeError,
        r"`bias_initializer` must be .*got 'zeros'",
    ),
    (
        dict(normalized_shape=4, scale_initializer=Constant),
        TypeError,
        r"`scale_initializer`: the class Constant needs arguments",
    ),
    (
        dict(normalized_shape=4, scale_initializer=dict),
        TypeError,
        r"`scale_initializer` must be .*got the class",
    ),
    (
        dict(normalized_shape=4, param_dtype=jnp.int32),
        TypeError,
        r"`param_dtype` must be a floating-point dtype, got int32",
    ),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), BAD_CONSTRUCTION)
def test_bad_construction_is_a_clear_error(kwargs, error, match):
    with pytest.raises(error, match=match):
        LayerNorm(**kwargs)


@pytest.mark.parametrize(
    ("x", "kwargs", "error", "match"),
    [
        (
            jnp.zeros((20, 5, 11)),
            {},
            ValueError,
            r"normalized_shape=\(10,\) expects an input `x` whose last 1 axes are \(10,\), got x "
            r"of shape \(20, 5, 11\).*normalized_shape=\(11,\)",
        ),
        (jnp.zeros((20, 10, 5)), {}, ValueError, r"jnp.moveaxis"),
        (
            jnp.zeros((4, 10), jnp.int32),
            {},
            TypeError,
            r"floating-point input `x`, got dtype int32",
        ),
        (jnp.zeros((4, 10), bool), {}, TypeError, r"floating-point input `x`, got dtype bool"),
        (
            jnp.zeros((4, 10)),
            {"mask": jnp.ones((4, 10), jnp.int32)},
            TypeError,
            r"`mask` must be boolean",
        ),
        (
            jnp.zeros((4, 10)),
            {"mask": jnp.ones((10,), bool)},
            ValueError,
            r"`mask` must have the rank of `x`",
        ),
    ],
)
def test_bad_call_is_a_clear_error(x, kwargs, error, match):
    with pytest.raises(error, match=match):
        LayerNorm(10)(x, **kwargs)


def test_too_few_axes_is_a_clear_error():
    with pytest.raises(
        ValueError, match=r"whose last 3 axes are \(2, 3, 4\), got x of shape \(3, 4\)"
    ):
        LayerNorm((2, 3, 4))(jnp.zeros((3, 4)))
