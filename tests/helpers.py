"""Helpers shared by the per-family test files: seeded inputs, layers with non-trivial
parameters, and jitted gradients of ``sum(cotangent * layer(x))``."""

import ctypes
import importlib.util
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

    def on(argument):  # a switch left at None follows elementwise_affine
        switch = kwargs.get(switches[argument], defaults.get(switches[argument], True))
        return affine if switch is None else affine and switch

    return {argument: value for argument, value in inits.items() if on(argument)}


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
    """``max|got - want| / max|want|`` in float64; ``got`` is read in ``want``'s shape (a
    reference may return rows where the layer returns ``x``'s shape)."""
    want = np.asarray(want, np.float64)
    got = np.asarray(got).astype(np.float64).reshape(want.shape)
    return np.abs(got - want).max() / np.abs(want).max()


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


# ----------------------------------------------------------------------------------------
# The compiled kernel's tests (test_cpu_kernel.py, test_group_kernel.py).


def kernel_inputs(shape, channels, *, spread=0.1, mean=0.0, dtype=jnp.float32, seed=0):
    """``(x, scale, offset, cotangent)`` from one seeded NumPy generator, drawn in that
    order: ``x = mean + N(0, 1)`` and the cotangent ``N(0, 1)`` of ``shape``, rounded to
    float32 and cast to ``dtype``; float32 ``scale = 1 + spread * N`` and
    ``offset = spread * N`` of ``(channels,)``."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(mean + rng.standard_normal(shape), jnp.float32).astype(dtype)
    scale = jnp.asarray(1 + spread * rng.standard_normal(channels), jnp.float32)
    offset = jnp.asarray(spread * rng.standard_normal(channels), jnp.float32)
    cotangent = jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
    return x, scale, offset, cotangent


def max_error_over_terms(got, want, terms=0.0):
    """``max|got - want|`` over the larger of ``max|want|`` and ``terms`` (the size of the
    terms that ``want`` sums before they cancel, e.g. a gradient of about 0), in float64: a
    relative error that stays meaningful where the result cancels; 0 where both are 0."""
    got = np.asarray(np.asarray(got, np.float32), np.float64)
    return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), terms, 1e-30))


def jitted_y_and_gradients(layer, x, cotangent):
    """``(y, dx, dgamma, dbeta)``: ``layer(x)`` and the gradients of
    ``sum(cotangent * layer(x))``, from one jitted ``jax.vjp``."""
    params, static = eqx.partition(layer, eqx.is_inexact_array)

    @jax.jit
    def run(x, params):
        y, vjp = jax.vjp(lambda x, p: eqx.combine(p, static)(x), x, params)
        dx, dp = vjp(cotangent)
        return y, dx, dp.gamma, dp.beta

    return run(x, params)


def call_target(target, outs, *args, **attrs):
    """``jax.ffi.ffi_call(target, outs)(*args, **attrs)``, jitted: a registered FFI target
    called directly, as anyone may, with buffers of any shape and element type."""
    return jax.jit(lambda *a: jax.ffi.ffi_call(target, outs)(*a, **attrs))(*args)


def kernel_pool_threads():
    """The size of XLA's intra-op pool as the compiled kernel's last call in this process
    saw it (0 before any call), from the loaded library's ``EqxNormPoolThreads`` (Linux:
    the library is found in /proc/self/maps)."""
    with open("/proc/self/maps") as maps:
        path = next(line.split()[-1] for line in maps if "libeqx_norm_cpu" in line)
    query = ctypes.CDLL(path).EqxNormPoolThreads
    query.restype = ctypes.c_int64
    return query()


def _results_on_cores(script, cores, out, timeout):
    """What ``script`` saves with ``np.savez(sys.argv[1], ...)`` when run in a fresh Python
    allowed only the CPU ``cores`` (set before it imports jax: XLA sizes its intra-op pool
    by the cores it may use), and the pool size the kernel's last call there saw."""
    prologue = f"import os\nos.sched_setaffinity(0, {sorted(cores)!r})\n"
    epilogue = "\nfrom helpers import kernel_pool_threads\nprint(kernel_pool_threads())\n"
    path = os.pathsep.join([str(_TESTS), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    result = subprocess.run(
        [sys.executable, "-c", prologue + script + epilogue, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(out)), int(result.stdout.split()[-1])


def assert_bitwise_independent_of_thread_count(script, tmp_path, timeout=300):
    """``script`` (which runs the kernel and saves its results with
    ``np.savez(sys.argv[1], ...)``) gives bitwise the same results on one core, where the
    kernel's pool has one thread, as on every core this process may use, where it has
    more: the pool sizes are checked, so that the two runs do differ in threads."""
    cores = sorted(os.sched_getaffinity(0))
    one, one_threads = _results_on_cores(script, cores[:1], tmp_path / "one.npz", timeout)
    every, threads = _results_on_cores(script, cores, tmp_path / "every.npz", timeout)
    assert one_threads == 1 and threads > 1, (one_threads, threads)
    assert sorted(one) == sorted(every)
    for key in one:
        np.testing.assert_array_equal(one[key], every[key], err_msg=key)


def assert_layer_norm_call_forms(layer, x):
    """The call forms of LayerNorm that an elementwise stand-in (DyT, Derf) keeps, on ``x``
    of shape ``(rows, d)``: ``state`` returned unchanged, ``key`` ignored, ``beta`` where
    the mask is False, and a drop-in where a LayerNorm stands in ``eqx.nn.Sequential``."""
    import eqx_norm

    d = x.shape[-1]
    y = layer(x)
    y_state, state = layer(x, "state")
    assert state == "state"
    np.testing.assert_array_equal(y_state, y)
    np.testing.assert_array_equal(layer(x, key=jax.random.key(0)), y)  # key ignored
    mask = jnp.arange(d)[None, :] % 4 != 0
    np.testing.assert_array_equal(layer(x, mask=mask), jnp.where(mask, y, layer.beta[None, :]))
    model = eqx.nn.Sequential([eqx.nn.Linear(d, d, key=jax.random.key(0)), type(layer)(d)])
    as_layer_norm = eqx.tree_at(lambda m: m.layers[1], model, eqx_norm.LayerNorm(d))
    for m in (model, as_layer_norm):
        out, state = m(x[0], state=eqx.nn.State(m))
        assert out.shape == (d,)


BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_benchmark(name):
    """The module ``benchmarks/<name>.py``, imported once (kept in ``sys.modules``); the
    benchmarks folder is on the path while it runs, for the benchmarks it imports."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    sys.path.insert(0, str(BENCHMARKS))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(BENCHMARKS))
    return module
