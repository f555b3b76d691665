"""Benchmark of the model's training step, in one run: ours vs the same architecture
built naively from stock layers (`nn.Conv2d(groups=2)`, `nn.LocalResponseNorm(5,
alpha=5e-4, beta=0.75, k=2)`, the paper's formula in torch's convention) vs
torchvision's `alexnet` (a different, later variant, for context); and the share of our
step spent in LRN (forward and backward, measured by the profiler).

    python bench/model.py [--batch 128] [--steps 3]      (also run by `make bench`)

A step is forward + backward + SGD (momentum 0.9, weight decay 5e-4) on random 224
inputs, float32, all CPU threads.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import cpu_model  # noqa: E402

from alexnet.model import AlexNet, initialise, local_response_norm  # noqa: E402


def naive(num_classes: int = 1000) -> nn.Module:
    """The paper's network from stock layers only."""
    lrn = lambda: nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)  # noqa: E731
    model = AlexNet(num_classes)
    model.features = nn.Sequential(
        nn.Conv2d(3, 96, 11, 4, 2), nn.ReLU(inplace=True), lrn(), nn.MaxPool2d(3, 2),
        nn.Conv2d(96, 256, 5, padding=2, groups=2), nn.ReLU(inplace=True), lrn(),
        nn.MaxPool2d(3, 2), nn.Conv2d(256, 384, 3, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(384, 384, 3, padding=1, groups=2), nn.ReLU(inplace=True),
        nn.Conv2d(384, 256, 3, padding=1, groups=2), nn.ReLU(inplace=True), nn.MaxPool2d(3, 2),
    )  # fmt: skip
    initialise(model, "paper")
    return model


def step_rate(model: nn.Module, batch: int, steps: int) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    x = torch.randn(batch, 3, 224, 224) * 50
    y = torch.randint(0, 1000, (batch,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return batch * steps / (time.perf_counter() - start)


def lrn_share(model: AlexNet, batch: int, seconds_per_step: float) -> float:
    """Share of a training step spent in our LRN: the forward and backward of every LRN
    layer, timed alone on the activations it sees in the step, over the step's time."""
    inputs = []
    hooks = [m.register_forward_hook(lambda m, i, o: inputs.append(i[0].detach()))
             for m in model.features if type(m).__name__ == "LRN"]  # fmt: skip
    model(torch.randn(batch, 3, 224, 224) * 50)
    for hook in hooks:
        hook.remove()

    def lrn_passes():
        for x in inputs:
            x = x.clone().requires_grad_()
            out = local_response_norm(x, groups=model.columns)
            out.backward(torch.ones_like(out))

    lrn_passes()  # warm-up
    start = time.perf_counter()
    lrn_passes()
    return (time.perf_counter() - start) / seconds_per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(f"CPU: {cpu_model()}; {torch.get_num_threads()} threads; batch {args.batch}; "
          f"{args.steps} steps after one warm-up")  # fmt: skip
    from torchvision.models import alexnet as torchvision_alexnet

    torch.manual_seed(0)
    rates = {
        "ours": step_rate(AlexNet(), args.batch, args.steps),
        "naive stock layers": step_rate(naive(), args.batch, args.steps),
        "torchvision alexnet": step_rate(torchvision_alexnet(), args.batch, args.steps),
    }
    for name, rate in rates.items():
        print(f"{name:<22}{rate:8.1f} img/s   ours/this {rates['ours'] / rate:5.2f}x")
    share = lrn_share(AlexNet(), args.batch, args.batch / rates["ours"])
    print(f"LRN share of our step (forward + backward): {share:.1%}  (target <= 10%)")
    print("target: ours >= 1.0x the naive build")


if __name__ == "__main__":
    main()
