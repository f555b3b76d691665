"""Benchmark of the evaluate stage's nearest-neighbour search (paper section 6.1), in one
run: our streamed search (`alexnet.neighbours.nearest`: read a batch of the training
store, centre crops, fc7 vectors, exact distances to the queries, merge the k best)
vs the forward pass it cannot avoid (the centre-crop fc7 vectors of the same batches of
the same store, read the same way, nothing kept). Target: overhead <= 10%, so the search
costs what one forward pass over the training store costs, whatever its size.

    python bench/neighbours.py [--images 800] [--batch 128] [--repeats 3] [--device cpu]
        (run by `make bench`)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import best_seconds, device_name  # noqa: E402

from alexnet.lmdb_store import write_store  # noqa: E402
from alexnet.model import AlexNet  # noqa: E402
from alexnet.neighbours import hidden_vectors, nearest  # noqa: E402
from alexnet.reader import LmdbSplit, batch_loader, in_order  # noqa: E402
from alexnet.runtime import configure  # noqa: E402

CLASSES = [{"index": i, "wnid": f"n{i}", "name": f"c{i}"} for i in range(10)]


def store(folder: Path, images: int) -> LmdbSplit:
    """A raw store of `images` random 256x256 records (the demo's store is raw too)."""
    rng = np.random.default_rng(0)
    records = [
        (i % 10, rng.integers(0, 256, (256, 256, 3), dtype=np.uint8).tobytes())
        for i in range(images)
    ]
    write_store(folder, [records], "raw", CLASSES, size=256)
    return LmdbSplit(folder)


def main() -> None:
    configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=800, help="training store size")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = AlexNet(num_classes=10).to(device).eval()
    mean = torch.rand(3, 256, 256) * 255
    with tempfile.TemporaryDirectory() as folder:
        train = store(Path(folder) / "train", args.images)
        queries = hidden_vectors(model, train.read_batch(range(5))[0].to(device), mean, 224)

        def forward_only() -> None:
            batches = in_order(train, args.batch)
            for images, _ in batch_loader(batches, range(len(batches))):
                hidden_vectors(model, images.to(device), mean.to(device), 224)

        def search() -> None:
            nearest(model, queries, train, mean, 224, 6, args.batch, device)

        ours = best_seconds(search, args.repeats, device)
        baseline = best_seconds(forward_only, args.repeats, device)
    where = device_name(device)
    print(f"{where}; {args.images} training images, batch {args.batch}, 5 queries, k 6")
    print(f"neighbour search (ours)      {args.images / ours:8.1f} images/s  {ours:6.1f} s")
    print(f"centre-crop fc7 forward pass {args.images / baseline:8.1f} images/s  {baseline:6.1f} s")
    print(f"overhead of ours: {ours / baseline - 1:+.1%}  (target <= +10%)")


if __name__ == "__main__":
    main()
