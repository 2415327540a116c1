"""Time eqx_norm.BatchNorm (training mode) against torch.nn.BatchNorm2d and eqx.nn.BatchNorm.

Usage::

    python benchmarks/batch_norm.py              # (32, 28, 28, 256) float32, ~1 minute
    python benchmarks/batch_norm.py --quick      # a small shape: checks the script works
    python benchmarks/batch_norm.py --fault-free # glibc keeps freed memory (as run.py's
                                                 # fault-free worker), see below

Rows, all in training mode (batch statistics, running statistics updated):

* ``eqx_norm (N, H, W, C)``: ``BatchNorm(C)`` on the channels-last batch;
* ``eqx_norm (N, C, H, W)``: ``BatchNorm(C, channel_axis=1)`` on torch's layout;
* ``torch BatchNorm2d``: ``(N, C, H, W)``, ``torch.set_num_threads(2)``,
  ``OMP_WAIT_POLICY=PASSIVE``; forward under ``torch.no_grad()``, forward+backward as
  ``y.backward(dy)``;
* ``eqx.nn.BatchNorm``: ``mode="batch"``, one ``(C, H, W)`` example at a time under
  ``jax.vmap(..., axis_name="batch")``, as equinox requires.

JAX forward is ``jit(bn)(x, state)``; forward+backward is the jitted ``vjp`` with respect
to ``x``, ``gamma`` and ``beta``, applied to ``dy``. After a warm-up the rows are
interleaved round by round; each time is the median over rounds (interquartile range
beside it) and the ratio is against torch. The script then prints the largest error of
eqx_norm in float32 against float64 torch (output, dx, dgamma, dbeta), at mean 0 and at
mean 1e4. It asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

FAULT_FREE = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1"
)
TORCH_THREADS = 2
EPSILON = 1e-5


def jax_rows(shape):
    """``{name: (fwd, fwd+bwd)}`` zero-argument timers of the JAX implementations."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_norm

    c = shape[-1]
    key_x, key_dy = jax.random.split(jax.random.key(0))
    x_last = jax.random.normal(key_x, shape, jnp.float32)
    dy_last = jax.random.normal(key_dy, shape, jnp.float32)
    x_first, dy_first = x_last.transpose(0, 3, 1, 2), dy_last.transpose(0, 3, 1, 2)

    def timers(apply, params, state, x, dy):
        fwd = jax.jit(apply)

        @jax.jit
        def fwd_bwd(x, params, state, dy):
            y, vjp, state = jax.vjp(lambda x, p: apply(x, p, state), x, params, has_aux=True)
            return y, vjp(dy), state

        return (
            lambda: jax.block_until_ready(fwd(x, params, state)),
            lambda: jax.block_until_ready(fwd_bwd(x, params, state, dy)),
        )

    rows = {}
    for name, channel_axis, x, dy in (
        ("eqx_norm (N, H, W, C)", -1, x_last, dy_last),
        ("eqx_norm (N, C, H, W)", 1, x_first, dy_first),
    ):
        bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(c, channel_axis=channel_axis)

        def apply(x, params, state, bn=bn):
            return eqx.tree_at(lambda m: (m.gamma, m.beta), bn, params)(x, state)

        rows[name] = timers(apply, (bn.gamma, bn.beta), state, x, dy)

    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, "batch", eps=EPSILON, mode="batch")

    def apply_equinox(x, params, state):
        model = eqx.tree_at(lambda m: (m.weight, m.bias), bn, params)
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    rows["eqx.nn.BatchNorm (vmap)"] = timers(
        apply_equinox, (bn.weight, bn.bias), state, x_first, dy_first
    )
    return rows, (x_first, dy_first)


def torch_row(x_first, dy_first):
    import numpy as np
    import torch

    module = torch.nn.BatchNorm2d(x_first.shape[1], eps=EPSILON)
    xt = torch.from_numpy(np.array(x_first))
    dyt = torch.from_numpy(np.array(dy_first))
    xt_grad = xt.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            module(xt)

    def fwd_bwd():
        xt_grad.grad = None
        module.zero_grad(set_to_none=True)
        module(xt_grad).backward(dyt)

    return fwd, fwd_bwd


def time_rows(rows, warmup, rounds):
    """``{(name, pass): [seconds]}``, the timers interleaved round by round."""
    timers = {(name, phase): fn for name, fns in rows.items() for phase, fn in zip(PASSES, fns)}
    for _ in range(warmup):
        for fn in timers.values():
            fn()
    samples = {k: [] for k in timers}
    for _ in range(rounds):
        for k, fn in timers.items():
            start = time.perf_counter()
            fn()
            samples[k].append(time.perf_counter() - start)
    return samples


PASSES = ("fwd", "fwd+bwd")
TORCH = "torch BatchNorm2d"


def accuracy(shape, mean):
    """Largest error of eqx_norm (float32, channels-last) against float64 torch: the output
    (absolute), and dx, dgamma, dbeta (relative to each one's largest magnitude)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    import eqx_norm

    rng = np.random.default_rng(1)
    x = (mean + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[-1]
    gamma = (1 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    beta = (0.3 * rng.standard_normal(c)).astype(np.float32)
    bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(
        c, scale_initializer=gamma, bias_initializer=beta
    )

    @jax.jit
    def run(x, params, dy):
        apply = lambda x, p: eqx.tree_at(lambda m: (m.gamma, m.beta), bn, p)(x, state)[0]  # noqa: E731
        y, vjp = jax.vjp(apply, x, params)
        return y, *vjp(dy)

    y, dx, (dgamma, dbeta) = run(jnp.asarray(x), (bn.gamma, bn.beta), jnp.asarray(dy))

    module = torch.nn.BatchNorm2d(c, eps=EPSILON).double()
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(gamma.astype(np.float64)))
        module.bias.copy_(torch.from_numpy(beta.astype(np.float64)))
    xt = torch.from_numpy(x.astype(np.float64).transpose(0, 3, 1, 2)).requires_grad_(True)
    yt = module(xt)
    yt.backward(torch.from_numpy(dy.astype(np.float64).transpose(0, 3, 1, 2)))
    expected = {
        "y": yt.detach().numpy().transpose(0, 2, 3, 1),
        "dx": xt.grad.numpy().transpose(0, 2, 3, 1),
        "dgamma": module.weight.grad.numpy(),
        "dbeta": module.bias.grad.numpy(),
    }
    got = {"y": y, "dx": dx, "dgamma": dgamma, "dbeta": dbeta}
    errors = {}
    for name, want in expected.items():
        error = np.abs(np.asarray(got[name], np.float64) - want).max()
        errors[name] = error if name == "y" else error / np.abs(want).max()
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shape, few rounds")
    parser.add_argument("--fault-free", action="store_true", help="keep freed memory (glibc)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    if args.fault_free and os.environ.get("GLIBC_TUNABLES") != FAULT_FREE:
        argv = [a for a in sys.argv if a != "--fault-free"]
        env = dict(os.environ, GLIBC_TUNABLES=FAULT_FREE)
        sys.exit(subprocess.call([sys.executable, *argv, "--fault-free"], env=env))

    import numpy as np
    import torch

    torch.set_num_threads(TORCH_THREADS)
    shape = (4, 6, 6, 16) if args.quick else (32, 28, 28, 256)
    warmup, rounds = (1, 3) if args.quick else (3, args.rounds)
    rows, (x_first, dy_first) = jax_rows(shape)
    rows[TORCH] = torch_row(x_first, dy_first)
    samples = time_rows(rows, warmup, rounds)

    allocator = "fault-free" if os.environ.get("GLIBC_TUNABLES") == FAULT_FREE else "default"
    print(
        f"BatchNorm, training mode, x {shape} float32 (N, H, W, C); {rounds} interleaved "
        f"rounds, median ms [p25-p75]; torch threads {TORCH_THREADS}; allocator {allocator}\n"
    )
    print("| implementation | fwd ms | fwd+bwd ms | fwd vs torch | fwd+bwd vs torch |")
    print("|---|---|---|---|---|")
    medians = {k: float(np.median(v)) * 1e3 for k, v in samples.items()}
    for name in rows:
        cells = []
        for phase in PASSES:
            p25, p75 = np.percentile(np.asarray(samples[(name, phase)]) * 1e3, [25, 75])
            cells.append(f"{medians[(name, phase)]:.2f} [{p25:.2f}-{p75:.2f}]")
        ratios = [f"{medians[(name, p)] / medians[(TORCH, p)]:.2f}x" for p in PASSES]
        print(f"| {name} | {' | '.join(cells)} | {' | '.join(ratios)} |")

    print("\nLargest error of eqx_norm (float32) against float64 torch, training mode:")
    print("(y absolute; dx, dgamma, dbeta relative to each one's largest magnitude)\n")
    print("| input | y | dx | dgamma | dbeta |")
    print("|---|---|---|---|---|")
    for mean in (0.0, 1e4):
        errors = accuracy(shape, mean)
        print(f"| mean {mean:g}, std 1 | " + " | ".join(f"{e:.1e}" for e in errors.values()) + " |")


if __name__ == "__main__":
    main()
