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

from alexnet.errors import AlexnetError, one_line
from alexnet.evaluate import crop_average, crop_log_probabilities
from alexnet.imageops import BadImage, load_plugins, prepare_image
from alexnet.jpeg import rgb
from alexnet.modelfile import load_model
from alexnet.params import DEFAULTS, PREDICT_BATCH
from alexnet.placement import resolve_devices
from alexnet.prepare import max_file_bytes, too_large
from alexnet.sources import display_name


class PluginError(AlexnetError):
    """A model file asks for PIL plugins the user did not allow, or that do not load."""


@dataclass
class Prediction:
    path: str
    top: list[dict] = field(default_factory=list)  # class, wnid, name, probability
    error: str | None = None


def read_file(path: Path, max_pixels: int) -> bytes:
    """The bytes of an image file; `BadImage` for what is not a regular file (a folder, a
    FIFO that would block) or is larger than any image within `max_pixels` can be (read
    whole, a video or a disk image could exhaust the memory), `OSError` when it cannot
    be read."""
    if path.is_dir():
        raise BadImage("is a directory")
    if path.exists() and not path.is_file():
        raise BadImage("not a regular file")
    if (size := path.stat().st_size) > (limit := max_file_bytes(max_pixels)):
        raise BadImage(too_large(size, limit))
    return path.read_bytes()


def why_unusable(path: Path, error: Exception) -> str:
    """One line for a file that cannot be predicted: its reason, without repeating the
    path (an `OSError`'s message does), on one line whatever the decoder said."""
    if isinstance(error, FileNotFoundError):
        return "broken symbolic link" if path.is_symlink() else "no such file"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror[:1].lower() + error.strerror[1:]  # "permission denied"
    text = " ".join(str(error).split())
    if isinstance(error, BadImage) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def load_file(path: Path, image_options: dict) -> torch.Tensor:
    """(3, size, size) uint8, exactly as the prepare stage with `image_options` (the
    model file's `prepare`) stores the file."""
    path = Path(path)
    data = read_file(path, image_options.get("max_pixels", DEFAULTS.prepare.max_pixels))
    prepared = prepare_image(data, path.suffix, **image_options)
    data = torch.frombuffer(bytearray(prepared.jpeg), dtype=torch.uint8)
    return rgb(data)


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
) -> Iterator[Prediction]:
    """One `Prediction` per path, in order, each given as soon as its batch of `batch`
    files is done: its `top` classes, run on `device` (their defaults are the command's,
    `alexnet predict`); a file that cannot be read or decoded gets its one-line `error`
    and the others are still predicted. `plugins`: the PIL plugin modules the user allows
    the model file's preparation to import. The model file is read, and refused, before
    the first."""
    [device] = resolve_devices([device])  # a wrong name: one line, as train and evaluate
    model, payload = load_model(model_path, device)
    allow_plugins(Path(model_path), payload["prepare"].get("plugins") or (), plugins)
    mean = payload["mean"].float().to(device)
    return _predictions(paths, model, mean, payload, top, batch)


def _predictions(
    paths: Sequence[Path], model, mean: torch.Tensor, payload: dict, top: int, batch: int
) -> Iterator[Prediction]:
    classes = payload["classes"]
    for start in range(0, len(paths), batch):
        group = paths[start : start + batch]
        loaded = [_loaded(Path(path), payload["prepare"]) for path in group]
        images = [image for image in loaded if isinstance(image, torch.Tensor)]
        if images:
            stacked = torch.stack(images).to(mean.device)
            logs = crop_average(crop_log_probabilities(model, stacked, mean, model.input_size))
            values, indices = logs.topk(min(top, len(classes)))
            tops = iter(zip(values.tolist(), indices.tolist(), strict=True))
        for path, image in zip(group, loaded, strict=True):
            if isinstance(image, str):
                yield Prediction(display_name(path), error=image)
                continue
            top_classes = [
                {**classes[i], "probability": round(math.exp(v), 6)}
                for v, i in zip(*next(tops), strict=True)
            ]
            yield Prediction(display_name(path), top_classes)


def _loaded(path: Path, image_options: dict) -> torch.Tensor | str:
    """`load_file`, or the one line of why it cannot be (any file, any decoder failure)."""
    try:
        return load_file(path, image_options)
    except Exception as error:
        return why_unusable(path, error)
