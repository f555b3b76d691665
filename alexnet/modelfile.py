"""The model file `models/alexnet.pt` (docs/design.md, "Model file"): what training leaves
for evaluation and prediction.

A dict that `torch.load(path, weights_only=True)` reads (no pickle of code):
- `format` "alexnet-model", `version` 2;
- `state_dict`: the weights in the one-device layout of `alexnet.model.AlexNet`;
- `model`: its keyword arguments (params `model` and `num_classes`);
- `classes`: [{index, wnid, name}, ...];
- `mean`: the (3, 256, 256) float32 mean image; `pca`: eigenvalues and eigenvectors;
- `prepare`: how an image was prepared (params `prepare`'s image options: size, quality,
  resample, max_pixels), so `alexnet predict` needs nothing but this file;
- `train`: the training params; `digest`: of the params and data it was trained on.
Nothing that depends on when or how fast a run went: identical deterministic runs give
identical bytes (run timings are metrics).
"""

from __future__ import annotations

from pathlib import Path

import torch

from alexnet.atomic import atomic_output
from alexnet.errors import AlexnetError
from alexnet.model import AlexNet
from alexnet.params import DEFAULTS, Kernels

FORMAT = {"format": "alexnet-model", "version": 2}


class ModelFileError(AlexnetError):
    """The model file is missing, unreadable or not an alexnet model file."""


def save_model(path: Path, contents: dict) -> None:
    """Write a model file with `contents` (the keys of the module docstring), whole or
    not at all."""
    with atomic_output(path) as temporary:
        torch.save({**FORMAT, **contents}, temporary)


def load_model(
    path: Path, device: torch.device | str = "cpu", kernels: Kernels = DEFAULTS.compute.kernels
) -> tuple[AlexNet, dict]:
    """The network of a model file, on `device` in eval mode, and the file's contents."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such model file; run train") from None
    except Exception as error:  # unpickling refuses anything but tensors and plain data
        raise ModelFileError(f"{path}: not a readable model file ({error})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT["format"]:
        raise ModelFileError(f"{path}: not an alexnet model file")
    if payload.get("version") != FORMAT["version"]:
        raise ModelFileError(
            f"{path}: model file version {payload.get('version')}, this code reads "
            f"{FORMAT['version']}; train again"
        )
    model = AlexNet(**payload["model"], kernels=kernels)
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise ModelFileError(f"{path}: weights do not fit the model ({error})") from None
    return model.to(device).eval(), payload
