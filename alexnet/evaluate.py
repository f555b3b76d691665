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
from collections import Counter
from collections.abc import Callable, Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from alexnet.crops import CENTRE, ten_crops
from alexnet.eval_files import WORST_CLASSES, WORST_CONFUSION, check_targets, worst_classes
from alexnet.jpeg import to_device
from alexnet.lmdb_store import StoreError, key, read_meta
from alexnet.metrics import label_ranks, missed, predicted, top_classes
from alexnet.modelfile import ModelFileError, check_model_file, load_model
from alexnet.params import DEFAULTS, EvaluateParams, JpegDecoder, Kernels
from alexnet.placement import check_devices
from alexnet.reader import LmdbSplit, batch_loader, encoded_for, in_order

OTHER = "(another class)"  # a prediction outside the classes a confusion plot shows


@contextmanager
def speed_switches(
    model: torch.nn.Module, device: torch.device, amp: bool, channels_last: bool
) -> Iterator[None]:
    """params `evaluate.amp` and `evaluate.channels_last` for every forward inside: bf16
    autocast, and the model's weights in the channels-last layout (its convolutions then
    run channels-last; the weights stay so after). As training's switches: outputs equal
    up to rounding, which the metrics' last digits show; the softmax stays float32."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    with torch.autocast(device.type, torch.bfloat16, enabled=amp):
        yield


@torch.no_grad()
def crop_log_probabilities(
    model: torch.nn.Module, images: torch.Tensor, mean: torch.Tensor | None, crop: int
) -> torch.Tensor:
    """(N, 10, classes) log-softmax outputs of the ten crops of each image. Logs: a class
    whose logit is ~104 below the top one has a float32 probability of 0, tied with every
    other such class, and ties count against the label (alexnet.metrics). The 10N crops
    go through the model N at a time: the memory (and CPU cache use) of a batch of N."""
    crops = ten_crops(images, mean, crop)
    n = crops.shape[0]
    flat = crops.reshape(n * 10, *crops.shape[2:])
    logits = torch.cat([model(chunk) for chunk in flat.split(max(n, 1))])
    return torch.log_softmax(logits.float(), dim=1).reshape(n, 10, -1)


def crop_average(log_probabilities: torch.Tensor) -> torch.Tensor:
    """(N, classes): the log of the prediction, the mean of the ten crops' softmax outputs
    (from `crop_log_probabilities`). The paper averages the softmax outputs, not the
    logits (a crop sure of one class would outvote nine that mildly prefer another); in
    logs (logsumexp) the mean keeps its order where its probabilities would underflow."""
    return torch.logsumexp(log_probabilities, dim=1) - math.log(log_probabilities.shape[1])


@dataclass
class Results:
    """Per image: the label, the 10-crop prediction and the label's rank under the
    10-crop average and under the centre crop alone. `kept`: the log of the 10-crop
    average softmax (K, classes) of the images `evaluate` was asked to keep, in order."""

    labels: torch.Tensor
    predicted: torch.Tensor
    rank: torch.Tensor
    centre_rank: torch.Tensor
    kept: torch.Tensor = field(default_factory=lambda: torch.empty(0, 0))

    def summary(self) -> dict:
        """`metrics/eval.json` (docs/design.md)."""
        n = len(self.labels)

        def error(rank: torch.Tensor, k: int) -> float:
            return float(missed(rank, k).sum()) / max(n, 1)

        return {
            "top1_error": error(self.rank, 1),
            "top5_error": error(self.rank, 5),
            "center_top1_error": error(self.centre_rank, 1),
            "center_top5_error": error(self.centre_rank, 5),
            "images": n,
        }

    def per_class(self, classes: list[dict]) -> list[dict]:
        rows = []
        for entry in classes:
            mine = self.labels == entry["index"]
            count = int(mine.sum())

            def error(k: int, mine=mine, count=count) -> float | None:
                return round(float(missed(self.rank[mine], k).sum()) / count, 6) if count else None

            rows.append(
                {
                    "class": entry["index"],
                    "wnid": entry["wnid"],
                    "name": entry["name"],
                    "images": count,
                    "top1_error": error(1),
                    "top5_error": error(5),
                }
            )
        return rows

    def confusion(self, classes: list[dict], shown: Collection[int] | None = None) -> list[dict]:
        """One row per image, actual and predicted class (`class_labels`: DVC's
        confusion plot). With `shown` (class indices): the images of those classes only,
        a prediction of any other class named `OTHER` (ImageNet's whole matrix is 1,000
        x 1,000 classes)."""
        names = class_labels(classes)
        rows = []
        for actual, guess in zip(self.labels.tolist(), self.predicted.tolist(), strict=True):
            if shown is None or actual in shown:
                other = shown is not None and guess not in shown
                rows.append(
                    {"actual": names[actual], "predicted": OTHER if other else names[guess]}
                )
        return rows

    def plotted(self, classes: list[dict], per_class: list[dict], count: int) -> dict:
        """The data of the per-class bar chart and of the confusion matrix: the `count`
        classes of highest top-1 error (`worst_classes`), and their images' predictions."""
        labels = class_labels(classes)
        worst = [{**row, "label": labels[row["class"]]} for row in worst_classes(per_class, count)]
        shown = {row["class"] for row in worst}
        return {WORST_CLASSES: worst, WORST_CONFUSION: self.confusion(classes, shown)}


def class_labels(classes: list[dict]) -> dict[int, str]:
    """{index: name} as the plots show the classes. A name two classes share (ImageNet
    has two "crane"s, a bird and a machine) takes its wnid: the confusion matrix would
    count one mistaken for the other as right, and the bar chart draw both as one bar."""
    shared = Counter(entry["name"] for entry in classes)
    return {
        entry["index"]: entry["name"] + (f" ({entry['wnid']})" if shared[entry["name"]] > 1 else "")
        for entry in classes
    }


def evaluate(
    model: torch.nn.Module,
    split: LmdbSplit,
    mean: torch.Tensor | None,
    crop: int,
    batch: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    keep: Sequence[int] = (),
    workers: int = DEFAULTS.evaluate.loader_workers,
    decoder: JpegDecoder = DEFAULTS.compute.jpeg_decoder,
) -> Results:
    """10-crop and centre-crop predictions for a whole split, and the log of the 10-crop
    average softmax of the images `keep` lists (only theirs: a split's would be images x
    classes). `workers`
    processes read and decode batches ahead (a JPEG store needs them to feed a GPU);
    on a CUDA device a jpeg store's batches are decoded there by `decoder`."""
    if not len(split):  # no error rate, rather than a perfect one
        raise StoreError(f"{split.path}: no images to evaluate")
    model.eval()
    mean = None if mean is None else mean.to(device)
    batches = in_order(split, batch, encoded=encoded_for(split, device, decoder))
    parts: list[tuple[torch.Tensor, ...]] = []
    wanted = {index: position for position, index in enumerate(keep)}
    kept: dict[int, torch.Tensor] = {}
    loader = batch_loader(batches, range(len(batches)), workers, device.type == "cuda")
    for rows, (images, labels) in zip(batches.batches, loader, strict=True):
        # the decode first, then the labels (pinned: no wait for the last batch's forward)
        images = to_device(images, device, split.shape, decoder)
        labels = labels.to(device, non_blocking=True)
        log_probabilities = crop_log_probabilities(model, images, mean, crop)
        average = crop_average(log_probabilities)
        for row, index in enumerate(rows):
            if index in wanted:
                kept[wanted[index]] = average[row].cpu()
        rank = label_ranks(average, labels)
        centre_rank = label_ranks(log_probabilities[:, CENTRE], labels)
        parts.append((labels, predicted(average, labels, rank), rank, centre_rank))
        if on_batch:
            on_batch(len(labels))
    columns = [
        torch.cat([p[i].cpu() for p in parts]) if parts else torch.empty(0, dtype=torch.long)
        for i in range(4)
    ]
    gallery = torch.stack([kept[p] for p in range(len(keep))]) if keep else torch.empty(0, 0)
    return Results(*columns, kept=gallery)


def top5_table(
    indices: Sequence[int], labels: Sequence[int], kept: torch.Tensor, names: Sequence[str]
) -> list[dict]:
    """`metrics/eval/top5.csv`, the gallery's data: one row per (image, rank), the image
    by its key in the val store, its true class and the k-th most probable class
    (`kept`: `Results.kept`, log-probabilities)."""
    return [
        {
            "key": key(index).decode(),
            "true_class": names[label],
            "rank": rank + 1,
            "class": names[top],
            "probability": round(math.exp(float(kept[row, top])), 6),
        }
        for row, (index, label, classes) in enumerate(
            zip(indices, labels, top_classes(kept, labels), strict=True)
        )
        for rank, top in enumerate(classes)
    ]


def sample(count: int, size: int, seed: int) -> list[int]:
    """A seeded choice of `size` (at most `count`) distinct indices of a split: the
    figures' validation images (the same ones run after run)."""
    return np.random.default_rng(seed).permutation(count)[:size].tolist()


def load_model_for(
    split: LmdbSplit, path: Path, device: torch.device, kernels: Kernels = DEFAULTS.compute.kernels
) -> tuple[torch.nn.Module, dict]:
    """The model of a model file, checked to classify the classes of `split`, and the
    file's contents (its mean image is the one training subtracted)."""
    model, payload = load_model(path, device, kernels)
    if len(split.classes) != len(payload["classes"]):
        raise ModelFileError(
            f"{path} has {len(payload['classes'])} classes, {split.path} has {len(split.classes)}"
        )
    if split.classes != payload["classes"]:
        raise ModelFileError(f"{path} and {split.path} list different classes")
    _, height, width = payload["mean"].shape  # each crop's window of it is subtracted
    if split.shape[1:] != (height, width):
        raise ModelFileError(
            f"{path} was trained on {height}x{width} images, {split.path} holds "
            f"{split.shape[1]}x{split.shape[2]}: pack it from a prepare of the same size"
        )
    return model, payload


def refuse(
    val: str,
    model_path: str,
    train: str,
    metrics: str,
    evaluate: EvaluateParams | None = None,
    **_: object,
) -> None:
    """What stops the stage before any work, as one line (`flows.stages.Stage.refusal`)."""
    if evaluate is not None:
        check_devices("evaluate.device", [evaluate.device])
    check_targets(Path(metrics))
    read_meta(val)
    check_model_file(Path(model_path))  # (none: evaluate run before train, say)
    read_meta(train)
