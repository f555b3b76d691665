"""`alexnet predict`: classes of image files by a trained model, with the pipeline's own
preprocessing as the model file records it (any mode to RGB, shorter side to its size,
the central square, the JPEG round trip of the prepare stage) and the 10-crop softmax
average of the evaluate stage. Nothing but the model file is read: editing params.yaml
after training does not change a prediction."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alexnet.decoder import Isolated
from alexnet.errors import AlexnetError, one_line
from alexnet.evaluate import crop_average, crop_log_probabilities
from alexnet.imageops import load_plugins
from alexnet.jpeg import rgb
from alexnet.modelfile import load_model
from alexnet.params import DEFAULTS, PREDICT_BATCH
from alexnet.placement import resolve_devices
from alexnet.sources import display_name
from alexnet.user_images import prepare_files, prepared_jpeg


class PluginError(AlexnetError):
    """A model file asks for PIL plugins the user did not allow, or that do not load."""


@dataclass
class Prediction:
    path: str
    top: list[dict] = field(default_factory=list)  # class, wnid, name, probability
    error: str | None = None


def load_file(path: Path, image_options: dict) -> torch.Tensor:
    """(3, size, size) uint8, exactly as the prepare stage with `image_options` (the
    model file's `prepare`) stores the file, prepared in this process."""
    return _decoded(prepared_jpeg(Path(path), image_options))


def _decoded(jpeg: bytes) -> torch.Tensor:
    return rgb(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))


def allow_plugins(model_path: Path, asked: Sequence[str], allowed: Sequence[str]) -> None:
    """Import the PIL plugins the model file's images were prepared with, each only if
    the user allowed it (importing a module runs its code, and a model file is data,
    never code, even when it comes from someone else), and the others the user allowed."""
    refused = [name for name in asked if name not in allowed]
    if refused:
        flags = " ".join(f"--plugin {name}" for name in refused)
        raise PluginError(
            f"{model_path}: its images were prepared with the PIL plugins "
            f"{', '.join(refused)}; importing them runs their code: allow them with {flags}"
        )
    # and every plugin the user allowed: one adds formats (a HEIC photo to predict on)
    for name in [*asked, *(name for name in allowed if name not in asked)]:
        try:
            load_plugins([name])
        except Exception as error:  # not installed, or failing as it loads: not per image
            whose = f"{model_path}: its PIL plugin" if name in asked else "--plugin"
            raise PluginError(f"{whose} {name} cannot be imported ({one_line(error)})") from None


def predict(
    paths: Sequence[Path],
    model_path: Path,
    top: int,
    device: str,
    plugins: Sequence[str] = (),
    batch: int = PREDICT_BATCH,
    timeout: float = DEFAULTS.prepare.file_timeout,
) -> Iterator[Prediction]:
    """One `Prediction` per path, in order, each given as soon as its batch of `batch`
    files is done: its `top` classes, run on `device` (their defaults are the command's,
    `alexnet predict`); a file that cannot be read or decoded, or crashes the decoder,
    or keeps it longer than `timeout` seconds, gets its one-line `error` and the others
    are still predicted. `plugins`: the PIL plugin modules the user allows the model
    file's preparation to import. The model file is read, and refused, before the
    first."""
    [device] = resolve_devices([device])  # a wrong name: one line, as train and evaluate
    model, payload = load_model(model_path, device)
    allow_plugins(Path(model_path), payload["prepare"].get("plugins") or (), plugins)
    mean = payload["mean"].float().to(device)
    # Its own decoder process (started at the first batch, so importing from sys.path as
    # it is then: a plugin's folder), which ends with the predictions.
    child = Isolated(timeout)
    options = {"image_options": payload["prepare"], "plugins": list(plugins)}
    return _predictions(paths, model, mean, payload["classes"], top, batch, child, options)


def _predictions(
    paths: Sequence[Path],
    model,
    mean: torch.Tensor,
    classes: list[dict],
    top: int,
    batch: int,
    child: Isolated,
    options: dict,
) -> Iterator[Prediction]:
    try:  # (the child ends too where the caller stops early)
        for start in range(0, len(paths), batch):
            group = paths[start : start + batch]
            prepared = prepare_files(child, group, **options)
            loaded = [_decoded(p) if isinstance(p, bytes) else p for p in prepared]
            images = [image for image in loaded if isinstance(image, torch.Tensor)]
            tops = _top_classes(model, images, mean, classes, top)
            for path, image in zip(group, loaded, strict=True):
                if isinstance(image, str):
                    yield Prediction(display_name(path), error=image)
                else:
                    yield Prediction(display_name(path), next(tops))
    finally:
        child.close()


def _top_classes(
    model, images: list[torch.Tensor], mean: torch.Tensor, classes: list[dict], top: int
) -> Iterator[list[dict]]:
    """Each image's `top` classes, from one forward pass of their ten crops."""
    if not images:
        return iter(())
    stacked = torch.stack(images).to(mean.device)
    logs = crop_average(crop_log_probabilities(model, stacked, mean, model.input_size))
    values, indices = logs.topk(min(top, len(classes)))
    return (
        [{**classes[i], "probability": round(math.exp(v), 6)} for v, i in zip(vs, ix, strict=True)]
        for vs, ix in zip(values.tolist(), indices.tolist(), strict=True)
    )
