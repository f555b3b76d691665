"""Benchmark of the model's training step, in one run: ours vs the same architecture
built naively from stock layers (`nn.Conv2d(groups=2)`, `nn.LocalResponseNorm(5,
alpha=5e-4, beta=0.75, k=2)`, the paper's formula in torch's convention) vs
torchvision's `alexnet` (a different, later variant, for context); the share of our
step spent in LRN (every LRN layer's forward and backward timed alone on the activations
of the step, under the same autocast); and the making of the model (its layers made on
the meta device, then `initialise`) vs torch's own initialisation of each layer first,
as before (drawn, then thrown away: `initialise` draws every weight). Every figure is
the best of its repeats (a step's rate: the best of `--steps` steps), so that the
share's two sides are taken alike.

    python bench/model.py [--batch 128] [--steps 3] [--device cuda] [--amp]
                                                         (CPU run by `make bench`)

A step is forward + backward + fused SGD (momentum 0.9, weight decay 5e-4) on random 224
inputs, float32 (bf16 autocast with --amp), all CPU threads or one GPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import best_seconds, device_name, print_ms_ratio  # noqa: E402

CPU = torch.device("cpu")

from alexnet.lrn import local_response_norm  # noqa: E402
from alexnet.model import AlexNet, allocate, initialise  # noqa: E402
from alexnet.runtime import configure  # noqa: E402


def naive(num_classes: int = 1000) -> nn.Module:
    """The paper's network from stock layers only."""
    lrn = lambda: nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)  # noqa: E731
    model = AlexNet(num_classes)
    model.features = nn.Sequential(
        nn.Conv2d(3, 96, 11, 4, 2),
        nn.ReLU(inplace=True),
        lrn(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=2),
        nn.ReLU(inplace=True),
        lrn(),
        nn.MaxPool2d(3, 2),
        nn.Conv2d(256, 384, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1, groups=2),
        nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1, groups=2),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2),
    )
    initialise(model, "paper")
    return model


def with_torch_init() -> AlexNet:
    """The model made as before: each layer's own initialisation, then the paper's."""
    with torch.device("meta"):
        model = AlexNet()
    allocate(model, CPU)
    for layer in model.layers().values():
        layer.reset_parameters()
    initialise(model, "paper")
    return model


def step_rate(
    model: nn.Module, batch: int, steps: int, device: torch.device = CPU, amp: bool = False
) -> float:
    model = model.to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, fused=True
    )  # as the trainer's
    x = torch.randn(batch, 3, 224, 224, device=device) * 50
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        optimizer.step()

    for _ in range(0 if device.type == "cpu" else 4):  # cuDNN picks its algorithms
        step()
    return batch / best_seconds(step, steps, device)  # (after one more warm-up step)


def lrn_share(
    model: AlexNet,
    batch: int,
    seconds_per_step: float,
    device: torch.device = CPU,
    repeats: int = 3,
    amp: bool = False,
) -> float:
    """Share of a training step spent in our LRN: the forward and backward of every LRN
    layer, timed alone on the activations it sees in the step, under the step's autocast
    (the best of `repeats`), over the step's best time."""
    inputs = []
    hooks = [
        m.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
        for m in model.features
        if type(m).__name__ == "LRN"
    ]
    with torch.autocast(device.type, torch.bfloat16, enabled=amp):
        model.to(device)(torch.randn(batch, 3, 224, 224, device=device) * 50)
    for hook in hooks:
        hook.remove()

    leaves = [x.requires_grad_() for x in inputs]
    grads = [torch.randn_like(x) for x in inputs]

    def lrn_passes():  # the LRN's own forward and backward, no copies around them
        for x, grad in zip(leaves, grads, strict=True):
            with torch.autocast(device.type, torch.bfloat16, enabled=amp):
                out = local_response_norm(x, groups=model.columns)
            torch.autograd.grad(out, x, grad)

    return best_seconds(lrn_passes, repeats, device) / seconds_per_step


def main() -> None:
    configure()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast")
    args = parser.parse_args()
    device = torch.device(args.device)
    where = device_name(device)
    print(
        f"{where}; torch {torch.__version__}; batch {args.batch}; {args.steps} steps after "
        f"warm-up; {'bf16 autocast' if args.amp else 'float32'}"
    )
    from torchvision.models import alexnet as torchvision_alexnet

    torch.manual_seed(0)
    rates = {
        name: step_rate(build(), args.batch, args.steps, device, args.amp)
        for name, build in (
            ("ours", AlexNet),
            ("naive stock layers", naive),
            ("torchvision alexnet", torchvision_alexnet),
        )
    }
    for name, rate in rates.items():
        print(f"{name:<22}{rate:8.1f} img/s   ours/this {rates['ours'] / rate:5.2f}x")
    # best of 3 on a CPU: one timing once read 18% where the kernels take 6% (a stall)
    repeats = 3 if device.type == "cpu" else 20
    seconds = args.batch / rates["ours"]  # its best step
    share = lrn_share(AlexNet(), args.batch, seconds, device, repeats, args.amp)
    print(f"LRN share of our step (forward + backward): {share:.1%}  (target <= 10%)")
    print("target: ours >= 1.0x the naive build")
    print("making the model (1,000 classes, on the CPU), best of 5:")
    ours = ("meta layers", best_seconds(AlexNet, 5, CPU))
    print_ms_ratio(ours, ("torch's init first", best_seconds(with_torch_init, 5, CPU)), 0.8)


if __name__ == "__main__":
    main()
