"""The demo's figure: loss curves, first-step gradient norms, and the init-scale sweep."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._train import RunResult, default_init_scale

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_COLORS = {
    "none-default": "tab:red",
    "none-he": "tab:orange",
    "layer": "tab:blue",
    "rms": "tab:green",
}
_NAMES = {"none": "no norm", "layer": "LayerNorm", "rms": "RMSNorm"}


def _color(result: RunResult) -> str:
    config = result.config
    return _COLORS[f"none-{config.init}" if config.norm == "none" else config.norm]


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def _by_label(results: Sequence[RunResult]) -> dict[str, list[RunResult]]:
    groups: dict[str, list[RunResult]] = {}
    for result in results:
        groups.setdefault(result.config.label, []).append(result)
    return groups


def plot_results(
    results: Sequence[RunResult],
    path: str | Path | None = None,
    *,
    scale_runs: Sequence[RunResult] = (),
) -> Figure:
    """A figure of the runs: training loss, first-step gradient per layer, init-scale sweep.

    Left: training loss per step, a moving average (the mean over seeds when ``results``
    holds several seeds of a run). Middle: the Frobenius norm of each Linear weight's
    gradient at the first step (layer 1 is next to the input, the last is the output head),
    on a log scale: a curve that falls towards layer 1 is a gradient that vanishes on its
    way back. Right (when ``scale_runs`` is given): the test accuracy after training against
    the scale of the initial weights, in multiples of He init, with and without
    normalization (mean over seeds, bars from the lowest to the highest seed); the dotted
    line marks ``eqx.nn.Linear``'s default init.

    The figure is drawn on matplotlib's Agg canvas without touching pyplot's global state,
    so it works in scripts, tests and notebooks alike (a notebook displays the returned
    figure inline).

    Args:
        results: the runs to compare, e.g. ``[no_norm_default, no_norm_he, layer_norm]``.
        path: where to save a PNG; nothing is saved when None.
        scale_runs: runs with He init (``config.init == "he"``) at several
            ``config.init_scale``; other runs in it are ignored.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    scale_runs = [r for r in scale_runs if r.config.init == "he"]
    panels = 3 if scale_runs else 2
    fig = Figure(figsize=(4.6 * panels, 4.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels)
    loss_ax, grad_ax = axes[:2]
    for label, group in _by_label(results).items():
        color = _color(group[0])
        losses = np.mean([r.losses for r in group], axis=0)
        steps = np.arange(1, len(losses) + 1)
        window = max(1, len(steps) // 25)
        accuracy = np.mean([r.test_accuracy for r in group])
        loss_ax.plot(
            steps[window - 1 :],
            _moving_average(losses, window),
            color=color,
            label=f"{label} (test acc {accuracy:.3f})",
        )
        weights = np.exp(np.mean([np.log(r.grad_norms_first["weight"]) for r in group], axis=0))
        layers = np.arange(1, len(weights) + 1)
        grad_ax.semilogy(layers, weights, "o-", color=color, label=label, markersize=4)
    seeds = len(next(iter(_by_label(results).values())))
    over = f", mean of {seeds} seeds" if seeds > 1 else ""
    loss_ax.set(xlabel="step", ylabel="training loss (cross-entropy)", yscale="log")
    loss_ax.set_title(f"Training loss{over}")
    loss_ax.legend(fontsize="small")
    grad_ax.set(xlabel="layer (1 = next to the input, last = output head)", ylabel="gradient norm")
    grad_ax.set_title("Gradient of each Linear weight, first step")
    grad_ax.grid(True, which="major", alpha=0.3)
    grad_ax.legend(fontsize="small")
    if scale_runs:
        ax = axes[2]
        by_norm: dict[str, dict[float, list[float]]] = {}
        for r in scale_runs:
            by_norm.setdefault(r.config.norm, {}).setdefault(r.config.init_scale, []).append(
                r.test_accuracy
            )
        for norm, points in by_norm.items():
            scales = np.array(sorted(points))
            values = [np.array(points[s]) for s in scales]
            mean = np.array([v.mean() for v in values])
            low = mean - np.array([v.min() for v in values])
            high = np.array([v.max() for v in values]) - mean
            color = _COLORS["none-he" if norm == "none" else norm]
            ax.errorbar(
                scales, mean, yerr=(low, high), fmt="o-", color=color, capsize=3, label=_NAMES[norm]
            )
        default = default_init_scale(scale_runs[0].config.activation)
        ax.axvline(default, color="gray", linestyle=":")
        ax.annotate(
            f"default init\n({default:.2f}x He)",
            (default, 0.02),
            xycoords=("data", "axes fraction"),
            xytext=(4, 0),
            textcoords="offset points",
            fontsize="small",
            color="gray",
        )
        ax.set_xscale("log", base=2)
        ax.set(
            xlabel="initial weight scale (x He init)",
            ylabel=f"test accuracy after {scale_runs[0].config.steps} steps",
            ylim=(0, 1),
        )
        ax.set_title("Test accuracy against the init scale")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")
    if path is not None:
        fig.savefig(path)
    return fig
