"""The pictures of paper section 6.1, drawn with matplotlib: the first layer's kernels
(figure 3), validation images with the model's top-5 labels (figure 4, left) and the
training images nearest to a few validation images in the last hidden layer (figure 4,
right).

Figures are built as `matplotlib.figure.Figure` objects (no pyplot: no global state, no
GUI backend) and written by `png`, without the "Software" tag, so the same inputs give
the same bytes. Torch is not imported here: the report (`alexnet report`) reads the
figures' names and `png` only, and importing torch took ~2 s of its ~4.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from matplotlib.figure import Figure

if TYPE_CHECKING:
    import torch

# The figures the evaluate stage writes (metrics/eval/<name>.png; dvc.yaml lists them as
# plots), with the caption the report and the Prefect artifacts give them.
FIGURES = {
    "kernels": "conv1's kernels (paper figure 3), each stretched to its own range; one "
    "block per column of the network (the paper's two GPUs).",
    "top5": "Validation images (a seeded choice) with their true class above them and the "
    "model's five most probable classes (figure 4, left); red marks the true class.",
    "neighbours": "Each row: a validation image, then the training images whose "
    "last-hidden-layer vectors are nearest (figure 4, right; Euclidean distance above "
    "each; red: same class).",
}
PER_ROW = 16  # kernels per row: figure 3 has 3 rows of 16 per GPU
BLOCK_GREY = 0.93  # the background of a column's block of kernels, and of its gaps
TRUE = "tab:red"  # the true class, wherever it appears
OTHER = "tab:blue"


def png(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return buffer.getvalue()


def kernel_cells(weight: torch.Tensor) -> np.ndarray:
    """(K, 3, h, w) conv weights -> (K, h, w, 3) in [0, 1]: each kernel stretched from
    its own minimum to its own maximum, so every kernel is visible whatever its scale
    (figure 3 shows them so). A constant kernel is mid-grey."""
    cells = weight.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    low = cells.min(axis=(1, 2, 3), keepdims=True)
    span = cells.max(axis=(1, 2, 3), keepdims=True) - low
    return np.where(span > 0, (cells - low) / np.where(span > 0, span, 1), 0.5)


def mosaic(cells: np.ndarray, per_row: int, fill: float, gap: int = 1) -> np.ndarray:
    """(K, h, w, 3) cells -> one image of them, `per_row` a row in order, `gap` pixels
    apart; the gaps and the cells after the last are `fill`."""
    count, h, w, _ = cells.shape
    rows = math.ceil(count / per_row)
    padded = np.full((rows * per_row, h + gap, w + gap, 3), fill, dtype=cells.dtype)
    padded[:count, :h, :w] = cells
    grid = padded.reshape(rows, per_row, h + gap, w + gap, 3).transpose(0, 2, 1, 3, 4)
    height, width = rows * (h + gap), per_row * (w + gap)
    return grid.reshape(height, width, 3)[: height - gap, : width - gap]  # no gap outside


def kernels_figure(weight: torch.Tensor, columns: int) -> Figure:
    """conv1's kernels as figure 3 lays them out: one block per column of the network
    (the paper's GPUs; conv1's first K/2 kernels feed column 1), the blocks apart and
    labelled; one grid for a one-column net. Each block is one image of its kernels (an
    axes a kernel cost ~2.5 s of a CPU to draw, 96 of them; this ~0.15 s)."""
    cells = kernel_cells(weight)
    blocks = np.split(cells, columns)
    rows = math.ceil(len(blocks[0]) / PER_ROW)
    size = 0.5  # inches a kernel
    figure = Figure(
        figsize=(PER_ROW * size + 0.2, columns * (rows * size + 0.35) + 0.45), layout="constrained"
    )
    k = weight.shape[-1]
    figure.suptitle(f"conv1: {len(cells)} kernels of {k}x{k}x3")
    parts = figure.subfigures(columns, 1, hspace=0.04, squeeze=False)[:, 0]
    for column, (part, block) in enumerate(zip(parts, blocks, strict=True)):
        background = 1.0  # the figure's white
        if columns > 1:
            part.suptitle(f"column {column + 1} (GPU {column + 1} in the paper)", fontsize=9)
            background = BLOCK_GREY  # the two blocks read as two
            part.set_facecolor(str(background))
        ax = part.subplots()
        ax.set_axis_off()
        ax.imshow(mosaic(block, PER_ROW, background), interpolation="nearest")
    return figure


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.permute(1, 2, 0).numpy()


def _short(name: str, width: int = 22) -> str:
    """A class name fit for a tick label (ImageNet's run to 60+ characters)."""
    name = name.split(",")[0]
    return name if len(name) <= width else name[: width - 1] + "…"


def top5_figure(
    images: torch.Tensor,
    labels: Sequence[int],
    log_probabilities: torch.Tensor,
    names: Sequence[str],
    per_row: int = 4,
) -> Figure:
    """Each image (uint8 CHW) with its true class above it and, beside it, bars of the
    five classes of highest (10-crop average) probability, from their logs; the true
    class's bar in red when it is among them."""
    from alexnet.metrics import top_classes  # (imports torch: see the module's docstring)

    count = len(labels)
    rows = math.ceil(count / per_row)
    figure = Figure(figsize=(per_row * 4.2, rows * 1.9), layout="constrained")
    figure.suptitle("Validation images and the model's top 5 (10-crop average softmax)")
    axes = figure.subplots(rows, per_row * 2, squeeze=False, width_ratios=[1, 1.25] * per_row)
    for ax in axes.flat:
        ax.set_axis_off()
    scores = log_probabilities.float()
    for i, (label, classes) in enumerate(zip(labels, top_classes(scores, labels), strict=True)):
        picture, bars = axes[i // per_row, 2 * (i % per_row) : 2 * (i % per_row) + 2]
        picture.imshow(_hwc(images[i]))
        picture.set_title(_short(names[label]), fontsize=8, color=TRUE)
        bars.set_axis_on()
        bars.barh(
            range(len(classes)),
            scores[i, classes].exp().tolist(),
            color=[TRUE if c == label else OTHER for c in classes],
        )
        bars.set_yticks(range(len(classes)), [_short(names[c], 16) for c in classes], fontsize=7)
        bars.invert_yaxis()  # the most probable on top
        bars.set_xlim(0, 1)
        bars.tick_params(axis="x", labelsize=6)
        for side in ("top", "right"):
            bars.spines[side].set_visible(False)
    return figure


def neighbours_figure(
    queries: torch.Tensor,
    query_labels: Sequence[int],
    neighbours: torch.Tensor,
    neighbour_labels: torch.Tensor,
    distances: torch.Tensor,
    names: Sequence[str],
    dimensions: int,
) -> Figure:
    """One row per query: the validation image, then its k nearest training images in
    the last hidden layer (of `dimensions` units), nearest first, each with its class
    (red: the query's class) and its distance."""
    count, k = neighbour_labels.shape
    figure = Figure(figsize=((k + 1) * 1.35, count * 1.55 + 0.4), layout="constrained")
    figure.suptitle(f"Nearest training images in the last hidden layer ({dimensions}-d, Euclidean)")
    axes = figure.subplots(count, k + 1, squeeze=False)
    for row in range(count):
        label = query_labels[row]
        cells = [(queries[row], label, "query")] + [
            (neighbours[row, j], int(neighbour_labels[row, j]), f"{float(distances[row, j]):.3g}")
            for j in range(k)
        ]
        for ax, (image, shown, note) in zip(axes[row], cells, strict=True):
            ax.imshow(_hwc(image))
            ax.set_xticks([])
            ax.set_yticks([])
            color = TRUE if shown == label else "black"
            ax.set_title(f"{_short(names[shown], 14)}\n{note}", fontsize=7, color=color)
        axes[row, 0].spines[:].set(color=TRUE, linewidth=2)
    return figure
