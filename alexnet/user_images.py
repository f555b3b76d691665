"""The image files a user names (`alexnet predict`), read and prepared as the prepare
stage stores them (`imageops.prepare_image`), in a decoder process of their own
(`alexnet.decoder`), as the prepare stage's: a file that crashes or hangs the decoder
costs itself alone, not the command and every result before it. No torch here: the
process starts in a fraction of a second."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path

from alexnet.decoder import AGAIN_NEXT_RUN, At, Isolated
from alexnet.imageops import BadImage, load_plugins, prepare_image
from alexnet.params import DEFAULTS
from alexnet.prepare import max_file_bytes, too_large


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


def prepared_jpeg(path: Path, image_options: dict) -> bytes:
    """The JPEG the prepare stage with `image_options` (a model file's `prepare`) stores
    for the file at `path`."""
    data = read_file(path, image_options.get("max_pixels", DEFAULTS.prepare.max_pixels))
    return prepare_image(data, path.suffix, **image_options).jpeg


def prepare_files(
    child: Isolated, paths: Sequence[Path], image_options: dict, plugins: Sequence[str]
) -> list[bytes | str]:
    """Each file's `prepared_jpeg`, or the one line of why it cannot be (a crash or a
    hang of the decoder too), made in `child`; `plugins`: the modules it imports first
    (the user's, besides the model file's in `image_options`)."""
    request = {"paths": [str(p) for p in paths], "options": image_options, "plugins": plugins}
    answers = child.call(f"{__name__}:{in_child.__name__}", request)
    return [base64.b64decode(a["jpeg"]) if "jpeg" in a else a["error"] for a in answers]


def in_child(request: dict, skip: dict[int, str], at: At) -> list[dict]:
    """`prepare_files` in the decoder's child: {"jpeg": base64} or {"error": line} a
    file; a file in `skip` crashed or hung an earlier try."""
    load_plugins(request["plugins"])
    answers = []
    for index, name in enumerate(request["paths"]):
        if index in skip:  # (a second time there is no "next run" to try it again in)
            answers.append({"error": skip[index].removesuffix(AGAIN_NEXT_RUN)})
            continue
        at(index)
        path = Path(name)
        try:
            jpeg = prepared_jpeg(path, request["options"])
        except Exception as error:  # any file, any decoder failure: that file's line
            answers.append({"error": why_unusable(path, error)})
            continue
        answers.append({"jpeg": base64.b64encode(jpeg).decode("ascii")})
    return answers
