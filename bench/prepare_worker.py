"""Times one way of preparing a folder of JPEGs; run by bench/prepare.py in the
interpreter under test (ours, or a side environment with stock Pillow). Prints JSON.

Modes: `ours` (alexnet.imageops.prepare_image in this process, and taking turns with
it, the same through alexnet.decoder's child process as the prepare stage runs it:
`isolated`), `pillow` (the
plain-Pillow baseline: open, convert RGB, antialiased resize of the shorter side to 256,
centre crop, save JPEG), `decode` (decode only: the floor).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

from PIL import Image


def pillow_baseline(data: bytes) -> bytes:
    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    scale = 256 / min(width, height)
    size = (max(256, round(width * scale)), max(256, round(height * scale)))
    image = image.resize(size, Image.Resampling.BILINEAR)
    left, top = (size[0] - 256) // 2, (size[1] - 256) // 2
    out = io.BytesIO()
    image.crop((left, top, left + 256, top + 256)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def decode_only(data: bytes) -> None:
    Image.open(io.BytesIO(data)).load()


def isolated_prepare():
    """prepare_image of every file through the decoder's child process, streamed as the
    stage streams a shard's files."""
    from alexnet.decoder import Isolated
    from alexnet.params import DEFAULTS

    decoder, options = Isolated(timeout=60.0), DEFAULTS.prepare.image_options()
    decoder._running()  # start the child outside the timing
    return lambda files: decoder.prepare_all([(data, ".jpg") for data in files], options)


def each(work):
    return lambda files: [work(data) for data in files]


def best_of(works: dict, files: list[bytes], repeats: int) -> dict[str, float]:
    """Best seconds of each way over `repeats` rounds, the ways taking turns in each round
    (so that a slow spell of the machine hits them alike)."""
    best = dict.fromkeys(works, float("inf"))
    for _ in range(repeats):
        for name, work in works.items():
            start = time.perf_counter()
            work(files)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main(mode: str, folder: str, repeats: int) -> None:
    if mode == "ours":  # in this process, and isolated as the stage runs it, in turns
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from alexnet.imageops import prepare_image

        works = {"ours": each(prepare_image), "isolated": isolated_prepare()}
    else:
        works = {mode: each({"pillow": pillow_baseline, "decode": decode_only}[mode])}
    files = [p.read_bytes() for p in sorted(Path(folder).glob("*.jpg"))]
    seconds = best_of(works, files, repeats)
    import PIL

    print(json.dumps({"images": len(files), "seconds": seconds, "pil": PIL.__version__}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
