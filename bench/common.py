"""What the benchmarks share: photo-like test images, the machine's description, and the
line a timed pair ends with."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet.doctor import cpu_model  # noqa: F401 (the benchmarks' import)


def photo_like(width: int, height: int, seed: int) -> bytes:
    """Smooth structure plus fine texture, so the JPEG is about as large as a photo's."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    waves = [np.sin(x * rng.uniform(4, 20) + y * rng.uniform(4, 20) + c) for c in range(3)]
    fine = rng.normal(0, 1, (height // 2 + 1, width // 2 + 1, 3)).repeat(2, 0).repeat(2, 1)
    pixels = np.clip(np.stack(waves, -1) * 70 + 128 + fine[:height, :width] * 22, 0, 255)
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="JPEG", quality=90)
    return out.getvalue()


def device_name(device) -> str:
    """What a torch benchmark ran on: the GPU's name, or the CPU's and its threads.
    (torch is imported here: the Pillow baseline's environment has none.)"""
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}; {torch.get_num_threads()} threads"


def best_seconds(work, repeats: int, device) -> float:
    """The least seconds of `repeats` calls of `work` after one warm-up call, the
    device's queue drained around each."""
    import time

    import torch

    work()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        work()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def bench_run(root: Path, model: dict | None = None, jpeg_decoder: str | None = None, **train):
    """A `TrainRun` on the benchmark's stores in `root` (train/, val/, stats/), with a
    fresh checkpoint path, caffe init unless `model` says otherwise, the default JPEG
    decoder unless `jpeg_decoder` names one, and no checkpoint but at an epoch's end
    unless `train` says otherwise (the steps are what is timed)."""
    import time

    from alexnet.params import ComputeParams, ModelParams, PrepareParams, TrainParams
    from alexnet.train import TrainRun

    return TrainRun(
        train=TrainParams(**{"checkpoint_minutes": 10**6, **train}),
        model=ModelParams(**{"init": "caffe", **(model or {})}),
        image=PrepareParams().image_options(),
        kernels=ComputeParams().kernels,
        jpeg_decoder=jpeg_decoder or ComputeParams().jpeg_decoder,
        lmdb=root,
        stats=root / "stats",
        model_path=root / "alexnet.pt",
        checkpoint=root / f"ckpt-{time.monotonic_ns()}.pt",
        metrics=root / "metrics",
    )


def print_ms_ratio(ours: tuple[str, float], baseline: tuple[str, float], at_most: float) -> None:
    """Two seconds-per-item figures (label, seconds) in ms, and ours over the baseline's
    against the target `at_most`."""
    ratio = ours[1] / baseline[1]
    verdict = "met" if ratio <= at_most else "MISSED"
    print(f"  ours ({ours[0]}) {ours[1] * 1e3:.1f} ms, {baseline[0]} {baseline[1] * 1e3:.1f} ms:")
    print(f"  {ratio:.2f}x ({verdict}: <= {at_most}x)")
