"""The demo's figure: loss curves, first-step gradient norms, and the init-scale sweep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._train import NORMS, RunResult, default_init_scale


def plot_results(
    results: Sequence[RunResult],
    path: str | Path | None = None,
    *,
    scale_runs: Sequence[RunResult] = (),
):
    """The figure: training loss, first-step gradient per layer, init-scale sweep.

    Left: the training loss, a moving average (mean over the seeds of a run). Middle: the
    norm of each Linear weight's gradient at the first step, log scale (layer 1 next to the
    input): a curve falling towards layer 1 is a vanishing gradient. Right, given
    ``scale_runs`` (He init at several ``init_scale``): the final test accuracy against the
    initial weight scale, bars from the lowest to the highest seed; the dotted line is
    ``eqx.nn.Linear``'s default init. Drawn on matplotlib's Agg canvas, without pyplot.
    Saved as a PNG at ``path`` unless None; returns the ``matplotlib.figure.Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale_runs = [r for r in scale_runs if r.config.init == "he"]
    panels = 3 if scale_runs else 2
    fig = Figure(figsize=(4.6 * panels, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    groups: dict[str, list[RunResult]] = {}
    for r in results:
        groups.setdefault(r.config.label, []).append(r)
    colors: dict[str, str] = {}  # one colour per norm ("none" per init), the same in every panel
    for label, group in groups.items():
        c = group[0].config
        key = f"none-{c.init}" if c.norm == "none" else c.norm
        color = colors.setdefault(key, f"C{len(colors)}")
        losses = np.mean([r.losses for r in group], axis=0)
        window = max(1, len(losses) // 25)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        accuracy = np.mean([r.test_accuracy for r in group])
        axes[0].plot(
            np.arange(window, len(losses) + 1),
            smooth,
            color=color,
            label=f"{label} (test acc {accuracy:.3f})",
        )
        weights = np.exp(np.mean([np.log(r.grad_norms_first["weight"]) for r in group], axis=0))
        layers = np.arange(1, len(weights) + 1)
        axes[1].semilogy(layers, weights, "o-", color=color, label=label, markersize=4)
    seeds = len(next(iter(groups.values())))
    axes[0].set(
        xlabel="step",
        ylabel="training loss (cross-entropy)",
        yscale="log",
        title="Training loss" + (f", mean of {seeds} seeds" if seeds > 1 else ""),
    )
    axes[1].set(
        xlabel="layer (1 = next to the input, last = output head)",
        ylabel="gradient norm",
        title="Gradient of each Linear weight, first step",
    )
    axes[1].grid(True, which="major", alpha=0.3)
    if scale_runs:
        ax = axes[2]
        by_norm: dict[str, dict[float, list[float]]] = {}
        for r in scale_runs:
            points = by_norm.setdefault(r.config.norm, {})
            points.setdefault(r.config.init_scale, []).append(r.test_accuracy)
        for norm, points in by_norm.items():
            scales = sorted(points)
            values = [np.array(points[s]) for s in scales]
            mean = np.array([v.mean() for v in values])
            bars = (mean - [v.min() for v in values], [v.max() for v in values] - mean)
            name = "no norm" if norm == "none" else NORMS[norm].__name__
            color = colors.setdefault("none-he" if norm == "none" else norm, f"C{len(colors)}")
            ax.errorbar(scales, mean, yerr=bars, fmt="o-", color=color, capsize=3, label=name)
        default = default_init_scale(scale_runs[0].config.activation)
        ax.axvline(default, color="gray", linestyle=":")
        ax.annotate(
            f"default init\n({default:.2f}x He)",
            (default, 0.02),
            xytext=(4, 0),
            xycoords=("data", "axes fraction"),
            textcoords="offset points",
            fontsize="small",
            color="gray",
        )
        ax.set_xscale("log", base=2)
        ax.set(
            xlabel="initial weight scale (x He init)",
            ylim=(0, 1),
            ylabel=f"test accuracy after {scale_runs[0].config.steps} steps",
            title="Test accuracy against the init scale",
        )
        ax.grid(True, alpha=0.3)
    for ax in axes:
        ax.legend(fontsize="small", loc="lower right" if ax is axes[-1] and scale_runs else "best")
    if path is not None:
        fig.savefig(path)
    return fig
