"""Times one way of preparing a folder of JPEGs; run by bench/prepare.py in the
interpreter under test (ours, or a side environment with stock Pillow). Prints JSON.

Modes: `ours` (alexnet.imageops.prepare_image of each file's bytes, and taking turns
with it, the stage's whole work on the folder as one shard, in this process: `shard`,
and in alexnet.decoder's child process as the stage runs it: `isolated`), `pillow` (the
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


def shards(folder: str, isolated: bool):
    """The prepare stage's work on the folder as one shard (read, fingerprint, prepare,
    write the tar to memory): in this process, or in the decoder's child as the stage
    runs it."""
    import shutil
    import tempfile

    from alexnet.params import DEFAULTS
    from alexnet.prepare import Item, ShardPlan, make_shard, prepare_shard

    paths = sorted(Path(folder).glob("*.jpg"))
    items = [Item(str(p), p.name, 0, p.stem) for p in paths]
    plan, params = ShardPlan("train", 0, items), DEFAULTS.prepare
    make = prepare_shard if isolated else make_shard
    out = tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None)
    if isolated:  # start the child outside the timing
        make(ShardPlan("val", 0, []), out, params)

    def run(files):
        shutil.rmtree(Path(out) / "train", ignore_errors=True)  # made, never reused
        make(plan, out, params)

    return run


def each(work):
    return lambda files: [work(data) for data in files]


def rounds(works: dict, files: list[bytes], repeats: int) -> dict[str, list[float]]:
    """Seconds of each way in each of `repeats` rounds, the ways taking turns in each
    round (so that a slow spell of the machine hits them alike), in reverse order every
    other round (so that none always runs after another)."""
    seconds: dict[str, list[float]] = {name: [] for name in works}
    for round_ in range(repeats):
        for name in list(works)[:: -1 if round_ % 2 else 1]:
            work = works[name]
            start = time.perf_counter()
            work(files)
            seconds[name].append(time.perf_counter() - start)
    return seconds


def main(mode: str, folder: str, repeats: int) -> None:
    if mode == "ours":  # in this process, and isolated as the stage runs it, in turns
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from alexnet.imageops import prepare_image

        works = {
            "ours": each(prepare_image),
            "shard": shards(folder, isolated=False),
            "isolated": shards(folder, isolated=True),
        }
    else:
        works = {mode: each({"pillow": pillow_baseline, "decode": decode_only}[mode])}
    files = [p.read_bytes() for p in sorted(Path(folder).glob("*.jpg"))]
    seconds = rounds(works, files, repeats)
    import PIL

    print(json.dumps({"images": len(files), "seconds": seconds, "pil": PIL.__version__}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
