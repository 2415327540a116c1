"""The portable-path table: eqx_norm ``implementation="xla"`` against the plain formula.

Usage::

    python benchmarks/portable_path.py           # every case, a few minutes on 2 cores
    python benchmarks/portable_path.py --quick   # tiny shapes, checks the script works

The plain formula is the jnp two-pass formula (float32 statistics, then the affine step)
and its plain autodiff, over each layer's axes: the trailing features for LayerNorm and
RMSNorm, the positions and a group's channels for GroupNorm and InstanceNorm (both
layouts), the batch and the positions for BatchNorm's training step (with its running
statistics' update). The parent re-runs itself in a worker with the fault-free allocator
of ``benchmarks/run.py`` (``GLIBC_TUNABLES``); inside, after a warm-up, the two are
interleaved round by round and each figure is the median over rounds. Ratios < 1 mean
eqx_norm is faster. The last column counts the full-size arrays each compiled program
reads and writes (``benchmarks/passes.py``): the proxy for an accelerator, where a
normalization's time is its memory traffic. It prints a Markdown table; it asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from residual import FAULT_FREE, interleaved

EPSILON = 1e-5
# (name, family, shape, normalized axes (LayerNorm/RMSNorm) or layout, dtype)
CASES = (
    ("(8192, 1024)", "layer_norm", (8192, 1024), 1, "float32"),
    ("(64, 128, 768)", "layer_norm", (64, 128, 768), 1, "float32"),
    ("(64, 128, 768) bf16", "layer_norm", (64, 128, 768), 1, "bfloat16"),
    ("(32, 28, 28, 256) last 3", "layer_norm", (32, 28, 28, 256), 3, "float32"),
    ("(32, 64)", "layer_norm", (32, 64), 1, "float32"),
    ("RMSNorm (8192, 1024)", "rms_norm", (8192, 1024), 1, "float32"),
    ("QK-norm RMSNorm (2^18, 128)", "rms_norm", (2**18, 128), 1, "float32"),
    ("QK-norm LayerNorm (2^18, 64)", "layer_norm", (2**18, 64), 1, "float32"),
    ("GroupNorm G=32 (32, 256, 28, 28)", "group_norm", (32, 256, 28, 28), "first", "float32"),
    ("GroupNorm G=32 (32, 28, 28, 256)", "group_norm", (32, 28, 28, 256), "last", "float32"),
    ("InstanceNorm (32, 64, 28, 28)", "instance_norm", (32, 64, 28, 28), "first", "float32"),
    ("InstanceNorm (32, 28, 28, 64)", "instance_norm", (32, 28, 28, 64), "last", "float32"),
    ("BatchNorm (32, 28, 28, 256)", "batch_norm", (32, 28, 28, 256), "last", "float32"),
    ("BatchNorm (32, 256, 28, 28)", "batch_norm", (32, 256, 28, 28), "first", "float32"),
)
QUICK_CASES = (
    ("(256, 128)", "layer_norm", (256, 128), 1, "float32"),
    ("(4, 16, 128) bf16", "layer_norm", (4, 16, 128), 1, "bfloat16"),
    ("RMSNorm (64, 128)", "rms_norm", (64, 128), 1, "float32"),
    ("GroupNorm G=4 (4, 6, 6, 16)", "group_norm", (4, 6, 6, 16), "last", "float32"),
    ("InstanceNorm (4, 8, 6, 6)", "instance_norm", (4, 8, 6, 6), "first", "float32"),
    ("BatchNorm (8, 6, 6, 16)", "batch_norm", (8, 6, 6, 16), "last", "float32"),
)
GROUPS = 32  # GroupNorm's groups (at most the channels)
MOMENTUM = 0.99


def plain_formula(x, gamma, beta, axes, center: bool = True):
    """The plain jnp two-pass formula over ``axes`` (float32 statistics for half inputs),
    then the affine step: what a hand-written layer (``equinox.nn``'s) computes."""
    import jax
    import jax.numpy as jnp

    xf = x.astype(jnp.float32) if jnp.finfo(x.dtype).bits < 32 else x
    mean = jnp.mean(xf, axis=axes, keepdims=True) if center else jnp.zeros((), xf.dtype)
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    y = (xf - mean) * jax.lax.rsqrt(var + EPSILON) * gamma
    if beta is not None:
        y = y + beta
    return y.astype(x.dtype), mean, var


def applies(case):
    """``{name: (apply(x, params), params)}``: eqx_norm's ``implementation="xla"`` and the
    plain formula, each a pure function of the same input and parameters."""
    import jax.numpy as jnp
    import numpy as np

    from eqx_norm import functional as F

    _, family, shape, spec, _ = case
    rng = np.random.default_rng(0)
    if family in ("layer_norm", "rms_norm"):
        normalized = shape[len(shape) - spec :]
        axes = tuple(range(len(shape) - spec, len(shape)))
        center = family == "layer_norm"
        params = (
            jnp.asarray(1 + 0.1 * rng.standard_normal(normalized), jnp.float32),
            jnp.asarray(0.1 * rng.standard_normal(normalized), jnp.float32) if center else None,
        )
        norm = F.layer_norm if center else F.rms_norm

        def ours(x, p):
            return norm(x, normalized, *p, epsilon=EPSILON, implementation="xla")

        def plain(x, p):
            return plain_formula(x, *p, axes, center)[0]

        return {"eqx_norm xla": (ours, params), "plain formula": (plain, params)}
    last = spec == "last"
    channels = shape[-1] if last else shape[1]
    params = (
        jnp.asarray(1 + 0.1 * rng.standard_normal(channels), jnp.float32),
        jnp.asarray(0.1 * rng.standard_normal(channels), jnp.float32),
    )
    # the parameters' broadcast shape, and the axes of the plain formula's statistics
    broadcast = (channels,) if last else (channels, 1, 1)
    if family == "batch_norm":
        axes = (0, 1, 2) if last else (0, 2, 3)
        running = (jnp.zeros(channels, jnp.float32), jnp.ones(channels, jnp.float32))

        def ours(x, p):
            return F.batch_norm(
                x, *running, *p, training=True, momentum=MOMENTUM, epsilon=EPSILON,
                channel_axis=-1 if last else 1, implementation="xla",
            )  # fmt: skip

        def plain(x, p):
            y, mean, var = plain_formula(x, *(q.reshape(broadcast) for q in p), axes)
            count = x.size // channels
            unbiased = var.reshape(channels) * (count / max(count - 1, 1))
            return (
                y,
                MOMENTUM * running[0] + (1 - MOMENTUM) * mean.reshape(channels),
                MOMENTUM * running[1] + (1 - MOMENTUM) * unbiased,
            )

        return {"eqx_norm xla": (ours, params), "plain formula": (plain, params)}
    groups = channels if family == "instance_norm" else min(GROUPS, channels)
    layout = dict(channel_axis=-1 if last else 0, spatial_ndim=2)

    def ours(x, p):
        if family == "instance_norm":
            return F.instance_norm(x, *p, **layout, epsilon=EPSILON, implementation="xla")
        return F.group_norm(x, groups, *p, **layout, epsilon=EPSILON, implementation="xla")

    def plain(x, p):
        n = x.shape[0]
        if last:  # (N, H * W, G, C / G) over the positions and the group's channels
            grouped, axes = x.reshape(n, -1, groups, channels // groups), (1, 3)
        else:  # (N, G, C / G * H * W)
            grouped, axes = x.reshape(n, groups, -1), (2,)
        ones = jnp.ones((), jnp.float32)
        y = plain_formula(grouped, ones, None, axes)[0].reshape(x.shape)
        return y * p[0].reshape(broadcast) + p[1].reshape(broadcast)

    return {"eqx_norm xla": (ours, params), "plain formula": (plain, params)}


def _timers(case):
    """``({(name, pass): timer}, {(name, pass): Passes})``."""
    import jax
    import jax.numpy as jnp
    from passes import count_in_hlo

    _, _, shape, _, dtype = case
    kx, kdy = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, shape, jnp.float32).astype(dtype)
    dy = jax.random.normal(kdy, shape, jnp.float32).astype(dtype)
    timers, passes = {}, {}
    for name, (apply, p) in applies(case).items():

        def fb(x, p, dy, apply=apply):
            y, vjp = jax.vjp(apply, x, p)
            # BatchNorm returns (y, running mean, running var): only y gets a cotangent
            cotangent = (dy, *(jnp.zeros_like(s) for s in y[1:])) if isinstance(y, tuple) else dy
            return y, vjp(cotangent)

        # compiled once: the same executables are timed and counted
        fwd = jax.jit(apply).lower(x, p).compile()
        fb = jax.jit(fb).lower(x, p, dy).compile()
        timers[(name, "fwd")] = lambda f=fwd, p=p: jax.block_until_ready(f(x, p))
        timers[(name, "fwd+bwd")] = lambda f=fb, p=p: jax.block_until_ready(f(x, p, dy))
        passes[(name, "fwd")] = count_in_hlo(fwd.as_text(), x.size)
        passes[(name, "fwd+bwd")] = count_in_hlo(fb.as_text(), x.size)
    return timers, passes


def _worker(quick: bool) -> None:
    import numpy as np

    warmup, rounds = (1, 3) if quick else (3, 25)
    print(
        "| case | pass | eqx_norm xla ms | plain formula ms | ratio "
        "| full-size reads + writes: ours / plain |"
    )
    print("|---|---|---|---|---|---|")
    for case in QUICK_CASES if quick else CASES:
        timers, passes = _timers(case)
        samples = interleaved(timers, warmup, rounds)
        for phase in ("fwd", "fwd+bwd"):
            ours = float(np.median(samples[("eqx_norm xla", phase)])) * 1e3
            plain = float(np.median(samples[("plain formula", phase)])) * 1e3
            moved = [passes[(name, phase)] for name in ("eqx_norm xla", "plain formula")]
            moved = " / ".join(f"{p.reads} + {p.writes}" for p in moved)
            ratio = ours / plain
            print(f"| {case[0]} | {phase} | {ours:.2f} | {plain:.2f} | {ratio:.2f} | {moved} |")
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
