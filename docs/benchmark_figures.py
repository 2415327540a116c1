"""The Performance page's tables and figure, made from ``benchmarks/results/results.json``.

The tables are the harness's own report (``markdown`` in ``benchmarks/run.py``), so the
page and ``benchmarks/results/results.md`` cannot disagree; the figure is drawn here.

As an MkDocs hook (listed in mkdocs.yml) this runs at every build: the line
``<!-- benchmark report -->`` of performance.md becomes the figure and the report, and
``assets/benchmark.png`` is drawn into the site. After a new ``python benchmarks/run.py``,
rebuild the site and the page shows the new figures. As a script,
``python docs/benchmark_figures.py [OUT]`` writes ``benchmark.png`` and ``benchmark.md``
into OUT (default ``benchmark_figures/``) to look at without building the site.
"""

from __future__ import annotations

import importlib.util
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


def _harness():
    """benchmarks/run.py as a module (its imports of jax and torch happen inside functions)."""
    spec = importlib.util.spec_from_file_location("benchmark_run", ROOT / "benchmarks" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: Path = RESULTS) -> dict:
    return json.loads(Path(path).read_text())


def report_markdown(report: dict) -> str:
    """The harness's report without its title, its ``<details>`` readable as Markdown."""
    lines = _harness().markdown(report).splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    return "\n".join(lines).replace("<details>", '<details markdown="1">')


def quick_note(report: dict) -> str:
    """A warning to put first when the results are from a ``--quick`` run."""
    if not report.get("quick"):
        return ""
    return (
        "!!! warning\n    These figures come from a `--quick` run (small shapes, few rounds):"
        " they check that the harness works, and do not measure the layers at the sizes"
        " of real models. Run `python benchmarks/run.py` for those.\n\n"
    )


def _allocator(report: dict) -> tuple[str, dict]:
    name = (
        "fault-free" if "fault-free" in report["allocators"] else next(iter(report["allocators"]))
    )
    return name, report["allocators"][name]


def _minor_label(value: float, _) -> str:
    """Label the minor ticks at 2 and 5 times a power of ten, and no others."""
    return f"{value:g}" if f"{value:.0e}"[0] in "25" else ""


def figure_png(report: dict) -> bytes:
    """Per case and pass, each implementation's median time over torch's, on a log scale."""
    allocator, data = _allocator(report)
    cases = [case["case"] for case in data["cases"]]
    impls = list(  # every implementation timed in some case, in the order first met
        dict.fromkeys(n for c in data["cases"] for n in c["compiled"] if n != "torch")
    )
    fig = Figure(figsize=(9, 1.2 + 0.25 * len(cases) * len(impls)), layout="constrained")
    axes = fig.subplots(1, len(PASSES), sharey=True)
    height = 0.8 / len(impls)
    for ax, phase in zip(axes, PASSES):
        for k, impl in enumerate(impls):
            ratios = []
            for case in data["cases"]:
                t = {(r["impl"], r["pass"]): r["median_ms"] for r in case["timings"]}
                ratios.append(t.get((impl, phase), float("nan")) / t[("torch", phase)])
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
        ax.set_xlabel("median time / torch's (log scale; < 1 is faster than torch)")
        ax.set_title(phase)
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks(range(len(cases)), cases)
    axes[0].invert_yaxis()
    axes[-1].legend(loc="lower right", fontsize="small")
    m = report["machine"]
    fig.suptitle(
        f"{m['cpu']}, {m['cores']} cores, jax {m['jax']}, torch {m['torch']}; "
        f"allocator: {allocator}; `{report['command']}`",
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
