"""Benchmark of the evaluate stage's 10-crop test, in one run: our batched 10-crop
(one gather on the device, one forward of 10N crops, the softmax average in logs) vs
ten times the centre-crop forward of the same model on the same batch (the cost of the
ten forwards alone). Target: overhead <= 10%. Then figure 3 (conv1's kernels, drawn by
every evaluate): one image a block against an axes a kernel, the layout before.

    python bench/evaluate.py [--batch 50] [--repeats 3] [--device cpu]   (run by `make bench`)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import best_seconds, device_name  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from alexnet.crops import CENTRE, centre_crop  # noqa: E402
from alexnet.evaluate import crop_average, crop_log_probabilities  # noqa: E402
from alexnet.figures import PER_ROW, kernel_cells, kernels_figure, png  # noqa: E402
from alexnet.model import AlexNet  # noqa: E402
from alexnet.runtime import configure  # noqa: E402


def main() -> None:
    configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = AlexNet(num_classes=1000).to(device).eval()
    images = torch.randint(0, 256, (args.batch, 3, 256, 256), dtype=torch.uint8, device=device)
    mean = torch.rand(3, 256, 256, device=device) * 255

    @torch.no_grad()
    def ten_centre_forwards():
        for _ in range(10):
            torch.softmax(model(centre_crop(images, mean)), 1)

    with torch.no_grad():  # ours computes what the baseline does: its centre crop's column
        centre = crop_log_probabilities(model, images, mean, 224)[:, CENTRE]
        forward = torch.log_softmax(model(centre_crop(images, mean)), 1)
    torch.testing.assert_close(centre, forward, atol=1e-2, rtol=0)  # (TF32 convs on a GPU)
    ours = best_seconds(
        lambda: crop_average(crop_log_probabilities(model, images, mean, 224)), args.repeats, device
    )
    baseline = best_seconds(ten_centre_forwards, args.repeats, device)
    where = device_name(device)
    print(f"{where}; AlexNet 1000 classes, batch {args.batch} images, best of {args.repeats}")
    print(f"10-crop (ours)          {args.batch / ours:8.1f} images/s")
    print(f"10 x centre-crop forward{args.batch / baseline:8.1f} images/s")
    print(f"overhead of ours: {ours / baseline - 1:+.1%}  (target <= +10%)")
    kernels = model.layers()["conv1"].weight
    size = kernels_figure(kernels, 2).get_size_inches()  # the baseline's page is ours
    cpu = torch.device("cpu")
    ours = best_seconds(lambda: png(kernels_figure(kernels, 2)), args.repeats, cpu)
    baseline = best_seconds(lambda: png(kernels_axes_figure(kernels, 2, size)), args.repeats, cpu)
    print(f"figure 3, drawn and written as PNG (CPU): {ours * 1e3:.0f} ms (ours, an image a")
    print(f"block) vs {baseline * 1e3:.0f} ms (an axes a kernel): {ours / baseline:.2f}x")


def kernels_axes_figure(weight: torch.Tensor, columns: int, size: np.ndarray) -> Figure:
    """The baseline: figure 3 as `alexnet.figures` drew it before, an axes a kernel (the
    same blocks, the same cells, a page of `size` inches; no titles)."""
    figure = Figure(figsize=size, layout="constrained")
    blocks = np.split(kernel_cells(weight), columns)
    for part, block in zip(figure.subfigures(columns, 1), blocks, strict=True):
        axes = part.subplots(len(block) // PER_ROW, PER_ROW, squeeze=False)
        for ax, cell in zip(axes.flat, block, strict=True):
            ax.set_axis_off()
            ax.imshow(cell, interpolation="nearest")
    return figure


if __name__ == "__main__":
    main()
