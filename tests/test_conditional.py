"""Conditional normalization (issue 26): per-example ``scale``/``shift`` on LayerNorm,
RMSNorm, GroupNorm and InstanceNorm, ``activation="silu"`` on the grouped norms, and
GatedRMSNorm, against float64 NumPy, finite differences, and each other's implementations.

The oracle is tests/reference.py's float64 norm, then ``y * (1 + scale) + shift``, then
``silu`` (the documented order: the activation comes after the modulation).

Tolerances: outputs are compared by ``max|got - want| / max|want|``. float32 statistics
over rows of a few hundred elements are within TOL[float32] = 1e-5. In bfloat16 one
rounding of the output is already up to TOL[bfloat16] = 2**-8 of max|want| (half an ulp
of an element just above a power of two; measured: 0.93 of it for RMSNorm), and the
float32 statistics and modulation add to it, so bf16 allows 2 * TOL[bfloat16]. Gradients
are sums over a batch of O(1) terms: 1e-4 relative in float32 between the two
implementations; the finite-difference checks run in float64.

Sampling a new shape with jax.random compiles for seconds on CPU, so inputs are slices of
one seeded pool (``draw``) and layers are called through one jitted ``apply``.
"""

import functools
import math
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    TOL,
    assert_checks_pass_on_simulated_devices,
    first_example_results,
    max_relative_error,
    random_input,
    random_layer,
    random_params,
)
from jax.test_util import check_grads

from eqx_norm import GatedRMSNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm, functional

import reference

IMPLEMENTATIONS = ["xla", "kernel"]
DTYPES = [jnp.float32, jnp.bfloat16]
# bf16 repeats every float32 case of the larger tables: the slow loop runs it
SLOW_BF16 = [jnp.float32, pytest.param(jnp.bfloat16, marks=pytest.mark.slow)]


@functools.cache
def _pool(seed):
    return np.asarray(random_input((_POOL,), seed=seed))


_POOL = 2**20  # the largest input here is (8, 256, 384) = 786,432 elements


def draw(shape, seed=1, mean=0.0, std=1.0, dtype=jnp.float32):
    """``random_input`` of ``shape``, seeded, drawn as the first elements of one seeded
    pool of ``random_input((2**20,))``: one compiled sampler for every shape (sampling each
    shape anew compiles for seconds on CPU)."""
    flat = mean + std * _pool(seed)[: math.prod(shape)]
    return jnp.asarray(flat.reshape(shape), jnp.float32).astype(dtype)


@eqx.filter_jit
def apply(layer, x, **kwargs):
    """``layer(x, **kwargs)``, jitted: one compilation per configuration, not one per op
    (``test_vmap_and_jit_*`` check that eager calls give the same)."""
    return layer(x, **kwargs)


def tolerance(dtype):
    """Relative tolerance of a modulated output in ``dtype`` (see the module docstring)."""
    return TOL[jnp.float32] if dtype == jnp.float32 else 2 * TOL[jnp.bfloat16]


def f64(a):
    return None if a is None else np.asarray(np.asarray(a, np.float32), np.float64)


def modulated(y, scale=None, shift=None, activation=None):
    """The float64 oracle's last steps: ``y * (1 + scale) + shift``, then the activation."""
    if scale is not None:
        y = y * (1 + f64(scale))
    if shift is not None:
        y = y + f64(shift)
    if activation == "silu":
        y = y / (1 + np.exp(-y))
    return y


def modulation(shape, which, dtype=jnp.float32, seed=10):
    """``(scale, shift)`` of ``shape`` (None where ``which`` leaves one out), seeded:
    scale ~ 0.5 N, shift ~ 0.5 N."""
    scale = draw(shape, seed=seed, std=0.5, dtype=dtype)
    shift = draw(shape, seed=seed + 1, std=0.5, dtype=dtype)
    return (scale if which != "shift" else None), (shift if which != "scale" else None)


# ----------------------------------------------------------------------------------------
# LayerNorm and RMSNorm: adaLN on (B, T, D).

B, T, D = 8, 256, 384  # DiT-S: 256 patches of width 384
TRAILING = {
    "LayerNorm": (LayerNorm, reference.layer_norm),
    "RMSNorm": (RMSNorm, reference.rms_norm),
}
SHORT_T = 32  # the table of modulation shapes runs on (B, SHORT_T, D)
MODULATION_SHAPES = {  # the modulation's shape for x of (B, SHORT_T, D)
    "per-example": (B, 1, D),
    "shared": (1, 1, D),
    "per-token": (B, SHORT_T, D),
    "per-example-scalar": (B, 1, 1),
}


def trailing_layer(name, implementation, **kwargs):
    cls, _ = TRAILING[name]
    return random_layer(cls, D, use_bias=True, implementation=implementation, **kwargs)


def trailing_oracle(name, layer, x, mask=None):
    _, norm = TRAILING[name]
    return norm(f64(x), 1, f64(layer.gamma), f64(layer.beta), epsilon=layer.epsilon, mask=mask)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TRAILING)
def test_trailing_norm_modulation_matches_float64(name, dtype, implementation):
    layer = trailing_layer(name, implementation)
    x = draw((B, T, D), mean=1.0, std=2.0, dtype=dtype)
    scale, shift = modulation((B, 1, D), "both", dtype)
    y = apply(layer, x, scale=scale, shift=shift)
    assert y.shape == x.shape and y.dtype == dtype
    want = modulated(trailing_oracle(name, layer, x), scale, shift)
    assert max_relative_error(y, want) < tolerance(dtype)
    # the modulation matters: the unmodulated norm is far from the modulated oracle
    assert max_relative_error(apply(layer, x), want) > 0.1


# (modulation shape, which of scale/shift): either alone and both per example, both for
# the other shapes
SHAPES_AND_WHICH = [("per-example", w) for w in ("scale", "shift", "both")] + [
    (shape, "both") for shape in MODULATION_SHAPES if shape != "per-example"
]


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(("shape", "which"), SHAPES_AND_WHICH)
@pytest.mark.parametrize("name", TRAILING)
def test_trailing_norm_modulation_shapes_and_either_alone(name, shape, which, implementation):
    layer = trailing_layer(name, implementation)
    x = draw((B, SHORT_T, D), seed=2, mean=-0.5, std=1.5)
    scale, shift = modulation(MODULATION_SHAPES[shape], which)
    y = apply(layer, x, scale=scale, shift=shift)
    want = modulated(trailing_oracle(name, layer, x), scale, shift)
    assert max_relative_error(y, want) < TOL[jnp.float32]


@pytest.mark.parametrize("implementation", [None, "xla"])
@pytest.mark.parametrize("name", TRAILING)
def test_trailing_norm_modulation_with_a_mask(name, implementation):
    # masked elements take no part in the statistics and give the modulated beta
    layer = trailing_layer(name, implementation)
    x = draw((B, 16, D), seed=3, mean=2.0)
    mask = (jnp.arange(D)[None, None, :] % 5 != 0) & (jnp.arange(B)[:, None, None] != 3)
    mask = jnp.broadcast_to(mask, x.shape).at[3].set(True).at[0, :4].set(False)
    scale, shift = modulation((B, 1, D), "both")
    y = apply(layer, x, mask=mask, scale=scale, shift=shift)
    want = modulated(trailing_oracle(name, layer, x, mask=np.asarray(mask)), scale, shift)
    assert max_relative_error(y, want) < TOL[jnp.float32]
    beta = modulated(np.broadcast_to(f64(layer.beta), x.shape), scale, shift)
    np.testing.assert_allclose(np.where(mask, 0.0, y), np.where(mask, 0.0, beta), atol=1e-6)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", TRAILING)
def test_trailing_norm_modulation_with_a_residual(name, dtype, implementation):
    layer = trailing_layer(name, implementation)
    x = draw((B, 64, D), seed=4, dtype=dtype)
    residual = draw((B, 64, D), seed=5, mean=1.0, dtype=dtype)
    scale, shift = modulation((B, 1, D), "both", dtype)
    y, h = apply(layer, x, residual=residual, scale=scale, shift=shift)
    assert y.dtype == dtype and h.dtype == dtype
    h_want = f64(x) + f64(residual)
    assert max_relative_error(h, h_want) < TOL[dtype]
    # y is the modulated norm of the h that was returned (stored in the residual's dtype)
    want = modulated(trailing_oracle(name, layer, h), scale, shift)
    assert max_relative_error(y, want) < tolerance(dtype)


@pytest.mark.parametrize("name", TRAILING)
def test_functional_trailing_norm_equals_the_layer(name):
    layer = trailing_layer(name, None)
    x = draw((4, 32, D), seed=6)
    scale, shift = modulation((4, 1, D), "both")
    fn = functional.layer_norm if name == "LayerNorm" else functional.rms_norm
    got = fn(x, D, layer.gamma, layer.beta, epsilon=layer.epsilon, scale=scale, shift=shift)
    np.testing.assert_array_equal(got, layer(x, scale=scale, shift=shift))


# ----------------------------------------------------------------------------------------
# GroupNorm and InstanceNorm: AdaGN on images, channels-last and channels-first.

N, H, W, C, G = 4, 16, 16, 64, 32  # a Stable Diffusion block's GroupNorm(32, C)


def grouped_case(family, channel_axis, implementation, activation=None, **kwargs):
    """``(layer, x, modulation shape, oracle)`` for ``family`` in the layout of
    ``channel_axis``; ``oracle(x)`` is the float64 unmodulated norm."""
    shape = (N, H, W, C) if channel_axis == -1 else (N, C, H, W)
    per_example = (N, 1, 1, C) if channel_axis == -1 else (N, C, 1, 1)
    if family == "GroupNorm":
        layer = random_layer(
            GroupNorm,
            G,
            C,
            param_shape=C,
            channel_axis=channel_axis,
            implementation=implementation,
            activation=activation,
            **kwargs,
        )
        groups = G
    else:
        layer = random_layer(
            InstanceNorm,
            C,
            channel_axis=channel_axis,
            implementation=implementation,
            activation=activation,
            **kwargs,
        )
        groups = C

    def oracle(x):
        return reference.group_norm(
            f64(x),
            groups,
            2,
            f64(layer.gamma),
            f64(layer.beta),
            layer.epsilon,
            channel_axis=channel_axis,
        )

    return layer, shape, per_example, oracle


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", SLOW_BF16)
@pytest.mark.parametrize("channel_axis", [-1, 0])
@pytest.mark.parametrize(
    ("family", "activation"),
    [
        ("GroupNorm", None),
        ("GroupNorm", "silu"),
        ("InstanceNorm", "silu"),
        pytest.param("InstanceNorm", None, marks=pytest.mark.slow),
    ],
)
def test_grouped_norm_modulation_matches_float64(
    family, activation, channel_axis, dtype, implementation
):
    layer, shape, per_example, oracle = grouped_case(
        family, channel_axis, implementation, activation
    )
    x = draw(shape, seed=7, mean=1.0, std=2.0, dtype=dtype)
    scale, shift = modulation(per_example, "both", dtype)
    y = apply(layer, x, scale=scale, shift=shift)
    assert y.shape == x.shape and y.dtype == dtype
    want = modulated(oracle(x), scale, shift, activation)
    assert max_relative_error(y, want) < tolerance(dtype)
    # the activation comes after the modulation, not before it
    if activation == "silu":
        before = modulated(modulated(oracle(x), activation="silu"), scale, shift)
        assert max_relative_error(before, want) > 0.1


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("shared", "which"), [(False, "scale"), (False, "shift"), (False, "both"), (True, "both")]
)
@pytest.mark.parametrize("channel_axis", [-1, 0])
def test_group_norm_modulation_either_alone_per_example_or_shared(
    channel_axis, shared, which, implementation
):
    layer, shape, per_example, oracle = grouped_case("GroupNorm", channel_axis, implementation)
    x = draw(shape, seed=8, mean=-1.0)
    scale, shift = modulation((1, *per_example[1:]) if shared else per_example, which)
    y = apply(layer, x, scale=scale, shift=shift)
    assert max_relative_error(y, modulated(oracle(x), scale, shift)) < TOL[jnp.float32]


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("family", ["GroupNorm", "InstanceNorm"])
def test_grouped_norm_activation_without_modulation(family, activation):
    for implementation in IMPLEMENTATIONS:
        layer, shape, _, oracle = grouped_case(family, -1, implementation, activation)
        x = draw(shape, seed=9, mean=0.5)
        y = apply(layer, x)
        assert max_relative_error(y, modulated(oracle(x), activation=activation)) < 1e-5


def test_group_norm_spatially_varying_modulation_runs_on_xla():
    layer, shape, _, oracle = grouped_case("GroupNorm", -1, None, "silu")
    x = draw(shape, seed=11)
    scale, shift = modulation((N, H, 1, C), "both")  # varies over rows of the image
    y = apply(layer, x, scale=scale, shift=shift)
    assert max_relative_error(y, modulated(oracle(x), scale, shift, "silu")) < 1e-5
    kernel = GroupNorm(G, C, implementation="kernel")
    with pytest.raises(ValueError, match="`scale` or `shift` varies over the spatial axes"):
        kernel(x, scale=scale, shift=shift)


def test_group_norm_modulation_with_a_mask():
    layer, _, per_example, _ = grouped_case("GroupNorm", -1, None, "silu")
    x = draw((N, 8, 8, C), seed=12, mean=1.0)
    mask = jnp.broadcast_to(jnp.arange(8)[None, :, None, None] < 6, (N, 8, 8, 1))
    scale, shift = modulation(per_example, "both")
    y = apply(layer, x, mask=mask, scale=scale, shift=shift)
    gamma, beta = f64(layer.gamma), f64(layer.beta)
    norm = reference.group_norm(f64(x), G, 2, gamma, beta, layer.epsilon, mask=np.asarray(mask))
    assert max_relative_error(y, modulated(norm, scale, shift, "silu")) < TOL[jnp.float32]


@pytest.mark.parametrize("family", ["GroupNorm", "InstanceNorm"])
def test_functional_grouped_norm_equals_the_layer(family):
    layer, shape, per_example, _ = grouped_case(family, 0, None, "silu")
    x = draw(shape, seed=13)
    scale, shift = modulation(per_example, "both")
    common = dict(channel_axis=0, epsilon=layer.epsilon, scale=scale, shift=shift)
    if family == "GroupNorm":
        got = functional.group_norm(x, G, layer.gamma, layer.beta, activation="silu", **common)
    else:
        got = functional.instance_norm(x, layer.gamma, layer.beta, activation="silu", **common)
    np.testing.assert_array_equal(got, layer(x, scale=scale, shift=shift))


# ----------------------------------------------------------------------------------------
# GatedRMSNorm (Mamba-2).

GATED_D = 256


def gated_oracle(x, z, gamma, beta, *, group_size, norm_before_gate, epsilon=1e-5):
    x, z = f64(x), f64(z)
    silu = z / (1 + np.exp(-z))
    u = x if norm_before_gate else x * silu
    size = group_size or GATED_D
    grouped = u.reshape(*u.shape[:-1], GATED_D // size, size)
    y = reference.rms_norm(grouped, 1, epsilon=epsilon).reshape(u.shape) * f64(gamma)
    y = y if beta is None else y + f64(beta)
    return y * silu if norm_before_gate else y


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", SLOW_BF16)
@pytest.mark.parametrize("group_size", [None, 64])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_matches_float64(norm_before_gate, group_size, dtype, implementation):
    layer = random_layer(
        GatedRMSNorm,
        GATED_D,
        group_size=group_size,
        norm_before_gate=norm_before_gate,
        implementation=implementation,
    )
    assert layer.beta is None  # Mamba-2 has none
    x = draw((4, 64, GATED_D), seed=14, mean=0.5, std=2.0, dtype=dtype)
    z = draw((4, 64, GATED_D), seed=15, dtype=dtype)
    y = apply(layer, x, gate=z)
    assert y.shape == x.shape and y.dtype == dtype
    options = dict(group_size=group_size, norm_before_gate=norm_before_gate)
    want = gated_oracle(x, z, layer.gamma, None, **options)
    assert max_relative_error(y, want) < tolerance(dtype)
    # the other order, and the other grouping, are far from this one
    other = gated_oracle(
        x, z, layer.gamma, None, group_size=group_size, norm_before_gate=not norm_before_gate
    )
    assert max_relative_error(other, want) > 0.05
    regrouped = gated_oracle(
        x,
        z,
        layer.gamma,
        None,
        norm_before_gate=norm_before_gate,
        group_size=None if group_size else 64,
    )
    assert max_relative_error(regrouped, want) > 1e-3
    # no gate: the (grouped) RMSNorm alone
    alone = reference.rms_norm(
        f64(x).reshape(4, 64, -1, group_size or GATED_D), 1, epsilon=1e-5
    ).reshape(x.shape) * f64(layer.gamma)
    assert max_relative_error(apply(layer, x), alone) < tolerance(dtype)


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("norm_before_gate", [False, True])
def test_gated_rms_norm_with_beta_and_functional_equals_the_layer(norm_before_gate, group_size):
    options = dict(group_size=group_size, norm_before_gate=norm_before_gate)
    layer = random_layer(GatedRMSNorm, GATED_D, use_bias=True, **options)
    x = draw((3, 10, GATED_D), seed=16)
    z = draw((3, 10, GATED_D), seed=17, mean=0.5)
    y = apply(layer, x, gate=z)
    assert max_relative_error(y, gated_oracle(x, z, layer.gamma, layer.beta, **options)) < 1e-5
    got = jax.jit(lambda x, z, g, b: functional.gated_rms_norm(x, z, GATED_D, g, b, **options))(
        x, z, layer.gamma, layer.beta
    )
    np.testing.assert_array_equal(got, y)


# ----------------------------------------------------------------------------------------
# Errors, named in the caller's words.


def test_wrong_rank_modulation_names_the_argument_and_the_fix():
    x = jnp.zeros((B, T, D))
    with pytest.raises(ValueError, match=r"LayerNorm: `scale` must have x's rank") as info:
        LayerNorm(D)(x, scale=jnp.zeros((B, D)))
    message = str(info.value)
    assert "(8, 1, 384)" in message and "got shape (8, 384)" in message
    assert "Use `scale[:, None]`" in message
    with pytest.raises(ValueError, match=r"RMSNorm: `shift` must have x's rank.*shift\[:, None\]"):
        RMSNorm(D)(x, shift=jnp.zeros((B, D)))
    images = jnp.zeros((N, H, W, C))
    with pytest.raises(
        ValueError, match=r"GroupNorm: `scale`.*\(4, 1, 1, 64\).*scale\[:, None, None\]"
    ):
        GroupNorm(G, C)(images, scale=jnp.zeros((N, C)))
    with pytest.raises(ValueError, match=r"group_norm: `shift`.*\(4, 1, 1, 64\)"):
        functional.group_norm(images, G, shift=jnp.zeros((N, C)))


def test_modulation_axis_neither_one_nor_x_size_is_an_error():
    x = jnp.zeros((B, T, D))
    with pytest.raises(ValueError, match=r"LayerNorm: `shift`.*got shape \(8, 2, 384\)\.$"):
        LayerNorm(D)(x, shift=jnp.zeros((B, 2, D)))
    with pytest.raises(ValueError, match=r"layer_norm: `scale`.*got shape \(8, 1, 192\)"):
        functional.layer_norm(x, D, scale=jnp.zeros((B, 1, D // 2)))
    with pytest.raises(ValueError, match=r"InstanceNorm: `scale`.*got shape \(2, 1, 1, 64\)"):
        InstanceNorm(C)(jnp.zeros((N, H, W, C)), scale=jnp.zeros((2, 1, 1, C)))


def test_integer_modulation_is_a_type_error():
    x = jnp.zeros((B, T, D))
    with pytest.raises(TypeError, match=r"LayerNorm: `scale` must be a floating array.*int32"):
        LayerNorm(D)(x, scale=jnp.zeros((B, 1, D), jnp.int32))
    with pytest.raises(TypeError, match=r"GroupNorm: `shift` must be a floating array.*int32"):
        GroupNorm(G, C)(jnp.zeros((N, H, W, C)), shift=jnp.zeros((N, 1, 1, C), jnp.int32))


def test_unknown_activation_is_an_error_at_construction():
    expected = r"`activation` must be None or one of 'silu'.*got 'relu'\. Apply any other"
    with pytest.raises(ValueError, match="GroupNorm: " + expected):
        GroupNorm(G, C, activation="relu")
    with pytest.raises(ValueError, match="InstanceNorm: " + expected):
        InstanceNorm(C, activation="relu")
    with pytest.raises(ValueError, match="group_norm: " + expected):
        functional.group_norm(jnp.zeros((N, H, W, C)), G, activation="relu")


def test_gated_rms_norm_errors():
    x = jnp.zeros((2, GATED_D))
    with pytest.raises(
        ValueError,
        match=r"GatedRMSNorm: `gate` must have x's shape \(2, 256\) "
        r"\(it is multiplied with x, never broadcast\), got shape \(2, 1\)",
    ):
        GatedRMSNorm(GATED_D)(x, gate=jnp.zeros((2, 1)))
    with pytest.raises(TypeError, match=r"GatedRMSNorm: `gate` must be a floating array"):
        GatedRMSNorm(GATED_D)(x, gate=jnp.zeros((2, GATED_D), jnp.int32))
    divide = r"`group_size`=48 must divide the 256 features of normalized_shape=\(256,\)"
    with pytest.raises(ValueError, match="GatedRMSNorm: " + divide):
        GatedRMSNorm(GATED_D, group_size=48)
    with pytest.raises(ValueError, match="gated_rms_norm: " + divide):
        functional.gated_rms_norm(x, x, GATED_D, group_size=48)


# ----------------------------------------------------------------------------------------
# Gradients: the two implementations agree in float32; finite differences in float64.


def _grads(layer, x, scale, shift, cotangent):
    """Jitted gradients of ``sum(cotangent * layer(x, scale=, shift=))`` wrt x, scale,
    shift, gamma and beta."""
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    @jax.jit
    def run(x, scale, shift, params):
        def loss(x, scale, shift, params):
            y = eqx.combine(params, static)(x, scale=scale, shift=shift)
            return jnp.sum(y * cotangent)

        dx, ds, dt, dp = jax.grad(loss, argnums=(0, 1, 2, 3))(x, scale, shift, params)
        return dx, ds, dt, dp.gamma, dp.beta

    return run(x, scale, shift, params)


GRADIENT_CASES = {  # layer builder, x shape, modulation shape
    "LayerNorm": (lambda i: trailing_layer("LayerNorm", i), (B, 32, D), (B, 1, D)),
    "RMSNorm": (lambda i: trailing_layer("RMSNorm", i), (B, 32, D), (B, 1, D)),
    "GroupNorm-silu": (
        lambda i: grouped_case("GroupNorm", -1, i, "silu")[0],
        (N, H, W, C),
        (N, 1, 1, C),
    ),
    "InstanceNorm-silu-channels-first": (
        lambda i: grouped_case("InstanceNorm", 0, i, "silu")[0],
        (N, C, H, W),
        (N, C, 1, 1),
    ),
}


@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_gradients_agree_between_implementations(case):
    build, shape, mod_shape = GRADIENT_CASES[case]
    x = draw(shape, seed=18, mean=1.0, std=2.0)
    scale, shift = modulation(mod_shape, "both")
    cotangent = draw(shape, seed=19)
    xla = _grads(build("xla"), x, scale, shift, cotangent)
    kernel = _grads(build("kernel"), x, scale, shift, cotangent)
    for name, a, b in zip(["x", "scale", "shift", "gamma", "beta"], kernel, xla):
        assert a.shape == b.shape, name
        assert max_relative_error(a, b) < 1e-4, name
        assert np.abs(np.asarray(b)).max() > 0, name


FINITE_DIFFERENCE_CASES = {  # builder(dtype), x shape, modulation shape
    "LayerNorm": (lambda d: LayerNorm(5, param_dtype=d), (3, 4, 5), (3, 1, 5)),
    "RMSNorm": (lambda d: RMSNorm(5, use_bias=True, param_dtype=d), (3, 4, 5), (1, 4, 5)),
    "GroupNorm-silu": (
        lambda d: GroupNorm(2, 4, activation="silu", param_dtype=d),
        (2, 3, 3, 4),
        (2, 1, 1, 4),
    ),
    "InstanceNorm-silu-channels-first": (
        lambda d: InstanceNorm(3, channel_axis=0, activation="silu", param_dtype=d),
        (2, 3, 2, 3),
        (2, 3, 1, 1),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", FINITE_DIFFERENCE_CASES)
def test_finite_differences_in_float64(case, x64):
    build, shape, mod_shape = FINITE_DIFFERENCE_CASES[case]
    layer = build(jnp.float64)
    gamma, beta = (p.astype(jnp.float64) for p in random_params(layer.gamma.shape, seed=3))
    x = draw(shape, seed=20, mean=1.0, dtype=jnp.float64)
    scale, shift = modulation(mod_shape, "both", jnp.float64)
    static = eqx.tree_at(lambda m: (m.gamma, m.beta), layer, replace=(None, None))

    def f(x, scale, shift, gamma, beta):
        m = eqx.tree_at(
            lambda m: (m.gamma, m.beta), static, (gamma, beta), is_leaf=lambda v: v is None
        )
        return jnp.sin(m(x, scale=scale, shift=shift))

    assert f(x, scale, shift, gamma, beta).dtype == jnp.float64
    # float64 central differences (eps 1e-4) are accurate to ~1e-7, within check_grads'
    # float64 tolerance
    check_grads(f, (x, scale, shift, gamma, beta), order=1, modes=["rev"])


@pytest.mark.slow
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("group_size", [None, 4])
def test_gated_rms_norm_finite_differences_in_float64(norm_before_gate, group_size, x64):
    layer = GatedRMSNorm(
        8, group_size=group_size, norm_before_gate=norm_before_gate, param_dtype=jnp.float64
    )
    gamma = random_params(8, seed=4)[0].astype(jnp.float64)
    x = draw((3, 8), seed=21, mean=0.5, dtype=jnp.float64)
    z = draw((3, 8), seed=22, dtype=jnp.float64)

    def f(x, z, gamma):
        return jnp.sin(eqx.tree_at(lambda m: m.gamma, layer, gamma)(x, gate=z))

    check_grads(f, (x, z, gamma), order=1, modes=["rev"])


# ----------------------------------------------------------------------------------------
# Transformations: vmap, jit, a sharded jit, and batch invariance on the kernel path.


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vmap_and_jit_of_layer_norm_with_per_example_modulation(implementation):
    layer = trailing_layer("LayerNorm", implementation)
    x = draw((B, 32, D), seed=23, mean=1.0)
    scale, shift = modulation((B, 1, D), "both")
    batched = layer(x, scale=scale, shift=shift)
    # inside vmap one example is x (T, D) with scale and shift (1, D)
    mapped = jax.vmap(lambda x, s, t: layer(x, scale=s, shift=t))(x, scale, shift)
    np.testing.assert_allclose(mapped, batched, atol=TOL[jnp.float32])
    jitted = eqx.filter_jit(lambda m, x, s, t: m(x, scale=s, shift=t))(layer, x, scale, shift)
    np.testing.assert_allclose(jitted, batched, atol=TOL[jnp.float32])
    assert (
        max_relative_error(batched, modulated(trailing_oracle("LayerNorm", layer, x), scale, shift))
        < 1e-5
    )


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_vmap_and_jit_of_group_norm_with_silu_and_modulation(implementation):
    layer, shape, per_example, oracle = grouped_case("GroupNorm", -1, implementation, "silu")
    x = draw(shape, seed=24)
    scale, shift = modulation(per_example, "both")
    batched = layer(x, scale=scale, shift=shift)
    # one unbatched example: x (H, W, C) with scale and shift (1, 1, C)
    np.testing.assert_allclose(
        layer(x[1], scale=scale[1], shift=shift[1]), batched[1], atol=TOL[jnp.float32]
    )
    mapped = jax.vmap(lambda x, s, t: layer(x, scale=s, shift=t))(x, scale, shift)
    np.testing.assert_allclose(mapped, batched, atol=TOL[jnp.float32])
    jitted = eqx.filter_jit(lambda m, x, s, t: m(x, scale=s, shift=t))(layer, x, scale, shift)
    np.testing.assert_allclose(jitted, batched, atol=TOL[jnp.float32])
    assert max_relative_error(batched, modulated(oracle(x), scale, shift, "silu")) < 1e-5


@pytest.mark.slow
def test_axis_name_under_vmap_with_modulation():
    # the feature axis split into 4 shards of 16 under vmap(axis_name=...): statistics are
    # the whole row's, and each shard's scale/shift are its features' (1, 16) per example
    whole = random_layer(LayerNorm, 64, use_bias=True)
    layer = LayerNorm(16, axis_name="features")
    x = draw((4, 6, 64), seed=25, mean=1.0)
    scale, shift = modulation((4, 1, 64), "both")

    def one(x, s, t, g, b):
        model = eqx.tree_at(lambda m: (m.gamma, m.beta), layer, (g, b))
        return model(x, scale=s, shift=t)

    def split(a):
        return a.reshape(*a.shape[:-1], 4, 16)

    y = jax.vmap(one, in_axes=(2, 2, 2, 0, 0), out_axes=2, axis_name="features")(
        split(x), split(scale), split(shift), split(whole.gamma), split(whole.beta)
    )
    y = y.reshape(x.shape)
    want = modulated(trailing_oracle("LayerNorm", whole, x), scale, shift)
    assert max_relative_error(y, want) < TOL[jnp.float32]
    np.testing.assert_allclose(y, whole(x, scale=scale, shift=shift), atol=1e-5)


@pytest.mark.slow
def test_batch_sharded_jit_on_eight_devices():
    # LayerNorm with per-example scale/shift and GroupNorm with silu, batch-sharded jit
    checks = Path(__file__).resolve().parent / "_conditional_multidevice_checks.py"
    assert_checks_pass_on_simulated_devices(checks, devices=8, timeout=300)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the kernel is CPU only")
@pytest.mark.parametrize("jit", [False, True])
def test_kernel_batch_invariance_with_per_example_modulation(jit):
    layer = trailing_layer("LayerNorm", "kernel")
    x = draw((8, 16, D), seed=26, mean=2.0)
    cotangent = draw((8, 16, D), seed=27)
    scale, shift = modulation((8, 1, D), "both")

    def fn(x):
        n = x.shape[0]
        return layer(x, scale=scale[:n], shift=shift[:n])

    one, eight = first_example_results(fn, [x[:1], x], cotangent, jit=jit)
    np.testing.assert_array_equal(one[0], eight[0])
    np.testing.assert_array_equal(one[1], eight[1])
    assert np.abs(one[0]).max() > 0


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the kernel is CPU only")
@pytest.mark.parametrize("jit", [pytest.param(False, marks=pytest.mark.slow), True])
def test_kernel_batch_invariance_of_group_norm_with_silu_and_scale(jit):
    layer, shape, per_example, _ = grouped_case("GroupNorm", -1, "kernel", "silu")
    x = draw((8, *shape[1:]), seed=28, mean=-1.0)
    cotangent = draw((8, *shape[1:]), seed=29)
    scale, _ = modulation((8, *per_example[1:]), "scale")

    def fn(x):
        return layer(x, scale=scale[: x.shape[0]])

    one, eight = first_example_results(fn, [x[:1], x], cotangent, jit=jit)
    np.testing.assert_array_equal(one[0], eight[0])
    np.testing.assert_array_equal(one[1], eight[1])
    assert np.abs(one[0]).max() > 0
