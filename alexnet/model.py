"""The network of the paper (section 3, figure 2), with the ablation switches of
sections 3.2-3.4 and 4.2 and the initialisations of section 5.

Two columns (the paper's two GPUs) run on one device as grouped convolutions: conv2,
conv4 and conv5 see only their own column's maps (groups=2), conv3 and the fully
connected layers see both. Local response normalisation is the paper's formula and
normalises within a column. Shapes for a 224 input (conv1 padding 2; 227 without):
55 -> 27 -> 27 -> 13 -> 13 -> 13 -> 13 -> 6, then 9216 -> 4096 -> 4096 -> classes.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from alexnet import lrn_cpu

Init = Literal["paper", "caffe", "kaiming"]


def _band(per: int, size: int, like: torch.Tensor) -> torch.Tensor:
    """(per, per) 0/1 matrix B with B[i, j] = 1 when map j is in map i's window of
    `size` maps (i - size//2 ... i + size - 1 - size//2)."""
    index = torch.arange(per, device=like.device)
    offset = index[None, :] - index[:, None]
    return ((offset >= -(size // 2)) & (offset <= size - 1 - size // 2)).to(like.dtype)


def _window_sum(
    t: torch.Tensor,
    size: int,
    groups: int,
    transpose: bool = False,
    alpha: float = 1.0,
    k: float = 0.0,
    slices: bool = False,
) -> torch.Tensor:
    """k + alpha * (sum over each map's window of `size` adjacent maps), within each
    channel group; maps beyond a group's ends count as zero. `transpose` sums over the
    maps whose window contains this map instead (the backward's sum).

    By default one batched product with the band matrix per group (a GEMM: one read of
    t, one write, k and alpha folded in): on a CPU 3x faster than `slices`, `size`
    shifted slices of a zero-padded view, each a memory pass unless a compiler fuses
    them (the CUDA path)."""
    n, c, h, w = t.shape
    per, half = c // groups, size // 2
    rows = t.reshape(n * groups, per, h * w)
    if not slices:
        band = _band(per, size, t)
        band = (band.T if transpose else band).expand(n * groups, per, per)
        return torch.baddbmm(t.new_full((1, 1, 1), k), band, rows, alpha=alpha).view(n, c, h, w)
    before, after = (size - 1 - half, half) if transpose else (half, size - 1 - half)
    padded = F.pad(rows, (0, 0, before, after))  # (N*G, C/G+n-1, HW)
    total = padded[:, 0:per] + padded[:, 1 : per + 1]
    for shift in range(2, size):
        total += padded[:, shift : shift + per]
    if alpha != 1.0 or k != 0.0:
        total = total * alpha + k
    return total.reshape(n, c, h, w)


def _lrn_terms(
    xf: torch.Tensor,
    size: int,
    alpha: float,
    k: float,
    beta: float,
    groups: int,
    slices: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """d = k + alpha * (window sum of squares), and d^-beta."""
    d = _window_sum(xf * xf, size, groups, alpha=alpha, k=k, slices=slices)
    # d^-beta as exp(-beta log d): 2.5x faster on a CPU than pow with a fractional
    # exponent, within 2e-7 relative (pow: 6e-8); d >= k > 0.
    return d, torch.log(d).mul_(-beta).exp_()


def _lrn_backward(
    grad, xf, d, scale, size: int, alpha: float, beta: float, groups: int, slices: bool = False
):
    scaled = grad.to(xf.dtype) * scale  # g_j d_j^-beta
    inner = _window_sum((scaled * xf).div_(d), size, groups, transpose=True, slices=slices)
    return torch.addcmul(scaled, xf, inner, value=-2 * alpha * beta).to(grad.dtype)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float32 for half-precision inputs (the window sums), else x itself."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _fused_forward(x, size: int, alpha: float, beta: float, k: float, groups: int):
    xf = _wide(x)
    return (xf * _lrn_terms(xf, size, alpha, k, beta, groups, slices=True)[1]).to(x.dtype)


def _fused_backward(grad, x, size: int, alpha: float, beta: float, k: float, groups: int):
    xf = _wide(x)  # d and d^-beta recomputed: cheaper than storing and re-reading them
    d, scale = _lrn_terms(xf, size, alpha, k, beta, groups, slices=True)
    return _lrn_backward(grad, xf, d, scale, size, alpha, beta, groups, slices=True)


_FUSED: dict[str, object] = {}


def _fused(name: str):
    """On CUDA the LRN is memory-bound: ~10 elementwise kernels each way in eager mode.
    torch.compile fuses each direction into one or two kernels (Triton). Called with
    autocast off (its state would be part of the guards). Shapes are static: a run sees
    a few (train, last partial and validation batches, per dtype), each compiled in
    seconds, while one symbolic-shape compile of the backward took minutes."""
    if name not in _FUSED:
        function = {"forward": _fused_forward, "backward": _fused_backward}[name]
        compiled = torch.compile(function, dynamic=False)

        def call(*args):
            with torch.autocast("cuda", enabled=False):
                try:
                    return compiled(*args)
                except torch.OutOfMemoryError:
                    raise
                except Exception as error:  # no Triton, or a compiler failure: run eagerly
                    warnings.warn(
                        f"LRN: torch.compile failed ({type(error).__name__}: "
                        f"{error}); using the eager kernels",
                        stacklevel=2,
                    )
                    _FUSED[name] = function
                    return function(*args)

        _FUSED[name] = call
    return _FUSED[name]


class _LocalResponseNorm(torch.autograd.Function):
    """Forward and a hand-derived backward, so autograd keeps 1-3 tensors instead of
    the ~10 intermediates of the composed ops. With d_i = k + alpha sum_{j in N(i)} a_j^2:
    dL/da_j = g_j d_j^-beta - 2 alpha beta a_j sum_{i: j in N(i)} g_i a_i d_i^(-beta-1).
    Sums are in float32 or wider. Three paths, each direction one pass where it can:
    CUDA compiled (`_fused`), CPU float32 with the paper's beta (`alexnet.lrn_cpu`'s
    kernels), and the eager ops for everything else (float64, bf16, channels_last)."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k, groups):
        ctx.options = (size, alpha, beta, k, groups)
        ctx.path = "cuda" if x.is_cuda else "cpu" if lrn_cpu.applies(x, beta) else "eager"
        if ctx.path != "eager":
            ctx.save_for_backward(x)
        if ctx.path == "cuda":
            return _fused("forward")(x, size, alpha, beta, k, groups)
        if ctx.path == "cpu":
            return lrn_cpu.forward(x, size, alpha, k, groups)
        xf = _wide(x)
        d, scale = _lrn_terms(xf, size, alpha, k, beta, groups)
        ctx.save_for_backward(xf, d, scale)
        return (xf * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        size, alpha, beta, k, groups = ctx.options
        if ctx.path == "cuda":
            (x,) = ctx.saved_tensors
            result = _fused("backward")(grad.contiguous(), x, size, alpha, beta, k, groups)
        elif ctx.path == "cpu":
            (x,) = ctx.saved_tensors
            result = lrn_cpu.backward(grad, x, size, alpha, k, groups)
        else:
            xf, d, scale = ctx.saved_tensors
            result = _lrn_backward(grad, xf, d, scale, size, alpha, beta, groups)
        return result, None, None, None, None, None


def local_response_norm(
    x: torch.Tensor,
    size: int = 5,
    alpha: float = 1e-4,
    beta: float = 0.75,
    k: float = 2.0,
    groups: int = 1,
) -> torch.Tensor:
    """Paper section 3.3: b_i = a_i / (k + alpha * sum_{j=i-n/2}^{i+n/2} a_j^2)^beta, the
    sum over the `size` adjacent maps that exist, within each of `groups` channel groups.

    Note: `torch.nn.LocalResponseNorm` (and Caffe) divide alpha by n; passing the paper's
    alpha=1e-4 to them is a 5x weaker normalisation. Here alpha multiplies the plain sum.
    The window sum is a product with a band matrix (no 3-D pooling detour as in
    `F.local_response_norm`), with a hand-written backward; see `_window_sum`.
    """
    return _LocalResponseNorm.apply(x, size, alpha, beta, k, groups)


class LRN(nn.Module):
    def __init__(
        self,
        size: int = 5,
        alpha: float = 1e-4,
        beta: float = 0.75,
        k: float = 2.0,
        groups: int = 1,
    ):
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(x, self.size, self.alpha, self.beta, self.k, self.groups)

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, "
            f"groups={self.groups}"
        )


def widths(columns: int) -> tuple[int, int, int, int, int]:
    """Kernels of conv1..conv5. One column = section 3.2's comparison net: half the
    kernels in every convolutional layer except the last (kept, like the FC layers, so
    both nets have about the same number of parameters)."""
    return (96, 256, 384, 384, 256) if columns == 2 else (48, 128, 192, 192, 256)


class AlexNet(nn.Module):
    def __init__(
        self,
        num_classes: int = 1000,
        columns: Literal[1, 2] = 2,
        lrn: bool = True,
        overlap_pool: bool = True,
        dropout: float = 0.5,
        input_size: Literal[224, 227] = 224,
        init: Init = "paper",
    ):
        super().__init__()
        if columns not in (1, 2):
            raise ValueError(f"columns must be 1 or 2, got {columns}")
        if input_size not in (224, 227):
            raise ValueError(f"input_size must be 224 (conv1 padding 2) or 227, got {input_size}")
        c1, c2, c3, c4, c5 = widths(columns)
        pool = (3, 2) if overlap_pool else (2, 2)  # section 3.4: z=3, s=2 vs z=s=2
        norm = (lambda: LRN(groups=columns)) if lrn else nn.Identity
        self.columns, self.input_size, self.init = columns, input_size, init
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
            nn.Linear(c5 * 6 * 6, 4096),  # fc6
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),  # section 4.2: on the outputs of fc6 and fc7
            nn.Linear(4096, 4096),  # fc7
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(4096, num_classes),  # fc8
        )
        initialise(self, init)

    def layers(self) -> dict[str, nn.Module]:
        """The eight learned layers by their paper names."""
        convs = [m for m in self.features if isinstance(m, nn.Conv2d)]
        fcs = [m for m in self.classifier if isinstance(m, nn.Linear)]
        names = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")
        return dict(zip(names, convs + fcs, strict=True))

    def place(self, devices: Sequence[torch.device | str]) -> nn.Module:
        """Column 0 on `devices[0]`, column 1 on `devices[1]` (see alexnet/placement.py);
        with one device, this model moved there."""
        from alexnet.placement import place

        return place(self, devices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (N, 256, 6, 6)
        return self.classifier(torch.flatten(x, 1))  # (N, classes)


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
