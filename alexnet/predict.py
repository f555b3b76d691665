"""`alexnet predict`: classes of image files by a trained model, with the pipeline's own
preprocessing (any mode to RGB, shorter side 256, central 256x256, the JPEG round trip
of the prepare stage) and the 10-crop softmax average of the evaluate stage."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from alexnet.evaluate import crop_probabilities, load_model
from alexnet.imageops import BadImage, prepare_image


@dataclass
class Prediction:
    path: str
    top: list[dict] = field(default_factory=list)  # class, wnid, name, probability
    error: str | None = None


def load_file(
    path: Path,
    size: int = 256,
    quality: int = 90,
    resample: str = "bilinear",
    max_pixels: int = 178_956_970,
) -> torch.Tensor:
    """(3, size, size) uint8, exactly as the prepare stage would store the file."""
    prepared = prepare_image(
        Path(path).read_bytes(), Path(path).suffix, size, quality, resample, max_pixels
    )
    data = torch.frombuffer(bytearray(prepared.jpeg), dtype=torch.uint8)
    return decode_jpeg(data, mode=ImageReadMode.RGB)


def predict(
    paths: list[Path],
    model_path: Path,
    top: int = 5,
    device: str = "cpu",
    prepare: dict | None = None,
) -> list[Prediction]:
    """One `Prediction` per path, in order; a file that cannot be read or decoded gets
    its one-line `error` and the others are still predicted."""
    model, payload = load_model(model_path, device)
    mean = payload["mean"].float().to(device)
    classes = payload["classes"]
    results = []
    for path in paths:
        try:
            image = load_file(path, **(prepare or {}))
        except (BadImage, OSError) as error:
            results.append(Prediction(str(path), error=str(error) or type(error).__name__))
            continue
        probabilities = crop_probabilities(
            model, image[None].to(device), mean, model.input_size
        ).mean(1)[0]
        values, indices = probabilities.topk(min(top, len(classes)))
        results.append(
            Prediction(
                str(path),
                [
                    {**classes[i], "probability": round(float(v), 6)}
                    for v, i in zip(values.tolist(), indices.tolist(), strict=True)
                ],
            )
        )
    return results
