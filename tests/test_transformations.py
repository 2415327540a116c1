"""LayerNorm through every transformation a training loop uses, each against a reference.

Derivatives (grad, hessian, jvp, vjp, checkpoint) are compared with central finite
differences of the float64 NumPy reference (tests/reference.py), never with JAX's own
autodiff, so a hand-written derivative rule in the layer is held to the formula.
Finite-difference error in float64: with step h = 1e-6 the first derivative is off by
~h^2 + eps/h ~ 1e-10; the second (h = 2e-4) by ~h^2 + eps|f|/h^2 ~ 1e-7. Tolerances: 1e-8
for float64 derivatives, 1e-6 for the float64 Hessian, and for float32 results 1e-5
(outputs, O(1)) or 1e-4 (gradients, sums of O(10) float32 terms).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_input, random_layer

from eqx_norm import LayerNorm, Normal

import reference

CONFIGS = {  # name: (input shape, normalized_shape, LayerNorm keyword arguments)
    "affine": ((3, 8), (8,), {}),
    "two_axes": ((2, 3, 4), (3, 4), {}),
    "no_affine": ((3, 8), (8,), {"elementwise_affine": False}),
    "scale_only": ((3, 8), (8,), {"use_bias": False}),
    "bias_only": ((3, 8), (8,), {"use_scale": False}),
    "zero_centered": ((3, 8), (8,), {"zero_centered_scale": True}),
}


call = eqx.filter_jit(lambda layer, x: layer(x))  # one compilation instead of op by op


def with_params(layer, gamma, beta):
    """``layer`` with its gamma and beta (those it has) replaced."""
    if layer.gamma is not None:
        layer = eqx.tree_at(lambda m: m.gamma, layer, gamma)
    if layer.beta is not None:
        layer = eqx.tree_at(lambda m: m.beta, layer, beta)
    return layer


def reference_call(layer, x, gamma, beta, mask=None):
    """The float64 NumPy reference of ``layer`` at ``x``, with the given gamma and beta."""
    if gamma is not None and layer.zero_centered_scale:
        gamma = 1.0 + np.asarray(gamma, np.float64)
    ndim = len(layer.normalized_shape)
    return reference.layer_norm(x, ndim, gamma, beta, layer.epsilon, mask)


def parts(layer, x):
    """The differentiable inputs as a dict of float64 NumPy arrays (x, and gamma/beta if set)."""
    arrays = {"x": x, "gamma": layer.gamma, "beta": layer.beta}
    return {k: np.asarray(v, np.float64) for k, v in arrays.items() if v is not None}


def reference_of(layer, mask=None):
    """``f(parts) -> output``: the reference as a function of the differentiable inputs."""
    return lambda p: reference_call(layer, p["x"], p.get("gamma"), p.get("beta"), mask)


def fd_directional(f, point, tangent, h=1e-6):
    """Central difference of ``f`` at ``point`` (a dict of arrays) along ``tangent``."""
    plus = {k: point[k] + h * tangent[k] for k in point}
    minus = {k: point[k] - h * tangent[k] for k in point}
    return (f(plus) - f(minus)) / (2 * h)


def fd_gradient(f, point, h=1e-6):
    """The gradient of the scalar ``f`` at ``point`` by central differences, element by element."""
    grads = {}
    for name, value in point.items():
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            unit = {k: np.zeros_like(v) for k, v in point.items()}
            unit[name][index] = 1.0
            grad[index] = fd_directional(f, point, unit, h)
        grads[name] = grad
    return grads


def layer_grads(grads_layer, grad_x):
    """``{"x", "gamma", "beta"}`` from a gradient with respect to (layer, x), Nones dropped."""
    out = {"x": grad_x, "gamma": grads_layer.gamma, "beta": grads_layer.beta}
    return {k: np.asarray(v) for k, v in out.items() if v is not None}


def assert_dicts_close(got, expected, **tolerances):
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], err_msg=name, **tolerances)


# ---------------------------------------------------------------- vmap and filter_vmap


@pytest.mark.slow
@pytest.mark.parametrize("config", ["affine", "two_axes", "zero_centered"])
def test_vmap_matches_reference(config):
    shape, normalized_shape, kwargs = CONFIGS[config]
    layer = random_layer(LayerNorm, normalized_shape, **kwargs)
    x = random_input((5, *shape), seed=1, mean=2.0, std=3.0)
    expected = reference_call(layer, x, layer.gamma, layer.beta)
    np.testing.assert_allclose(jax.jit(jax.vmap(layer))(x), expected, atol=1e-5)
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.vmap(layer)))(x), expected, atol=1e-5)
    # a batch axis that is not the leading one
    moved = jax.jit(jax.vmap(layer, in_axes=1, out_axes=1))(jnp.moveaxis(x, 0, 1))
    np.testing.assert_allclose(jnp.moveaxis(moved, 1, 0), expected, atol=1e-5)


@pytest.mark.slow
def test_vmap_with_mask():
    layer = random_layer(LayerNorm, (8,))
    x = random_input((4, 3, 8), seed=1)
    mask = jax.random.bernoulli(jax.random.key(2), 0.7, (4, 3, 8))
    y = jax.jit(jax.vmap(lambda x, m: layer(x, mask=m)))(x, mask)
    expected = reference_call(layer, x, layer.gamma, layer.beta, mask)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def stacked_layers(num_layers, size):
    """``num_layers`` LayerNorms with random gamma, built by one ``eqx.filter_vmap`` over keys."""
    keys = jax.random.split(jax.random.key(3), num_layers)
    make = eqx.filter_vmap(
        lambda key: LayerNorm(
            size, scale_initializer=Normal(1.0, 0.5), bias_initializer=Normal(0.0, 0.3), key=key
        )
    )
    return make(keys), keys


@pytest.mark.slow
def test_filter_vmap_builds_a_stack_of_layers():
    stack, keys = stacked_layers(4, 8)
    assert stack.gamma.shape == stack.beta.shape == (4, 8)
    assert stack.normalized_shape == (8,) and stack.epsilon == 1e-5
    for i, key in enumerate(keys):  # layer i is the layer built alone from key i
        alone = LayerNorm(
            8, scale_initializer=Normal(1.0, 0.5), bias_initializer=Normal(0.0, 0.3), key=key
        )
        np.testing.assert_array_equal(stack.gamma[i], alone.gamma)
        np.testing.assert_array_equal(stack.beta[i], alone.beta)
    assert len(set(np.asarray(stack.gamma[:, 0]).tolist())) == 4  # the keys differ
    # each layer applied to its own input, by filter_vmap over the stack
    x = random_input((4, 3, 8), seed=1, mean=1.0, std=2.0)
    y = eqx.filter_jit(eqx.filter_vmap(lambda m, x: m(x)))(stack, x)
    for i in range(4):
        expected = reference.layer_norm(x[i], 1, stack.gamma[i], stack.beta[i])
        np.testing.assert_allclose(y[i], expected, atol=1e-5)


@pytest.mark.slow
def test_scan_over_a_stack_of_layers():
    stack, _ = stacked_layers(5, 8)
    params, static = eqx.partition(stack, eqx.is_array)
    w = random_input((8, 8), seed=4) / np.sqrt(8)
    x = random_input((3, 8), seed=1, mean=1.0, std=2.0)

    def body(h, layer_params):
        layer = eqx.combine(layer_params, static)
        return jnp.tanh(layer(h) @ w), None

    y, _ = jax.lax.scan(body, x, params)
    expected = np.asarray(x, np.float64)
    for i in range(5):  # the same network as a Python loop over the float64 reference
        expected = np.tanh(
            reference.layer_norm(expected, 1, stack.gamma[i], stack.beta[i])
            @ np.asarray(w, np.float64)
        )
    np.testing.assert_allclose(y, expected, atol=1e-5)


# ---------------------------------------------------------------- grad, hessian, jvp, vjp


@pytest.mark.parametrize("config", list(CONFIGS))
def test_grad_matches_finite_differences_float64(x64, config):
    shape, normalized_shape, kwargs = CONFIGS[config]
    layer = random_layer(LayerNorm, normalized_shape, param_dtype=jnp.float64, **kwargs)
    x = random_input(shape, seed=1, dtype=jnp.float64, mean=2.0, std=3.0)
    w = random_input(shape, seed=2, dtype=jnp.float64)

    def loss(layer, x):
        return jnp.sum(w * layer(x))

    grads = layer_grads(*jax.jit(jax.grad(loss, argnums=(0, 1)))(layer, x))
    f = reference_of(layer)
    expected = fd_gradient(lambda p: np.sum(np.asarray(w) * f(p)), parts(layer, x))
    assert_dicts_close(grads, expected, atol=1e-8, rtol=1e-8)


@pytest.mark.parametrize(("mean", "atol"), [(2.0, 1e-4), (1e4, 3e-3)])
def test_grad_float32_matches_float64_reference(mean, atol):
    layer = random_layer(LayerNorm, (16,))
    x = random_input((4, 16), seed=1, mean=mean)  # float32, seen exactly by the reference
    w = random_input((4, 16), seed=2)
    grads = layer_grads(
        *jax.jit(jax.grad(lambda m, x: jnp.sum(w * m(x)), argnums=(0, 1)))(layer, x)
    )
    f = reference_of(layer)
    expected = fd_gradient(lambda p: np.sum(np.asarray(w, np.float64) * f(p)), parts(layer, x))
    # mean 2: float32 sums of 16 O(1) terms, 1e-4. Mean 1e4: float32 spacing there is 1e-3,
    # so the float32 mean, and each x - mean, is off by up to ~1e-3 (the forward bound of
    # test_layer_norm.py); gamma's gradient adds 4 rows of such terms (measured 1.2e-3)
    assert_dicts_close(grads, expected, atol=atol, rtol=1e-4)


def test_grad_with_mask_matches_finite_differences_float64(x64):
    layer = random_layer(LayerNorm, (8,), param_dtype=jnp.float64)
    x = random_input((3, 8), seed=1, dtype=jnp.float64)
    w = random_input((3, 8), seed=2, dtype=jnp.float64)
    mask = np.asarray(jax.random.bernoulli(jax.random.key(5), 0.6, (3, 8)))
    grads = layer_grads(
        *jax.jit(jax.grad(lambda m, x: jnp.sum(w * m(x, mask=mask)), argnums=(0, 1)))(layer, x)
    )
    f = reference_of(layer, mask)
    expected = fd_gradient(lambda p: np.sum(np.asarray(w) * f(p)), parts(layer, x))
    assert_dicts_close(grads, expected, atol=1e-8, rtol=1e-8)
    assert np.all(grads["x"][~mask] == 0)  # masked-out inputs take no part


@pytest.mark.slow
@pytest.mark.parametrize("config", ["affine", "two_axes", "no_affine", "zero_centered"])
def test_hessian_matches_finite_differences_float64(x64, config):
    shape, normalized_shape, kwargs = CONFIGS[config]
    layer = random_layer(LayerNorm, normalized_shape, param_dtype=jnp.float64, **kwargs)
    x = random_input(shape, seed=1, dtype=jnp.float64, mean=2.0, std=3.0)
    w = random_input(shape, seed=2, dtype=jnp.float64)
    point = parts(layer, x)
    names = list(point)
    sizes = [point[n].size for n in names]

    def unflatten(v, xp):
        pieces = xp.split(v, np.cumsum(sizes)[:-1])
        return {n: p.reshape(point[n].shape) for n, p in zip(names, pieces)}

    def loss(v):  # a curved loss of (x, gamma, beta) together, so cross terms count
        p = unflatten(v, jnp)
        y = with_params(layer, p.get("gamma"), p.get("beta"))(p["x"])
        return jnp.sum(w * y + 0.5 * y**2)

    f = reference_of(layer)

    def reference_loss(v):
        y = f(unflatten(v, np))
        return np.sum(np.asarray(w) * y + 0.5 * y**2)

    v = np.concatenate([point[n].ravel() for n in names])
    hessian = jax.jit(jax.hessian(loss))(jnp.asarray(v))
    h, n = 2e-4, v.size
    expected = np.zeros((n, n))
    for i in range(n):
        for j in range(i, n):
            ei, ej = np.eye(n)[i] * h, np.eye(n)[j] * h
            expected[i, j] = expected[j, i] = (
                reference_loss(v + ei + ej)
                - reference_loss(v + ei - ej)
                - reference_loss(v - ei + ej)
                + reference_loss(v - ei - ej)
            ) / (4 * h * h)
    # second differences: truncation ~h^2 = 4e-8, rounding ~eps * |loss| / h^2 ~ 1e-7
    np.testing.assert_allclose(hessian, expected, atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-12)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_jvp_matches_finite_differences_float64(x64, config):
    shape, normalized_shape, kwargs = CONFIGS[config]
    layer = random_layer(LayerNorm, normalized_shape, param_dtype=jnp.float64, **kwargs)
    x = random_input(shape, seed=1, dtype=jnp.float64, mean=2.0, std=3.0)
    point = parts(layer, x)
    tangent = {
        k: np.asarray(random_input(v.shape, seed=10 + i, dtype=jnp.float64))
        for i, (k, v) in enumerate(point.items())
    }
    layer_tangent = with_params(layer, tangent.get("gamma"), tangent.get("beta"))
    # with respect to x alone, then to the layer's parameters and x together
    y, y_dot = jax.jit(lambda x, t: jax.jvp(layer, (x,), (t,)))(x, jnp.asarray(tangent["x"]))
    f = reference_of(layer)
    x_only = {k: (v if k == "x" else np.zeros_like(v)) for k, v in tangent.items()}
    np.testing.assert_allclose(y, f(point), atol=1e-12)
    np.testing.assert_allclose(y_dot, fd_directional(f, point, x_only), atol=1e-8, rtol=1e-8)
    _, y_dot = jax.jit(lambda p, t: jax.jvp(lambda m, x: m(x), p, t))(
        (layer, x), (layer_tangent, jnp.asarray(tangent["x"]))
    )
    np.testing.assert_allclose(y_dot, fd_directional(f, point, tangent), atol=1e-8, rtol=1e-8)


def test_jvp_float32_matches_float64_reference():
    layer = random_layer(LayerNorm, (16,))
    x = random_input((4, 16), seed=1, mean=1e3, std=1.0)
    t = random_input((4, 16), seed=2)
    _, y_dot = jax.jit(lambda x, t: jax.jvp(layer, (x,), (t,)))(x, t)
    point = parts(layer, x)
    tangent = {
        k: (np.asarray(t, np.float64) if k == "x" else np.zeros_like(v)) for k, v in point.items()
    }
    expected = fd_directional(reference_of(layer), point, tangent)
    np.testing.assert_allclose(y_dot, expected, atol=1e-4)  # float32 sums of O(1) terms


@pytest.mark.parametrize("config", ["affine", "two_axes", "scale_only", "zero_centered"])
def test_vjp_matches_finite_differences_float64(x64, config):
    shape, normalized_shape, kwargs = CONFIGS[config]
    layer = random_layer(LayerNorm, normalized_shape, param_dtype=jnp.float64, **kwargs)
    x = random_input(shape, seed=1, dtype=jnp.float64, mean=-1.0, std=0.5)
    cotangent = random_input(shape, seed=3, dtype=jnp.float64)

    @jax.jit
    def forward_and_pullback(layer, x, cotangent):
        y, vjp = jax.vjp(lambda m, x: m(x), layer, x)
        return y, vjp(cotangent)

    y, pulled_back = forward_and_pullback(layer, x, cotangent)
    f = reference_of(layer)
    np.testing.assert_allclose(y, f(parts(layer, x)), atol=1e-12)
    grads = layer_grads(*pulled_back)
    expected = fd_gradient(lambda p: np.sum(np.asarray(cotangent) * f(p)), parts(layer, x))
    assert_dicts_close(grads, expected, atol=1e-8, rtol=1e-8)


# ---------------------------------------------------------------- checkpoint


@pytest.mark.parametrize("policy", [None, jax.checkpoint_policies.nothing_saveable])
def test_checkpoint_matches_finite_differences_float64(x64, policy):
    layer = random_layer(LayerNorm, (3, 4), param_dtype=jnp.float64)
    x = random_input((2, 3, 4), seed=1, dtype=jnp.float64, mean=2.0, std=3.0)
    w = random_input((2, 3, 4), seed=2, dtype=jnp.float64)

    def block(m, x):
        return jnp.tanh(m(x))

    remat = jax.checkpoint(block, policy=policy)
    loss, (g_layer, g_x) = jax.jit(
        jax.value_and_grad(lambda m, x: jnp.sum(w * remat(m, x)), argnums=(0, 1))
    )(layer, x)
    f = reference_of(layer)
    point = parts(layer, x)
    np.testing.assert_allclose(loss, np.sum(np.asarray(w) * np.tanh(f(point))), rtol=1e-12)
    expected = fd_gradient(lambda p: np.sum(np.asarray(w) * np.tanh(f(p))), point)
    assert_dicts_close(layer_grads(g_layer, g_x), expected, atol=1e-8, rtol=1e-8)


# ---------------------------------------------------------------- filter_jit


def test_filter_jit_does_not_recompile_for_same_shapes():
    traces = []

    @eqx.filter_jit
    def apply(layer, x):
        traces.append(x.shape)  # runs only while tracing, i.e. once per compilation
        return layer(x)

    layer = random_layer(LayerNorm, (8,))
    x = random_input((4, 8), seed=1)
    np.testing.assert_allclose(
        apply(layer, x), reference_call(layer, x, layer.gamma, layer.beta), atol=1e-5
    )
    other_values = random_layer(
        LayerNorm, (8,), seed=7
    )  # new parameter values, same shapes and config
    np.testing.assert_allclose(
        apply(other_values, random_input((4, 8), seed=2)),
        reference_call(
            other_values, random_input((4, 8), seed=2), other_values.gamma, other_values.beta
        ),
        atol=1e-5,
    )
    assert traces == [(4, 8)]
    apply(layer, random_input((5, 8), seed=3))  # a new shape compiles once more
    assert traces == [(4, 8), (5, 8)]
    apply(random_layer(LayerNorm, (8,), epsilon=1e-3), x)  # static config is part of the cache key
    assert len(traces) == 3
    apply(random_layer(LayerNorm, (8,), epsilon=1e-3, seed=9), x)
    assert len(traces) == 3


def test_filter_jit_compiles_once_per_shape_per_jax_log(caplog):
    @eqx.filter_jit
    def apply(layer, x):
        return layer(x) * 2.0

    layer = random_layer(LayerNorm, (8,))
    with jax.log_compiles(True), caplog.at_level("WARNING", logger="jax"):
        apply(layer, random_input((6, 8), seed=1)).block_until_ready()
        first = sum("Compiling" in r.getMessage() for r in caplog.records)
        caplog.clear()
        apply(
            random_layer(LayerNorm, (8,), seed=2), random_input((6, 8), seed=2)
        ).block_until_ready()
        second = sum("Compiling" in r.getMessage() for r in caplog.records)
    assert first >= 1 and second == 0


# ---------------------------------------------------------------- partition, combine, pytrees


@pytest.mark.parametrize("config", ["affine", "no_affine", "scale_only", "bias_only"])
def test_partition_and_combine(config):
    shape, normalized_shape, kwargs = CONFIGS[config]
    layer = random_layer(LayerNorm, normalized_shape, **kwargs)
    params, static = eqx.partition(layer, eqx.is_array)
    expected_leaves = [p for p in (layer.gamma, layer.beta) if p is not None]
    assert len(jax.tree.leaves(params)) == len(expected_leaves)
    assert all(a is b for a, b in zip(jax.tree.leaves(params), expected_leaves))
    assert jax.tree.leaves(static) == []  # the config is static: nothing left to train
    assert static.normalized_shape == normalized_shape
    # an SGD step on the partitioned parameters, recombined, is the layer with new parameters
    x = random_input((5, *shape), seed=1)
    w = random_input((5, *shape), seed=2)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(w * eqx.combine(p, static)(x))))(params)
    stepped = eqx.combine(jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), static)
    gamma = None if layer.gamma is None else layer.gamma - 0.1 * grads.gamma
    beta = None if layer.beta is None else layer.beta - 0.1 * grads.beta
    np.testing.assert_allclose(call(stepped, x), reference_call(layer, x, gamma, beta), atol=1e-5)


@pytest.mark.parametrize("config", ["affine", "two_axes", "no_affine", "scale_only", "bias_only"])
def test_tree_flatten_unflatten(config):
    _, normalized_shape, kwargs = CONFIGS[config]
    layer = random_layer(LayerNorm, normalized_shape, **kwargs)
    leaves, treedef = jax.tree_util.tree_flatten(layer)
    # exactly the arrays training updates, and no others (config lives in the treedef)
    expected = [p for p in (layer.gamma, layer.beta) if p is not None]
    assert len(leaves) == len(expected) and all(a is b for a, b in zip(leaves, expected))
    assert (
        jax.tree_util.tree_flatten(random_layer(LayerNorm, normalized_shape, seed=5, **kwargs))[1]
        == treedef
    )
    assert jax.tree_util.tree_flatten(
        random_layer(LayerNorm, normalized_shape, epsilon=0.1, **kwargs)
    )[1] != (treedef)
    # unflatten with new leaves gives the same layer with those parameters
    new_leaves = [leaf * 2.0 + 1.0 for leaf in leaves]
    rebuilt = jax.tree_util.tree_unflatten(treedef, new_leaves)
    assert isinstance(rebuilt, LayerNorm)
    assert (rebuilt.normalized_shape, rebuilt.epsilon) == (layer.normalized_shape, layer.epsilon)
    assert all(a is b for a, b in zip(jax.tree.leaves(rebuilt), new_leaves))
    x = random_input((2, *normalized_shape), seed=1)
    gamma = None if layer.gamma is None else layer.gamma * 2.0 + 1.0
    beta = None if layer.beta is None else layer.beta * 2.0 + 1.0
    np.testing.assert_allclose(call(rebuilt, x), reference_call(layer, x, gamma, beta), atol=1e-5)
