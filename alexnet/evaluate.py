"""Test-time evaluation of paper section 4.1: the network's prediction for an image is
the average of its softmax outputs over ten 224x224 patches -- the four corner patches
and the centre patch of the 256x256 image, and their horizontal reflections. Also the
single centre patch, as a cheaper reference.

The ten crops are one gather of a batched tensor on the device, in the positions and
order of torchvision's `ten_crop` (the five crops of the image, then the five crops of
its reflection), after subtracting the mean image (so each crop loses its own window
of the mean, as in training).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from alexnet.errors import AlexnetError
from alexnet.metrics import label_ranks
from alexnet.model import AlexNet
from alexnet.reader import LmdbSplit, batch_loader, in_order

CENTRE = 4  # index of the (unreflected) centre crop among the ten


class ModelFileError(AlexnetError):
    """The model file is missing, unreadable or not an alexnet model file."""


def ten_crop_windows(height: int, width: int, crop: int) -> tuple[list[int], list[int], list[bool]]:
    """Tops, lefts and reflections of torchvision's `ten_crop`: top-left, top-right,
    bottom-left, bottom-right, centre; then the same five of the reflected image (a crop
    of the reflection at left L is the reflection of the original's crop at W-crop-L)."""
    centre = (int(round((height - crop) / 2.0)), int(round((width - crop) / 2.0)))
    corners = [(0, 0), (0, width - crop), (height - crop, 0), (height - crop, width - crop), centre]
    tops = [top for top, _ in corners] * 2
    lefts = [left for _, left in corners] + [width - crop - left for _, left in corners]
    return tops, lefts, [False] * 5 + [True] * 5


def ten_crops(images: torch.Tensor, mean: torch.Tensor | None, crop: int = 224) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 10, 3, crop, crop) float32, mean-subtracted 0-255.

    The windows are a strided view of the batch (`unfold` on a grid whose step divides
    every crop offset), so the ten crops are one gather of whole rows from that view."""
    height, width = images.shape[-2:]
    tops, lefts, flips = ten_crop_windows(height, width, crop)
    x = images.float()
    if mean is not None:
        x = x - mean  # each crop then loses its own window of the mean
    step_y, step_x = math.gcd(*tops) or 1, math.gcd(*lefts) or 1
    grid = x.unfold(2, crop, step_y).unfold(3, crop, step_x)  # (N, 3, gy, gx, crop, crop)
    grid = grid.permute(0, 2, 3, 1, 4, 5)  # (N, gy, gx, 3, crop, crop), still a view
    crops = grid[:, [t // step_y for t in tops], [left // step_x for left in lefts]]
    reflected = [i for i, flip in enumerate(flips) if flip]
    crops[:, reflected] = crops[:, reflected].flip(-1)
    return crops


@torch.no_grad()
def crop_probabilities(
    model: torch.nn.Module, images: torch.Tensor, mean: torch.Tensor | None, crop: int
) -> torch.Tensor:
    """(N, 10, classes) softmax outputs of the ten crops of each image. The 10N crops go
    through the model N at a time: the memory (and CPU cache use) of a batch of N."""
    crops = ten_crops(images, mean, crop)
    n = crops.shape[0]
    flat = crops.reshape(n * 10, *crops.shape[2:])
    logits = torch.cat([model(chunk) for chunk in flat.split(max(n, 1))])
    return torch.softmax(logits.float(), dim=1).reshape(n, 10, -1)


@dataclass
class Results:
    """Per image: the label, the 10-crop prediction and the label's rank under the
    10-crop average and under the centre crop alone."""

    labels: torch.Tensor
    predicted: torch.Tensor
    rank: torch.Tensor
    centre_rank: torch.Tensor

    def summary(self) -> dict:
        """`metrics/eval.json` (DESIGN.md)."""
        n = len(self.labels)
        k = 5

        def error(rank: torch.Tensor, top: int) -> float:
            return float((rank >= top).sum()) / max(n, 1)

        return {
            "top1_error": error(self.rank, 1),
            "top5_error": error(self.rank, k),
            "center_top1_error": error(self.centre_rank, 1),
            "center_top5_error": error(self.centre_rank, k),
            "images": n,
        }

    def per_class(self, classes: list[dict]) -> list[dict]:
        rows = []
        for entry in classes:
            mine = self.labels == entry["index"]
            count = int(mine.sum())
            rows.append(
                {
                    "class": entry["index"],
                    "wnid": entry["wnid"],
                    "name": entry["name"],
                    "images": count,
                    "top1_error": round(float((self.rank[mine] >= 1).sum()) / count, 6)
                    if count
                    else None,
                    "top5_error": round(float((self.rank[mine] >= 5).sum()) / count, 6)
                    if count
                    else None,
                }
            )
        return rows

    def confusion(self, classes: list[dict]) -> list[dict]:
        """One row per image, actual and predicted class names (DVC's confusion plot)."""
        names = {entry["index"]: entry["name"] for entry in classes}
        return [
            {"actual": names[int(a)], "predicted": names[int(p)]}
            for a, p in zip(self.labels, self.predicted, strict=True)
        ]


def evaluate(
    model: torch.nn.Module,
    split: LmdbSplit,
    mean: torch.Tensor | None,
    crop: int,
    batch: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
) -> Results:
    """10-crop and centre-crop predictions for a whole split."""
    model.eval()
    mean = None if mean is None else mean.to(device)
    batches = in_order(split, batch)
    parts: list[tuple[torch.Tensor, ...]] = []
    for images, labels in batch_loader(
        batches, range(len(batches)), pin_memory=device.type == "cuda"
    ):
        labels = labels.to(device)
        probabilities = crop_probabilities(model, images.to(device, non_blocking=True), mean, crop)
        average = probabilities.mean(1)  # the paper: average the softmax, not the logits
        parts.append(
            (
                labels,
                average.argmax(1),
                label_ranks(average, labels),
                label_ranks(probabilities[:, CENTRE], labels),
            )
        )
        if on_batch:
            on_batch(len(labels))
    columns = [
        torch.cat([p[i].cpu() for p in parts]) if parts else torch.empty(0, dtype=torch.long)
        for i in range(4)
    ]
    return Results(*columns)


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[AlexNet, dict]:
    """The network of a model file (DESIGN.md) and the file's metadata."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file; run train") from None
    except Exception as error:  # unpickling refuses anything but tensors and plain data
        raise ModelFileError(f"{path}: not a readable model file ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != "alexnet-model":
        raise ModelFileError(f"{path}: not an alexnet model file")
    model = AlexNet(**payload["model"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ModelFileError(f"{path}: weights do not fit the model ({error})") from None
    return model.to(device).eval(), payload
