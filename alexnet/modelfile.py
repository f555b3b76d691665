"""The model file `models/alexnet.pt` (docs/design.md, "Model file"): what training leaves
for evaluation and prediction.

A dict that `torch.load(path, weights_only=True)` reads (no pickle of code):
- `format` "alexnet-model", `version` 2;
- `state_dict`: the weights in the one-device layout of `alexnet.model.AlexNet`;
- `model`: its keyword arguments (params `model` and `num_classes`);
- `classes`: [{index, wnid, name}, ...];
- `mean`: the (3, 256, 256) float32 mean image; `pca`: eigenvalues and eigenvectors;
- `prepare`: how an image was prepared (params `prepare`'s image options,
  `PrepareParams.IMAGE_KEYS`), so `alexnet predict` needs nothing but this file;
- `train`: the training params; `digest`: of the params and data it was trained on.
Nothing that depends on when or how fast a run went: identical deterministic runs give
identical bytes (run timings are metrics).
"""

from __future__ import annotations

import re
import shutil
import warnings
from pathlib import Path

import torch

from alexnet.atomic import OutputError, atomic_output
from alexnet.errors import AlexnetError, one_line
from alexnet.model import AlexNet, allocate
from alexnet.params import DEFAULTS, Kernels

FORMAT = {"format": "alexnet-model", "version": 2}


class ModelFileError(AlexnetError):
    """The model file is missing, unreadable or not an alexnet model file."""


def save_model(path: Path, contents: dict) -> None:
    """Write a model file with `contents` (the keys of the module docstring), whole or
    not at all."""
    save_tensors({**FORMAT, **contents}, path)


def save_tensors(value: dict, path: Path) -> None:
    """`torch.save`, whole or not at all (a model file, a checkpoint). torch's writer
    reports a failed write (a full disk) as a RuntimeError naming neither the file nor the
    cause: it becomes one line with both, and the space left on the file's disk."""
    with atomic_output(path) as temporary:
        try:
            torch.save(value, temporary)
        except RuntimeError as error:
            free = shutil.disk_usage(temporary.parent).free / 1e9
            raise OutputError(
                f"{path}: torch could not write it ({one_line(error, first_only=True)}); "
                f"{free:.1f} GB free on its disk"
            ) from None


# torch's weights-only unpickler names what it refused: "Unsupported global: GLOBAL
# torch.nn.Linear ..." for a class, "unsupported GLOBAL posix.system whose module ..."
# for a function of a blocked module.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_PICKLE_START = re.compile(rb"\x80[\x02-\x05]")  # PROTO 2..5: torch's and today's pickles
REQUIRED = ("model", "state_dict", "classes", "mean", "prepare")  # what loaders read


def _read(path: Path, mapped: bool = False) -> object:
    """torch.load with weights only (tensors and plain data, never code); its warnings
    (e.g. about a foreign pickle protocol) would only add lines to the one error.
    `mapped`: a zip file is mapped, not read (a look at what a file is, before any work:
    a checkpoint is ~0.5 GB on ImageNet)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mapped and _kind(path) == "zip":  # (torch maps only its zip format)
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except OSError:
                raise
            except Exception:  # a file system that cannot map it: read, as loading will
                pass
        return torch.load(path, map_location="cpu", weights_only=True)


def _contents(path: Path, mapped: bool = False) -> dict:
    """The contents of a model file this code reads; anything else (missing, unreadable,
    foreign, holding code, a checkpoint) raises a one-line `ModelFileError`."""
    try:
        contents = _read(path, mapped)
    except OSError as error:
        raise _unreadable(path, error) from None
    except Exception as error:  # torch's loader raises many types for a foreign file
        raise _refused(path, error) from None
    return _check_contents(path, contents)


def check_model_file(path: Path) -> None:
    """One line, before any work, for a file that is not a model file this code reads (none
    there, a folder, a checkpoint, another version): mapped, not read."""
    _contents(path, mapped=True)


def check_replaceable(path: Path) -> None:
    """A file at `path`, where train will write its model, is replaced only if it is a
    model file (an earlier one, of any version) or empty: a path mistyped as MODEL must not
    cost a file of the user's, nor a checkpoint its hours of training. (A symbolic link is
    replaced itself, never written through: what it points to is not at stake.)"""
    if path.is_symlink() or not path.is_file():
        return
    try:
        if _kind(path) == "empty":
            return
        payload = _read(path, mapped=True)
    except OSError as error:
        what = f"cannot be read ({error.strerror or error})"
    except Exception:  # torch's loader raises many types: whatever fails is not ours
        what = "not an alexnet model file"
    else:
        if _is_model(payload):
            return
        checkpoint = _is_checkpoint(payload)
        what = (
            "a training checkpoint, not a model file" if checkpoint else "not an alexnet model file"
        )
    raise ModelFileError(f"{path}: {what}; train would replace it: name another, or remove it")


def _is_model(payload: object) -> bool:
    """Whether loaded contents are a model file's, of any version."""
    return isinstance(payload, dict) and payload.get("format") == FORMAT["format"]


def _is_checkpoint(payload: object) -> bool:
    return isinstance(payload, dict) and {"optimizer", "digest"} <= payload.keys()


def _unreadable(path: Path, error: OSError) -> ModelFileError:
    if isinstance(error, FileNotFoundError):
        broken = " (a broken symbolic link)" if path.is_symlink() else ""
        return ModelFileError(f"{path}: no such model file{broken}; run train")
    if isinstance(error, IsADirectoryError):
        return ModelFileError(f"{path}: is a directory, not a model file")
    return ModelFileError(f"{path}: cannot read the model file ({error.strerror or error})")


def _refused(path: Path, error: Exception) -> ModelFileError:
    """One line for a file torch's weights-only loader refused. Never torch's own message:
    it spans lines and advises loading with weights_only=False, which runs whatever code
    the file holds (the wrong advice for a file that is not ours)."""
    refused = _REFUSED_GLOBAL.search(str(error))
    kind = "pickle" if refused else _kind(path)
    if refused:
        what = f"it holds pickled code: {refused[1]}"
    elif kind == "pickle":  # a pickle the loader could not follow to a named global
        what = "it holds pickled objects other than weights"
    else:
        return ModelFileError(f"{path}: not an alexnet model file ({_KINDS[kind]})")
    return ModelFileError(
        f"{path}: refused: not an alexnet model file ({what}; only weights are loaded)"
    )


_KINDS = {
    "empty": "an empty file",
    "zip": "a damaged torch file, or a zip archive that is not one",
    "other": "not a torch zip/pickle",
}


def _kind(path: Path) -> str:
    """What a file is by its first bytes: torch's zip format starts with a zip's local
    header, a pickle of protocol 2 or later with the PROTO opcode."""
    with open(path, "rb") as stream:
        start = stream.read(4)
    if not start:
        return "empty"
    if start == b"PK\x03\x04":
        return "zip"
    return "pickle" if _PICKLE_START.match(start) else "other"


def _check_contents(path: Path, payload: object) -> dict:
    """The loaded contents, if they are those of a model file this code reads."""
    if _is_checkpoint(payload):
        raise ModelFileError(
            f"{path}: a training checkpoint, not a model file: name the model file train "
            "writes when it ends (its MODEL)"
        )
    if not _is_model(payload):
        raise ModelFileError(f"{path}: not an alexnet model file (no format 'alexnet-model')")
    if payload.get("version") != FORMAT["version"]:
        raise ModelFileError(
            f"{path}: model file version {payload.get('version')}, this code reads "
            f"{FORMAT['version']}; train again"
        )
    missing = [key for key in REQUIRED if key not in payload]
    if missing:
        raise ModelFileError(f"{path}: damaged model file: no {', '.join(missing)}")
    mean, classes, model = payload["mean"], payload["classes"], payload["model"]
    if not (isinstance(mean, torch.Tensor) and mean.dim() == 3 and mean.shape[0] == 3):
        raise ModelFileError(f"{path}: damaged model file: mean is not a (3, H, W) image")
    if not isinstance(model, dict) or not isinstance(payload["prepare"], dict):
        raise ModelFileError(f"{path}: damaged model file: model or prepare is not a mapping")
    count = model.get("num_classes")
    if not (isinstance(classes, list) and all(isinstance(c, dict) for c in classes)):
        raise ModelFileError(f"{path}: damaged model file: classes is not a list of classes")
    if len(classes) != count:
        raise ModelFileError(
            f"{path}: damaged model file: {len(classes)} classes for {count} outputs"
        )
    return payload


def load_model(
    path: Path, device: torch.device | str = "cpu", kernels: Kernels = DEFAULTS.compute.kernels
) -> tuple[AlexNet, dict]:
    """The network of a model file, on `device` in eval mode, and the file's contents.
    Anything else (missing, unreadable, foreign, or holding code) raises a one-line
    `ModelFileError` that names the file."""
    path = Path(path)
    payload = _contents(path)
    try:
        with torch.device("meta"):  # no weights drawn: the file's are copied in
            model = AlexNet(**payload["model"], kernels=kernels)
        allocate(model, "cpu")
        model.load_state_dict(payload["state_dict"])
    except Exception as error:  # a wrong shape, key or argument: the file is not this net
        raise ModelFileError(f"{path}: weights do not fit the model ({one_line(error)})") from None
    return model.to(device).eval(), payload
