"""Time eqx_norm's normalization layers against equinox, flax.nnx, torch and plain jnp.

Usage::

    python benchmarks/run.py            # full run, a few minutes on 2 cores
    python benchmarks/run.py --quick    # small shapes, seconds: checks the harness works

The parent process runs one worker subprocess per allocator: glibc's default, and a
fault-free configuration (``GLIBC_TUNABLES``, see ``FAULT_FREE``) under which freed memory
is kept and reused instead of returned to the kernel, so XLA's fresh output buffers do not
page-fault on every call. Inside a worker everything runs in one process: after a warm-up
the implementations are interleaved round by round, and each reported time is the median
over rounds, with the interquartile range as spread. The harness only prints numbers: it
asserts nothing about speed.

Output: a Markdown report printed and written to ``benchmarks/results/results.md`` (or
``--out``), and the raw figures in ``results.json`` beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

FAULT_FREE = (
    "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736:glibc.malloc.arena_max=1"
)
ALLOCATORS = {"default": None, "fault-free": FAULT_FREE}
TORCH_THREADS = 2
ACCURACY_SHAPE = (512, 1024)
ACCURACY_MEAN = 1e4
BF16_ACCURACY_SHAPE = (8192, 768)


def _percentiles(samples: list[float]) -> dict[str, float]:
    import numpy as np

    p25, p50, p75 = np.percentile(np.asarray(samples) * 1e3, [25, 50, 75])
    return {"median_ms": float(p50), "p25_ms": float(p25), "p75_ms": float(p75)}


def _case_timers(case) -> tuple[dict, dict]:
    """Zero-argument timers for each (implementation, pass) of ``case``, and compile data."""
    import cases as cases_module
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    jax_impls, torch_impls = cases_module.implementations(case)
    key_x, key_dy = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, case.shape, jnp.float32).astype(case.dtype)
    dy = jax.random.normal(key_dy, case.shape, jnp.float32).astype(case.dtype)
    tdt = torch.bfloat16 if case.dtype == "bfloat16" else torch.float32
    xt = torch.from_numpy(np.array(x.astype(jnp.float32))).to(tdt)
    dyt = torch.from_numpy(np.array(dy.astype(jnp.float32))).to(tdt)

    timers, extra = {}, {}
    for impl in jax_impls:

        def forward_backward(x, params, dy, apply=impl.apply):
            y, vjp = jax.vjp(apply, x, params)
            return y, vjp(dy.astype(y.dtype))

        fb = jax.jit(forward_backward)
        start = time.perf_counter()
        compiled = fb.lower(x, impl.params, dy).compile()
        compile_s = time.perf_counter() - start
        memory = compiled.memory_analysis()
        fwd = jax.jit(impl.apply)
        timers[(impl.name, "fwd")] = lambda f=fwd, p=impl.params: jax.block_until_ready(f(x, p))
        timers[(impl.name, "fwd+bwd")] = lambda f=fb, p=impl.params: jax.block_until_ready(
            f(x, p, dy)
        )
        extra[impl.name] = {
            "temp_bytes": int(memory.temp_size_in_bytes),
            "compile_s": compile_s,
        }
    for impl in torch_impls:
        module = impl.module
        x_in, dy_in = (xt, dyt) if impl.prepare is None else map(impl.prepare, (xt, dyt))
        x_grad = x_in.clone().requires_grad_(True)

        def torch_fwd(module=module, x_in=x_in):
            with torch.no_grad():
                module(x_in)

        def torch_fb(module=module, x_grad=x_grad, dy_in=dy_in):
            x_grad.grad = None
            module.zero_grad(set_to_none=True)
            module(x_grad).backward(dy_in)

        timers[(impl.name, "fwd")] = torch_fwd
        timers[(impl.name, "fwd+bwd")] = torch_fb
        extra[impl.name] = {"temp_bytes": None, "compile_s": None}

    # Copy-bandwidth baselines at the same size: a jitted x + 1, and NumPy writing into
    # a preallocated buffer (uint16 stands in for bf16: same bytes, native loop).
    plus_one = jax.jit(lambda x: x + 1)
    np_dtype = np.uint16 if case.dtype == "bfloat16" else np.dtype(case.dtype)
    xn = np.ones(case.shape, np_dtype)
    buffer = np.empty_like(xn)
    one = np_dtype(1) if case.dtype == "bfloat16" else xn.dtype.type(1)
    timers[("copy: jit x+1", "copy")] = lambda: jax.block_until_ready(plus_one(x))
    timers[("copy: np.add(out=)", "copy")] = lambda: np.add(xn, one, out=buffer)

    return timers, extra


def _worker(quick: bool) -> dict:
    """Time every case and implementation in this process; returns the raw figures."""
    import cases as cases_module
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(TORCH_THREADS)
    warmup, rounds = (1, 3) if quick else (3, 25)
    results = []
    for case in cases_module.QUICK_CASES if quick else cases_module.FULL_CASES:
        timers, extra = _case_timers(case)
        samples: dict = {k: [] for k in timers}
        for _ in range(warmup):
            for fn in timers.values():
                fn()
        for _ in range(rounds):
            for k, fn in timers.items():
                start = time.perf_counter()
                fn()
                samples[k].append(time.perf_counter() - start)
        nbytes = int(np.prod(case.shape)) * jnp.dtype(case.dtype).itemsize
        timings = [
            {"impl": impl, "pass": phase, **_percentiles(s)} for (impl, phase), s in samples.items()
        ]
        results.append(
            {
                "case": case.name,
                "family": case.family,
                "shape": list(case.shape),
                "dtype": case.dtype,
                "input_bytes": nbytes,
                "timings": timings,
                "compiled": extra,
            }
        )
        print(f"  {case.name}: done", file=sys.stderr, flush=True)
    return {"cases": results, "accuracy": _accuracy(quick)}


def _accuracy(quick: bool) -> list[dict]:
    """Errors against float64: float32 at mean 1e4, and bf16 at mean 0 (torch's dgamma)."""
    import cases as cases_module
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    rows = []
    for dtype, shape, mean in (
        ("float32", (64, 128) if quick else ACCURACY_SHAPE, ACCURACY_MEAN),
        ("bfloat16", (64, 128) if quick else BF16_ACCURACY_SHAPE, 0.0),
    ):
        case = cases_module.Case("accuracy", "layer_norm", shape, 1, dtype)
        rng = np.random.default_rng(2)
        x = jnp.asarray(mean + rng.standard_normal(shape), jnp.float32).astype(dtype)
        dy = jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)
        jax_impls, torch_impls = cases_module.implementations(case)
        # float64 references from the values each library actually uses: x and dy after
        # rounding to dtype, and the parameters as each holds them (float32 for the JAX
        # layers, and torch's own, which are bf16-rounded in its bf16 module)
        x64 = np.asarray(x.astype(jnp.float32), np.float64)
        dy64 = np.asarray(dy.astype(jnp.float32), np.float64)

        float32_case = dataclasses.replace(case, dtype="float32")
        references = {
            impl.name: _reference(x64, dy64, impl.module, cases_module.EPSILON)
            for impl in torch_impls
        }
        float32_torch = cases_module.implementations(float32_case)[1][0].module
        jax_reference = _reference(x64, dy64, float32_torch, cases_module.EPSILON)
        references.update({impl.name: jax_reference for impl in jax_impls})
        outputs = {}
        for impl in jax_impls:
            y, vjp = jax.jit(lambda x, p, apply=impl.apply: jax.vjp(apply, x, p))(x, impl.params)
            dx, dparams = vjp(dy.astype(y.dtype))
            leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(dparams)]
            outputs[impl.name] = (y, dx, leaves)
        for impl in torch_impls:
            xt = torch.from_numpy(np.array(x.astype(jnp.float32))).to(
                torch.bfloat16 if dtype == "bfloat16" else torch.float32
            )
            xt.requires_grad_(True)
            y = impl.module(xt)
            y.backward(torch.from_numpy(np.array(dy.astype(jnp.float32))).to(xt.dtype))
            outputs[impl.name] = (
                y.detach().float().numpy(),
                xt.grad.float().numpy(),
                [
                    impl.module.weight.grad.double().numpy(),
                    impl.module.bias.grad.double().numpy(),
                ],
            )
            impl.module.zero_grad(set_to_none=True)
        for name, (y, dx, leaves) in outputs.items():
            reference = references[name]
            y = np.asarray(np.asarray(y, np.float32), np.float64)
            dx = np.asarray(np.asarray(dx, np.float32), np.float64)
            # gamma's gradient is the leaf correlated with sum(dy * x_hat), beta's the other
            dgamma, dbeta = _match_leaves(leaves, reference["dgamma"], reference["dbeta"])

            def rel(a, b):
                return float(np.max(np.abs(a.reshape(b.shape) - b)) / np.max(np.abs(b)))

            rows.append(
                {
                    "dtype": dtype,
                    "mean": mean,
                    "shape": list(shape),
                    "impl": name,
                    "y_abs": float(np.max(np.abs(y - reference["y"]))),
                    "dx_rel": rel(dx, reference["dx"]),
                    "dgamma_rel": rel(dgamma, reference["dgamma"]),
                    "dbeta_rel": rel(dbeta, reference["dbeta"]),
                }
            )
    return rows


def _reference(x64, dy64, module, epsilon: float) -> dict:
    """float64 LayerNorm output and gradients for cotangent ``dy64``, with module's params."""
    import numpy as np

    gamma = module.weight.detach().double().numpy()
    mu = x64.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x64 - mu) ** 2).mean(-1, keepdims=True) + epsilon)
    x_hat = (x64 - mu) * rstd
    v = dy64 * gamma
    return {
        "y": x_hat * gamma + module.bias.detach().double().numpy(),
        "dx": rstd * (v - v.mean(-1, keepdims=True) - x_hat * (v * x_hat).mean(-1, keepdims=True)),
        "dgamma": (dy64 * x_hat).sum(0),
        "dbeta": dy64.sum(0),
    }


def _match_leaves(leaves, dgamma, dbeta):
    """(dgamma, dbeta) among a parameter gradient's leaves, whatever the pytree order."""
    import numpy as np

    flat = [leaf.reshape(-1) for leaf in leaves]
    flat.sort(key=lambda leaf: np.max(np.abs(leaf - dbeta.reshape(-1))))
    return flat[1], flat[0]


def _run_worker(allocator: str, quick: bool, out: Path) -> dict:
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    if ALLOCATORS[allocator]:
        env["GLIBC_TUNABLES"] = ALLOCATORS[allocator]
    # torch's OpenMP threads spin while waiting by default; sharing 2 cores with XLA's own
    # threads (or any other load) that made a (256, 128) torch LayerNorm take ~40 ms
    # instead of 0.1 ms. Passive waiting gives torch its best figures here.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]
    )
    path = out / f"worker-{allocator}.json"
    command = [sys.executable, __file__, "--worker", "--json", str(path)]
    if quick:
        command.append("--quick")
    print(f"allocator {allocator}:", file=sys.stderr, flush=True)
    subprocess.run(command, env=env, check=True)
    return json.loads(path.read_text())


def _machine() -> dict:
    import jax
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    from eqx_norm.kernels import rows as _cpu_kernel

    reason = _cpu_kernel.unavailable_reason(jax.ShapeDtypeStruct((1, 1), "float32"))
    return {
        "kernel": "the compiled CPU kernel" if reason is None else f"XLA: {reason}",
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "torch_threads": TORCH_THREADS,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
    }


def _fmt(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _faster_torch(timings: dict, phase: str) -> tuple[str, float]:
    """``(name, median ms)`` of torch's faster row for ``phase`` (see ``cases.TORCH_NAMES``)."""
    import cases as cases_module

    rows = [
        (timings[(n, phase)]["median_ms"], n)
        for n in cases_module.TORCH_NAMES
        if (n, phase) in timings
    ]
    ms, name = min(rows)
    return name, ms


# where torch's faster row was not the case's own layout: the mark after its time
_LAYOUT_MARKS = {"torch NCHW": " NCHW", "torch channels_last": " CL"}


def markdown(report: dict) -> str:
    """The Markdown report: per allocator a summary and a full table, then accuracy."""
    import cases as cases_module

    m = report["machine"]
    lines = [
        "# eqx_norm benchmark",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores; jax {m['jax']}, torch {m['torch']} "
        f"({m['torch_threads']} threads, OMP_WAIT_POLICY={m['omp_wait_policy']}), "
        f"Python {m['python']}. Command: `{report['command']}`.",
        "Times are medians over interleaved rounds (spread: interquartile range). "
        "x torch and x best JAX peer are ratios of medians (< 1 is faster); torch is its "
        "faster layout: on channels-last cases torch also runs a contiguous NCHW copy "
        "(NCHW marks where that row was the faster), on channels-first 4-D cases its "
        "channels_last memory format (CL). GB/s counts "
        "the bytes a pass must move: x and y for fwd; x, dy, y and dx for fwd+bwd. "
        "copy frac = that rate over the copy rate (2 bytes moved per input byte) of a "
        "jitted `x + 1` and of `np.add(x, 1, out=buf)` at the same size. "
        f"eqx_norm runs the default implementation ({m['kernel']}); the xla path columns "
        'time `implementation="xla"`.',
        "",
    ]
    for allocator, data in report["allocators"].items():
        lines += [
            f"## Allocator: {allocator}"
            + (f" (`GLIBC_TUNABLES={FAULT_FREE}`)" if ALLOCATORS[allocator] else ""),
            "",
            "| case | pass | eqx_norm ms (IQR) | torch ms | x torch | xla path ms | "
            "xla x torch | best JAX peer | x best peer | GB/s | copy frac jit / np | "
            "temp MB (input MB) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for case in data["cases"]:
            t = {(r["impl"], r["pass"]): r for r in case["timings"]}
            copy_jit = t[("copy: jit x+1", "copy")]["median_ms"]
            copy_np = t[("copy: np.add(out=)", "copy")]["median_ms"]
            mb = case["input_bytes"] / 1e6
            for phase, moved in (("fwd", 2), ("fwd+bwd", 4)):
                ours = t[("eqx_norm", phase)]
                torch_name, torch_ms = _faster_torch(t, phase)
                peers = [
                    r
                    for (name, p), r in t.items()
                    if p == phase and name not in (*cases_module.OURS, *cases_module.TORCH_NAMES)
                ]
                xla = t.get((cases_module.XLA_NAME, phase))
                xla_cells = (
                    f"{xla['median_ms']:.2f} | {xla['median_ms'] / torch_ms:.2f}"
                    if xla
                    else "n/a | n/a"
                )
                best = min(peers, key=lambda r: r["median_ms"])
                gbs = moved * case["input_bytes"] / ours["median_ms"] / 1e6
                frac_jit = (moved / 2) * copy_jit / ours["median_ms"]
                frac_np = (moved / 2) * copy_np / ours["median_ms"]
                temp = case["compiled"]["eqx_norm"]["temp_bytes"] / 1e6
                lines.append(
                    f"| {case['case']} | {phase} | {ours['median_ms']:.2f} "
                    f"({ours['p25_ms']:.2f}-{ours['p75_ms']:.2f}) | {torch_ms:.2f}"
                    f"{_LAYOUT_MARKS.get(torch_name, '')} | "
                    f"{ours['median_ms'] / torch_ms:.2f} | {xla_cells} | {best['impl']} "
                    f"{best['median_ms']:.2f} | {ours['median_ms'] / best['median_ms']:.2f} | "
                    f"{gbs:.1f} | {frac_jit:.2f} / {frac_np:.2f} | "
                    + (f"{temp:.1f} ({mb:.1f})" if phase == "fwd+bwd" else "")
                    + " |"
                )
        lines += [
            "",
            "<details><summary>All implementations</summary>",
            "",
            "| case | impl | fwd ms (IQR) | fwd+bwd ms (IQR) | fwd+bwd x torch | temp MB | "
            "compile s |",
            "|---|---|---|---|---|---|---|",
        ]
        for case in data["cases"]:
            t = {(r["impl"], r["pass"]): r for r in case["timings"]}
            torch_fb = _faster_torch(t, "fwd+bwd")[1]
            for name, extra in case["compiled"].items():
                f, fb = t[(name, "fwd")], t[(name, "fwd+bwd")]
                temp = None if extra["temp_bytes"] is None else extra["temp_bytes"] / 1e6
                lines.append(
                    f"| {case['case']} | {name} | {f['median_ms']:.2f} ({f['p25_ms']:.2f}-"
                    f"{f['p75_ms']:.2f}) | {fb['median_ms']:.2f} ({fb['p25_ms']:.2f}-"
                    f"{fb['p75_ms']:.2f}) | {fb['median_ms'] / torch_fb:.2f} | "
                    f"{_fmt(temp, 1)} | {_fmt(extra['compile_s'])} |"
                )
            for name in ("copy: jit x+1", "copy: np.add(out=)"):
                c = t[(name, "copy")]
                lines.append(
                    f"| {case['case']} | {name} | {c['median_ms']:.2f} ({c['p25_ms']:.2f}-"
                    f"{c['p75_ms']:.2f}) | | | | |"
                )
        lines += ["", "</details>", ""]
    first = next(iter(report["allocators"].values()))
    lines += [
        "## Accuracy against float64",
        "",
        "LayerNorm, gamma = 1 + 0.1 N(0, 1), beta = 0.1 N(0, 1), dy = N(0, 1). y: max "
        "absolute error; gradients: max absolute error over max |reference|. The reference "
        "is computed from the inputs and parameters as each library holds them (torch's "
        "bf16 module holds bf16 parameters and returns bf16 parameter gradients; the JAX "
        "layers keep float32 parameters).",
        "",
        "| dtype | x mean | shape | impl | y abs err | dx rel | dgamma rel | dbeta rel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in first["accuracy"]:
        lines.append(
            f"| {r['dtype']} | {r['mean']:g} | {tuple(r['shape'])} | {r['impl']} | "
            f"{r['y_abs']:.2e} | {r['dx_rel']:.2e} | {r['dgamma_rel']:.2e} | "
            f"{r['dbeta_rel']:.2e} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes, few rounds")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="folder for results.json and results.md (default benchmarks/results)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        args.json.write_text(json.dumps(_worker(args.quick)))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = {
        "command": "python benchmarks/run.py" + (" --quick" if args.quick else ""),
        "quick": args.quick,
        "allocators": {name: _run_worker(name, args.quick, args.out) for name in ALLOCATORS},
    }
    report["machine"] = _machine()
    report["wall_s"] = time.perf_counter() - start
    for name in ALLOCATORS:
        (args.out / f"worker-{name}.json").unlink()
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (args.out / "results.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
