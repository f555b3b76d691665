"""The checks that need a CUDA GPU (issues 4 and 5), printed as figures:

0. the fused LRN on CUDA equals the formula;
1. two-device placement: column 0 on cuda:0, column 1 on the CPU, forward and backward
   equal to the one-device model with the same weights;
2. the trainer on CUDA: a real data path (LMDB -> batched augmentation on the GPU) at
   batch 128, float32 vs bf16 autocast vs + channels-last vs + torch.compile;
3. training with the two columns on two devices (cuda:0 + cpu).

    python bench/gpu_check.py [--images 2048] [--out results.json]

Needs a CUDA device; writes its synthetic LMDB to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import bench_run  # noqa: E402

from alexnet.lmdb_store import write_store  # noqa: E402
from alexnet.lrn import local_response_norm  # noqa: E402
from alexnet.model import AlexNet  # noqa: E402
from alexnet.placement import place  # noqa: E402
from alexnet.runtime import configure  # noqa: E402
from alexnet.train import Trainer  # noqa: E402

CLASSES = [{"index": i, "wnid": f"n{i:08d}", "name": f"class {i}"} for i in range(10)]


def check_placement() -> dict:
    """Same weights, same input: one-device CPU model vs columns on cuda:0 and cpu."""
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    reference = AlexNet(num_classes=1000, dropout=0.0)
    placed = AlexNet(num_classes=1000, dropout=0.0)
    placed.load_state_dict(reference.state_dict())
    placed = place(placed, ["cuda:0", "cpu"])
    x = torch.randn(8, 3, 224, 224) * 50
    y = torch.randint(0, 1000, (8,))
    ref_logits = reference(x)
    F.cross_entropy(ref_logits, y).backward()
    logits = placed(x)
    F.cross_entropy(logits, y.to(logits.device)).backward()
    devices = (
        {str(p.device) for p in placed.column0.parameters()},
        {str(p.device) for p in placed.column1.parameters()},
    )
    grads = {}
    for prefix, first, second in zip(
        [f"features.{i}" for i in range(placed.num_features)]
        + [f"classifier.{i}" for i in range(placed.num_classifier)],
        placed.column0,
        placed.column1,
        strict=True,
    ):
        for name, p in first.named_parameters():
            q = dict(second.named_parameters())[name]
            grads[f"{prefix}.{name}"] = torch.cat([p.grad.cpu(), q.grad.cpu()])
    ref_grads = dict(reference.named_parameters())
    grad_error = max(  # per layer, |difference| / |gradient| (norms)
        float((grads[n] - ref_grads[n].grad).norm() / ref_grads[n].grad.norm()) for n in grads
    )
    result = {
        "logits_device": str(logits.device),
        "column0_devices": sorted(devices[0]),
        "column1_devices": sorted(devices[1]),
        "max_abs_logit_difference": float((logits.detach().cpu() - ref_logits).abs().max()),
        "max_relative_gradient_difference": grad_error,
    }
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    return result


def check_lrn() -> dict:
    """The fused (compiled) CUDA LRN against the float64 formula, and its gradient
    against the eager CPU path, on conv1-sized activations."""
    torch.manual_seed(0)
    x = torch.relu(torch.randn(128, 96, 55, 55, device="cuda")) * 50
    ours = local_response_norm(x, groups=2)
    ref = torch.cat(
        [F.local_response_norm(half.double(), 5, 5e-4, 0.75, 2.0) for half in x.chunk(2, dim=1)],
        dim=1,
    )
    small = x[:8].clone().requires_grad_()
    grad = torch.randn_like(small)
    (fused,) = torch.autograd.grad(local_response_norm(small, groups=2), small, grad)
    cpu = small.detach().cpu().requires_grad_()
    (eager,) = torch.autograd.grad(local_response_norm(cpu, groups=2), cpu, grad.cpu())
    from alexnet import model

    compiled = {
        name: model._FUSED.get(name) not in (model._fused_forward, model._fused_backward)
        for name in ("forward", "backward")
    }
    x.requires_grad_()
    grad = torch.randn_like(x)
    timings = {}
    for name, work in (
        ("forward", lambda: local_response_norm(x, groups=2)),
        ("forward+backward", lambda: local_response_norm(x, groups=2).backward(grad)),
    ):
        work()
        torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(20):
            work()
        torch.cuda.synchronize()
        timings[f"{name} ms (128x96x55x55)"] = round((time.perf_counter() - started) / 20e-3, 3)
    return {
        "compiled": compiled,
        **timings,
        "max_abs_forward_difference": float((ours.double() - ref).abs().max()),
        "max_abs_gradient_difference": float((fused.cpu() - eager).abs().max()),
        "max_abs_gradient": float(eager.abs().max()),
    }


def make_data(root: Path, images: int) -> Path:
    rng = np.random.default_rng(0)
    records = []
    for i in range(images):
        label = i % 10
        image = rng.integers(0, 80, (256, 256, 3), dtype=np.uint8)
        image[label * 20 : label * 20 + 60, :, label % 3] = 230  # a learnable band
        records.append((label, image.tobytes()))
    write_store(
        root / "train", [records[i : i + 256] for i in range(0, images, 256)], "raw", CLASSES
    )
    write_store(root / "val", [records[: min(images, 512)]], "raw", CLASSES)
    (root / "stats").mkdir()
    np.save(root / "stats" / "mean.npy", np.full((256, 256, 3), 50, np.float32))
    eig = {"eigenvalues": [900.0, 90.0, 9.0], "eigenvectors": np.eye(3).tolist()}
    (root / "stats" / "pca.json").write_text(json.dumps(eig))
    return root


def train_rate(root: Path, epochs: int = 2, **options) -> dict:
    """Images/s of the last epoch (the first pays cuDNN tuning and compilation)."""
    run = bench_run(
        root,
        epochs=epochs,
        batch_size=options.pop("batch_size", 128),
        val_batch_size=256,
        checkpoint_every=10_000,
        deterministic=False,
        **options,
    )
    trainer = Trainer(run)
    started = time.perf_counter()
    while not trainer.finished():
        trainer.run_epoch()
    last = trainer.history[-1]
    return {
        "images_per_s": round(last["images_per_s"], 1),
        "train_loss": [round(r["train_loss"], 4) for r in trainer.history],
        "val_top1_error": last["val_top1_error"],
        "seconds": round(time.perf_counter() - started, 1),
    }


def loader_ceiling(root: Path, workers: int, batches: int = 48) -> dict:
    """Images/s of the data path alone: the trainer's read-ahead stream (LMDB raw HWC
    batches, pinned) copied to the GPU and augmented there, with no model step."""
    run = bench_run(
        root,
        model={"init": "paper"},
        epochs=4,
        batch_size=128,
        checkpoint_every=10_000,
        deterministic=False,
        device="cuda",
        loader_workers=workers,
        channels_last=True,
    )
    trainer = Trainer(run)
    stream, generator = trainer.batches(), torch.Generator(device="cuda").manual_seed(0)
    for step in range(batches + 4):
        if step == 4:  # the workers have started
            torch.cuda.synchronize()
            started = time.perf_counter()
        images, _, size = next(stream)
        draws = trainer.augment.draw(size, *images.shape[-2:], generator, "cuda")
        trainer.augment.apply(images.to("cuda", non_blocking=True), draws)
    torch.cuda.synchronize()
    return {
        "workers": workers,
        "images_per_s": round(batches * 128 / (time.perf_counter() - started), 1),
    }


def main() -> None:
    configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--out", type=Path)
    parser.add_argument(
        "--training-only", action="store_true", help="skip the LRN, placement and two-device checks"
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device here")
    results = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    print(results, flush=True)
    if not args.training_only:
        results["lrn"] = check_lrn()
        print("fused LRN on cuda vs float64 formula / eager CPU gradient:", results["lrn"])
        results["placement"] = check_placement()
        print("placement cuda:0 + cpu:", results["placement"], flush=True)
    with tempfile.TemporaryDirectory() as folder:
        root = make_data(Path(folder), args.images)
        runs = {
            "float32": {},
            "bf16 autocast": {"amp": True},
            "bf16 + channels_last": {"amp": True, "channels_last": True},
            "bf16 + channels_last + compile": {"amp": True, "channels_last": True, "compile": True},
            "bf16 + channels_last, 4 loader workers": {
                "amp": True,
                "channels_last": True,
                "loader_workers": 4,
            },
            "bf16 + channels_last + compile, 4 loader workers": {
                "amp": True,
                "channels_last": True,
                "compile": True,
                "loader_workers": 4,
            },
        }
        for workers in (0, 4, 8):
            results[f"loader ceiling, {workers} workers"] = loader_ceiling(root, workers)
            print(
                "data path alone (read + copy + augment on cuda):",
                results[f"loader ceiling, {workers} workers"],
                flush=True,
            )
        for name, options in runs.items():
            results[f"cuda:0 {name}"] = train_rate(root, device="cuda", **options)
            print(f"train on cuda, batch 128, {name}:", results[f"cuda:0 {name}"], flush=True)
        if args.training_only:
            return
        results["two devices cuda:0,cpu"] = train_rate(
            root, epochs=1, device="cuda:0,cpu", batch_size=64
        )
        print(
            "train, columns on cuda:0 and cpu, batch 64:",
            results["two devices cuda:0,cpu"],
            flush=True,
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
