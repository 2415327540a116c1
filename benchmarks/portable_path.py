"""The portable-path table: eqx_norm ``implementation="xla"`` against the plain formula.

Usage::

    python benchmarks/portable_path.py           # every case, a few minutes on 2 cores
    python benchmarks/portable_path.py --quick   # tiny shapes, checks the script works

The plain formula is the jnp two-pass LayerNorm/RMSNorm (float32 statistics, then the affine
step) and its plain autodiff. The parent re-runs itself in a worker with the fault-free
allocator of ``benchmarks/run.py`` (``GLIBC_TUNABLES``); inside, after a warm-up, the two are
interleaved round by round and each figure is the median over rounds. Ratios < 1 mean
eqx_norm is faster. It prints a Markdown table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

FAULT_FREE = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1"
)
EPSILON = 1e-5
# (name, family, shape, normalized axes, dtype)
CASES = (
    ("(8192, 1024)", "layer_norm", (8192, 1024), 1, "float32"),
    ("(64, 128, 768)", "layer_norm", (64, 128, 768), 1, "float32"),
    ("(64, 128, 768) bf16", "layer_norm", (64, 128, 768), 1, "bfloat16"),
    ("(32, 28, 28, 256) last 3", "layer_norm", (32, 28, 28, 256), 3, "float32"),
    ("(32, 64)", "layer_norm", (32, 64), 1, "float32"),
    ("RMSNorm (8192, 1024)", "rms_norm", (8192, 1024), 1, "float32"),
    ("QK-norm RMSNorm (2^18, 128)", "rms_norm", (2**18, 128), 1, "float32"),
    ("QK-norm LayerNorm (2^18, 64)", "layer_norm", (2**18, 64), 1, "float32"),
)
QUICK_CASES = (
    ("(256, 128)", "layer_norm", (256, 128), 1, "float32"),
    ("(4, 16, 128) bf16", "layer_norm", (4, 16, 128), 1, "bfloat16"),
    ("RMSNorm (64, 128)", "rms_norm", (64, 128), 1, "float32"),
)


def plain_formula(x, gamma, beta, ndim: int, center: bool):
    """The plain jnp two-pass formula, float32 statistics for half inputs."""
    import jax
    import jax.numpy as jnp

    xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    axes = tuple(range(x.ndim - ndim, x.ndim))
    mean = jnp.mean(xf, axis=axes, keepdims=True) if center else jnp.zeros((), xf.dtype)
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + EPSILON) * gamma[(None,) * (x.ndim - ndim)]
    if beta is not None:
        y = y + beta[(None,) * (x.ndim - ndim)]
    return y.astype(x.dtype)


def _timers(case):
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_norm

    _, family, shape, ndim, dtype = case
    normalized = shape[len(shape) - ndim :]
    center = family == "layer_norm"
    kx, kdy, kg, kb = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
    dy = jax.random.normal(kdy, shape, jnp.float32).astype(dtype)
    gamma = 1 + 0.1 * jax.random.normal(kg, normalized)
    beta = 0.1 * jax.random.normal(kb, normalized) if center else None
    if center:
        layer = eqx_norm.LayerNorm(
            normalized, EPSILON, scale_initializer=gamma, bias_initializer=beta,
            implementation="xla",
        )  # fmt: skip
    else:
        layer = eqx_norm.RMSNorm(normalized, EPSILON, scale_initializer=gamma, implementation="xla")
    params, static = eqx.partition(layer, eqx.is_inexact_array)
    applies = {
        "eqx_norm xla": (lambda x, p: eqx.combine(p, static)(x), params),
        "plain formula": (lambda x, p: plain_formula(x, *p, ndim, center), (gamma, beta)),
    }
    timers = {}
    for name, (apply, p) in applies.items():
        fwd = jax.jit(apply)

        def fb(x, p, dy, apply=apply):
            y, vjp = jax.vjp(apply, x, p)
            return y, vjp(dy)

        fb = jax.jit(fb)
        timers[(name, "fwd")] = lambda f=fwd, p=p: jax.block_until_ready(f(x, p))
        timers[(name, "fwd+bwd")] = lambda f=fb, p=p: jax.block_until_ready(f(x, p, dy))
    return timers


def _worker(quick: bool) -> None:
    import numpy as np

    warmup, rounds = (1, 3) if quick else (3, 25)
    print("| case | pass | eqx_norm xla ms | plain formula ms | ratio |")
    print("|---|---|---|---|---|")
    for case in QUICK_CASES if quick else CASES:
        timers = _timers(case)
        for _ in range(warmup):
            for fn in timers.values():
                fn()
        samples = {k: [] for k in timers}
        for _ in range(rounds):
            for k, fn in timers.items():
                start = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - start)
        for phase in ("fwd", "fwd+bwd"):
            ours = float(np.median(samples[("eqx_norm xla", phase)])) * 1e3
            plain = float(np.median(samples[("plain formula", phase)])) * 1e3
            print(f"| {case[0]} | {phase} | {ours:.2f} | {plain:.2f} | {ours / plain:.2f} |")
        sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.quick)
        return
    import jax

    print(
        f"# Portable path: jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs; medians of interleaved rounds, fault-free allocator\n"
    )
    env = dict(os.environ, GLIBC_TUNABLES=FAULT_FREE)
    command = [sys.executable, __file__, "--worker"] + (["--quick"] if args.quick else [])
    subprocess.run(command, env=env, check=True)


if __name__ == "__main__":
    main()
