"""Whether a formulation makes the portable path batch invariant on XLA:CPU, and its cost.

Usage::

    python benchmarks/batch_invariant_sums.py           # (8192, 1024), about a minute
    python benchmarks/batch_invariant_sums.py --quick   # (256, 128): checks the script works

XLA:CPU sums a few small rows with a reduce-window tree and larger inputs in a YNN fusion,
in different orders, so on ``implementation="xla"`` a row's ``dx`` can differ by one float32
ulp between a batch of one and a batch of 600 (the strict xfail in
``tests/test_portable_path.py``). This script compares three ways of summing each row, in a
LayerNorm with the same centring and checks as eqx_norm's:

* ``eqx_norm (xla)``: eqx_norm's portable path, whose sums are XLA reductions;
* ``pairwise tree``: every row sum (forward and backward, by a ``custom_vjp``) as a fixed
  pairwise tree of slices and elementwise adds, zero-padded to a power of two. XLA does not
  reassociate floating-point adds, so the order is the same at every batch size;
* ``dot with ones``: every row sum as ``a @ ones((D, 1))``;
* ``plain formula``: ``jnp.mean``/``jnp.var`` and plain autodiff, for scale.

It prints, per formulation, whether the first row's ``y`` and ``dx`` are bitwise the same
alone and in batches of 7, 64 and 600 rows (D = 64 and 768), and then the forward and
forward+backward times, interleaved round by round with the fault-free allocator of
``benchmarks/run.py`` (medians). It asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from residual import FAULT_FREE, interleaved

import eqx_norm

EPSILON = 1e-5
BATCHES = (7, 64, 600)


def tree_sum(a: jax.Array) -> jax.Array:
    """Sum over the last axis (kept) as a fixed pairwise tree: pad to a power of two, then
    add the two halves until one column is left."""
    d = a.shape[-1]
    width = 1 << (d - 1).bit_length()
    if width != d:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - d)])
    while a.shape[-1] > 1:
        half = a.shape[-1] // 2
        a = a[..., :half] + a[..., half:]
    return a


def dot_sum(a: jax.Array) -> jax.Array:
    """Sum over the last axis (kept) as a matrix product with a column of ones."""
    return a @ jnp.ones((a.shape[-1], 1), a.dtype)


def layer_norm_with(row_sum):
    """LayerNorm over the last axis of a 2-D ``x`` whose every row sum is ``row_sum``: a
    first mean (each element scaled before the sum), the mean of the shifted values as its
    rounding, the variance of the centred values, and NaN where the variance overflows, as
    eqx_norm's core; the derivative by a ``custom_vjp`` whose row sums are ``row_sum``."""

    def statistics(x, gamma, beta):
        n = x.shape[-1]
        shifted = x - row_sum(x * (1.0 / n))
        centered = shifted - row_sum(shifted) / n
        var = row_sum(centered * centered) / n
        rstd = lax.rsqrt(var + EPSILON)
        rstd = rstd + (var - var)
        xhat = centered * rstd
        return xhat * gamma[None] + beta[None], (xhat, rstd, gamma)

    @jax.custom_vjp
    def layer_norm(x, gamma, beta):
        return statistics(x, gamma, beta)[0]

    def backward(residuals, ct):
        xhat, rstd, gamma = residuals
        n = xhat.shape[-1]
        v = ct * gamma[None]
        dx = rstd * ((v - row_sum(v) / n) - xhat * (row_sum(v * xhat) / n))
        return dx, jnp.sum(ct * xhat, axis=0), jnp.sum(ct, axis=0)

    layer_norm.defvjp(statistics, backward)
    return layer_norm


def eqx_norm_xla(x, gamma, beta):
    return eqx_norm.functional.layer_norm(
        x, x.shape[-1], gamma, beta, epsilon=EPSILON, implementation="xla"
    )


def plain_formula(x, gamma, beta):
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.var(x, axis=-1, keepdims=True)
    return (x - mean) * lax.rsqrt(var + EPSILON) * gamma[None] + beta[None]


FORMULATIONS = {
    "eqx_norm (xla)": eqx_norm_xla,
    "pairwise tree": layer_norm_with(tree_sum),
    "dot with ones": layer_norm_with(dot_sum),
    "plain formula": plain_formula,
}


def _y_and_dx(fn):
    @jax.jit
    def run(x, ct, gamma, beta):
        y, vjp = jax.vjp(fn, x, gamma, beta)
        return y, vjp(ct)[0]

    return run


def is_batch_invariant(fn, d: int, seed: int = 3) -> bool:
    """Whether the first row's ``y`` and ``dx`` are bitwise the same alone and in batches of
    7, 64 and 600 rows of width ``d``."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(2.0 + rng.standard_normal((max(BATCHES), d)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((max(BATCHES), d)), jnp.float32)
    gamma = jnp.asarray(1.0 + 0.1 * rng.standard_normal(d), jnp.float32)
    beta = jnp.asarray(0.1 * rng.standard_normal(d), jnp.float32)
    run = _y_and_dx(fn)
    alone = [np.asarray(a) for a in run(x[:1], ct[:1], gamma, beta)]
    for rows in BATCHES:
        together = run(x[:rows], ct[:rows], gamma, beta)
        if not all(np.array_equal(np.asarray(t)[:1], a) for t, a in zip(together, alone)):
            return False
    return True


def _table(quick: bool) -> None:
    shape, rounds = ((256, 128), 5) if quick else ((8192, 1024), 25)
    widths = (64,) if quick else (64, 768)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    ct = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    gamma, beta = jnp.ones(shape[-1], jnp.float32), jnp.zeros(shape[-1], jnp.float32)
    timers = {}
    for name, fn in FORMULATIONS.items():
        forward, forward_backward = jax.jit(fn), _y_and_dx(fn)
        timers[(name, "fwd")] = lambda f=forward: jax.block_until_ready(f(x, gamma, beta))
        timers[(name, "fwd+bwd")] = lambda f=forward_backward: jax.block_until_ready(
            f(x, ct, gamma, beta)
        )
    samples = interleaved(timers, warmup=2, rounds=rounds)
    ms = {k: float(np.median(v)) * 1e3 for k, v in samples.items()}
    base = "eqx_norm (xla)"
    print(f"| formulation | batch invariant (D = {', '.join(map(str, widths))}) |", end="")
    print(f" fwd ms {shape} | x eqx_norm | fwd+bwd ms | x eqx_norm |")
    print("|---|---|---:|---:|---:|---:|")
    for name, fn in FORMULATIONS.items():
        invariant = ", ".join("yes" if is_batch_invariant(fn, d) else "no" for d in widths)
        fwd, fb = ms[(name, "fwd")], ms[(name, "fwd+bwd")]
        print(
            f"| {name} | {invariant} | {fwd:.2f} | {fwd / ms[(base, 'fwd')]:.2f} | "
            f"{fb:.2f} | {fb / ms[(base, 'fwd+bwd')]:.2f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small shape, few rounds")
    args = parser.parse_args()
    if os.environ.get("GLIBC_TUNABLES") != FAULT_FREE:  # re-run under the allocator
        env = dict(os.environ, GLIBC_TUNABLES=FAULT_FREE)
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))
    print(
        f"# Batch-invariant sums: jax {jax.__version__}, backend {jax.default_backend()}, "
        f"{os.cpu_count()} CPUs; medians of interleaved rounds, fault-free allocator\n"
    )
    _table(args.quick)


if __name__ == "__main__":
    main()
