"""Batch invariance on the default CPU path: a row's (an example's) ``y`` and ``dx`` are
bitwise the same alone, in a batch of 7 and in a large batch, eager and jitted, and
``jax.vmap(layer)(x)`` equals ``layer(x)``. GroupNorm and InstanceNorm are covered in
``test_group_kernel.py``; the XLA path's (weaker) invariance in ``test_portable_path.py``."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import first_example_results, random_input, random_layer

import eqx_norm

pytestmark = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the default path is the kernel on CPU only"
)

ROW_LAYERS = {"LayerNorm": eqx_norm.LayerNorm, "RMSNorm": eqx_norm.RMSNorm}


def _assert_all_equal(results):
    for y, dx in results[1:]:
        np.testing.assert_array_equal(y, results[0][0])
        np.testing.assert_array_equal(dx, results[0][1])


@pytest.mark.slow
@pytest.mark.parametrize("name", ROW_LAYERS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("jit", [False, True])
def test_a_row_is_the_same_alone_in_7_and_in_600_rows(name, dtype, jit):
    layer = random_layer(ROW_LAYERS[name], 256, use_bias=True)
    x = random_input((600, 256), seed=3, mean=2.0, dtype=dtype)
    ct = random_input((600, 256), seed=4, dtype=dtype)
    sizes = (1, 7, 600)
    results = first_example_results(layer, [x[:n] for n in sizes], ct, jit=jit)
    _assert_all_equal(results)


@pytest.mark.parametrize("jit", [False, True])
def test_a_row_of_the_fused_residual_norm_is_the_same_in_any_batch(jit):
    layer = random_layer(eqx_norm.LayerNorm, 256)
    x = random_input((600, 256), seed=3, mean=2.0)
    r = random_input((600, 256), seed=5)
    ct = random_input((600, 256), seed=4)
    fn = lambda x: layer(x, residual=r[: x.shape[0]])[0]  # noqa: E731
    _assert_all_equal(first_example_results(fn, [x[:n] for n in (1, 7, 600)], ct, jit=jit))


@pytest.mark.parametrize("name", ROW_LAYERS)
def test_vmap_of_a_row_layer_equals_the_batched_call_bitwise(name):
    layer = random_layer(ROW_LAYERS[name], 128)
    x = random_input((9, 5, 128), seed=3, mean=-1.0)
    ct = random_input((9, 5, 128), seed=4)
    np.testing.assert_array_equal(jax.vmap(layer)(x), layer(x))
    np.testing.assert_array_equal(eqx.filter_jit(jax.vmap(layer))(x), eqx.filter_jit(layer)(x))

    def dx(fn):
        return jax.grad(lambda x: jnp.sum(fn(x) * ct))(x)

    np.testing.assert_array_equal(dx(jax.vmap(layer)), dx(layer))


@pytest.mark.slow
@pytest.mark.parametrize("channel_axis, shape", [(-1, (40, 6, 6, 16)), (1, (40, 16, 6, 6))])
@pytest.mark.parametrize("jit", [False, True])
def test_batch_norm_in_inference_is_the_same_for_an_image_in_any_batch(channel_axis, shape, jit):
    """In training a batch's statistics are the batch's by definition; in inference an
    image's output must not depend on the others."""
    train, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(16, channel_axis=channel_axis)
    # running statistics away from (0, 1), as after training
    _, state = train(random_input(shape, seed=7, mean=3.0, std=2.0), state)
    layer = eqx.nn.inference_mode(train)
    x = random_input(shape, seed=3, mean=2.0)
    ct = random_input(shape, seed=4)
    sizes = (1, 7, 40)
    fn = lambda x: layer(x, state)[0]  # noqa: E731
    _assert_all_equal(first_example_results(fn, [x[:n] for n in sizes], ct, jit=jit))


@pytest.mark.slow
@pytest.mark.parametrize("jit", [False, True])
def test_dyt_is_the_same_for_a_row_in_any_batch(jit):
    layer = eqx_norm.DyT(64)
    x = random_input((600, 64), seed=3, mean=1.0)
    ct = random_input((600, 64), seed=4)
    sizes = (1, 7, 600)
    _assert_all_equal(first_example_results(layer, [x[:n] for n in sizes], ct, jit=jit))
