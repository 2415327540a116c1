"""The demo's figure: loss curves and per-layer gradient norms of both runs."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ._train import RunResult

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_COLORS = {"no norm": "tab:red", "LayerNorm": "tab:blue"}


def _moving_average(values: np.ndarray, window: int) -> np.ndarray:
    window = max(1, min(window, len(values)))
    kernel = np.ones(window) / window
    return np.convolve(values, kernel, mode="valid")


def plot_results(results: Sequence[RunResult], path: str | Path | None = None) -> Figure:
    """A figure of the training loss and the per-layer gradient norms of each run.

    Left: training loss per step (faint) and its moving average. Middle and right: the
    Frobenius norm of the gradient of each Linear weight (layer 1 is next to the input, the
    last is the output head) at the first and at the last step, on a log scale, with the
    LayerNorm ``gamma`` and ``beta`` gradient norms where there are some.

    The figure is drawn on matplotlib's Agg canvas without touching pyplot's global state,
    so it works in scripts, tests and notebooks alike (a notebook displays the returned
    figure inline).

    Args:
        results: the runs to draw, e.g. ``[no_norm, layer_norm]``.
        path: where to save a PNG; nothing is saved when None.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, first_ax, last_ax = fig.subplots(1, 3)
    for result in results:
        label = result.config.label
        color = _COLORS.get(label)
        steps = np.arange(1, len(result.losses) + 1)
        window = max(1, len(steps) // 25)
        loss_ax.plot(steps, result.losses, color=color, alpha=0.25, linewidth=0.8)
        loss_ax.plot(
            steps[window - 1 :],
            _moving_average(result.losses, window),
            color=color,
            label=f"{label} (test acc {result.test_accuracy:.3f})",
        )
        for ax, norms in ((first_ax, result.grad_norms_first), (last_ax, result.grad_norms_last)):
            layers = np.arange(1, len(norms["weight"]) + 1)
            ax.semilogy(layers, norms["weight"], "o-", color=color, label=f"{label}: Linear weight")
            if "gamma" in norms:
                hidden = layers[:-1]
                ax.semilogy(hidden, norms["gamma"], "s--", color=color, alpha=0.6, markersize=4)
                ax.semilogy(hidden, norms["beta"], "^:", color=color, alpha=0.6, markersize=4)
    loss_ax.set(xlabel="step", ylabel="training loss (cross-entropy)", yscale="log")
    loss_ax.set_title("Training loss")
    loss_ax.legend()
    for ax, when in ((first_ax, "first step"), (last_ax, "last step")):
        ax.set(xlabel="layer (1 = next to the input, last = output head)", ylabel="gradient norm")
        ax.set_title(f"Per-layer gradient norm, {when}")
        ax.grid(True, which="major", alpha=0.3)
    handles, labels = first_ax.get_legend_handles_labels()
    if any("gamma" in r.grad_norms_first for r in results):
        from matplotlib.lines import Line2D

        handles += [
            Line2D([], [], color="gray", linestyle="--", marker="s", markersize=4),
            Line2D([], [], color="gray", linestyle=":", marker="^", markersize=4),
        ]
        labels += ["LayerNorm gamma", "LayerNorm beta"]
    first_ax.legend(handles, labels, fontsize="small")
    if path is not None:
        fig.savefig(path)
    return fig
