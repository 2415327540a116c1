"""One script to run on a CUDA machine: the portable path's correctness core, then timings.

Usage::

    python benchmarks/gpu_check.py           # transformer sizes, under 5 minutes on a GPU
    python benchmarks/gpu_check.py --quick   # tiny sizes: runs anywhere (tested on CPU)

Correctness (exit status 1 if any check fails), for LayerNorm and RMSNorm with
``implementation="xla"`` on the default backend:

* accuracy: float32 inputs of mean 1e4 and spread 1 against a float64 NumPy reference
  (bound 1e-5 on y);
* gradients: dx, dgamma, dbeta of ``sum(dy * y)`` against the float64 closed form
  (relative bound 1e-4);
* batch invariance: one example's y and dx bitwise the same alone, in a batch of 7 and in
  a batch of 600 (reported, as XLA:CPU does not give it: see docs/numeric_edges.md).

Timings: eqx_norm's portable path against the plain jnp two-pass formula,
``eqx.nn.LayerNorm`` under ``jax.vmap`` and ``flax.nnx.LayerNorm``, forward and
forward+backward, medians of interleaved rounds, printed with the ratio to the plain
formula (< 1 is faster).
"""

from __future__ import annotations

import argparse
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from residual import interleaved

import eqx_norm

EPSILON = 1e-5
SIZES = ((8192, 1024, "float32"), (16384, 4096, "bfloat16"), (64 * 2048, 128, "float32"))
QUICK_SIZES = ((64, 128, "float32"), (32, 256, "bfloat16"))


def _reference(x, dy, gamma, beta, center):
    """float64 y and (dx, dgamma, dbeta) of ``sum(dy * y)``."""
    mu = x.mean(-1, keepdims=True) if center else 0.0
    rstd = 1 / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + EPSILON)
    xhat = (x - mu) * rstd
    g = dy * gamma
    inner = g - g.mean(-1, keepdims=True) if center else g
    dx = rstd * (inner - xhat * (g * xhat).mean(-1, keepdims=True))
    return xhat * gamma + beta, (dx, (dy * xhat).sum(0), dy.sum(0))


def _layer(cls, d, rng):
    gamma = (1 + 0.1 * rng.standard_normal(d)).astype(np.float32)
    beta = (0.1 * rng.standard_normal(d)).astype(np.float32)
    kwargs = {"bias_initializer": beta} if cls is eqx_norm.LayerNorm else {}
    layer = cls(d, EPSILON, scale_initializer=gamma, implementation="xla", **kwargs)
    return layer, gamma, (beta if kwargs else np.zeros(d, np.float32))


def correctness(quick: bool) -> bool:
    """Run the checks, print one line each; True when all pass."""
    rng = np.random.default_rng(0)
    rows, d = (64, 128) if quick else (4096, 1024)
    ok = True
    for cls in (eqx_norm.LayerNorm, eqx_norm.RMSNorm):
        center = cls is eqx_norm.LayerNorm
        layer, gamma, beta = _layer(cls, d, rng)
        x = (1e4 + rng.standard_normal((rows, d))).astype(np.float32)
        dy = rng.standard_normal((rows, d)).astype(np.float32)
        y, vjp = jax.jit(lambda x, m: jax.vjp(lambda x, m: m(x), x, m))(jnp.asarray(x), layer)
        dx, dlayer = vjp(jnp.asarray(dy))
        want_y, (want_dx, want_dg, want_db) = _reference(
            x.astype(np.float64), dy.astype(np.float64), gamma, beta, center
        )
        err_y = float(np.abs(np.asarray(y, np.float64) - want_y).max())
        checks = {"accuracy at mean 1e4 (y, abs)": (err_y, 1e-5)}
        got = {"dx": dx, "dgamma": dlayer.gamma}
        want = {"dx": want_dx, "dgamma": want_dg}
        if center:
            got["dbeta"], want["dbeta"] = dlayer.beta, want_db
        for name in got:
            w = np.asarray(want[name])
            rel = float(np.abs(np.asarray(got[name], np.float64) - w).max() / np.abs(w).max())
            checks[f"gradient {name} vs float64 (rel)"] = (rel, 1e-4)
        for name, (value, bound) in checks.items():
            passed = value <= bound
            ok &= passed
            print(f"  {cls.__name__:9s} {name}: {value:.2e} (bound {bound:g}) "
                  f"{'ok' if passed else 'FAIL'}")  # fmt: skip
        # batch invariance
        batch = jnp.asarray(rng.standard_normal((600, d)), jnp.float32)
        cot = jnp.asarray(rng.standard_normal((600, d)), jnp.float32)

        @jax.jit
        def y_dx(x, c, m=layer):
            y, vjp = jax.vjp(m, x)
            return y, vjp(c)[0]

        alone = y_dx(batch[:1], cot[:1])
        same = all(
            bool(jnp.array_equal(got[:1], want))
            for n in (7, 600)
            for got, want in zip(y_dx(batch[:n], cot[:n]), alone)
        )
        print(f"  {cls.__name__:9s} batch invariance (alone, 7, 600; bitwise y and dx): "
              f"{'yes' if same else 'NO'}")  # fmt: skip
        if jax.default_backend() != "cpu":
            ok &= same  # XLA:CPU's reduction strategy changes with size: reported only
    print(f"correctness: {'all checks passed' if ok else 'FAILED'}")
    return ok


def _implementations(rows, d, dtype):
    rng = np.random.default_rng(1)
    gamma = jnp.asarray(1 + 0.1 * rng.standard_normal(d), jnp.float32)
    beta = jnp.asarray(0.1 * rng.standard_normal(d), jnp.float32)
    ours = eqx_norm.LayerNorm(
        d, EPSILON, scale_initializer=gamma, bias_initializer=beta, implementation="xla"
    )
    peer = eqx.tree_at(
        lambda m: (m.weight, m.bias), eqx.nn.LayerNorm(d, eps=EPSILON), (gamma, beta)
    )
    fl = nnx.LayerNorm(d, epsilon=EPSILON, rngs=nnx.Rngs(0))
    fl.scale.value, fl.bias.value = gamma, beta
    graphdef, state = nnx.split(fl)

    def plain(x, p):
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))
        mean = jnp.mean(xf, -1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), -1, keepdims=True)
        y = (xf - mean) * jax.lax.rsqrt(var + EPSILON) * p[0][None, :] + p[1][None, :]
        return y.astype(x.dtype)

    def module(m):
        params, static = eqx.partition(m, eqx.is_inexact_array)
        return (lambda x, p: eqx.combine(p, static)(x)), params

    def vmapped(m):
        params, static = eqx.partition(m, eqx.is_inexact_array)
        return (lambda x, p: jax.vmap(eqx.combine(p, static))(x)), params

    return {
        "eqx_norm xla": module(ours),
        "plain formula": (plain, (gamma, beta)),
        "equinox (vmap)": vmapped(peer),
        "flax.nnx": ((lambda x, s: nnx.merge(graphdef, s)(x)), state),
    }


def timings(quick: bool) -> None:
    warmup, rounds = (1, 3) if quick else (3, 20)
    names = ("eqx_norm xla", "equinox (vmap)", "flax.nnx")
    header = " | ".join(f"{n} ms (x plain)" for n in names)
    print(f"\n| case | pass | plain formula ms | {header} |")
    print("|---|---|---|" + "---|" * len(names))
    for rows, d, dtype in QUICK_SIZES if quick else SIZES:
        keys = jax.random.split(jax.random.key(0), 2)
        x = jax.random.normal(keys[0], (rows, d), jnp.float32).astype(dtype)
        dy = jax.random.normal(keys[1], (rows, d), jnp.float32).astype(dtype)
        timers = {}
        for name, (apply, p) in _implementations(rows, d, dtype).items():
            fwd = jax.jit(apply)

            def fb(x, p, dy, apply=apply):
                y, vjp = jax.vjp(apply, x, p)
                return y, vjp(dy.astype(y.dtype))

            fb = jax.jit(fb)
            timers[(name, "fwd")] = lambda f=fwd, p=p, x=x: jax.block_until_ready(f(x, p))
            timers[(name, "fwd+bwd")] = lambda f=fb, p=p, x=x, dy=dy: jax.block_until_ready(
                f(x, p, dy)
            )
        samples = interleaved(timers, warmup, rounds)
        med = {k: float(np.median(v)) * 1e3 for k, v in samples.items()}
        for phase in ("fwd", "fwd+bwd"):
            base = med[("plain formula", phase)]
            cells = " | ".join(
                f"{med[(n, phase)]:.3f} ({med[(n, phase)] / base:.2f})" for n in names
            )
            print(f"| ({rows}, {d}) {dtype} | {phase} | {base:.3f} | {cells} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, runs anywhere")
    args = parser.parse_args()
    device = jax.devices()[0]
    print(f"jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind}")
    ok = correctness(args.quick)
    timings(args.quick)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
