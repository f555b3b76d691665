"""Benchmark of the LMDB store and the stats reduction, ours vs a baseline, one core:

1. pack writes: `write_store` (sorted appends, big transactions, no sync) vs plain `lmdb`
   puts of the same values (default environment, one commit per 1000 puts);
2. random reads of 128-image batches: our reader (`raw` payloads) vs torchvision
   `ImageFolder` + PIL decode (+ `pil_to_tensor`) of the same 256x256 JPEGs (the `jpeg`
   payloads against the same baseline: `bench/gpu.py --cpu`);
3. stats: `shard_moments` over tar shards vs decoding the same shards only.

    python bench/store.py [--images 1000]      (also run by `make bench`)
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cpu_model, photo_like  # noqa: E402

from alexnet.lmdb_store import encode_value, key, write_store  # noqa: E402
from alexnet.reader import LmdbSplit  # noqa: E402
from alexnet.runtime import configure  # noqa: E402
from alexnet.shards import Record, iter_shard, write_shard  # noqa: E402
from alexnet.stats import decode_rgb, shard_moments  # noqa: E402


def best(function, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


# One class: every record's label is 0 (a reader checks labels against the class list).
CLASSES = [{"index": 0, "wnid": "n00000000", "name": "class 0"}]


def bench_writes(folder: Path, raw: list[tuple[int, bytes]]) -> tuple[float, float]:
    megabytes = sum(len(p) + 12 for _, p in raw) / 1e6
    batches = [raw[i : i + 256] for i in range(0, len(raw), 256)]

    def ours():
        write_store(folder / "ours", batches, "raw", CLASSES, size=256)

    def plain():
        env = lmdb.open(str(folder / "plain"), map_size=1 << 34)
        txn = env.begin(write=True)
        for index, (label, payload) in enumerate(raw):
            txn.put(key(index), encode_value(label, 256, 256, payload))
            if index % 1000 == 999:
                txn.commit()
                txn = env.begin(write=True)
        txn.commit()
        env.close()

    def fresh(function):
        def run():
            for name in ("ours", "plain"):
                for path in (folder / name).glob("*"):
                    path.unlink()
            function()

        return run

    return megabytes / best(fresh(ours)), megabytes / best(fresh(plain))


def bench_reads(folder: Path, jpegs: list[bytes], raw, batches: int = 8) -> dict[str, float]:
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    write_store(folder / "raw", [raw], "raw", CLASSES, size=256)
    (folder / "imagefolder" / "c0").mkdir(parents=True)
    for i, data in enumerate(jpegs):
        (folder / "imagefolder" / "c0" / f"{i:05d}.jpg").write_bytes(data)
    rng = np.random.default_rng(0)
    picks = [rng.integers(0, len(jpegs), 128) for _ in range(batches)]
    images = 128 * batches

    rates = {}
    split = LmdbSplit(folder / "raw")
    split.read_batch(picks[0])  # warm: the pages are in the page cache for both sides
    rates["raw"] = images / best(lambda: [split.read_batch(p) for p in picks])
    dataset = ImageFolder(str(folder / "imagefolder"))
    # the same images: the raw store's records are these JPEGs decoded
    mine = split.read_batch(picks[0])[0].int()
    theirs = torch.stack([pil_to_tensor(dataset[int(i)][0]) for i in picks[0]]).int()
    assert (mine - theirs).abs().max() <= 2, "the raw store's images differ from the JPEGs'"

    def imagefolder():
        for pick in picks:
            torch.stack([pil_to_tensor(dataset[int(i)][0]) for i in pick])

    rates["imagefolder"] = images / best(imagefolder)
    return rates


def bench_stats(folder: Path, jpegs: list[bytes]) -> tuple[float, float]:
    shards = []
    for start in range(0, len(jpegs), 250):
        path = folder / f"shard-{start // 250:05d}.tar"
        write_shard(
            path, [Record(f"{i}", j, 0) for i, j in enumerate(jpegs[start : start + 250])], {}
        )
        shards.append(path)

    def decode_only():  # the same reading and decoding as ours, without the sums
        for shard in shards:
            for record in iter_shard(shard):
                decode_rgb(record.jpeg)

    ours = best(lambda: [shard_moments(s, 256) for s in shards])
    return len(jpegs) / ours, len(jpegs) / best(decode_only)


def main() -> None:
    configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"CPU: {cpu_model()}; one core; best of 3; {args.images} photo-like 256x256 JPEGs")
    jpegs = [photo_like(256, 256, i) for i in range(args.images)]
    raw = [(0, np.asarray(Image.open(io.BytesIO(j)).convert("RGB")).tobytes()) for j in jpegs]
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
        folder = Path(tmp)
        (folder / "w").mkdir()
        ours_mb, plain_mb = bench_writes(folder / "w", raw)
        rows = [("pack write MB/s", "ours", ours_mb, "plain lmdb puts", plain_mb, ">= 0.8x")]
        rates = bench_reads(folder / "r", jpegs, raw)
        base = rates["imagefolder"]
        rows.append(
            ("random reads img/s", "ours raw", rates["raw"], "ImageFolder+PIL", base, ">= 5x")
        )
        stats_rate, decode_rate = bench_stats(folder / "s", jpegs)
        rows.append(("stats img/s", "ours", stats_rate, "decode-only", decode_rate, ">= 0.8x"))
        for what, ours_name, ours, base_name, baseline, target in rows:
            print(
                f"{what:<20}{ours_name:>10} {ours:7.0f}   {base_name:>16} {baseline:7.0f}   "
                f"ratio {ours / baseline:5.2f}x  {'target ' + target if target else ''}"
            )


if __name__ == "__main__":
    main()
