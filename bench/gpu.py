"""The training machine's data path and step, measured: one table and a JSON file.

On a CUDA GPU (`python bench/gpu.py`: ~6.5 minutes on an H200 when full steps ran 2
epochs; `--targets`: ~5, estimated):
- the model step alone (forward, backward, SGD on inputs already on the device);
- the full training step from a `raw` and from a `jpeg` LMDB (the trainer's own loop:
  read-ahead workers, the copy or the nvJPEG decode, augmentation, step), batch 128 and
  256, float32 and bf16 (+ channels-last), and from the `jpeg` LMDB at batch 256 in bf16
  with `train.compile` (the whole step compiled, replayed as CUDA graphs) and with the
  batches decoded by DALI (`compute.jpeg_decoder: dali`) or by the loader workers on the
  CPU (`cpu`) instead of torchvision's nvJPEG;
- the data path alone (the same stream, decoded and augmented, no model), with either
  decoder: the faster is the one to keep as the default;
- the LRN's share of the step (the step with and without it), and the LRN alone: its
  time and how near it comes to the memory's speed;
- the 10-crop evaluation, crops/s;
- a training checkpoint's save, seconds (the interval `train.checkpoint_minutes` is
  chosen against it).
Every training row runs with `train.deterministic` off, as the ImageNet preset does (on
CUDA it costs speed: deterministic cuDNN algorithms, each new tensor filled).
Targets (issue 18, H100/H200, bf16): full step from the JPEG LMDB >= 15,000 img/s, the
data path alone >= 2x the full step, LRN <= 10% of the step, evaluation >= 40,000 crops/s.

On a CPU (`--cpu`, in `make bench`): the JPEG loader (`LmdbSplit.read_batch` of a `jpeg`
store: libjpeg-turbo on a pool of threads) against torchvision `ImageFolder` + PIL
(+ `pil_to_tensor`, stacked) on the same 256x256 JPEGs, per core (one thread, one
process) and on every core (threads; DataLoader worker processes). Target: >= 2x per core.
Both decode every image with libjpeg-turbo, so the decode alone (torchvision's, PIL's) is
timed too: the baseline's time over it is the most any such loader can gain on one core.
Beside them, DALI's CPU decode of the same batches on every core (the decoder the tests
run DALI with; the CPU loader decodes on its own threads), and the batches left encoded,
as for a GPU, handed over by loader worker processes: one buffer a batch
(`alexnet.jpeg.Encoded`) against a tensor an image, as they travelled before.

    python bench/gpu.py [--images 4096] [--out gpu.json] [--targets]
    python bench/gpu.py --cpu [--images 1024] [--out cpu.json]
    python bench/gpu.py --device cpu --images 256 --batches 8 16 [--targets]  # a dry run

The dry run goes through every GPU row on the CPU, small (5-10 minutes on 2 cores, as
busy as the machine is: BENCHMARKS.md has its times): it checks the script before a
GPU's time is spent on it. Its figures mean nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import bench_run, best_seconds, cpu_model, device_name, photo_like  # noqa: E402

from alexnet import (
    jpeg_dali,  # noqa: E402
    runtime,  # noqa: E402
)
from alexnet.evaluate import evaluate, speed_switches  # noqa: E402
from alexnet.jpeg import decode_on, to_device  # noqa: E402
from alexnet.lmdb_store import write_store  # noqa: E402
from alexnet.lrn import local_response_norm  # noqa: E402
from alexnet.model import AlexNet  # noqa: E402
from alexnet.reader import Batches, LmdbSplit  # noqa: E402
from alexnet.runtime import configure  # noqa: E402
from alexnet.stats import save_stats  # noqa: E402
from alexnet.train import Trainer  # noqa: E402

# ImageNet's count: the full steps train the model the model step times (fc8 and its update)
CLASSES = [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(1000)]
# (figure, at least or at most, value): issue 18's targets
TARGETS = (
    ("full step, jpeg LMDB, batch 256, bf16, best of the decoders and compiled", ">=", 15_000),
    ("data path / full step", ">=", 2.0),
    ("LRN share of the step", "<=", 0.10),
    ("10-crop evaluation, jpeg LMDB, bf16 + channels_last (crops/s)", ">=", 40_000),
    ("JPEG loader / ImageFolder + PIL, per core", ">=", 2.0),
)


def make_stores(root: Path, images: int, encodings: tuple[str, ...]) -> list[bytes]:
    """A store per encoding in `root/<encoding>/` (train/, val/: the first quarter, and
    stats/) of the same photo-like 256x256 JPEGs; returns the JPEGs."""
    jpegs = [photo_like(256, 256, seed) for seed in range(images)]
    labels = [i % len(CLASSES) for i in range(images)]
    for encoding in encodings:
        payloads = jpegs if encoding == "jpeg" else [pixels(data) for data in jpegs]
        records = list(zip(labels, payloads, strict=True))
        for split, part in (("train", records), ("val", records[: max(images // 4, 1)])):
            batches = [part[i : i + 256] for i in range(0, len(part), 256)]
            write_store(root / encoding / split, batches, encoding, CLASSES, size=256)
        eig = {"eigenvalues": [900.0, 90.0, 9.0], "eigenvectors": np.eye(3).tolist()}
        save_stats(root / encoding / "stats", np.full((256, 256, 3), 110, np.float32), eig)
    return jpegs


def pixels(jpeg: bytes) -> bytes:
    """The HWC RGB bytes a JPEG decodes to: what a `raw` store holds for it."""
    image = decode_jpeg(torch.frombuffer(bytearray(jpeg), dtype=torch.uint8))
    return image.permute(1, 2, 0).contiguous().numpy().tobytes()


# -- on a CPU -----------------------------------------------------------------------


class PerImage(torch.utils.data.Dataset):
    """The batches of `picks` read encoded, each payload a tensor of its own: how a
    batch left a loader worker before `alexnet.jpeg.Encoded` held one buffer (the
    baseline of the "encoded batches" rows)."""

    def __init__(self, split: LmdbSplit, picks: list[list[int]]):
        self.split, self.picks = split, picks

    def __len__(self) -> int:
        return len(self.picks)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        batch = self.split.read_encoded(self.picks[index])
        return [payload.clone() for payload in batch.payloads()], batch.labels


def cpu_loader(root: Path, jpegs: list[bytes], batches: int) -> dict:
    """img/s of the JPEG loader and of ImageFolder + PIL over the same random batches of
    128, per core and on every core."""
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    folder = root / "imagefolder" / "c0"
    folder.mkdir(parents=True)
    for i, data in enumerate(jpegs):
        (folder / f"{i:05d}.jpg").write_bytes(data)
    rng = np.random.default_rng(0)
    picks = [rng.integers(0, len(jpegs), 128).tolist() for _ in range(batches)]
    images, cores = 128 * batches, runtime.cores()  # this process's, as DALI's threads
    dataset = ImageFolder(str(folder.parent), transform=pil_to_tensor)
    split = LmdbSplit(root / "jpeg" / "train")
    cpu = torch.device("cpu")

    def ours(threads: int):
        def work():
            # set when it runs: the works are all made before the first one runs
            split.threads = threads
            return [split.read_batch(pick, channels_last=True) for pick in picks]

        return work

    def imagefolder(workers: int):
        # the classic loader: an image an item, PIL decode, collated into batches
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=picks,
            num_workers=workers,
            persistent_workers=workers > 0,
            multiprocessing_context="forkserver" if workers else None,
        )
        return lambda: list(loader)

    def decode_alone(pil: bool):
        # what both loaders pay for each image: the decode (libjpeg-turbo in both), alone
        chosen = [jpegs[i] for pick in picks for i in pick]
        if pil:
            return lambda: [Image.open(io.BytesIO(data)).convert("RGB") for data in chosen]
        payloads = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in chosen]
        return lambda: [decode_jpeg(payload, mode=ImageReadMode.RGB) for payload in payloads]

    def encoded(dataset: torch.utils.data.Dataset):
        # the batches left encoded (as for a GPU), handed over by `cores` loader workers
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=cores,
            persistent_workers=True,
            multiprocessing_context="forkserver",
        )
        return lambda: list(loader)

    def dali():
        # the same batches read encoded, decoded by DALI's CPU decoder on `cores` threads
        shape = split.shape
        return lambda: [decode_on(split.read_encoded(pick), cpu, shape, "dali") for pick in picks]

    # ours reads what the baseline reads: the same pixels (libjpeg-turbo in both)
    split.threads = 1
    mine, _ = split.read_batch(picks[0], channels_last=True)
    theirs, _ = next(iter(torch.utils.data.DataLoader(dataset, batch_sampler=picks[:1])))
    assert (mine.int() - theirs.int()).abs().max() <= 2, "the loaders' images differ"

    rates = {}
    works = [
        ("JPEG loader, 1 thread", ours(1)),
        (f"JPEG loader, {cores} threads", ours(cores)),
        ("ImageFolder + PIL, 1 process", imagefolder(0)),
        (f"ImageFolder + PIL, {cores} worker processes", imagefolder(cores)),
        ("decode alone, torchvision, 1 thread", decode_alone(pil=False)),
        ("decode alone, PIL, 1 thread", decode_alone(pil=True)),
    ]
    one_buffer = f"encoded batches, {cores} loader workers, one buffer a batch"
    per_image = f"encoded batches, {cores} loader workers, a tensor an image"
    works += [
        (one_buffer, encoded(Batches(split, picks, encoded=True))),
        (per_image, encoded(PerImage(split, picks))),
    ]
    if not jpeg_dali.missing():
        works.append((f"DALI's CPU decode, {cores} threads", dali()))
    for name, work in works:
        rates[name] = round(images / best_seconds(work, 3, cpu), 1)
    per_core = rates["JPEG loader, 1 thread"] / rates["ImageFolder + PIL, 1 process"]
    results = {
        "device": f"{cpu_model()}, {cores} cores",
        "images": images,
        **rates,
        "JPEG loader / ImageFolder + PIL, per core": round(per_core, 2),
        # a loader that decodes every image cannot pass this ratio on one core
        "ceiling: decode alone / ImageFolder + PIL, per core": round(
            rates["decode alone, torchvision, 1 thread"] / rates["ImageFolder + PIL, 1 process"], 2
        ),
    }
    results["encoded batches: one buffer / a tensor an image"] = round(
        rates[one_buffer] / rates[per_image], 2
    )
    if (dali_rate := rates.get(f"DALI's CPU decode, {cores} threads")) is not None:
        ratio = dali_rate / rates[f"JPEG loader, {cores} threads"]
        results["DALI's CPU decode / JPEG loader, every core"] = round(ratio, 2)
    return results


# -- on a GPU -----------------------------------------------------------------------


CUDA = torch.device("cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_step(
    batch: int, amp: bool, channels_last: bool, lrn: bool = True, device: torch.device = CUDA
) -> float:
    """img/s of forward + backward + SGD on a batch already on the GPU. (Every GPU
    function takes `device`: on a CPU, with small sizes, it checks the script.)"""
    model = AlexNet(num_classes=1000, lrn=lrn).to(device)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=layout)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, fused=True)
    inputs = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=layout)
    labels = torch.randint(0, 1000, (batch,), device=device)

    def step():
        for _ in range(10):
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                logits = model(inputs)
            loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return 10 * batch / best_seconds(step, 3, device)


def lrn_maps(batch: int) -> tuple[tuple[int, int, int, int], ...]:
    """The shapes of the maps the LRN normalises in a step of `batch`: conv1's, conv2's."""
    return (batch, 96, 55, 55), (batch, 256, 27, 27)


def lrn_bytes(batch: int) -> int:
    """Bytes of one read of each input and one write of each output of the LRN's forward
    (x, out) and backward (x, g, dx) on `lrn_maps(batch)` in bf16: its memory floor. (The
    CUDA path also copies a channels-last x and g to NCHW: ~4 passes more, not counted.)"""
    return 5 * 2 * sum(math.prod(shape) for shape in lrn_maps(batch))


def lrn_alone(batch: int, device: torch.device = CUDA) -> float:
    """ms of the LRN's forward + backward on `lrn_maps(batch)` (two columns), in bf16 and
    channels-last as a step hands them over (the best of 3 rounds of 10)."""
    xs = [
        torch.relu(torch.randn(shape, device=device))
        .to(torch.bfloat16)
        .contiguous(memory_format=torch.channels_last)
        .requires_grad_()
        for shape in lrn_maps(batch)
    ]
    grads = [torch.randn_like(x) for x in xs]

    def work():
        for _ in range(10):
            for x, grad in zip(xs, grads, strict=True):
                torch.autograd.grad(local_response_norm(x, groups=2), x, grad)

    return 1e3 * best_seconds(work, 3, device) / 10


WORKERS = 4  # the loaders' read-ahead processes
# Batches the workers hold read ahead (2 each): they fill while the trainer validates and
# saves, so the first steps of an epoch or a stream take them without waiting. Timing
# starts after them (a first GPU run timed whole epochs of 8 batches: the model's speed).
AHEAD = 2 * WORKERS


def full_step(
    root: Path, batch: int, device: torch.device = CUDA, decoder: str | None = None, **train
) -> float:
    """img/s of the trainer's steady steps, a jpeg store decoded by `decoder` (else the
    default): the better of its second and third epochs (the first pays the workers' start
    and any compile), each past its first `AHEAD` steps (read ahead while the epoch before
    validated)."""
    run = bench_run(
        root,
        jpeg_decoder=decoder,
        epochs=3,
        batch_size=batch,
        val_batch_size=256,
        deterministic=False,
        device=str(device),
        loader_workers=WORKERS,
        **train,
    )
    trainer = Trainer(run)
    trainer.run_epoch()
    steps = trainer.steps_per_epoch()
    if steps <= AHEAD:
        raise ValueError(f"{steps} steps an epoch: more images, for more than {AHEAD}")
    rates = []
    for _ in range(2):
        marks: dict[int, float] = {}

        def on_step(step: int, _: int, marks: dict[int, float] = marks) -> None:
            if step in (AHEAD, steps):
                synchronize(device)
                marks[step] = time.perf_counter()

        trainer.run_epoch(on_step)
        rates.append((steps - AHEAD) * batch / (marks[steps] - marks[AHEAD]))
    return max(rates)


def checkpoint_save(root: Path, device: torch.device = CUDA) -> float:
    """Seconds of one training checkpoint of the ImageNet model (weights and momenta,
    ~0.49 GB, from the device to a synced file), the best of 3: what a run pays each
    `train.checkpoint_minutes` and at each epoch's end."""
    trainer = Trainer(bench_run(root, epochs=1, device=str(device)))
    trainer._make_momenta()  # as after a step: a checkpoint holds them
    try:
        return best_seconds(trainer.save, 3, device)
    finally:
        trainer.checkpoint.unlink(missing_ok=True)


def data_path(
    root: Path, batch: int, steps: int, device: torch.device = CUDA, decoder: str | None = None
) -> float:
    """img/s of the trainer's stream alone over `steps` batches past the first `AHEAD`:
    read ahead, copied or decoded on the GPU (by `decoder`, else the default), augmented
    there; no model step."""
    run = bench_run(
        root,
        jpeg_decoder=decoder,
        epochs=4,
        batch_size=batch,
        deterministic=False,
        device=str(device),
        loader_workers=WORKERS,
        channels_last=True,
    )
    trainer = Trainer(run)
    stream, generator = trainer.batches(), torch.Generator(device=device).manual_seed(0)
    for step in range(steps + AHEAD):
        if step == AHEAD:  # the workers have started, and what they read ahead is taken
            synchronize(device)
            started = time.perf_counter()
        images, _, size = next(stream)
        images = to_device(images, trainer.device, trainer.train.shape, run.jpeg_decoder)
        draws = trainer.augment.draw(size, *images.shape[-2:], generator, trainer.device)
        trainer.augment.apply(images, draws)
    synchronize(device)
    rate = steps * batch / (time.perf_counter() - started)
    trainer._stream = None  # its workers end now, not when the cycle is collected
    return rate


def evaluation(root: Path, amp: bool, device: torch.device = CUDA) -> float:
    """crops/s of the 10-crop evaluation of the train store (the stage's code; `amp`: its
    evaluate.amp and evaluate.channels_last), once its loader's workers are up: from the
    end of the first batch (a small split's time is otherwise their start) to the end of
    the run, the batches between left to overlap as in the stage; the better of two."""
    model = AlexNet(num_classes=len(CLASSES)).to(device).eval()
    split = LmdbSplit(root / "train")
    mean = torch.full((3, 256, 256), 110.0)

    def steady() -> float:
        started: list[float] = []
        counts: list[int] = []

        def on_batch(count: int) -> None:
            if started:  # a wait for the device here would undo the stage's overlap
                counts.append(count)
                return
            synchronize(device)
            started.append(time.perf_counter())

        batch = max(1, min(250, len(split) // 8))  # the stage's 250, from 2,000 images up
        with speed_switches(model, device, amp, channels_last=amp):
            evaluate(model, split, mean, 224, batch, device, on_batch=on_batch, workers=4)
        synchronize(device)  # (evaluate has read its results on the host: done already)
        return 10 * sum(counts) / (time.perf_counter() - started[0])

    return max(steady() for _ in range(2))


def gpu(
    root: Path,
    images: int,
    device: torch.device,
    batches: tuple[int, int],
    out: Path | None,
    targets_only: bool = False,
) -> dict:
    """Every row, at the two batch sizes `batches` (the issue's: 128 and 256; the
    target rows are at the larger), float32 and bf16; with `targets_only`, only the
    larger batch in bf16. `out` gets the figures so far after each row, so a run cut
    short by a time limit still leaves them; a row that fails says so (with its
    traceback on stderr) and the others still run: a lent GPU's minutes are few."""
    results: dict = {"device": device_name(device), "torch": torch.__version__}
    if out:  # a crash in the first row (a compiler's abort) still leaves the device's name
        out.write_text(json.dumps(results, indent=2))

    def row(name: str, measure: Callable[[], float], digits: int = 0) -> float | None:
        started = time.perf_counter()
        try:
            value = measure()
        except Exception as error:  # noqa: BLE001 (reported in the row, not swallowed)
            traceback.print_exc()
            value, results[name] = None, f"failed: {type(error).__name__}: {error}"[:300]
        else:
            results[name] = round(value, digits or None)
        print(f"{name}: {results[name]} ({time.perf_counter() - started:.0f} s)", flush=True)
        if out:
            out.write_text(json.dumps(results, indent=2))
        return value

    large = batches[1]
    sizes, precisions = ((large,), (True,)) if targets_only else (batches, (False, True))
    for batch in sizes:
        for amp in precisions:
            precision = "bf16 + channels_last" if amp else "float32"
            name = f"model step, batch {batch}, {precision}"
            row(name, lambda b=batch, a=amp: model_step(b, a, a, device=device))
    # the data path's stream: 4 epochs of the store, less what is read ahead
    steps = min(32, 4 * (images // large) - AHEAD)
    stream: dict[str, float | None] = {}
    fulls: dict[tuple[str, int, bool], float | None] = {}
    for encoding in ("raw", "jpeg"):
        for batch in sizes:
            for amp in precisions:
                options = {"amp": amp, "channels_last": amp}
                precision = "bf16 + channels_last" if amp else "float32"
                name = f"full step, {encoding} LMDB, batch {batch}, {precision}"
                fulls[encoding, batch, amp] = row(
                    name, lambda e=encoding, b=batch, o=options: full_step(root / e, b, device, **o)
                )
        name = f"data path alone, {encoding} LMDB, batch {large}"
        stream[encoding] = row(name, lambda e=encoding: data_path(root / e, large, steps, device))
    # the target's rows again, the JPEG batches decoded another way (compute.jpeg_decoder):
    # by DALI, or on the CPU by the loader workers' threads; the fastest is the one to keep
    bf16 = {"amp": True, "channels_last": True}
    others: dict[str, tuple[float | None, float | None]] = {}
    for decoder, label in (("dali", "DALI"), ("cpu", "the loader workers' CPU threads")):
        if decoder == "dali" and (why := jpeg_dali.missing()):
            results["DALI"] = f"not measured: {why}"
            continue
        name = f"data path alone, jpeg LMDB, batch {large}, {label}"
        data = row(name, lambda d=decoder: data_path(root / "jpeg", large, steps, device, d))
        name = f"full step, jpeg LMDB, batch {large}, bf16 + channels_last, {label}"
        full = row(name, lambda d=decoder: full_step(root / "jpeg", large, device, d, **bf16))
        others[label] = (data, full)
    # LRN, evaluation and a checkpoint before the compiled step: its compile takes ~1 min.
    # The share's two sides one after the other: the row above ran minutes ago, and the
    # GPU's clocks and memory have moved since.
    with_lrn = row(
        f"model step, batch {large}, bf16 + channels_last, with the LRN (beside the next)",
        lambda: model_step(large, True, True, device=device),
    )
    without = row(
        f"model step, batch {large}, bf16 + channels_last, without the LRN",
        lambda: model_step(large, True, True, lrn=False, device=device),
    )
    if with_lrn and without:
        row("LRN share of the step", lambda: 1 - with_lrn / without, 3)
    alone = f"LRN forward + backward alone, conv1 + conv2 maps, batch {large}, bf16 + channels_last"
    if lrn_ms := row(f"{alone} (ms)", lambda: lrn_alone(large, device), 2):
        row(f"{alone} (GB/s of one pass)", lambda: lrn_bytes(large) / lrn_ms / 1e6)
    for amp in precisions:
        precision = "bf16 + channels_last" if amp else "float32"
        name = f"10-crop evaluation, jpeg LMDB, {precision} (crops/s)"
        row(name, lambda a=amp: evaluation(root / "jpeg", a, device))
    row("checkpoint save, ImageNet model (s)", lambda: checkpoint_save(root / "raw", device), 2)
    name = f"full step, jpeg LMDB, batch {large}, bf16 + channels_last + compile"
    compiled = row(
        name,
        lambda: full_step(root / "jpeg", large, device, amp=True, channels_last=True, compile=True),
    )
    eager = fulls["jpeg", large, True]
    for label, (data, full) in others.items():
        if data and full and eager and stream["jpeg"]:
            name = f"{label} / torchvision's nvJPEG"
            row(f"{name}, data path alone", lambda d=data: d / stream["jpeg"], 2)
            row(f"{name}, full step", lambda f=full: f / eager, 2)
    # (data path, full step) of each way to train from the jpeg store: the target rows
    # take the best full step, and the data path of the same decoder
    ways = [(stream["jpeg"], eager), (stream["jpeg"], compiled), *others.values()]
    if ways := [(data, full) for data, full in ways if full]:
        data, best = max(ways, key=lambda way: way[1])
        name = f"full step, jpeg LMDB, batch {large}, bf16, best of the decoders and compiled"
        row(name, lambda: best)
        if data:
            row("data path / full step", lambda: data / best, 2)
    return results


def table(results: dict) -> None:
    print(f"\n{'what':<78}{'figure':>12}")
    for name, value in results.items():
        print(f"{name:<78}{value!s:>12}")
    for name, sense, target in TARGETS:
        if isinstance(value := results.get(name), float | int):
            met = value >= target if sense == ">=" else value <= target
            print(f"target: {name} {sense} {target}: {value} ({'met' if met else 'MISSED'})")


def main() -> None:
    configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the CPU loader comparison only")
    parser.add_argument("--images", type=int, help="images in the stores (4096; CPU: 1024)")
    parser.add_argument("--out", type=Path, help="also write the figures here, as JSON")
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of the GPU rows")
    parser.add_argument(
        "--batches", type=int, nargs=2, default=[128, 256], help="the two batch sizes"
    )
    parser.add_argument(
        "--targets", action="store_true", help="only the target rows (larger batch, bf16)"
    )
    args = parser.parse_args()
    gpu_only = [parser.get_default(k) != getattr(args, k) for k in ("device", "batches", "targets")]
    if args.cpu and any(gpu_only):
        parser.error(
            "--cpu times the CPU loaders only: --device, --batches and --targets are not its"
        )
    device = torch.device(args.device)
    if not args.cpu and device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device here (the CPU part: python bench/gpu.py --cpu)")
    images = args.images or (1024 if args.cpu else 4096)
    if args.cpu and images < 128:
        parser.error("--cpu times batches of 128: --images 128 or more")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as folder:
        root = Path(folder)
        jpegs = make_stores(root, images, ("jpeg",) if args.cpu else ("raw", "jpeg"))
        print(f"stores of {images} images made in {time.perf_counter() - started:.0f} s")
        if args.cpu:
            torch.set_num_threads(1)
            results = cpu_loader(root, jpegs, batches=images // 128)
        else:
            batches = tuple(args.batches)
            results = gpu(root, images, device, batches, args.out, args.targets)
    print(f"measured in {time.perf_counter() - started:.0f} s")
    table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
