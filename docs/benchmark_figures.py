"""The Performance page's tables and figure, made from ``benchmarks/results/results.json``.

Only the measurements are read (each case's timings, scratch memory and the accuracy
rows), so the page follows whatever implementations and cases the harness timed, and
building the site needs neither torch nor the harness's code.

As an MkDocs hook (listed in mkdocs.yml) this runs at every build: the line
``<!-- benchmark report -->`` of performance.md becomes the figure and the tables, and
``assets/benchmark.png`` is drawn into the site. After a new ``python benchmarks/run.py``,
rebuild the site and the page shows the new figures. As a script,
``python docs/benchmark_figures.py [OUT]`` writes ``benchmark.png`` and ``benchmark.md``
into OUT (default ``benchmark_figures/``) to look at without building the site.
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "results.json"
MARKER = "<!-- benchmark report -->"
FIGURE = "assets/benchmark.png"
PASSES = ("fwd", "fwd+bwd")


def load(path: Path = RESULTS) -> dict:
    return json.loads(Path(path).read_text())


def _implementations(data: dict) -> list[str]:
    """Every implementation timed in some case, in the order first met (copies left out)."""
    names = (r["impl"] for case in data["cases"] for r in case["timings"])
    return [name for name in dict.fromkeys(names) if ":" not in name]


def _ours(names: list[str]) -> list[str]:
    """eqx_norm's rows: its default implementation first, then variants (the XLA path)."""
    return sorted((n for n in names if n.startswith("eqx_norm")), key=lambda n: n != "eqx_norm")


def _is_torch(name: str) -> bool:
    """torch's rows: its own layout, and its other one (``torch NCHW``, ``torch
    channels_last``), of which the faster is what a torch user would pick."""
    return name == "torch" or name.startswith("torch ")


def _faster_torch(timings: dict, phase: str) -> float | None:
    """The faster of torch's rows' median times for ``phase`` (None without torch)."""
    times = [r["median_ms"] for (n, p), r in timings.items() if p == phase and _is_torch(n)]
    return min(times) if times else None


def _timing_table(data: dict) -> list[str]:
    """Per case and pass: eqx_norm's time(s), torch's, the best JAX peer's, and the ratios."""
    names = _implementations(data)
    ours = _ours(names)
    lines = [
        "| case | pass | "
        + "".join(f"{name} ms (IQR) | " for name in ours)
        + "torch ms (faster layout) | best JAX peer ms | "
        + f"{ours[0]} / torch | {ours[0]} / best peer | temp MB (input MB) |",
        "|---|---|" + "---|" * (len(ours) + 5),
    ]
    for case in data["cases"]:
        t = {(r["impl"], r["pass"]): r for r in case["timings"]}
        for phase in PASSES:
            mine = [t.get((name, phase)) for name in ours]
            torch = _faster_torch(t, phase)
            peers = [
                t[(n, phase)]
                for n in names
                if n not in ours and not _is_torch(n) and (n, phase) in t
            ]
            best = min(peers, key=lambda r: r["median_ms"]) if peers else None
            head = mine[0]["median_ms"] if mine[0] else float("nan")
            temp = (case.get("compiled", {}).get(ours[0]) or {}).get("temp_bytes")
            cells = [
                case["case"],
                phase,
                *(
                    f"{r['median_ms']:.2f} ({r['p25_ms']:.2f}-{r['p75_ms']:.2f})" if r else ""
                    for r in mine
                ),
                f"{torch:.2f}" if torch else "",
                f"{best['impl']} {best['median_ms']:.2f}" if best else "",
                f"{head / torch:.2f}" if torch else "",
                f"{head / best['median_ms']:.2f}" if best else "",
                f"{temp / 1e6:.1f} ({case['input_bytes'] / 1e6:.1f})"
                if phase == "fwd+bwd" and temp is not None
                else "",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def report_markdown(report: dict) -> str:
    """The timing tables (one per allocator, the fault-free one first) and the accuracy table."""
    m = report["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; jax {m['jax']}, torch {m['torch']}; "
        f"command `{report['command']}`. Times are medians over interleaved rounds, with the "
        "interquartile range; ratios are of medians (< 1 is faster). Temp MB is the scratch "
        "memory XLA reserves for the jitted forward and backward pass. The harness's full "
        "report, with every implementation, is `benchmarks/results/results.md`.",
        "",
    ]
    allocators = sorted(report["allocators"], key=lambda name: name != "fault-free")
    for name in allocators:
        lines += [f"### Allocator: {name}", "", *_timing_table(report["allocators"][name]), ""]
    accuracy = report["allocators"][allocators[0]].get("accuracy", [])
    if accuracy:
        lines += [
            "### Accuracy against float64",
            "",
            "LayerNorm. y: the largest absolute error; gradients: the largest absolute error "
            "over the largest reference value.",
            "",
            "| dtype | x mean | shape | implementation | y | dx | dgamma | dbeta |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in accuracy:
            errors = " | ".join(
                f"{r[k]:.2e}" for k in ("y_abs", "dx_rel", "dgamma_rel", "dbeta_rel")
            )
            lines.append(
                f"| {r['dtype']} | {r['mean']:g} | {tuple(r['shape'])} | {r['impl']} | {errors} |"
            )
    return "\n".join(lines) + "\n"


def quick_note(report: dict) -> str:
    """A warning to put first when the results are from a ``--quick`` run."""
    if not report.get("quick"):
        return ""
    return (
        "!!! warning\n    These figures come from a `--quick` run (small shapes, few rounds):"
        " they check that the harness works, and do not measure the layers at the sizes"
        " of real models. Run `python benchmarks/run.py` for those.\n\n"
    )


def _minor_label(value: float, _) -> str:
    """Label the minor ticks at 2 and 5 times a power of ten, and no others."""
    return f"{value:g}" if f"{value:.0e}"[0] in "25" else ""


def figure_png(report: dict) -> bytes:
    """Per case and pass, each implementation's median time over torch's, on a log scale."""
    allocator = "fault-free" if "fault-free" in report["allocators"] else None
    allocator = allocator or next(iter(report["allocators"]))
    data = report["allocators"][allocator]
    cases = [case["case"] for case in data["cases"]]
    impls = [name for name in _implementations(data) if not _is_torch(name)]
    fig = Figure(figsize=(9, 1.2 + 0.25 * len(cases) * len(impls)), layout="constrained")
    axes = fig.subplots(1, len(PASSES), sharey=True)
    height = 0.8 / len(impls)
    for ax, phase in zip(axes, PASSES):
        for k, impl in enumerate(impls):
            ratios = []
            for case in data["cases"]:
                t = {(r["impl"], r["pass"]): r for r in case["timings"]}
                mine = t.get((impl, phase), {"median_ms": float("nan")})["median_ms"]
                ratios.append(mine / _faster_torch(t, phase))
            ax.barh(
                [i + (k - (len(impls) - 1) / 2) * height for i in range(len(cases))],
                ratios,
                height=height,
                label=impl,
                color=f"C{k}",
                edgecolor="black" if impl.startswith("eqx_norm") else "none",
            )
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(FuncFormatter(_minor_label))
        ax.set_xlabel("median time / torch's, its faster layout (< 1: faster)")
        ax.set_title(phase)
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(range(len(cases)), cases)
    axes[0].invert_yaxis()
    axes[-1].legend(loc="lower right", fontsize="small")
    m = report["machine"]
    fig.suptitle(
        f"{m['cpu']}, {m['cores']} cores, jax {m['jax']}, torch {m['torch']}; "
        f"allocator: {allocator}; `{report['command']}`; log scale",
        fontsize="medium",
    )
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    return buffer.getvalue()


# MkDocs hooks


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, FIGURE, content=figure_png(load())))
    return files


def on_page_markdown(markdown, page, **kwargs):
    if MARKER not in markdown:
        return markdown
    report = load()
    figure = f"![Each implementation's median time over torch's, per case and pass]({FIGURE})"
    return markdown.replace(MARKER, f"{quick_note(report)}{figure}\n\n{report_markdown(report)}")


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmark_figures")
    out.mkdir(parents=True, exist_ok=True)
    report = load()
    (out / "benchmark.png").write_bytes(figure_png(report))
    (out / "benchmark.md").write_text(quick_note(report) + report_markdown(report))
    print(f"wrote {out / 'benchmark.png'} and {out / 'benchmark.md'}")
