"""Benchmark of the training data path, in one run:

1. the full training step as the trainer runs it (LMDB read + batched augmentation +
   forward/backward/SGD) vs the model-only step on pre-loaded, pre-augmented tensors
   (target >= 0.9x: the data path is not the bottleneck);
2. our loader alone (LMDB raw batch read + random crop, flip, lighting, mean
   subtraction on the batch) vs a torchvision-style loader over the same images as JPEG
   files (`ImageFolder` + PIL `RandomCrop`/`RandomHorizontalFlip`/`ToTensor`/
   `Normalize`), both on one thread (target >= 5x per core).

    python bench/train.py [--images 256] [--batch 32] [--device cpu]   (run by `make bench`)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import bench_run, cpu_model, photo_like  # noqa: E402

from alexnet.augment import Augment  # noqa: E402
from alexnet.lmdb_store import write_store  # noqa: E402
from alexnet.reader import LmdbSplit  # noqa: E402
from alexnet.runtime import configure  # noqa: E402
from alexnet.stats import save_stats  # noqa: E402
from alexnet.train import EpochBatches, Trainer  # noqa: E402

CLASSES = [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(4)]


def make_data(root: Path, images: int) -> Path:
    """The same 256x256 images as an LMDB store (raw), JPEG files (ImageFolder) and
    stats files."""
    from PIL import Image

    records = []
    for i in range(images):
        label = i % len(CLASSES)
        jpeg = photo_like(256, 256, seed=i)
        folder = root / "folder" / CLASSES[label]["wnid"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{i}.jpg").write_bytes(jpeg)
        pixels = np.asarray(Image.open(folder / f"{i}.jpg").convert("RGB"))
        records.append((label, pixels.tobytes()))
    write_store(root / "train", [records], "raw", CLASSES, size=256)
    write_store(root / "val", [records[:8]], "raw", CLASSES, size=256)
    eig = {"eigenvalues": [900.0, 90.0, 9.0], "eigenvectors": np.eye(3).tolist()}
    save_stats(root / "stats", np.full((256, 256, 3), 120, np.float32), eig)
    return root


def full_and_model_only(root: Path, batch: int, device: str) -> tuple[float, float]:
    run = bench_run(
        root,
        epochs=2,
        batch_size=batch,
        val_batch_size=8,
        deterministic=False,
        device=device,
    )
    trainer = Trainer(run)
    trainer.run_epoch()  # warm-up epoch
    full = trainer.run_epoch()["images_per_s"]  # train steps only, validation excluded
    inputs = torch.randn(batch, 3, 224, 224, device=trainer.device) * 50
    labels = torch.randint(0, len(CLASSES), (batch,), device=trainer.device)
    model, optimizer = trainer.net, trainer.optimizer
    model.train()  # the epoch ended in validation's eval mode: dropout on, as in its steps

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), labels).backward()
        optimizer.step()

    step()
    steps = trainer.steps_per_epoch()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if trainer.device.type == "cuda":
        torch.cuda.synchronize()
    return full, steps * batch / (time.perf_counter() - start)


def loader_rates(root: Path, batch: int) -> tuple[float, float]:
    """Images/s of batches ready for the model, one thread each."""
    from torchvision import datasets, transforms

    torch.set_num_threads(1)
    split = LmdbSplit(root / "train")
    mean = torch.from_numpy(np.load(root / "stats" / "mean.npy")).permute(2, 0, 1)
    augment = Augment(mean, torch.tensor([900.0, 90.0, 9.0]), torch.eye(3))
    batches = EpochBatches(split, 0, batch, slice(None))
    steps = len(split) // batch
    generator = torch.Generator().manual_seed(0)

    def ours():
        for step in range(steps):
            images, _, _ = batches[(0, step)]
            augment(images, generator)

    normalise = transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    folder = datasets.ImageFolder(
        str(root / "folder"),
        transforms.Compose(
            [
                transforms.RandomCrop(224),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                normalise,
            ]
        ),
    )
    loader = torch.utils.data.DataLoader(
        folder, batch_size=batch, shuffle=True, num_workers=0, drop_last=True
    )

    def baseline():
        for _ in loader:
            pass

    rates = []
    for work in (ours, baseline):
        work()  # warm: page cache, allocator
        start = time.perf_counter()
        work()
        rates.append(steps * batch / (time.perf_counter() - start))
    return rates[0], rates[1]


def main() -> None:
    configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = make_data(Path(folder), args.images)
        print(
            f"{cpu_model()}; {torch.get_num_threads()} threads; {args.images} images "
            f"256x256; batch {args.batch}; device {args.device}"
        )
        full, model_only = full_and_model_only(root, args.batch, args.device)
        print(f"full training step (read + augment + step) {full:8.1f} img/s")
        print(f"model-only step (pre-loaded tensors)       {model_only:8.1f} img/s")
        print(f"full / model-only: {full / model_only:.2f}x  (target >= 0.9x)")
        ours, baseline = loader_rates(root, args.batch)
        print(f"our loader (LMDB raw + batched augment), 1 thread   {ours:8.1f} img/s")
        print(f"ImageFolder + PIL transforms, 1 thread              {baseline:8.1f} img/s")
        print(f"ours / torchvision-style: {ours / baseline:.2f}x per core  (target >= 5x)")


if __name__ == "__main__":
    main()
