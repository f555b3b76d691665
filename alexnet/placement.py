"""The paper's two-GPU model parallelism (section 3.2): column 0 of the network on one
device, column 1 on another; activations cross devices only where the paper's columns
communicate (conv3 and the fully connected layers), and the logits come back to the
first device.

`resolve_devices(names)` checks the device names a run asks for (params
`train.device`, `evaluate.device`); `place(model, devices)` builds the placement from
an `AlexNet`'s grouped (one-device) weights: each layer is cut into its two columns'
halves. With one device it only moves the model.
`TwoColumnAlexNet.merged_state_dict()` gives the weights back in the one-device layout,
so model files never depend on the placement. (Checkpoints hold the placed layout with
its optimizer state; a run on other devices is another run and starts afresh.)
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from alexnet.errors import AlexnetError
from alexnet.lrn import LRN
from alexnet.model import AlexNet, allocate
from alexnet.params import device_problem


def _half(module: nn.Module, column: int) -> tuple[str, nn.Module]:
    """Column `column`'s share of a layer, and what it reads: "own" (its column's maps)
    or "both" (both columns' maps, concatenated in column order)."""
    if isinstance(module, nn.Conv2d):
        out = module.out_channels // 2
        reads = "own" if module.groups == 2 or module.in_channels == 3 else "both"
        half = nn.Conv2d(
            module.in_channels // module.groups,
            out,
            module.kernel_size,
            module.stride,
            module.padding,
            device="meta",
        )
        rows = slice(column * out, (column + 1) * out)
    elif isinstance(module, nn.Linear):
        out = (module.out_features + 1 - column) // 2  # column 0 takes the odd one out
        start = 0 if column == 0 else (module.out_features + 1) // 2
        half = type(module)(module.in_features, out, device="meta")  # fc8's: `Logits` too
        reads, rows = "both", slice(start, start + out)
    elif isinstance(module, LRN):
        return "own", LRN(module.size, module.alpha, module.beta, module.k, 1, module.kernels)
    else:  # ReLU, pooling, dropout, identity: the same operation on each column
        return "own", copy.deepcopy(module)
    # Made on the meta device, given memory, then the layer's rows copied in: no weights
    # drawn (as `AlexNet`'s own layers), so the random numbers after are a one-device run's.
    allocate(half, module.weight.device)
    with torch.no_grad():
        half.weight.copy_(module.weight[rows])
        half.bias.copy_(module.bias[rows])
    return reads, half


class TwoColumnAlexNet(nn.Module):
    def __init__(self, model: AlexNet, devices: Sequence[torch.device | str]):
        super().__init__()
        if model.columns != 2:
            raise DeviceError("two devices need the two-column network (model.columns: 2)")
        self.devices = [torch.device(d) for d in devices]
        self.num_features = len(model.features)
        self.reads: list[str] = []
        self.column0, self.column1 = nn.ModuleList(), nn.ModuleList()
        for module in [*model.features, *model.classifier]:
            reads, first = _half(module, 0)
            self.reads.append(reads)
            self.column0.append(first)
            self.column1.append(_half(module, 1)[1])
        self.column0.to(self.devices[0])
        self.column1.to(self.devices[1])
        self.num_classifier = len(model.classifier)

    def _both(self, maps: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each column gets both columns' maps on its own device (a device crossing)."""
        return [torch.cat([maps[0].to(d), maps[1].to(d)], dim=1) for d in self.devices]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = [x.to(self.devices[0]), x.to(self.devices[1])]
        for index, (reads, first, second) in enumerate(
            zip(self.reads, self.column0, self.column1, strict=True)
        ):
            if index == self.num_features:  # pool5 -> FC: (N, 128, 6, 6) -> (N, 4608)
                maps = [torch.flatten(m, 1) for m in maps]
            inputs = self._both(maps) if reads == "both" else maps
            maps = [first(inputs[0]), second(inputs[1])]
        return torch.cat([maps[0], maps[1].to(self.devices[0])], dim=1)  # logits on device 0

    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights in `AlexNet`'s one-device layout (grouped convs, whole layers)."""
        merged = {}
        prefixes = [f"features.{i}" for i in range(self.num_features)] + [
            f"classifier.{i}" for i in range(self.num_classifier)
        ]
        for prefix, first, second in zip(prefixes, self.column0, self.column1, strict=True):
            for name, value in first.state_dict().items():
                other = second.state_dict()[name].to(value.device)
                merged[f"{prefix}.{name}"] = torch.cat([value, other]).detach().clone()
        return merged


def place(model: AlexNet, devices: Sequence[torch.device | str]) -> nn.Module:
    """One device: the model moved there. Two devices: a `TwoColumnAlexNet`."""
    if len(devices) == 1:
        return model.to(devices[0])
    if len(devices) != 2:
        raise ValueError(f"place takes one or two devices, got {len(devices)}")
    return TwoColumnAlexNet(model, devices)


class DeviceError(AlexnetError):
    """A device that this machine does not have, or more devices than columns."""


def _device(name: str) -> torch.device:
    if problem := device_problem(name):
        raise DeviceError(f"device {name!r}: {problem}")
    return torch.device(name)


def check_devices(key: str, names: Sequence[str]) -> None:
    """`resolve_devices`, before any work, its error naming the params `key`."""
    try:
        resolve_devices(names)
    except DeviceError as error:
        raise DeviceError(f"{key}: {error}") from None


def resolve_devices(names: Sequence[str]) -> list[torch.device]:
    """`[cpu]`, `[cuda]`, `[cuda:1]`, or two devices `[cuda:0, cuda:1]` for the paper's
    two-column model parallelism (column 0 on the first)."""
    devices = [_device(name) for name in names]
    # (CUDA is asked only where a device names it: a CPU run's process never starts it)
    cuda = any(device.type == "cuda" for device in devices) and torch.cuda.is_available()
    count = torch.cuda.device_count() if cuda else 0
    for device in devices:
        if device.type == "cuda" and not count:
            raise DeviceError(f"device {device} requested but CUDA is not available here")
        if device.type == "cuda" and (device.index or 0) >= count:
            raise DeviceError(f"device {device} requested; this machine has {count} CUDA device(s)")
    if not 1 <= len(devices) <= 2:
        raise DeviceError(f"devices {list(names)}: one, or two (one per column)")
    return devices
