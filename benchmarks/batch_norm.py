"""Time eqx_norm.BatchNorm (training mode) against torch, equinox, flax.nnx and plain jnp.

Usage::

    python benchmarks/batch_norm.py --fault-free  # (32, 256, 28, 28) float32, ~1-2 minutes
    python benchmarks/batch_norm.py               # glibc's default allocator
    python benchmarks/batch_norm.py --quick       # a small shape: checks the script works

``--fault-free`` re-runs the script under ``GLIBC_TUNABLES`` (see ``FAULT_FREE``, as
``run.py``'s fault-free worker) so that freed memory is kept and reused and XLA's fresh
output buffers do not page-fault on every call: the allocator issue 17's targets are
measured with.

Rows, all in training mode (batch statistics, running statistics updated where the
implementation keeps them), N=32, C=256, H=W=28:

* ``eqx_norm (N, H, W, C)``: ``BatchNorm(C)`` on the channels-last batch (the default,
  which takes the compiled CPU kernel);
* ``eqx_norm (N, C, H, W)``: ``BatchNorm(C, channel_axis=1)`` on torch's layout;
* ``eqx_norm xla (N, H, W, C)`` / ``(N, C, H, W)``: the same with ``implementation="xla"``
  (the pure-JAX path that accelerators run; the rows above take the CPU kernel);
* ``eqx_norm mask (N, H, W, C)`` / ``eqx_norm vmap axis_name (N, H, W, C)``: the
  channels-last layer with a mask that pads the last two examples, and with
  ``axis_name="batch"`` on one ``(H, W, C)`` example at a time under ``jax.vmap``; both on
  the kernel (the default), and beside them with ``implementation="xla"``;
* ``eqx.nn.BatchNorm (vmap)``: ``mode="batch"``, one ``(C, H, W)`` example at a time under
  ``jax.vmap(..., axis_name="batch")``, as equinox requires;
* ``flax.nnx.BatchNorm (N, H, W, C)``: ``use_running_average=False``, split/merged into a
  pure function (the running statistics returned);
* ``jnp formula (N, H, W, C)`` / ``(N, C, H, W)``: mean, mean of squared deviations,
  ``rsqrt``, affine, with plain autodiff;
* ``torch BatchNorm2d (N, C, H, W)`` and ``torch BatchNorm2d channels_last`` (the same
  module on a ``torch.channels_last`` tensor); each training ratio is to the faster of the
  two in that pass, the layout a torch user would pick:
  ``torch.set_num_threads(2)``, ``OMP_WAIT_POLICY=PASSIVE``; forward under
  ``torch.no_grad()``, forward+backward as ``y.backward(dy)``.

JAX forward is the jitted call; forward+backward is the jitted ``vjp`` with respect to
``x`` and the affine parameters, applied to ``dy``. After a warm-up the rows are
interleaved round by round; each time is the median over rounds (interquartile range
beside it) and the ratio is against torch's faster training row (the inference rows,
``eqx.nn.inference_mode(bn)``, against torch's ``.eval()`` module). The script then prints
the largest error of eqx_norm in float32 against float64 torch (output, dx, dgamma, dbeta),
at mean 0 and at mean 1e4. It asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from residual import FAULT_FREE, interleaved

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported

TORCH_THREADS = 2
EPSILON = 1e-5


def jax_rows(shape):
    """``{name: (fwd, fwd+bwd)}`` zero-argument timers of the JAX implementations; ``shape``
    is channels-last ``(N, H, W, C)``."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import eqx_norm

    c = shape[-1]
    key_x, key_dy = jax.random.split(jax.random.key(0))
    x_last = jax.random.normal(key_x, shape, jnp.float32)
    dy_last = jax.random.normal(key_dy, shape, jnp.float32)
    x_first, dy_first = x_last.transpose(0, 3, 1, 2), dy_last.transpose(0, 3, 1, 2)

    def timers(apply, params, state, x, dy):
        """``apply(x, params, state) -> (y, state)``."""
        fwd = jax.jit(apply)

        @jax.jit
        def fwd_bwd(x, params, state, dy):
            # the state goes through vjp as an input (its cotangent is dropped): flax.nnx
            # refuses to update a BatchStat that comes from an outer trace
            y, vjp, state = jax.vjp(apply, x, params, state, has_aux=True)
            return y, vjp(dy)[:2], state

        return (
            lambda: jax.block_until_ready(fwd(x, params, state)),
            lambda: jax.block_until_ready(fwd_bwd(x, params, state, dy)),
        )

    rows = {}
    for name, channel_axis, x, dy, implementation in (
        ("eqx_norm (N, H, W, C)", -1, x_last, dy_last, None),
        ("eqx_norm (N, C, H, W)", 1, x_first, dy_first, None),
        ("eqx_norm xla (N, H, W, C)", -1, x_last, dy_last, "xla"),
        ("eqx_norm xla (N, C, H, W)", 1, x_first, dy_first, "xla"),
    ):
        bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(
            c, channel_axis=channel_axis, implementation=implementation
        )

        def apply(x, params, state, bn=bn):
            return eqx.tree_at(lambda m: (m.gamma, m.beta), bn, params)(x, state)

        rows[name] = timers(apply, (bn.gamma, bn.beta), state, x, dy)
        if implementation == "xla":  # inference is one elementwise pass on every path
            continue
        inference = eqx.nn.inference_mode(bn)

        def apply_inference(x, params, state, bn=inference):
            return eqx.tree_at(lambda m: (m.gamma, m.beta), bn, params)(x, state)

        rows[name.replace("eqx_norm", "eqx_norm inference")] = timers(
            apply_inference, (bn.gamma, bn.beta), state, x, dy
        )

    # a mask (the last 2 examples padded) and axis_name (one example at a time under vmap):
    # the kernel (the default) against the XLA path
    mask = (jnp.arange(shape[0]) < shape[0] - 2).reshape(-1, 1, 1, 1)
    for implementation in (None, "xla"):
        label = "" if implementation is None else " xla"
        bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(c, implementation=implementation)

        def apply_masked(x, params, state, bn=bn):
            return eqx.tree_at(lambda m: (m.gamma, m.beta), bn, params)(x, state, mask=mask)

        rows[f"eqx_norm{label} mask (N, H, W, C)"] = timers(
            apply_masked, (bn.gamma, bn.beta), state, x_last, dy_last
        )
        bn, state = eqx.nn.make_with_state(eqx_norm.BatchNorm)(
            c, axis_name="batch", implementation=implementation
        )

        def apply_mapped(x, params, state, bn=bn):
            model = eqx.tree_at(lambda m: (m.gamma, m.beta), bn, params)
            run = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
            return run(x, state)

        rows[f"eqx_norm{label} vmap axis_name (N, H, W, C)"] = timers(
            apply_mapped, (bn.gamma, bn.beta), state, x_last, dy_last
        )

    bn, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(c, "batch", eps=EPSILON, mode="batch")

    def apply_equinox(x, params, state):
        model = eqx.tree_at(lambda m: (m.weight, m.bias), bn, params)
        return jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)

    rows["eqx.nn.BatchNorm (vmap)"] = timers(
        apply_equinox, (bn.weight, bn.bias), state, x_first, dy_first
    )

    module = nnx.BatchNorm(c, epsilon=EPSILON, use_running_average=False, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(module, nnx.Param, nnx.BatchStat)

    def apply_flax(x, params, stats):
        model = nnx.merge(graphdef, params, stats)
        y = model(x)
        return y, nnx.state(model, nnx.BatchStat)

    rows["flax.nnx.BatchNorm (N, H, W, C)"] = timers(apply_flax, params, stats, x_last, dy_last)

    for name, axes, x, dy in (
        ("jnp formula (N, H, W, C)", (0, 1, 2), x_last, dy_last),
        ("jnp formula (N, C, H, W)", (0, 2, 3), x_first, dy_first),
    ):
        per_channel = tuple(1 if i in axes else c for i in range(4))

        def apply_jnp(x, params, state, axes=axes, per_channel=per_channel):
            mean = jnp.mean(x, axis=axes, keepdims=True)
            var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
            y = (x - mean) * jax.lax.rsqrt(var + EPSILON)
            y = y * params[0].reshape(per_channel) + params[1].reshape(per_channel)
            return y, state

        rows[name] = timers(apply_jnp, (jnp.ones(c), jnp.zeros(c)), None, x, dy)
    return rows, (x_first, dy_first)


def torch_rows(x_first, dy_first):
    """``{name: (fwd, fwd+bwd)}`` of torch.nn.BatchNorm2d, NCHW and channels_last memory."""
    import numpy as np
    import torch

    rows = {}
    for name, memory_format in (
        (TORCH, torch.contiguous_format),
        ("torch BatchNorm2d channels_last", torch.channels_last),
    ):
        module = torch.nn.BatchNorm2d(x_first.shape[1], eps=EPSILON)
        xt = torch.from_numpy(np.array(x_first)).contiguous(memory_format=memory_format)
        dyt = torch.from_numpy(np.array(dy_first)).contiguous(memory_format=memory_format)
        xt_grad = xt.clone().requires_grad_(True)

        def fwd(module=module, xt=xt):
            with torch.no_grad():
                module(xt)

        def fwd_bwd(module=module, xt_grad=xt_grad, dyt=dyt):
            xt_grad.grad = None
            module.zero_grad(set_to_none=True)
            module(xt_grad).backward(dyt)

        rows[name] = (fwd, fwd_bwd)
    module = torch.nn.BatchNorm2d(x_first.shape[1], eps=EPSILON).eval()
    xt = torch.from_numpy(np.array(x_first))
    xt_grad = xt.clone().requires_grad_(True)
    dyt = torch.from_numpy(np.array(dy_first))

    def eval_fwd():
        with torch.no_grad():
            module(xt)

    def eval_fwd_bwd():
        xt_grad.grad = None
        module.zero_grad(set_to_none=True)
        module(xt_grad).backward(dyt)

    rows[TORCH_EVAL] = (eval_fwd, eval_fwd_bwd)
    return rows


def time_rows(rows, warmup, rounds):
    """``{(name, pass): [seconds]}``, the timers interleaved round by round."""
    timers = {(name, phase): fn for name, fns in rows.items() for phase, fn in zip(PASSES, fns)}
    return interleaved(timers, warmup, rounds)


PASSES = ("fwd", "fwd+bwd")
TORCH = "torch BatchNorm2d (N, C, H, W)"
TORCH_LAYOUTS = (TORCH, "torch BatchNorm2d channels_last")
TORCH_EVAL = "torch BatchNorm2d .eval() (N, C, H, W)"


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
    rows.update(torch_rows(x_first, dy_first))
    samples = time_rows(rows, warmup, rounds)

    allocator = "fault-free" if os.environ.get("GLIBC_TUNABLES") == FAULT_FREE else "default"
    print(
        f"BatchNorm, training mode, x {shape} float32 (N, H, W, C) and its transpose; {rounds} "
        f"interleaved "
        f"rounds, median ms [p25-p75]; torch threads {TORCH_THREADS}; allocator {allocator}\n"
    )
    print(
        "| implementation | fwd ms | fwd+bwd ms | fwd vs torch (faster layout) "
        "| fwd+bwd vs torch (faster layout) |"
    )
    print("|---|---|---|---|---|")
    medians = {k: float(np.median(v)) * 1e3 for k, v in samples.items()}
    for name in rows:
        cells = []
        for phase in PASSES:
            p25, p75 = np.percentile(np.asarray(samples[(name, phase)]) * 1e3, [25, 75])
            cells.append(f"{medians[(name, phase)]:.2f} [{p25:.2f}-{p75:.2f}]")
        inference = "inference" in name or name == TORCH_EVAL
        references = (TORCH_EVAL,) if inference else TORCH_LAYOUTS
        ratios = [
            f"{medians[(name, p)] / min(medians[(r, p)] for r in references):.2f}x" for p in PASSES
        ]
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
