"""Helpers shared by the per-family test files: seeded inputs, layers with non-trivial
parameters, and jitted gradients of ``sum(cotangent * layer(x))``."""

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def random_input(shape, seed=1, mean=0.0, std=1.0, dtype=jnp.float32):
    """``mean + std * N(0, 1)`` of ``shape``, seeded, cast to ``dtype``."""
    return (mean + std * jax.random.normal(jax.random.key(seed), shape)).astype(dtype)


def random_params(shape, seed=0):
    """``(gamma, beta)`` of ``shape``: gamma ~ 1 + 0.5 N and beta ~ 0.3 N, seeded."""
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    keys = jax.random.split(jax.random.key(seed), 2)
    return 1.0 + 0.5 * jax.random.normal(keys[0], shape), 0.3 * jax.random.normal(keys[1], shape)


def random_layer(build, *args, seed=0, param_shape=None, **kwargs):
    """``build(*args, **kwargs)`` with ``random_params`` of ``param_shape`` (by default
    ``args[0]``, the normalized shape) as its initializers, so that the affine step is tested
    too; beta is passed only where the layer has one."""
    scale, bias = random_params(args[0] if param_shape is None else param_shape, seed)
    return build(*args, **existing_initializers(build, scale, bias, kwargs), **kwargs)


def existing_initializers(cls, scale, bias, kwargs):
    """``scale_initializer``/``bias_initializer`` for the parameters that ``cls(...,
    **kwargs)`` has: an initializer for a parameter switched off is an error."""
    parameters = inspect.signature(cls).parameters
    defaults = {name: p.default for name, p in parameters.items()}  # a lambda's: none
    affine = kwargs.get("elementwise_affine", True)
    inits = {"scale_initializer": scale, "bias_initializer": bias}
    switches = {"scale_initializer": "use_scale", "bias_initializer": "use_bias"}
    return {
        argument: value
        for argument, value in inits.items()
        if affine and kwargs.get(switches[argument], defaults.get(switches[argument], True))
    }


def jitted_gradients(layer, x, cotangent):
    """``(dx, dgamma, dbeta)`` of ``sum(cotangent * layer(x))``, jitted."""

    @jax.jit
    def grads(x, gamma, beta):
        def loss(x, gamma, beta):
            y = eqx.tree_at(lambda m: (m.gamma, m.beta), layer, (gamma, beta))(x)
            return jnp.sum(y * cotangent)

        return jax.grad(loss, argnums=(0, 1, 2))(x, gamma, beta)

    return grads(x, layer.gamma, layer.beta)


def max_relative_error(got, want):
    """``max|got - want| / max|want|`` in float64."""
    want = np.asarray(want, np.float64)
    return np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()


# Tolerances by dtype, for outputs of size ~1 against a float64 reference. Statistics are
# always float32, so the rounding of the output to its own dtype dominates:
TOL = {
    # float32: two-pass float32 statistics over rows of up to a few thousand elements
    jnp.float32: 1e-5,
    # bfloat16 keeps 8 significant bits: one rounding of the output is 2 ** -8 relative
    jnp.bfloat16: 2.0**-8,
    # float16 keeps 11 significant bits: one rounding of the output is 2 ** -11 relative
    jnp.float16: 2.0**-11,
}


def first_example_results(fn, batches, cotangent, *, jit):
    """``(y, dx)`` of example 0 of ``fn`` on each batch, as NumPy arrays, with ``dx`` the
    gradient of ``sum(cotangent[:n] * fn(x))`` for a batch of ``n``: what batch-invariance
    tests compare bitwise."""

    def y_and_dx(x, ct):
        y, vjp = jax.vjp(fn, x)
        return y, vjp(ct)[0]

    run = jax.jit(y_and_dx) if jit else y_and_dx
    return [tuple(np.asarray(a[0]) for a in run(x, cotangent[: x.shape[0]])) for x in batches]


_TESTS = Path(__file__).resolve().parent


def run_on_simulated_devices(*args, devices=8, timeout=300):
    """``python *args`` in a fresh process with ``devices`` simulated CPU devices, run from
    the checkout with tests/ importable; returns the ``subprocess.CompletedProcess``.

    XLA's ``--xla_force_host_platform_device_count`` only works if it is set before jax is
    imported, so the checks that need several devices run in their own process and the rest
    of the suite (and each xdist worker) keeps its single device. ``timeout`` only stops a
    hang."""
    flags = [
        f
        for f in os.environ.get("XLA_FLAGS", "").split()
        if "xla_force_host_platform_device_count" not in f
    ]
    env = dict(
        os.environ,
        XLA_FLAGS=" ".join([*flags, f"--xla_force_host_platform_device_count={devices}"]),
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(
            [str(_TESTS), str(_TESTS.parent), os.environ.get("PYTHONPATH", "")]
        ),
    )
    return subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def assert_checks_pass_on_simulated_devices(checks, devices=8, timeout=300):
    """``pytest checks`` (a file of tests that skips itself without ``devices`` devices) by
    :func:`run_on_simulated_devices`: it passes, and every check ran and passed, none
    skipped (a skip means the devices were missing). A failure shows its pytest report."""
    command = ["-m", "pytest", "-q", "-rA", str(checks), "-p", "no:cacheprovider", "-p", "no:xdist"]
    result = run_on_simulated_devices(*command, devices=devices, timeout=timeout)
    report = result.stdout[-8000:] + result.stderr[-2000:]
    assert result.returncode == 0, report
    defined = len(re.findall(r"^def test_", Path(checks).read_text(), flags=re.MULTILINE))
    passed = len(re.findall(r"^PASSED ", result.stdout, flags=re.MULTILINE))
    assert passed >= defined > 0, report
    last = result.stdout.splitlines()[-1]
    assert "skipped" not in last, report
    assert re.fullmatch(rf"{passed} passed in [\d.]+s( \(.*\))?", last), report
