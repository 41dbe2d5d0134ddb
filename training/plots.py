"""Plots written as PNG files (matplotlib's Agg backend: no display needed)."""
from __future__ import annotations

import itertools
import math
import os
from typing import Mapping, Sequence

import jax
import matplotlib
import matplotlib.ticker
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nets.layers import layer_outputs  # noqa: E402

__all__ = ["save_curves", "save_histogram", "save_bars", "save_heatmaps", "save_scatter",
           "save_strips", "save_grouped_bars", "save_images",
           "save_misclassified", "save_kernels", "save_classifier_pictures",
           "save_feature_maps", "activation_maps", "save_spreads"]


def _grid(count: int, width: float, height: float, columns: int = 3):
    """A figure with `count` visible subplots, at most `columns` to a row."""
    columns = min(columns, count)
    rows = -(-count // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows),
                                squeeze=False)
    for axis in axes.ravel()[count:]:
        axis.set_visible(False)
    return figure, axes.ravel()[:count]


def _finish(figure, path: str | os.PathLike, title: str, outside_legend: bool = False) -> None:
    """The title over all subplots, a tight layout, the PNG written (grown to hold a legend
    placed outside the axes), the figure closed."""
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=110, bbox_inches="tight" if outside_legend else None)
    plt.close(figure)


def save_curves(
    path: str | os.PathLike,
    panels: Sequence[Mapping],
    title: str = "",
) -> None:
    """One subplot per panel, at most `columns` (3) to a row.

    Each panel is {"ylabel": str, "xlabel": str, "series": {label: (x, y)}, "log": bool,
    "marker": a matplotlib marker for the points (default none)}.
    """
    figure, axes = _grid(len(panels), 5.5, 4)
    for axis, panel in zip(axes, panels):
        for label, (xs, ys) in panel["series"].items():
            axis.plot(xs, ys, label=label, linewidth=1.2, marker=panel.get("marker"))
        axis.set_xlabel(panel.get("xlabel", "step"))
        axis.set_ylabel(panel["ylabel"])
        if panel.get("log"):
            axis.set_yscale("log")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    _finish(figure, path, title)


def save_histogram(
    path: str | os.PathLike,
    samples: Mapping[str, Sequence[float]],
    xlabel: str,
    title: str = "",
    bins: int = 30,
    threshold: float | None = None,
) -> None:
    """Histograms of the series in `samples` over one set of bin edges, each bin's bars side by
    side (overlaid, two identical distributions would hide each other), with an optional
    vertical threshold."""
    values = [np.asarray(v, np.float64) for v in samples.values()]
    if not values or any(v.ndim != 1 or v.size == 0 for v in values):
        raise ValueError("save_histogram: samples must map each label to a non-empty 1-d "
                         f"sequence, got sizes {[v.shape for v in values]}")
    edges = np.histogram_bin_edges(np.concatenate(values), bins=bins)
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.hist(values, bins=edges, label=list(samples))
    if threshold is not None:
        axis.axvline(threshold, color="k", linestyle="--", linewidth=1, label="threshold")
    axis.set_xlabel(xlabel)
    axis.set_ylabel("runs")
    axis.legend(fontsize=8)
    if title:
        axis.set_title(title, fontsize=10)
    _finish(figure, path, "")


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
    scale from 0 (or the smallest entry, if negative) to the largest entry."""
    count_rows, count_columns = len(rows), max(len(row) for row in rows)
    figure, axes = plt.subplots(count_rows, count_columns, squeeze=False,
                                figsize=(2.8 * count_columns + 0.8, 2.8 * count_rows + 0.6))
    top = max(float(matrix.max()) for row in rows for matrix in row)
    low = min(0.0, min(float(matrix.min()) for row in rows for matrix in row))
    for i, row in enumerate(rows):
        for j, axis in enumerate(axes[i]):
            if j >= len(row):
                axis.set_visible(False)
                continue
            image = axis.imshow(row[j], vmin=low, vmax=top, cmap="viridis")
            axis.set_title(f"{row_labels[i]}, {column_labels[j]}", fontsize=8)
            axis.set_xlabel(xlabel, fontsize=7)
            axis.set_ylabel(ylabel, fontsize=7)
            axis.tick_params(labelsize=6)
    figure.colorbar(image, ax=axes.ravel().tolist(), shrink=0.8)
    if title:
        figure.suptitle(title)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def save_scatter(path: str | os.PathLike, panels: Sequence[Mapping], title: str = "",
                 dynamic_range: float = 1e12) -> None:
    """One log-log subplot per panel, each with the line y = x.

    Each panel is {"title": str, "xlabel": str, "ylabel": str, "series": {label: (x, y)}}.
    Points with x or y at or below the panel's largest finite value over `dynamic_range`
    (zeros and negative values among them) or not finite (NaN, inf) are left out, and the
    panel's title says how many.
    """
    figure, axes = _grid(len(panels), 4.5, 4)
    for axis, panel in zip(axes, panels):
        if len(panel["series"]) > 10:  # more than the default cycle's colours
            axis.set_prop_cycle(color=plt.get_cmap("tab20").colors)
        pairs = {label: list(zip(xs, ys)) for label, (xs, ys) in panel["series"].items()}
        top = max((value for points in pairs.values() for point in points for value in point
                   if math.isfinite(value)), default=0.0)
        bottom = top / dynamic_range

        def shown_point(x, y, bottom=bottom):
            return math.isfinite(x) and math.isfinite(y) and x > bottom and y > bottom

        left_out = 0
        for label, points in pairs.items():
            kept = [(x, y) for x, y in points if shown_point(x, y)]
            left_out += len(points) - len(kept)
            if kept:
                axis.scatter(*zip(*kept), s=6, alpha=0.6, label=label)
        shown = [value for points in pairs.values() for x, y in points if shown_point(x, y)
                 for value in (x, y)]
        if shown:
            axis.plot([min(shown), max(shown)], [min(shown), max(shown)], color="k",
                      linewidth=0.8, label="y = x")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set_xlabel(panel["xlabel"], fontsize=8)
        axis.set_ylabel(panel["ylabel"], fontsize=8)
        suffix = (f"\n({left_out} points <= {bottom:.0e} or not finite not shown)"
                  if left_out else "")
        axis.set_title(panel["title"] + suffix, fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6)
    _finish(figure, path, title)


def save_strips(path: str | os.PathLike, rows: Sequence[str],
                series: Mapping[str, Sequence[tuple[str, float]]], xlabel: str,
                title: str = "", references: Mapping[str, float] | None = None,
                floor: float = 1e-18) -> None:
    """One horizontal strip per row, the values of every series as points along it, on a log
    x axis. `series` is {label: [(row, value), ...]}; `references` {label: x} are dashed
    vertical lines (tolerances). Values below `floor`, zeros included, are drawn at `floor`,
    and the x label says so; values that are not finite (a NaN relative error) are drawn as
    red crosses at ten times the largest finite value, and the legend counts them."""
    figure, axis = plt.subplots(figsize=(11, 0.4 * len(rows) + 1.8))
    position = {row: index for index, row in enumerate(rows)}
    offsets = [0.25 * (k - (len(series) - 1) / 2) / max(1, len(series) - 1)
               for k in range(len(series))]
    finite = [value for points in series.values() for _, value in points
              if math.isfinite(value)] + [x for x in (references or {}).values()]
    beyond = 10 * max([floor, *finite])
    for offset, (label, points) in zip(offsets, series.items()):
        axis.scatter([max(value, floor) for _, value in points if math.isfinite(value)],
                     [position[row] + offset for row, value in points if math.isfinite(value)],
                     s=10, alpha=0.7, label=label)
        bad = [position[row] + offset for row, value in points if not math.isfinite(value)]
        if bad:
            axis.scatter([beyond] * len(bad), bad, s=30, marker="x", color="red",
                         label=f"{label}: {len(bad)} not finite (drawn at {beyond:.0e})")
    styles = itertools.cycle(("--", ":", "-.", "-"))
    for (label, x), style in zip((references or {}).items(), styles):
        axis.axvline(x, color="k", linestyle=style, linewidth=1, label=label)
    axis.set_xscale("log")
    axis.set_yticks(range(len(rows)), rows, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlabel(f"{xlabel} (below {floor:.0e}: drawn at {floor:.0e})")
    axis.grid(alpha=0.3, axis="x")
    axis.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _finish(figure, path, title, outside_legend=True)


def save_spreads(path: str | os.PathLike, panels: Sequence[Mapping], title: str = "") -> None:
    """One subplot per panel {"xlabel": str, "rows": {label: values}}: each row's values (one
    per seed) as points, their mean as a diamond with a bar of +- one standard deviation
    (n - 1 in the denominator; none for a single value)."""
    rows = max(len(panel["rows"]) for panel in panels)
    figure, axes = _grid(len(panels), 5.5, 0.35 * rows + 1.5)
    for axis, panel in zip(axes, panels):
        labels = list(panel["rows"])
        for y, label in enumerate(labels):
            values = np.asarray(panel["rows"][label], dtype=float)
            axis.scatter(values, np.full(values.shape, y), s=12, color="0.55", zorder=2)
            sd = float(np.std(values, ddof=1)) if values.size > 1 else 0.0
            axis.errorbar(values.mean(), y, xerr=sd, fmt="D", color="k", markersize=4,
                          capsize=3, zorder=3)
        axis.set_yticks(range(len(labels)), labels, fontsize=7)
        axis.invert_yaxis()
        axis.set_xlabel(panel["xlabel"], fontsize=8)
        axis.grid(alpha=0.3, axis="x")
    _finish(figure, path, title)


def save_grouped_bars(path: str | os.PathLike, panels: Sequence[Mapping],
                      title: str = "") -> None:
    """One subplot per panel {"title": str, "groups": [names], "series": {label: [one value
    per group]}, "log": bool, "ylabel": str}: in each group one bar per series, side by
    side."""
    figure, axes = _grid(len(panels), 5.5, 4)
    for axis, panel in zip(axes, panels):
        groups, series = panel["groups"], panel["series"]
        width = 0.8 / len(series)
        for k, (label, values) in enumerate(series.items()):
            if len(values) != len(groups):
                raise ValueError(f"save_grouped_bars: series {label!r} has {len(values)} "
                                 f"values for {len(groups)} groups")
            axis.bar([g + (k - (len(series) - 1) / 2) * width for g in range(len(groups))],
                     values, width=width, label=label)
        axis.set_xticks(range(len(groups)), groups, fontsize=7, rotation=45, ha="right")
        if panel.get("log"):
            axis.set_yscale("log")
        axis.set_ylabel(panel.get("ylabel", ""), fontsize=8)
        axis.set_title(panel["title"], fontsize=9)
        axis.grid(alpha=0.3, axis="y")
        axis.legend(fontsize=7)
    _finish(figure, path, title)


def save_images(path: str | os.PathLike, images: Sequence, captions: Sequence[str],
                title: str = "", columns: int = 10, symmetric: bool = False) -> None:
    """Small images (height, width) in a grid, each with its caption; gray with dark ink, or
    with `symmetric` a diverging map centred on zero, one scale for all (kernels)."""
    if len(images) != len(captions):
        raise ValueError(f"save_images: {len(images)} images but {len(captions)} captions")
    if not images:
        raise ValueError("save_images: no images to draw")
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.1 * columns, 1.25 * rows + 0.5),
                                squeeze=False)
    top = max(float(abs(image).max()) for image in images) if symmetric else None
    for axis in axes.ravel():
        axis.set_axis_off()
    for axis, image, caption in zip(axes.ravel(), images, captions):
        if symmetric:
            axis.imshow(image, cmap="RdBu_r", vmin=-top, vmax=top)
        else:
            axis.imshow(image, cmap="gray_r")
        axis.set_title(caption, fontsize=7)
    _finish(figure, path, title)


def save_misclassified(path: str | os.PathLike, images, errors: Sequence[Mapping],
                       title: str = "", limit: int = 60) -> None:
    """The first `limit` misclassified examples of images (n, height, width[, 1]), captioned
    "#index: label→predicted" from the rows of `training.metrics.misclassified`."""
    shown = errors[:limit]
    more = f" (the first {limit} of {len(errors)})" if len(errors) > limit else ""
    save_images(path, [images[e["index"]].squeeze() for e in shown],
                [f"#{e['index']}: {e['label']}\u2192{e['predicted']}" for e in shown],
                title=title + more)


def save_kernels(path: str | os.PathLike, kernels, title: str = "") -> None:
    """The kernels (height, width, 1, maps) of a convolution over one input map, one image
    per output map, on one diverging scale centred on zero."""
    if kernels.ndim != 4 or kernels.shape[2] != 1:
        raise ValueError(f"save_kernels: kernels: expected (height, width, 1, maps), got "
                         f"{tuple(kernels.shape)}")
    save_images(path, [kernels[:, :, 0, m] for m in range(kernels.shape[3])],
                [f"map {m}" for m in range(kernels.shape[3])], title=title, columns=6,
                symmetric=True)


def save_classifier_pictures(workdir, kernels, layer: str, test_images, wrong: Sequence[Mapping],
                             what: str = "examples", feature_maps=None) -> None:
    """kernels.png, the learned kernels of `layer` (see `save_kernels`); misclassified.png,
    the test `what` in `wrong` (see `save_misclassified`; none written when it is empty);
    with `feature_maps` [(layer, activations (height, width, maps))] of the first test
    example, features.png (see `save_feature_maps`)."""
    save_kernels(os.path.join(workdir, "kernels.png"), kernels,
                 title=f"{layer}'s kernels after training")
    if feature_maps:
        save_feature_maps(os.path.join(workdir, "features.png"), test_images[0].squeeze(),
                          feature_maps, title=f"the first test {what[:-1]}'s feature maps")
    if wrong:
        save_misclassified(os.path.join(workdir, "misclassified.png"), test_images, wrong,
                           title=f"misclassified test {what}, #index: label\u2192predicted")


def save_feature_maps(path: str | os.PathLike, image, maps: Sequence[tuple[str, object]],
                      title: str = "") -> None:
    """An input image (height, width) in the first row, then one row per layer of `maps`
    [(name, activations (height, width, maps))], each map on that row's diverging scale
    centred on zero."""
    columns = max(array.shape[-1] for _, array in maps)
    figure, axes = plt.subplots(1 + len(maps), columns, squeeze=False,
                                figsize=(0.9 * columns, 1.0 * (1 + len(maps)) + 0.5))
    for axis in axes.ravel():
        axis.set_axis_off()
    axes[0, 0].imshow(image, cmap="gray_r")
    axes[0, 0].set_title("input", fontsize=7)
    for row, (name, array) in enumerate(maps, start=1):
        top = float(abs(array).max()) or 1.0
        for m in range(array.shape[-1]):
            axes[row, m].imshow(array[:, :, m], cmap="RdBu_r", vmin=-top, vmax=top)
            axes[row, m].set_title(f"{name} {m}", fontsize=6)
    _finish(figure, path, title)


def activation_maps(model, params, x) -> list[tuple[str, np.ndarray]]:
    """[(layer, maps (height, width, channels))]: the outputs of a serial model's activation
    layers (named "*_act") that still have a spatial extent, for the one example x (1, ...)."""
    if x.shape[0] != 1:
        raise ValueError(f"activation_maps: x: expected one example (1, ...), got "
                         f"{tuple(x.shape)}")
    outputs = jax.jit(lambda params, x: [y for _, y in layer_outputs(model, params, x)])(
        params, x)  # one program: op by op, LeNet-1989's compiled 35
    return [(layer.name.removesuffix("_act"), np.asarray(output[0]))
            for layer, output in zip(model.sublayers, outputs)
            if layer.name.endswith("_act") and output.ndim == 4 and output.shape[1] > 1]
