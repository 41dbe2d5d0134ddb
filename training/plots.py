"""Plots written as PNG files (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["save_curves", "save_histogram", "save_bars", "save_heatmaps"]


def save_curves(
    path: str | os.PathLike,
    panels: Sequence[Mapping],
    title: str = "",
) -> None:
    """One subplot per panel, at most `columns` (3) to a row.

    Each panel is {"ylabel": str, "xlabel": str, "series": {label: (x, y)}, "log": bool,
    "marker": a matplotlib marker for the points (default none)}.
    """
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 4 * rows), squeeze=False)
    for axis in axes.ravel()[len(panels):]:
        axis.set_visible(False)
    for axis, panel in zip(axes.ravel(), panels):
        for label, (xs, ys) in panel["series"].items():
            axis.plot(xs, ys, label=label, linewidth=1.2, marker=panel.get("marker"))
        axis.set_xlabel(panel.get("xlabel", "step"))
        axis.set_ylabel(panel["ylabel"])
        if panel.get("log"):
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_histogram(
    path: str | os.PathLike,
    samples: Mapping[str, Sequence[float]],
    xlabel: str,
    title: str = "",
    bins: int = 40,
    threshold: float | None = None,
) -> None:
    """Overlaid histograms, one per entry of `samples`, with an optional vertical threshold."""
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for label, values in samples.items():
        axis.hist(values, bins=bins, alpha=0.55, label=label)
    if threshold is not None:
        axis.axvline(threshold, color="k", linestyle="--", linewidth=1, label="threshold")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("runs")
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_bars(path: str | os.PathLike, values: Mapping[str, float], xlabel: str,
              title: str = "", log: bool = False, reference: float | None = 1.0) -> None:
    """Horizontal bars, one per entry, with an optional vertical reference line."""
    figure, axis = plt.subplots(figsize=(8, 0.35 * len(values) + 1.5))
    names = list(values)
    axis.barh(range(len(names)), [values[n] for n in names])
    axis.set_yticks(range(len(names)), names, fontsize=8)
    axis.invert_yaxis()
    if log:
        axis.set_xscale("log")
    if reference is not None:
        axis.axvline(reference, color="k", linestyle="--", linewidth=1)
    axis.set_xlabel(xlabel)
    if title:
        axis.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_heatmaps(path: str | os.PathLike, rows: Sequence[Sequence], row_labels: Sequence[str],
                  column_labels: Sequence[str], xlabel: str, ylabel: str,
                  title: str = "") -> None:
    """A grid of matrices shown as images, rows[i][j] in row i and column j, on one colour
    scale from 0 to the largest entry."""
    count_rows, count_columns = len(rows), max(len(row) for row in rows)
    figure, axes = plt.subplots(count_rows, count_columns, squeeze=False,
                                figsize=(2.8 * count_columns + 0.8, 2.8 * count_rows + 0.6))
    top = max(float(matrix.max()) for row in rows for matrix in row)
    for i, row in enumerate(rows):
        for j, axis in enumerate(axes[i]):
            if j >= len(row):
                axis.set_visible(False)
                continue
            image = axis.imshow(row[j], vmin=0, vmax=top, cmap="viridis")
            axis.set_title(f"{row_labels[i]}, {column_labels[j]}", fontsize=8)
            axis.set_xlabel(xlabel, fontsize=7)
            axis.set_ylabel(ylabel, fontsize=7)
            axis.tick_params(labelsize=6)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=110)
    plt.close(figure)
