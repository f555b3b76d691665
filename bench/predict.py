"""Benchmark of `alexnet predict` on many files: ours, up to `PREDICT_BATCH` images a
forward pass (their 10 crops N at a time); the baseline, one image at a time (what the
command did before: ten passes of one crop each). Same files, same untrained model file
of ImageNet's 1,000 classes, in one process, taking turns, best of `--repeats`; files
are read, prepared and decoded in both (what the command's time is).

    python bench/predict.py
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import torch  # noqa: E402
from common import device_name, photo_like  # noqa: E402

from alexnet.model import AlexNet  # noqa: E402
from alexnet.modelfile import save_model  # noqa: E402
from alexnet.params import DEFAULTS, PREDICT_BATCH  # noqa: E402
from alexnet.predict import predict  # noqa: E402
from alexnet.runtime import configure  # noqa: E402


def model_file(path: Path) -> Path:
    """An untrained model file of the default model and image options."""
    model = AlexNet(num_classes=1000)
    classes = [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(1000)]
    size = DEFAULTS.prepare.size
    save_model(
        path,
        {
            "state_dict": model.state_dict(),
            "classes": classes,
            "model": {**DEFAULTS.model.model_dump(), "num_classes": 1000},
            "mean": torch.full((3, size, size), 120.0),
            "prepare": DEFAULTS.prepare.image_options(),
        },
    )
    return path


def seconds(paths: list[Path], model: Path, batch: int) -> float:
    start = time.perf_counter()
    results = list(predict(paths, model, 5, "cpu", batch=batch))
    assert all(result.error is None for result in results)
    return time.perf_counter() - start


def main() -> None:
    configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = model_file(Path(folder) / "alexnet.pt")
        paths = []
        for i in range(args.images):  # ImageNet's typical 500 x 375 photo
            paths.append(Path(folder) / f"{i:05d}.jpg")
            paths[-1].write_bytes(photo_like(500, 375, i))
        best = {"ours": float("inf"), "baseline": float("inf")}
        for _ in range(args.repeats):
            best["ours"] = min(best["ours"], seconds(paths, model, PREDICT_BATCH))
            best["baseline"] = min(best["baseline"], seconds(paths, model, 1))
    print(f"{device_name(torch.device('cpu'))}; {args.images} files of 500x375")
    print(f"| what | ours (batch {PREDICT_BATCH}) | baseline (one image a pass) | ratio |")
    print("|---|---|---|---|")
    ours, base = (args.images / best[side] for side in ("ours", "baseline"))
    print(f"| `alexnet predict`, images/s | {ours:.1f} | {base:.1f} | {ours / base:.2f}x |")


if __name__ == "__main__":
    main()
