"""The API's contract: no positional footguns, one rule for the zero-centred scale,
equinox's call form and ``from_equinox``, valid annotations, and the library's shape
(no import cycles, nothing from the demo, no global JAX configuration changed on import).
"""

import ast
import inspect
import subprocess
import sys
import typing
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from beartype import beartype
from helpers import random_input
from jaxtyping import jaxtyped

import eqx_norm
from eqx_norm import (
    Constant,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    OneInit,
    RMSNorm,
    from_equinox,
    functional,
)

import reference

PACKAGE = Path(eqx_norm.__file__).parent

# name: (build(**kwargs), a batch of inputs)
LAYERS = {
    "LayerNorm": (lambda **kw: LayerNorm(8, **kw), (3, 8)),
    "RMSNorm": (lambda **kw: RMSNorm(8, **kw), (3, 8)),
    "GroupNorm": (lambda **kw: GroupNorm(2, 8, **kw), (3, 4, 4, 8)),
    "InstanceNorm": (lambda **kw: InstanceNorm(8, **kw), (3, 4, 4, 8)),
}


# ------------------------------------------------------------------ positional arguments


@pytest.mark.parametrize(
    "build",
    [
        lambda: RMSNorm(10, 1e-6, jax.nn.initializers.zeros),
        lambda: GroupNorm(2, 4, 1e-5, OneInit()),
        lambda: InstanceNorm(4, 1e-5, OneInit()),
    ],
    ids=["RMSNorm", "GroupNorm", "InstanceNorm"],
)
def test_initializers_are_keyword_only_outside_layer_norm(build):
    with pytest.raises(TypeError, match="positional argument"):
        build()


def test_layer_norm_keeps_the_seed_positional_signature():
    names = list(inspect.signature(LayerNorm).parameters)[:5]
    assert names == [
        "normalized_shape",
        "epsilon",
        "bias_initializer",
        "scale_initializer",
        "elementwise_affine",
    ]
    layer = LayerNorm(4, 1e-3, Constant(0.5), Constant(2.0), True)
    np.testing.assert_array_equal(layer.beta, np.full(4, 0.5))
    np.testing.assert_array_equal(layer.gamma, np.full(4, 2.0))
    assert layer.epsilon == 1e-3


# ------------------------------------------------------------------ zero-centred scale


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize(
    "initializer",
    [OneInit(), Constant(1.0), jax.nn.initializers.ones, np.ones(8, np.float32)],
    ids=["OneInit", "Constant", "jax-ones", "array"],
)
@pytest.mark.slow
def test_zero_centered_scale_stores_what_the_initializer_gives(name, initializer):
    """One rule: the initializer initializes the stored gamma, so every "ones" means a
    scale of 2 under zero_centered_scale; the default stores zeros (a scale of 1)."""
    build, shape = LAYERS[name]
    x = random_input(shape, seed=0, mean=1.0)
    plain = build()
    ones = build(zero_centered_scale=True, scale_initializer=initializer)
    default = build(zero_centered_scale=True)
    np.testing.assert_array_equal(ones.gamma, np.ones(8))
    np.testing.assert_array_equal(default.gamma, np.zeros(8))
    np.testing.assert_allclose(default(x), plain(x), atol=1e-6)
    beta = 0 if plain.beta is None else np.asarray(plain.beta)
    # (1 + 1) * x_hat + beta = 2 * (y - beta) + beta, to float32 rounding of unit values
    np.testing.assert_allclose(ones(x), 2 * (np.asarray(plain(x)) - beta) + beta, atol=1e-5)


# ------------------------------------------------------------------ equinox's call form


@pytest.mark.parametrize("name", list(LAYERS))
def test_state_is_passed_through_and_key_ignored(name):
    build, shape = LAYERS[name]
    layer, x = build(), random_input(shape, seed=0, mean=1.0)
    state = {"anything": jnp.arange(3)}
    y, same = layer(x, state, key=jax.random.key(0))
    assert same is state
    np.testing.assert_array_equal(y, layer(x))


@pytest.mark.slow
def test_layers_sit_in_equinox_sequential_beside_a_stateful_layer():
    def make(key):
        k1, k2 = jax.random.split(key)
        return eqx.nn.Sequential(
            [
                eqx.nn.Linear(4, 8, key=k1),
                LayerNorm(8),
                eqx.nn.BatchNorm(8, axis_name="batch", mode="batch"),
                RMSNorm(8),
                eqx.nn.Linear(8, 2, key=k2),
            ]
        )

    model, state = eqx.nn.make_with_state(make)(jax.random.key(0))
    x = random_input((16, 4), seed=0, mean=1.0)
    y, new_state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(
        x, state
    )
    # the same computation spelled out layer by layer, as an independent check
    h = jax.vmap(model.layers[0])(x)
    h = np.asarray(reference.layer_norm(h, 1, model.layers[1].gamma, model.layers[1].beta))
    h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5)  # BatchNorm in training, batch statistics
    h = reference.rms_norm(h, 1, model.layers[3].gamma)
    expected = h @ np.asarray(model.layers[4].weight, np.float64).T + np.asarray(
        model.layers[4].bias
    )
    np.testing.assert_allclose(y, expected, atol=1e-4)  # float32 through 4 layers
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


# ------------------------------------------------------------------ from_equinox


class Block(eqx.Module):
    """A pre-norm transformer block built from eqx.nn parts, plus a conv head with GroupNorm."""

    norm1: eqx.nn.LayerNorm
    attention: eqx.nn.MultiheadAttention
    norm2: eqx.nn.RMSNorm
    mlp: eqx.nn.MLP
    conv: eqx.nn.Conv1d
    group_norm: eqx.nn.GroupNorm

    def __init__(self, key, d=16):
        k1, k2, k3, k4, k5, k6 = jax.random.split(key, 6)
        self.norm1 = eqx.nn.LayerNorm(d)
        self.attention = eqx.nn.MultiheadAttention(4, d, key=k1)
        self.norm2 = eqx.nn.RMSNorm(d, eps=1e-6)
        self.mlp = eqx.nn.MLP(d, d, 32, 1, key=k2)
        self.conv = eqx.nn.Conv1d(d, 8, 3, padding=1, key=k3)
        self.group_norm = eqx.nn.GroupNorm(2, 8)
        # non-trivial parameters, so that a swapped weight or bias would show
        self.norm1 = eqx.tree_at(
            lambda n: (n.weight, n.bias),
            self.norm1,
            (1 + 0.3 * jax.random.normal(k4, (d,)), 0.2 * jax.random.normal(k5, (d,))),
        )
        self.group_norm = eqx.tree_at(
            lambda n: n.bias, self.group_norm, 0.1 * jax.random.normal(k6, (8,))
        )

    def __call__(self, x):  # x: (seq, d), one example
        h = jax.vmap(self.norm1)(x)
        x = x + self.attention(h, h, h)
        x = x + jax.vmap(self.mlp)(jax.vmap(self.norm2)(x))
        return self.group_norm(self.conv(x.T))  # (channels, seq), channels-first


@pytest.mark.slow
def test_from_equinox_keeps_a_transformer_block_s_outputs_and_gradients():
    block = Block(jax.random.key(0))
    converted = from_equinox(block)  # GroupNorm: one example of any rank, as in equinox
    assert type(converted.norm1) is LayerNorm and type(converted.norm2) is RMSNorm
    assert type(converted.group_norm) is GroupNorm
    assert (converted.norm2.beta is None) == (block.norm2.bias is None)  # on in equinox
    assert converted.norm2.epsilon == 1e-6
    x = 2 + random_input((5, 7, 16), seed=1, mean=1.0)  # a batch of 5 sequences of 7 tokens

    def loss(model, x):
        return jnp.sum(jnp.sin(jax.vmap(model)(x)))

    value, grads = eqx.filter_jit(eqx.filter_value_and_grad(loss))(block, x)
    new_value, new_grads = eqx.filter_jit(eqx.filter_value_and_grad(loss))(converted, x)
    np.testing.assert_allclose(jax.vmap(converted)(x), jax.vmap(block)(x), atol=1e-5)
    np.testing.assert_allclose(new_value, value, rtol=1e-5)
    pairs = [
        (new_grads.norm1.gamma, grads.norm1.weight),
        (new_grads.norm1.beta, grads.norm1.bias),
        (new_grads.norm2.gamma, grads.norm2.weight),
        (new_grads.group_norm.gamma, grads.group_norm.weight),
        (new_grads.group_norm.beta, grads.group_norm.bias),
        (new_grads.attention.query_proj.weight, grads.attention.query_proj.weight),
        (new_grads.mlp.layers[0].weight, grads.mlp.layers[0].weight),
    ]
    for ours, theirs in pairs:
        # float32: sums over <= 5*7*16 terms of unit size
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)
    # batches without vmap: the converted LayerNorm takes (batch, seq, d) directly
    np.testing.assert_allclose(converted.norm1(x), jax.vmap(jax.vmap(block.norm1))(x), atol=1e-5)


def test_from_equinox_rejects_layers_it_cannot_convert():
    with pytest.raises(ValueError, match="channels=None"):
        from_equinox(eqx.nn.GroupNorm(2, channelwise_affine=False))


# ------------------------------------------------------------------ annotations


PUBLIC_CALLABLES = [
    *(getattr(functional, name) for name in functional.__all__),
    *(
        getattr(cls, method)
        for cls in (LayerNorm, RMSNorm, GroupNorm, InstanceNorm)
        for method in ("__init__", "__call__")
    ),
    eqx_norm.load_leaves,
    eqx_norm.from_equinox,
    eqx_norm.estimate_running_statistics,
    *(
        cls.__call__
        for cls in vars(eqx_norm.initializers).values()
        if isinstance(cls, type) and issubclass(cls, eqx_norm.Initializer)
    ),
]


@pytest.mark.parametrize("fn", PUBLIC_CALLABLES, ids=lambda f: f.__qualname__)
def test_public_annotations_are_valid(fn):
    hints = typing.get_type_hints(fn)
    assert "return" in hints or fn.__name__ == "__init__"


@pytest.mark.parametrize("name", list(LAYERS))
def test_layers_pass_jaxtyping_runtime_checks(name):
    build, shape = LAYERS[name]
    layer, x = build(), random_input(shape, seed=0, mean=1.0)
    checked_call = jaxtyped(typechecker=beartype)(type(layer).__call__)
    np.testing.assert_array_equal(checked_call(layer, x), layer(x))


@pytest.mark.slow
def test_functions_pass_jaxtyping_runtime_checks():
    x = random_input((3, 4, 8), seed=0, mean=1.0)
    checked = jaxtyped(typechecker=beartype)(functional.layer_norm)
    np.testing.assert_array_equal(
        checked(x, 8, jnp.ones(8)), functional.layer_norm(x, 8, jnp.ones(8))
    )
    with pytest.raises(Exception, match=r"Type-check error|type-check"):
        checked(x, 8, gamma=jnp.ones(8, jnp.int32))  # gamma is annotated Float


# ------------------------------------------------------------------ the library's shape


def _imports(path: Path) -> set[str]:
    """The eqx_norm modules that ``path`` imports at its top level."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def test_no_import_cycles_and_no_imports_hidden_in_functions():
    modules = {p.stem: p for p in PACKAGE.glob("*.py")}
    graph = {name: _imports(path) & set(modules) for name, path in modules.items()}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef):
                inner = [n for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and n.level]
                assert not inner, f"{name}.{node.name} imports a sibling inside a function"

    def visit(name, path):
        assert name not in path, f"import cycle: {' -> '.join([*path, name])}"
        for dep in graph[name]:
            visit(dep, [*path, name])

    for name in graph:
        visit(name, [])


@pytest.mark.slow
def test_importing_the_library_imports_no_demo_and_changes_no_jax_config():
    code = (
        "import sys, jax\n"
        "before = dict(jax.config.values)\n"
        "import eqx_norm, eqx_norm.functional\n"
        "assert dict(jax.config.values) == before, 'jax config changed on import'\n"
        "demo = sorted(m for m in sys.modules if m.startswith('eqx_norm.demo'))\n"
        "assert not demo, demo\n"
        "assert 'sklearn' not in sys.modules and 'optax' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# ------------------------------------------------------------------ implementation switch


@pytest.mark.parametrize(
    ("x", "kwargs", "why"),
    [
        (jnp.ones((2, 8)), {"mask": jnp.ones((2, 8), bool)}, "a `mask` is given"),
        (
            jnp.ones((2, 8), jnp.bfloat16),
            {"dtype": jnp.float32},
            "the output dtype float32 differs from x's dtype bfloat16",
        ),
    ],
    ids=["mask", "wider-output"],
)
def test_kernel_where_it_cannot_serve_is_a_clear_error_and_none_falls_back(x, kwargs, why):
    x = x + jnp.arange(8, dtype=x.dtype)[None, :]  # not constant rows
    with pytest.raises(ValueError, match=rf"implementation='kernel' cannot serve .*{why}"):
        functional.layer_norm(x, 8, **kwargs, implementation="kernel")
    np.testing.assert_array_equal(
        functional.layer_norm(x, 8, **kwargs),
        functional.layer_norm(x, 8, **kwargs, implementation="xla"),
    )


def test_unknown_implementation_is_a_clear_error():
    with pytest.raises(ValueError, match=r"`implementation` must be None .* got 'triton'"):
        LayerNorm(8, implementation="triton")
    with pytest.raises(ValueError, match=r"`implementation` must be None .* got 'cuda'"):
        functional.rms_norm(jnp.ones((2, 8)), 8, implementation="cuda")


def test_bad_key_and_switches_are_clear_errors_even_without_affine():
    with pytest.raises(TypeError, match=r"`key` must be a PRNG key .* got 'a'"):
        LayerNorm(4, scale_initializer=eqx_norm.Normal(), key="a")
    with pytest.raises(TypeError, match=r"`use_scale` must be True or False, got 'yes'"):
        LayerNorm(4, elementwise_affine=False, use_scale="yes")
