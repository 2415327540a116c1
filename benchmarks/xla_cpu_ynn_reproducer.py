"""Stand-alone reproducer of two XLA:CPU bugs in YNNPACK-fused reductions (jaxlib 0.10.2).

No eqx_norm in it: only jax. Run ``python benchmarks/xla_cpu_ynn_reproducer.py``; it prints
what happened in each case and exits 0 whatever it finds (it reports, it does not assert).

1. **Crash.** The jitted gradient of a LayerNorm written as a ``jax.custom_jvp`` whose
   tangent is ``jax.checkpoint``-ed (``nothing_saveable``) ends the process with SIGSEGV on a
   (4096, 64) float32 input; 4,095 rows run. XLA:CPU compiles the whole gradient into one
   YNN fusion with four row reductions. Each case runs in a subprocess, so the crash is
   reported rather than killing this script.
2. **Miscompile.** The jitted gradient of a plain haiku-style LayerNorm
   (``scale * rsqrt(var + eps) * (x - mean) + offset``) with respect to ``x``, ``scale``
   and ``offset`` on (64, 128, 768) differs from the eager one by about 0.7 in ``dx``
   (against about 1e-6 for the gradient of ``x`` alone).

Both go away with ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce``, which
keeps reductions out of YNN fusions; the script runs every case with and without it.
"""

from __future__ import annotations

import os
import subprocess
import sys

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-reduce"

CRASH = r"""
import functools, sys
import jax, jax.numpy as jnp
from jax import lax

def stats(x):
    shift = lax.stop_gradient(x[:, :1])
    ms = jnp.mean(x - shift, axis=1, keepdims=True)
    mean = shift + ms
    c = (x - mean) - (ms - (mean - shift))
    return c, lax.rsqrt(jnp.mean(c * c, axis=1, keepdims=True) + 1e-5)

@jax.custom_jvp
def layer_norm(x, scale, offset):
    c, r = stats(x)
    return c * r * scale[None, :] + offset[None, :]

def tangent(x, scale, dx):
    c, r = stats(x)
    xhat = c * r
    inner = dx - jnp.mean(dx, axis=1, keepdims=True)
    inner = inner + xhat * -jnp.mean(dx * xhat, axis=1, keepdims=True)
    return inner * (r * scale[None, :])

tangent = jax.checkpoint(tangent, policy=jax.checkpoint_policies.nothing_saveable)

@layer_norm.defjvp
def _(primals, tangents):
    x, scale, offset = primals
    return layer_norm(x, scale, offset), tangent(x, scale, tangents[0])

rows, d = int(sys.argv[1]), int(sys.argv[2])
scale, offset, w = jnp.ones(d), jnp.zeros(d), jnp.arange(float(d))[None, :]
grad = jax.jit(jax.grad(lambda x: (layer_norm(x, scale, offset) ** 2 * w).sum()))
x = jax.random.normal(jax.random.key(0), (rows, d))
print(f"ran: sum(dx) = {float(grad(x).sum()):.6g}")
"""

MISCOMPILE = r"""
import jax, jax.numpy as jnp

def layer_norm(x, scale, offset):  # haiku's LayerNorm, two-pass variance
    mean = jnp.mean(x, axis=-1, keepdims=True)
    variance = jnp.var(x, axis=-1, keepdims=True)
    return scale * jax.lax.rsqrt(variance + 1e-5) * (x - mean) + offset

kx, kdy = jax.random.split(jax.random.key(0))
x = jax.random.normal(kx, (64, 128, 768))
dy = jax.random.normal(kdy, x.shape)
scale, offset = jnp.ones((768,)), jnp.zeros((768,))
loss = lambda x, s, o: jnp.sum(layer_norm(x, s, o) * dy)
grad = jax.grad(loss, argnums=(0, 1, 2))
eager, jitted = grad(x, scale, offset), jax.jit(grad)(x, scale, offset)
names = ("dx", "dscale", "doffset")
print("max |jit - eager|: " + ", ".join(
    f"{n} {float(jnp.abs(a - b).max()):.3g}" for n, a, b in zip(names, eager, jitted)))
"""


def _run(code: str, args: list[str], with_flag: bool) -> str:
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "").replace(FLAG, "").strip()
    env["XLA_FLAGS"] = f"{flags} {FLAG}".strip() if with_flag else flags
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode < 0 or done.returncode == 139:
        return f"CRASHED (exit {done.returncode}, signal {abs(done.returncode)})"
    if done.returncode != 0:
        return f"failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1]}"
    return done.stdout.strip()


def main() -> None:
    import jax

    print(f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs")
    for rows, d in ((4095, 64), (4096, 64)):
        for with_flag in (False, True):
            label = f"crash case ({rows}, {d}), {'with' if with_flag else 'without'} {FLAG}"
            print(f"{label}: {_run(CRASH, [str(rows), str(d)], with_flag)}", flush=True)
    for with_flag in (False, True):
        label = f"haiku-style gradient (64, 128, 768), {'with' if with_flag else 'without'} flag"
        print(f"{label}: {_run(MISCOMPILE, [], with_flag)}", flush=True)


if __name__ == "__main__":
    main()
