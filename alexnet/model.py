"""The network of the paper (section 3, figure 2), with the ablation switches of
sections 3.2-3.4 and 4.2 and the initialisations of section 5.

Two columns (the paper's two GPUs) run on one device as grouped convolutions: conv2,
conv4 and conv5 see only their own column's maps (groups=2), conv3 and the fully
connected layers see both. Local response normalisation is the paper's formula and
normalises within a column. Shapes for a 224 input (conv1 padding 2; 227 without):
55 -> 27 -> 27 -> 13 -> 13 -> 13 -> 13 -> 6, then 9216 -> 4096 -> 4096 -> classes.
`model.width` below 1 narrows every layer alike (not the paper's: a quick net to try the
chain on a CPU).
"""

from __future__ import annotations

from typing import get_args

import torch
from torch import nn

from alexnet.lrn import LRN
from alexnet.params import DEFAULTS, Columns, Init, InputSize, Kernels, Width

HIDDEN_UNITS = 4096  # fc6's and fc7's in the paper


def widths(columns: int, width: float = 1.0) -> tuple[int, int, int, int, int, int]:
    """Kernels of conv1..conv5, then the units of fc6 and fc7, each times `width`
    (params `model.width`). One column = section 3.2's comparison net: half the kernels
    in every convolutional layer except the last (kept, like the FC layers, so both nets
    have about the same number of parameters)."""
    kernels = (96, 256, 384, 384, 256) if columns == 2 else (48, 128, 192, 192, 256)
    return tuple(int(count * width) for count in (*kernels, HIDDEN_UNITS))


class Logits(nn.Linear):
    """fc8, in float32 under any autocast (params `train.amp`, `evaluate.amp`). The error
    rates count a tie with the label as a miss, and bf16 logits (8 significant bits:
    steps of 0.0625 between 8 and 16) tie classes that float32 tells apart, so a run with
    amp reported more errors than its network made. fc8 is a small share of the step.
    Without autocast it is `nn.Linear` exactly, in its weights' dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.to(self.weight.dtype))


class AlexNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,  # ImageNet's
        columns: Columns = DEFAULTS.model.columns,
        width: Width = DEFAULTS.model.width,
        lrn: bool = DEFAULTS.model.lrn,
        overlap_pool: bool = DEFAULTS.model.overlap_pool,
        dropout: float = DEFAULTS.model.dropout,
        input_size: InputSize = DEFAULTS.model.input_size,
        init: Init = DEFAULTS.model.init,
        kernels: Kernels = DEFAULTS.compute.kernels,
    ):
        """The keywords are params `model` (defaults: alexnet/params.py); `kernels` picks
        the LRN's implementation (alexnet/lrn.py): the same function, not the model."""
        super().__init__()
        for name, value, allowed in (
            ("columns", columns, Columns),
            ("width", width, Width),
            ("input_size", input_size, InputSize),
        ):
            if value not in get_args(allowed):
                raise ValueError(f"{name} must be one of {get_args(allowed)}, got {value}")
        c1, c2, c3, c4, c5, hidden = widths(columns, width)
        pool = (3, 2) if overlap_pool else (2, 2)  # section 3.4: z=3, s=2 vs z=s=2
        norm = (lambda: LRN(groups=columns, kernels=kernels)) if lrn else nn.Identity
        self.columns, self.input_size, self.init = columns, input_size, init
        # Made on the meta device: torch's own initialisation of each layer, drawn and then
        # thrown away by `initialise` (which draws every weight and bias), took a third of
        # a model's making on a CPU (~0.2 s). Memory is given after, on the default device.
        with torch.device("meta"):
            self.features = nn.Sequential(
                nn.Conv2d(3, c1, 11, stride=4, padding=2 if input_size == 224 else 0),  # conv1
                nn.ReLU(inplace=True),
                norm(),
                nn.MaxPool2d(*pool),
                nn.Conv2d(c1, c2, 5, padding=2, groups=columns),  # conv2: within a column
                nn.ReLU(inplace=True),
                norm(),
                nn.MaxPool2d(*pool),
                nn.Conv2d(c2, c3, 3, padding=1),  # conv3: across columns
                nn.ReLU(inplace=True),
                nn.Conv2d(c3, c4, 3, padding=1, groups=columns),  # conv4
                nn.ReLU(inplace=True),
                nn.Conv2d(c4, c5, 3, padding=1, groups=columns),  # conv5
                nn.ReLU(inplace=True),
                nn.MaxPool2d(*pool),
            )
            self.classifier = nn.Sequential(
                nn.Linear(c5 * 6 * 6, hidden),  # fc6
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),  # section 4.2: on the outputs of fc6 and fc7
                nn.Linear(hidden, hidden),  # fc7
                nn.ReLU(inplace=True),
                nn.Dropout(dropout),
                Logits(hidden, num_classes),  # fc8
            )
        device = torch.get_default_device()
        allocate(self, device)
        # On the meta device (a model file's weights are to be loaded) there is nothing to
        # draw, and torch's meta `normal_` imports its compiler on first use (~2 s).
        if device.type != "meta":
            initialise(self, init)

    def layers(self) -> dict[str, nn.Module]:
        """The eight learned layers by their paper names."""
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        fcs = [m for m in self.classifier if isinstance(m, nn.Linear)]
        names = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
        return dict(zip(names, convs + fcs, strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 256, 6, 6)
        return self.classifier(torch.flatten(x, 1))  # (N, classes)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 4096 x width): the last hidden layer (fc7 after its ReLU and dropout), the vector
        whose Euclidean distances section 6.1 compares between images."""
        return self.classifier[:-1](torch.flatten(self.features(x), 1))


def allocate(model: nn.Module, device: torch.device | str) -> None:
    """Give each parameter of `model` (made on the meta device) memory on `device`, its
    values unset. (`Module.to_empty` does the same through torch's Python reference of
    `empty_like`, whose first call imports sympy: ~0.7 s in every process.)"""
    for module in model.modules():
        for name, weight in module.named_parameters(recurse=False):
            memory = torch.empty(weight.shape, dtype=weight.dtype, device=device)
            setattr(module, name, nn.Parameter(memory, weight.requires_grad))


def initialise(model: AlexNet, scheme: Init) -> None:
    """Section 5: weights N(0, 0.01); biases 1 in conv2, conv4, conv5, fc6, fc7 (so early
    ReLUs get positive inputs), 0 in conv1, conv3, fc8. `caffe`: bvlc_alexnet's fix for
    the paper init's flat loss (bias 0.1 instead of 1, fc6/fc7 std 0.005). `kaiming`:
    He-normal weights (fan-in, ReLU), zero biases, fc8 N(0, 0.01)."""
    ones = {"conv2", "conv4", "conv5", "fc6", "fc7"}
    for name, layer in model.layers().items():
        if scheme == "kaiming" and name != "fc8":
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
            continue
        std = 0.005 if scheme == "caffe" and name in ("fc6", "fc7") else 0.01
        bias = (1.0 if scheme == "paper" else 0.1) if name in ones and scheme != "kaiming" else 0.0
        nn.init.normal_(layer.weight, 0.0, std)
        nn.init.constant_(layer.bias, bias)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
