"""Time the residual add + norm in one call (``residual=``) against the unfused ``norm(x + r)``.

Usage::

    python benchmarks/residual.py            # the issue's shapes, fault-free allocator
    python benchmarks/residual.py --quick    # small shapes, few rounds: checks the script
    python benchmarks/residual.py --default-allocator   # glibc's default malloc instead

Rows, for ``LayerNorm`` and ``RMSNorm`` on both implementations (``None``: the compiled
kernel, ``"xla"``):

* ``fused``: ``y, h = norm(x, residual=r)``;
* ``unfused``: ``h = (x + r)`` summed in float32 and stored in r's dtype, then
  ``y = norm(h)`` in x's dtype: the same two outputs, as a pre-norm block computes them
  without ``residual=``.

Cases: ``(8192, 1024)`` float32 ``x`` and ``r``; ``(64, 128, 768)`` bfloat16 ``x`` beside a
float32 ``r`` (flash-attn's ``residual_in_fp32``). ``fwd`` is the jitted call;
``fwd+bwd`` the jitted ``vjp`` with respect to ``x``, ``r``, ``gamma``, ``beta``, applied
to cotangents of both ``y`` and ``h``. Then one jitted ``optax.adamw`` training step of a
small pre-norm transformer (2 blocks of causal attention and an MLP, LayerNorm before each
and at the end), written with ``residual=`` against the same model written with ``h + f(h)``;
both compute the same loss (printed).

By default the script re-runs itself under the fault-free allocator of
``benchmarks/run.py`` (``GLIBC_TUNABLES``: freed memory is kept and reused, so XLA's fresh
output buffers do not page-fault on every call). After a warm-up every row of a table is
timed once per round, interleaved; each time is the median over rounds with the
interquartile range beside it, and ``fused/unfused`` is the ratio of medians. It asserts
nothing about speed.
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
PASSES = ("fwd", "fwd+bwd")
IMPLEMENTATIONS = {"kernel": None, "xla": "xla"}


def interleaved(timers: dict, warmup: int, rounds: int) -> dict:
    """``{key: [seconds]}``: every timer once per round, round after round."""
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


def stats(seconds: list[float]) -> tuple[float, float, float]:
    import numpy as np

    p25, p50, p75 = np.percentile(np.asarray(seconds) * 1e3, [25, 50, 75])
    return float(p50), float(p25), float(p75)


def norm_timers(shape, x_dtype, r_dtype) -> dict:
    """``{(family, implementation, variant, pass): timer}`` for one case."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_norm

    d = shape[-1]
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], shape, jnp.float32).astype(x_dtype)
    r = (3.0 + jax.random.normal(keys[1], shape, jnp.float32)).astype(r_dtype)
    dy = jax.random.normal(keys[2], shape, jnp.float32).astype(x_dtype)
    dh = jax.random.normal(keys[3], shape, jnp.float32).astype(r_dtype)
    timers = {}
    for family, cls in (("LayerNorm", eqx_norm.LayerNorm), ("RMSNorm", eqx_norm.RMSNorm)):
        for impl_name, implementation in IMPLEMENTATIONS.items():
            layer = cls(d, implementation=implementation)
            params, static = eqx.partition(layer, eqx.is_array)

            def fused(x, r, params, static=static):
                return eqx.combine(params, static)(x, residual=r)

            def unfused(x, r, params, static=static):
                h = (x.astype(jnp.float32) + r.astype(jnp.float32)).astype(r.dtype)
                return eqx.combine(params, static)(h).astype(x.dtype), h

            for variant, apply in (("fused", fused), ("unfused", unfused)):
                fwd = jax.jit(apply)

                @jax.jit
                def fwd_bwd(x, r, params, dy, dh, apply=apply):
                    out, vjp = jax.vjp(apply, x, r, params)
                    return out, vjp((dy, dh))

                key = (family, impl_name, variant)
                timers[(*key, "fwd")] = lambda f=fwd, p=params: jax.block_until_ready(f(x, r, p))
                timers[(*key, "fwd+bwd")] = lambda f=fwd_bwd, p=params: jax.block_until_ready(
                    f(x, r, p, dy, dh)
                )
    return timers


def transformer_timers(batch, seq, width, heads, blocks) -> tuple[dict, dict]:
    """``{(implementation, variant): timer}`` of one training step, and each one's loss."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import optax

    import eqx_norm

    class Block(eqx.Module):
        norm1: eqx_norm.LayerNorm
        norm2: eqx_norm.LayerNorm
        qkv: jax.Array
        proj: jax.Array
        up: jax.Array
        down: jax.Array
        heads: int = eqx.field(static=True)

        def attention(self, y):
            b, t, d = y.shape
            q, k, v = jnp.split(y @ self.qkv, 3, axis=-1)
            q, k, v = (a.reshape(b, t, self.heads, d // self.heads) for a in (q, k, v))
            return (
                jax.nn.dot_product_attention(q, k, v, is_causal=True).reshape(b, t, d) @ self.proj
            )

        def mlp(self, y):
            return jax.nn.gelu(y @ self.up) @ self.down

    class Model(eqx.Module):
        blocks: tuple
        final: eqx_norm.LayerNorm

        def plain(self, x):  # h = h + f(norm(h))
            h = x
            for block in self.blocks:
                h = h + block.attention(block.norm1(h))
                h = h + block.mlp(block.norm2(h))
            return self.final(h)

        def fused(self, x):  # y, h = norm(f(y), residual=h): each add inside the next norm
            h, branch = x, None
            for block in self.blocks:
                if branch is None:
                    y = block.norm1(h)
                else:
                    y, h = block.norm1(branch, residual=h)
                branch = block.attention(y)
                y, h = block.norm2(branch, residual=h)
                branch = block.mlp(y)
            y, _ = self.final(branch, residual=h)
            return y

    def make(implementation):
        keys = iter(jax.random.split(jax.random.key(0), 4 * blocks))

        def weight(shape):
            return jax.random.normal(next(keys), shape) / jnp.sqrt(shape[0])

        def norm():
            return eqx_norm.LayerNorm(width, implementation=implementation)

        return Model(
            tuple(
                Block(
                    norm(),
                    norm(),
                    weight((width, 3 * width)),
                    weight((width, width)),
                    weight((width, 4 * width)),
                    weight((4 * width, width)),
                    heads,
                )
                for _ in range(blocks)
            ),
            norm(),
        )

    x = jax.random.normal(jax.random.key(1), (batch, seq, width))
    target = jax.random.normal(jax.random.key(2), (batch, seq, width))
    optimizer = optax.adamw(1e-3)
    timers, losses = {}, {}
    for impl_name, implementation in IMPLEMENTATIONS.items():
        model = make(implementation)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        for variant in ("fused", "unfused"):
            method = "fused" if variant == "fused" else "plain"

            @eqx.filter_jit
            def step(model, opt_state, x, target, method=method):
                def loss_fn(model):
                    return jnp.mean((getattr(model, method)(x) - target) ** 2)

                loss, grads = eqx.filter_value_and_grad(loss_fn)(model)
                updates, opt_state = optimizer.update(
                    grads, opt_state, eqx.filter(model, eqx.is_array)
                )
                return eqx.apply_updates(model, updates), opt_state, loss

            losses[(impl_name, variant)] = float(step(model, opt_state, x, target)[2])
            timers[(impl_name, variant)] = lambda s=step, m=model, o=opt_state: (
                jax.block_until_ready(s(m, o, x, target))
            )
    return timers, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--default-allocator", action="store_true", help="glibc's default malloc")
    args = parser.parse_args()
    if not args.default_allocator and os.environ.get("GLIBC_TUNABLES") != FAULT_FREE:
        env = dict(os.environ, GLIBC_TUNABLES=FAULT_FREE)
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

    import jax
    import jax.numpy as jnp

    warmup, rounds = (1, 3) if args.quick else (3, args.rounds)
    cases = [
        ("(8192, 1024) float32", (8192, 1024), jnp.float32, jnp.float32),
        ("(64, 128, 768) bf16 + float32 residual", (64, 128, 768), jnp.bfloat16, jnp.float32),
    ]
    if args.quick:
        cases = [
            ("(256, 128) float32", (256, 128), jnp.float32, jnp.float32),
            ("(4, 16, 128) bf16 + float32 residual", (4, 16, 128), jnp.bfloat16, jnp.float32),
        ]
    allocator = "default" if args.default_allocator else f"fault-free (GLIBC_TUNABLES={FAULT_FREE})"
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, allocator: {allocator}")
    print(f"medians over {rounds} interleaved rounds, ms (interquartile range)\n")
    print("| case | norm | implementation | pass | fused | unfused | fused/unfused |")
    print("|---|---|---|---|---:|---:|---:|")
    for name, shape, x_dtype, r_dtype in cases:
        samples = interleaved(norm_timers(shape, x_dtype, r_dtype), warmup, rounds)
        for family in ("LayerNorm", "RMSNorm"):
            for impl in IMPLEMENTATIONS:
                for phase in PASSES:
                    fused = stats(samples[(family, impl, "fused", phase)])
                    unfused = stats(samples[(family, impl, "unfused", phase)])
                    print(
                        f"| {name} | {family} | {impl} | {phase} | {fused[0]:.3f} "
                        f"({fused[1]:.3f}-{fused[2]:.3f}) | {unfused[0]:.3f} "
                        f"({unfused[1]:.3f}-{unfused[2]:.3f}) | {fused[0] / unfused[0]:.2f} |"
                    )

    config = (2, 16, 64, 4, 2) if args.quick else (8, 128, 256, 4, 2)
    batch, seq, width, heads, blocks = config
    timers, losses = transformer_timers(*config)
    samples = interleaved(timers, warmup, rounds)
    print(
        f"\nOne adamw training step: {blocks} pre-norm blocks, (batch, seq, width) = "
        f"({batch}, {seq}, {width}), {heads} heads, float32\n"
    )
    print("| implementation | residual= | without | ratio | loss (residual=) | loss (without) |")
    print("|---|---:|---:|---:|---:|---:|")
    for impl in IMPLEMENTATIONS:
        fused, unfused = stats(samples[(impl, "fused")]), stats(samples[(impl, "unfused")])
        print(
            f"| {impl} | {fused[0]:.2f} ({fused[1]:.2f}-{fused[2]:.2f}) | {unfused[0]:.2f} "
            f"({unfused[1]:.2f}-{unfused[2]:.2f}) | {fused[0] / unfused[0]:.2f} | "
            f"{losses[(impl, 'fused')]:.6f} | {losses[(impl, 'unfused')]:.6f} |"
        )


if __name__ == "__main__":
    main()
