"""The compiled CPU kernel under stress: threads, many calls, odd layouts, donation, empty.

Oracles: the kernel's own single-threaded result (bitwise: the kernel is deterministic),
the kernel on a contiguous copy of the same values (bitwise), and the pure-JAX path
``implementation="xla"``, which computes the same formula in another order: within float32
rounding, 1e-5 of the largest magnitude of each output (y is O(1); the gradients are sums
over rows, so the bound is relative to their largest entry). Empty inputs must equal the
XLA path exactly (there is nothing to round).
"""

from __future__ import annotations

import gc
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import random_input, random_params

from eqx_norm.functional import layer_norm, rms_norm
from eqx_norm.kernels import rows as _cpu_kernel

_REASON = _cpu_kernel.unavailable_reason(jax.ShapeDtypeStruct((1, 8), jnp.float32))
# the quick loop (-m "not slow") skips this file: threads and 10,000 calls: long; CI runs it
pytestmark = [pytest.mark.slow, pytest.mark.skipif(_REASON is not None, reason=str(_REASON))]

FUNCTIONS = {"layer_norm": layer_norm, "rms_norm": rms_norm}
TOL = 1e-5  # float32 rounding, relative to each output's largest magnitude


def _inputs(shape, seed=0):
    """``(x, gamma, beta, weights)``: x of mean 3 and random parameters (helpers), and the
    weights of the loss ``sum(weights * y)``."""
    gamma, beta = random_params(shape[-1], seed)
    return random_input(shape, seed, mean=3.0), gamma, beta, random_input(shape, seed + 100)


def _programs(name, implementation):
    """Jitted forward, and forward+backward (the gradient of a weighted sum of y)."""
    fn = FUNCTIONS[name]

    def forward(x, gamma, beta):
        return fn(x, x.shape[-1], gamma, beta, implementation=implementation)

    def loss(x, gamma, beta, weights):
        return jnp.sum(forward(x, gamma, beta) * weights)

    return jax.jit(forward), jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def _run(programs, x, gamma, beta, weights):
    forward, backward = programs
    value, grads = backward(x, gamma, beta, weights)
    return [np.asarray(a) for a in (forward(x, gamma, beta), value, *grads)]


def _assert_close(got, want):
    for a, b in zip(got, want, strict=True):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert a.shape == b.shape
        scale = max(np.max(np.abs(b), initial=0.0), 1e-30)
        assert np.max(np.abs(a - b), initial=0.0) <= TOL * scale


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_four_threads_give_the_bits_of_one(name):
    programs = _programs(name, "kernel")
    cases = [_inputs((256, 1024), seed) for seed in (0, 1)]
    alone = [_run(programs, *case) for case in cases]  # one thread, warm
    results: dict[int, list] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def worker(i):
        try:
            barrier.wait()
            # Threads 0 and 2 share one input, 1 and 3 another: the same input from several
            # threads at once, and different inputs side by side.
            results[i] = [_run(programs, *cases[i % 2]) for _ in range(10)]
        except BaseException as error:  # reported in the main thread
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for i in range(4):
        for run in results[i]:
            for got, want in zip(run, alone[i % 2], strict=True):
                np.testing.assert_array_equal(got, want)
    # and the kernel is the thing under test: it agrees with the XLA path to rounding
    _assert_close(alone[0], _run(_programs(name, "xla"), *cases[0]))


def _resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_the_kernel_is_what_runs(name):
    forward, backward = _programs(name, "kernel")
    x, gamma, beta, weights = _inputs((4, 8))
    assert "eqx_norm_rows_forward" in forward.lower(x, gamma, beta).compile().as_text()
    compiled = backward.lower(x, gamma, beta, weights).compile().as_text()
    assert "eqx_norm_rows_forward" in compiled and "eqx_norm_rows_backward" in compiled


def test_ten_thousand_calls_leave_resident_memory_flat():
    # (64, 256) float32: each leaked x-sized buffer would be 64 KiB, 640 MiB over the calls;
    # besides the 5 % bound, growth must stay under 8 MiB (840 bytes a call).
    x, gamma, beta, weights = _inputs((64, 256))
    _, backward = _programs("layer_norm", "kernel")
    for _ in range(1000):  # warm-up: compile, allocator pools
        out = backward(x, gamma, beta, weights)
    jax.block_until_ready(out)
    gc.collect()
    before = _resident_bytes()
    for _ in range(10_000):
        out = backward(x, gamma, beta, weights)
    jax.block_until_ready(out)
    del out
    gc.collect()
    after = _resident_bytes()
    print(f"\nRSS before {before / 2**20:.1f} MiB, after 10,000 calls {after / 2**20:.1f} MiB")
    assert after <= 1.05 * before and after - before < 8 * 2**20, (before, after)


def _odd_layouts():
    """Non-contiguous views whose last axis (the normalized one) has 8 elements."""
    base = 3.0 + np.random.default_rng(2).standard_normal((12, 16, 16)).astype(np.float32)
    return {
        "every second row": lambda a: a[:, ::2, :8],
        "every second element": lambda a: a[:, 0, ::2],
        "transposed": lambda a: a.transpose(1, 0, 2)[..., :8],
        "normalized axis transposed": lambda a: a[:8].transpose(0, 2, 1)[..., :8],
        "reversed both": lambda a: a[::-1, 3, ::-1][:, :8],
        "offset slice": lambda a: a[1:-1, 2:5, 1:9],
    }, base


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("layout", list(_odd_layouts()[0]))
@pytest.mark.parametrize("where", ["numpy view", "inside jit"])
def test_non_contiguous_inputs_behave_like_xla(name, layout, where):
    views, base = _odd_layouts()
    view = views[layout]
    contiguous = np.ascontiguousarray(view(base))
    gamma, beta = (jnp.linspace(0.5, 1.5, 8), jnp.linspace(-0.2, 0.2, 8))
    weights = jnp.asarray(np.random.default_rng(3).standard_normal(contiguous.shape), jnp.float32)
    results = {}
    for implementation in ("kernel", "xla"):
        forward, backward = _programs(name, implementation)
        if where == "numpy view":  # a strided NumPy array handed to the layer as it is
            x = view(base)
            assert not x.flags.c_contiguous
            results[implementation] = _run((forward, backward), x, gamma, beta, weights)
        else:  # the strided slice, transpose or reversal happens in the same jitted program

            def strided(b, g, o, fn=forward):
                return fn(view(b), g, o)

            def loss(b, g, o):
                return jnp.sum(strided(b, g, o) * weights)

            value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
                jnp.asarray(base), gamma, beta
            )
            results[implementation] = [
                np.asarray(a) for a in (jax.jit(strided)(jnp.asarray(base), gamma, beta), value)
            ] + [np.asarray(g) for g in grads]
    _assert_close(results["kernel"], results["xla"])
    if where == "numpy view":  # the kernel on the view gives the bits of a contiguous copy
        same = _run(_programs(name, "kernel"), contiguous, gamma, beta, weights)
        for got, want in zip(results["kernel"], same, strict=True):
            np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", list(FUNCTIONS))
def test_donated_inputs_behave_like_xla(name):
    x, gamma, beta, weights = _inputs((32, 128), seed=4)
    fn = FUNCTIONS[name]

    def forward(x, gamma, beta, implementation):
        return fn(x, 128, gamma, beta, implementation=implementation)

    def step(x, gamma, beta, weights, implementation):
        def loss(x, gamma, beta):
            return jnp.sum(forward(x, gamma, beta, implementation) * weights)

        value, grads = jax.value_and_grad(loss, argnums=(0, 1, 2))(x, gamma, beta)
        return forward(x, gamma, beta, implementation), value, grads

    kept = jax.jit(step, static_argnums=4)(x, gamma, beta, weights, "kernel")
    donated_x = jnp.array(x, copy=True)
    donated = jax.jit(step, static_argnums=4, donate_argnums=0)(
        donated_x, gamma, beta, weights, "kernel"
    )
    xla = jax.jit(step, static_argnums=4)(x, gamma, beta, weights, "xla")
    flat = [jax.tree_util.tree_leaves(r) for r in (kept, donated, xla)]
    for got, want in zip(flat[1], flat[0], strict=True):  # donation changes no bit
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    _assert_close(flat[1], flat[2])
    # forward alone with x donated: its buffer may be reused for y
    again = jnp.array(x, copy=True)
    y = jax.jit(lambda x: forward(x, gamma, beta, "kernel"), donate_argnums=0)(again)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(kept[0]))


@pytest.mark.parametrize("name", list(FUNCTIONS))
@pytest.mark.parametrize("shape", [(0, 8), (3, 0, 8), (0, 2, 8)])
def test_zero_size_batches_equal_xla(name, shape):
    x, gamma, beta, weights = _inputs(shape, seed=5)
    kernel = _run(_programs(name, "kernel"), x, gamma, beta, weights)
    xla = _run(_programs(name, "xla"), x, gamma, beta, weights)
    assert kernel[0].shape == shape and kernel[0].dtype == np.float32
    for got, want in zip(kernel, xla, strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(kernel[3], 0.0)  # no row: the gradient of gamma is 0
