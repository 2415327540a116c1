"""Time conditional normalization in three real blocks: eqx_norm's fused calls against the
same blocks written out with eqx_norm's plain layers and with equinox's layers.

Usage::

    python benchmarks/conditional_blocks.py           # the issue's sizes, fault-free allocator
    python benchmarks/conditional_blocks.py --quick   # tiny sizes, few rounds: checks the script
    python benchmarks/conditional_blocks.py --blocks dit resblock --rounds 40
    python benchmarks/conditional_blocks.py --default-allocator   # glibc's default malloc

Blocks (float32; one step = ``jax.value_and_grad`` of ``mean(block(...) ** 2)`` with
respect to the block's parameters and its inputs, jitted):

* ``dit``: a DiT block with adaLN-Zero, hidden 384, 6 heads, x ``(8, 256, 384)``, the
  conditioning c ``(8, 384)``: ``Linear(silu(c))`` gives six ``(8, 1, 384)`` vectors, the
  shift, scale and gate of the attention and of the MLP, around two LayerNorms without an
  affine of their own.
* ``resblock``: guided diffusion's ResBlock with ``use_scale_shift_norm``, channels-last
  ``(8, 32, 32, 128)``, a time embedding of 512: GroupNorm(32) + SiLU + 3x3 conv, then
  GroupNorm(32) modulated by the embedding's ``(8, 1, 1, 128)`` scale and shift + SiLU +
  3x3 conv, and the residual.
* ``mamba2``: the output of a Mamba-2 block, ``y`` and the gate ``z`` ``(8, 512, 768)``:
  the gated RMSNorm ``rmsnorm(y * silu(z)) * gamma`` then the output projection
  768 -> 768; ``mamba2-groups``: the same with ``ngroups = 8`` (``group_size = 96``).

Rows per block, interleaved round by round in one process:

* ``fused``: eqx_norm's fused calls, ``norm(x, scale=s, shift=t)``,
  ``GroupNorm(..., activation="silu")`` and ``GatedRMSNorm(d, group_size=...)(y, gate=z)``;
* ``unfused``: eqx_norm's layers without those arguments, and the write-out in jnp:
  ``norm(x) * (1 + s) + t``, ``jax.nn.silu(norm(x))``, ``rmsnorm(y * jax.nn.silu(z))``;
* ``equinox``: ``eqx.nn.LayerNorm``/``GroupNorm``/``RMSNorm`` with the same write-out,
  vmapped over the examples (and tokens) as equinox's one-example layers are used; the
  channels-first ``eqx.nn.GroupNorm`` sees each example moved to ``(C, H, W)`` and back.

The eqx_norm rows run on the compiled kernel (``implementation="kernel"``, where it serves)
and on the portable path (``"xla"``). The adaLN and AdaGN ``Linear`` layers are random,
not zero as adaLN-Zero starts: at zero every row would compute the identity and a wrong
write-out would go unseen; the rows of a block compute the same loss (printed).

Then the micro section: the norm alone, ``fwd`` (jitted call) and ``fwd+bwd`` (jitted
``vjp`` with respect to x, the modulation and the parameters), fused against unfused, for
the LayerNorm modulation ``(8, 256, 384)``, GroupNorm(32) + SiLU and GroupNorm(32)
modulated + SiLU ``(8, 32, 32, 128)`` channels-last, on both implementations.

As ``benchmarks/residual.py``, the script re-runs itself under the fault-free allocator of
``benchmarks/run.py`` (``GLIBC_TUNABLES``); after a warm-up each time is the median over
rounds with the interquartile range, and a ratio is one of medians (< 1: fused is faster).
It prints Markdown tables and writes them to ``conditional_blocks.md`` beside the raw
figures in ``conditional_blocks.json`` in ``--out`` (default ``benchmarks/results``). It
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from residual import FAULT_FREE, PASSES, interleaved, stats

BLOCKS = ("dit", "resblock", "mamba2", "mamba2-groups")
VARIANTS = ("fused", "unfused", "equinox")
EPSILON = 1e-6  # DiT's LayerNorm; GroupNorm and the gated RMSNorm use 1e-5


def implementations() -> tuple[dict, str | None]:
    """``{label: implementation}`` of the eqx_norm rows, and why the kernel is left out."""
    import jax

    from eqx_norm.kernels import groups, rows

    probe = jax.ShapeDtypeStruct((1, 1), "float32")
    reason = rows.unavailable_reason(probe) or groups.unavailable_reason(
        jax.ShapeDtypeStruct((1, 1, 1), "float32")
    )
    if reason is None:
        return {"kernel": "kernel", "xla": "xla"}, None
    return {"xla": "xla"}, reason


# ----------------------------------------------------------------------------------------
# The three ways of writing a conditional norm: one helper per form, shared by the blocks


def _per_example(norm, x):
    """An ``eqx.nn`` layer of one example applied to a batch, as equinox's users write it:
    GroupNorm (channels first) on each ``(C, H, W)``, the others on each token."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    if isinstance(norm, eqx.nn.GroupNorm):
        return jnp.moveaxis(jax.vmap(norm)(jnp.moveaxis(x, -1, 1)), 1, -1)
    apply = norm
    for _ in range(x.ndim - 1):
        apply = jax.vmap(apply)
    return apply(x)


def modulated(variant: str, norm, x, scale, shift, silu: bool = False):
    """``norm(x) * (1 + scale) + shift``, then SiLU if ``silu``, written as ``variant``; a
    fused GroupNorm was built with ``activation="silu"`` where ``silu`` is asked."""
    import jax

    if variant == "fused":
        return norm(x, scale=scale, shift=shift)
    y = norm(x) if variant == "unfused" else _per_example(norm, x)
    y = y * (1 + scale) + shift
    return jax.nn.silu(y) if silu else y


def norm_silu(variant: str, norm, x):
    """``silu(norm(x))``, written as ``variant`` (the fused norm has ``activation="silu"``)."""
    import jax

    if variant == "fused":
        return norm(x)
    return jax.nn.silu(norm(x) if variant == "unfused" else _per_example(norm, x))


def _weight(key, shape, fan_in: int | None = None):
    import jax

    return jax.random.normal(key, shape) / (fan_in or shape[0]) ** 0.5


# ----------------------------------------------------------------------------------------
# The blocks: ``(module, inputs)``, the module's call taking ``*inputs``


def dit(variant: str, implementation, quick: bool):
    """A DiT block with adaLN-Zero (random modulation, see the module docstring)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_norm

    hidden, heads, batch, tokens = (64, 2, 2, 16) if quick else (384, 6, 8, 256)

    def norm():
        if variant == "equinox":
            return eqx.nn.LayerNorm(hidden, eps=EPSILON, use_weight=False, use_bias=False)
        return eqx_norm.LayerNorm(
            hidden, EPSILON, elementwise_affine=False, implementation=implementation
        )

    class DiTBlock(eqx.Module):
        norm1: eqx.Module
        norm2: eqx.Module
        qkv: jax.Array
        proj: jax.Array
        up: jax.Array
        down: jax.Array
        ada: jax.Array
        ada_bias: jax.Array

        def __call__(self, x, c):
            b, t, d = x.shape
            m = (jax.nn.silu(c) @ self.ada + self.ada_bias[None])[:, None, :]  # (B, 1, 6D)
            shift1, scale1, gate1, shift2, scale2, gate2 = jnp.split(m, 6, axis=-1)
            h = modulated(variant, self.norm1, x, scale1, shift1)
            q, k, v = jnp.split(h @ self.qkv, 3, axis=-1)
            q, k, v = (a.reshape(b, t, heads, d // heads) for a in (q, k, v))
            attention = jax.nn.dot_product_attention(q, k, v).reshape(b, t, d) @ self.proj
            x = x + gate1 * attention
            h = modulated(variant, self.norm2, x, scale2, shift2)
            return x + gate2 * (jax.nn.gelu(h @ self.up, approximate=True) @ self.down)

    keys = jax.random.split(jax.random.key(0), 7)
    block = DiTBlock(
        norm(),
        norm(),
        _weight(keys[0], (hidden, 3 * hidden)),
        _weight(keys[1], (hidden, hidden)),
        _weight(keys[2], (hidden, 4 * hidden)),
        _weight(keys[3], (4 * hidden, hidden)),
        0.1 * _weight(keys[4], (hidden, 6 * hidden)),
        jnp.zeros(6 * hidden),
    )
    x = jax.random.normal(keys[5], (batch, tokens, hidden))
    c = jax.random.normal(keys[6], (batch, hidden))
    return block, (x, c), f"x {x.shape}, c {c.shape}, {heads} heads"


def _conv(x, w):
    import jax

    return jax.lax.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def resblock(variant: str, implementation, quick: bool):
    """Guided diffusion's ResBlock with the time embedding's scale-shift GroupNorm."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_norm

    channels, size, batch, embedding = (32, 8, 2, 64) if quick else (128, 32, 8, 512)

    def norm():
        if variant == "equinox":
            return eqx.nn.GroupNorm(32, channels, eps=1e-5)
        extra = {"activation": "silu"} if variant == "fused" else {}
        return eqx_norm.GroupNorm(32, channels, implementation=implementation, **extra)

    class ResBlock(eqx.Module):
        norm1: eqx.Module
        conv1: jax.Array
        emb: jax.Array
        emb_bias: jax.Array
        norm2: eqx.Module
        conv2: jax.Array

        def __call__(self, x, t_emb):
            h = _conv(norm_silu(variant, self.norm1, x), self.conv1)
            st = jax.nn.silu(t_emb) @ self.emb + self.emb_bias[None]  # (N, 2C)
            scale, shift = (a[:, None, None, :] for a in jnp.split(st, 2, axis=-1))
            h = modulated(variant, self.norm2, h, scale, shift, silu=True)
            return x + _conv(h, self.conv2)

    keys = jax.random.split(jax.random.key(0), 5)
    block = ResBlock(
        norm(),
        _weight(keys[0], (3, 3, channels, channels), 9 * channels),
        0.1 * _weight(keys[1], (embedding, 2 * channels)),
        jnp.zeros(2 * channels),
        norm(),
        _weight(keys[2], (3, 3, channels, channels), 9 * channels),
    )
    x = jax.random.normal(keys[3], (batch, size, size, channels))
    t_emb = jax.random.normal(keys[4], (batch, embedding))
    return block, (x, t_emb), f"x {x.shape} channels-last, t_emb {t_emb.shape}, 32 groups"


def mamba2(variant: str, implementation, quick: bool, ngroups: int = 1):
    """A Mamba-2 block's end: the gated RMSNorm (gate first) and the output projection."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    import eqx_norm

    d, length, batch = (128, 16, 2) if quick else (768, 512, 8)
    group = d // ngroups
    grouped = ngroups > 1

    if variant == "fused":
        norm = eqx_norm.GatedRMSNorm(
            d, group_size=group if grouped else None, implementation=implementation
        )
    elif variant == "unfused":  # grouped: a norm of `group` features, then gamma
        norm = eqx_norm.RMSNorm(group, 1e-5, use_scale=not grouped, implementation=implementation)
    else:
        norm = eqx.nn.RMSNorm(group, eps=1e-5, use_weight=not grouped, use_bias=False)

    class GatedOutput(eqx.Module):
        norm: eqx.Module
        gamma: jax.Array | None  # the written-out grouped norm's scale
        out: jax.Array

        def __call__(self, y, z):
            if variant == "fused":
                return self.norm(y, gate=z) @ self.out
            u = y * jax.nn.silu(z)
            u = u.reshape(*u.shape[:-1], ngroups, group) if grouped else u
            u = self.norm(u) if variant == "unfused" else _per_example(self.norm, u)
            if grouped:
                u = u.reshape(y.shape) * self.gamma[None, None]
            return u @ self.out

    keys = jax.random.split(jax.random.key(0), 3)
    gamma = jnp.ones(d) if grouped and variant != "fused" else None
    block = GatedOutput(norm, gamma, _weight(keys[0], (d, d)))
    y = jax.random.normal(keys[1], (batch, length, d))
    z = jax.random.normal(keys[2], (batch, length, d))
    return block, (y, z), f"y, z {y.shape}, ngroups {ngroups}, out {d} -> {d}"


def build(name: str, variant: str, implementation, quick: bool):
    if name == "dit":
        return dit(variant, implementation, quick)
    if name == "resblock":
        return resblock(variant, implementation, quick)
    return mamba2(variant, implementation, quick, ngroups=8 if name == "mamba2-groups" else 1)


def step_timer(block, inputs):
    """A zero-argument timer of the jitted step, and the step's loss."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    params, static = eqx.partition(block, eqx.is_inexact_array)

    def loss(params, *inputs):
        return jnp.mean(eqx.combine(params, static)(*inputs) ** 2)

    step = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(1 + len(inputs)))))
    value = float(step(params, *inputs)[0])
    return (lambda: jax.block_until_ready(step(params, *inputs))), value


def block_rows(name: str, impls: dict, quick: bool) -> tuple[dict, dict, str]:
    """``{row label: timer}``, ``{row label: loss}`` and the case's description."""
    rows = {}
    for label, implementation in impls.items():
        for variant in ("fused", "unfused"):
            rows[f"{variant} ({label})"] = build(name, variant, implementation, quick)
    rows["equinox"] = build(name, "equinox", None, quick)
    timers, losses = {}, {}
    for label, (block, inputs, _) in rows.items():
        timers[label], losses[label] = step_timer(block, inputs)
    return timers, losses, rows["equinox"][2]


# ----------------------------------------------------------------------------------------
# The micro section: the norm alone


def micro_timers(impls: dict, quick: bool) -> tuple[dict, dict]:
    """``{(case, implementation, variant, pass): timer}``, and each case's shape."""
    import jax

    import eqx_norm

    tokens = (2, 16, 64) if quick else (8, 256, 384)
    images = (2, 8, 8, 32) if quick else (8, 32, 32, 128)
    keys = jax.random.split(jax.random.key(0), 8)
    cases = {
        "LayerNorm modulation": (tokens, (tokens[0], 1, tokens[-1])),
        "GroupNorm(32) + SiLU": (images, None),
        "GroupNorm(32) modulation + SiLU": (images, (images[0], 1, 1, images[-1])),
    }
    timers, shapes = {}, {}
    for case, (shape, modulation) in cases.items():
        shapes[case] = shape
        x = jax.random.normal(keys[0], shape)
        dy = jax.random.normal(keys[1], shape)
        m = (
            ()
            if modulation is None
            else tuple(0.5 * jax.random.normal(k, modulation) for k in keys[2:4])
        )
        for label, implementation in impls.items():
            for variant in ("fused", "unfused"):
                if case.startswith("LayerNorm"):
                    norm = eqx_norm.LayerNorm(
                        shape[-1], EPSILON, elementwise_affine=False, implementation=implementation
                    )
                else:
                    extra = {"activation": "silu"} if variant == "fused" else {}
                    norm = eqx_norm.GroupNorm(32, shape[-1], implementation=implementation, **extra)

                def apply(x, norm, *m, case=case, variant=variant):
                    if not m:
                        return norm_silu(variant, norm, x)
                    return modulated(variant, norm, x, *m, silu=case.startswith("GroupNorm"))

                fwd = jax.jit(apply)

                @jax.jit
                def fwd_bwd(x, norm, dy, *m, apply=apply):
                    y, vjp = jax.vjp(apply, x, norm, *m)
                    return y, vjp(dy)

                key = (case, label, variant)
                timers[(*key, "fwd")] = lambda f=fwd, n=norm, m=m, x=x: jax.block_until_ready(
                    f(x, n, *m)
                )
                timers[(*key, "fwd+bwd")] = lambda f=fwd_bwd, n=norm, m=m, x=x, dy=dy: (
                    jax.block_until_ready(f(x, n, dy, *m))
                )
    return timers, shapes


# ----------------------------------------------------------------------------------------
# The report


def _ms(figures: dict) -> str:
    return f"{figures['median_ms']:.2f} ({figures['p25_ms']:.2f}-{figures['p75_ms']:.2f})"


def _figures(seconds: list[float]) -> dict:
    median, p25, p75 = stats(seconds)
    return {"median_ms": median, "p25_ms": p25, "p75_ms": p75}


def machine(kernel_reason: str | None) -> dict:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kernel = "the compiled CPU kernel" if kernel_reason is None else f"XLA: {kernel_reason}"
    return {
        "kernel": kernel,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "platform": jax.devices()[0].platform,
        "python": platform.python_version(),
        "jax": jax.__version__,
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Conditional normalization in real blocks",
        "",
        f"{m['cpu']} ({m['cores']} cores, {m['platform']}), jax {m['jax']}, eqx_norm's "
        f"kernel rows: {m['kernel']}; allocator: {report['allocator']}. Medians over "
        f"{report['rounds']} interleaved rounds, ms (interquartile range); a ratio is of "
        "medians, < 1: fused is faster.",
        "",
        "## One training step (value_and_grad of mean(block ** 2), parameters and inputs)",
        "",
    ]
    for block in report["blocks"]:
        lines += [
            f"### {block['block']}: {block['case']}",
            "",
            "| row | step ms (IQR) | loss |",
            "|---|---:|---:|",
        ]
        for row in block["rows"]:
            lines.append(f"| {row['row']} | {_ms(row)} | {row['loss']:.6f} |")
        lines.append("")
        lines.append(f"- largest relative loss difference between rows: {block['loss_spread']:.1e}")
        for label, ratio in block["ratios"].items():
            lines.append(f"- {label}: **{ratio:.2f}**")
        lines.append("")
    lines += [
        "## The norm alone",
        "",
        "| case | implementation | pass | fused | unfused | fused/unfused |",
        "|---|---|---|---:|---:|---:|",
    ]
    for row in report["micro"]:
        lines.append(
            f"| {row['case']} {tuple(row['shape'])} | {row['implementation']} | {row['pass']} | "
            f"{_ms(row['fused'])} | {_ms(row['unfused'])} | {row['ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few rounds")
    parser.add_argument("--blocks", nargs="+", choices=BLOCKS, default=list(BLOCKS))
    parser.add_argument("--no-micro", action="store_true", help="skip the norm-alone section")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="folder for conditional_blocks.json and .md (default benchmarks/results)",
    )
    parser.add_argument("--default-allocator", action="store_true", help="glibc's default malloc")
    args = parser.parse_args()
    if not args.default_allocator and os.environ.get("GLIBC_TUNABLES") != FAULT_FREE:
        env = dict(os.environ, GLIBC_TUNABLES=FAULT_FREE)
        sys.exit(subprocess.call([sys.executable, *sys.argv], env=env))

    import jax

    warmup, rounds = (1, 3) if args.quick else (3, args.rounds)
    impls, reason = implementations()
    report = {
        "machine": machine(reason),
        "allocator": "default" if args.default_allocator else f"fault-free ({FAULT_FREE})",
        "rounds": rounds,
        "quick": args.quick,
        "blocks": [],
        "micro": [],
    }
    print(f"jax {jax.__version__}, {jax.devices()[0].platform}, kernel rows: {list(impls)}")
    for name in args.blocks:
        timers, losses, described = block_rows(name, impls, args.quick)
        samples = interleaved(timers, warmup, rounds)
        rows = []
        for label, seconds in samples.items():
            implementation = label.partition("(")[2].rstrip(")") or None
            rows.append(
                {"row": label, "implementation": implementation, "loss": losses[label]}
                | _figures(seconds)
            )
        medians = {row["row"]: row["median_ms"] for row in rows}
        ratios = {}
        for impl in impls:
            fused = medians[f"fused ({impl})"]
            ratios[f"fused/unfused ({impl})"] = fused / medians[f"unfused ({impl})"]
            ratios[f"fused/equinox ({impl})"] = fused / medians["equinox"]
        values = list(losses.values())
        spread = (max(values) - min(values)) / max(abs(v) for v in values)
        report["blocks"].append(
            {
                "block": name,
                "case": described,
                "rows": rows,
                "ratios": ratios,
                "loss_spread": spread,
            }
        )
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)

    if not args.no_micro:
        timers, shapes = micro_timers(impls, args.quick)
        samples = interleaved(timers, warmup, rounds)
        for case, shape in shapes.items():
            for impl in impls:
                for phase in PASSES:
                    fused = _figures(samples[(case, impl, "fused", phase)])
                    unfused = _figures(samples[(case, impl, "unfused", phase)])
                    report["micro"].append(
                        {
                            "case": case,
                            "shape": list(shape),
                            "implementation": impl,
                            "pass": phase,
                            "fused": fused,
                            "unfused": unfused,
                            "ratio": fused["median_ms"] / unfused["median_ms"],
                        }
                    )

    text = markdown(report)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "conditional_blocks.json").write_text(json.dumps(report, indent=1))
    (args.out / "conditional_blocks.md").write_text(text)
    print(f"wrote {args.out / 'conditional_blocks.md'} and conditional_blocks.json")


if __name__ == "__main__":
    main()
