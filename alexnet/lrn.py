"""Local response normalisation of paper section 3.3, after the ReLUs of conv1 and conv2:

    b_i = a_i / (k + alpha * sum_{j=i-n/2}^{i+n/2} a_j^2)^beta,   k=2, n=5, alpha=1e-4, beta=0.75

the sum over the n adjacent maps that exist, within one column's maps (each of the
paper's GPUs normalises its own half). alpha multiplies the plain sum: `torch.nn.
LocalResponseNorm` and Caffe divide it by n, so passing them the paper's 1e-4 is a 5x
weaker normalisation.

`local_response_norm_reference` is the formula in plain torch, differentiated by autograd:
the definition the rest is held to. The fast path (`kernels="fast"`, the default) equals
it within float rounding (tests/test_lrn.py: 1e-5 of the largest value in float32,
measured ~3e-7; 1e-12 in float64) and is one memory pass each way where it can be, with a
hand-derived backward:
- a CPU, float32, the paper's beta: numba kernels (`alexnet.lrn_cpu`);
- CUDA: one hand-written Triton kernel each way (`alexnet.lrn_triton`); for float64, or
  where Triton cannot run them, the ops compiled by `torch.compile` (`_fused`);
- anything else (a CPU's float64, bf16, other betas): eager ops, the window sum as one GEMM.
The switch is params `compute.kernels`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from alexnet import lrn_cpu
from alexnet.params import DEFAULTS, Kernels

# Section 3.3's constants: n, alpha, beta, k.
SIZE, ALPHA, BETA, K = 5, 1e-4, 0.75, 2.0


def local_response_norm_reference(
    x: torch.Tensor,
    size: int = SIZE,
    alpha: float = ALPHA,
    beta: float = BETA,
    k: float = K,
    groups: int = 1,
) -> torch.Tensor:
    """The paper's formula (section 3.3), literally: map i's window is maps
    i - size//2 ... i + size-1 - size//2 of its group, missing maps count as zero. Sums in
    float32 for half-precision inputs."""
    n, c, h, w = x.shape
    per, half = c // groups, size // 2
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    squares = (xf * xf).reshape(n, groups, per, h, w)
    padded = F.pad(squares, (0, 0, 0, 0, half, size - 1 - half))  # zero maps at group ends
    window = sum(padded[:, :, j : j + per] for j in range(size)).reshape(n, c, h, w)
    return (xf / (k + alpha * window) ** beta).to(x.dtype)


# -- the fast path: hand-derived backward, one pass each way ---------------------------


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


_NO_TRITON: set[str] = set()  # the directions whose Triton kernel failed here


def _on_cuda(name: str, *args):
    """The LRN's direction `name` ("forward": x, options; "backward": grad, x, options) on
    CUDA: the one-pass Triton kernel (`alexnet.lrn_triton`), or the compiled ops for
    float64 and where Triton cannot run it (warned once, then kept)."""
    if name not in _NO_TRITON and args[name == "backward"].dtype != torch.float64:
        try:
            from alexnet import lrn_triton

            return getattr(lrn_triton, name)(*args)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:
            warnings.warn(
                f"LRN: the Triton {name} failed ({type(error).__name__}: {error}); "
                "using the compiled ops",
                stacklevel=2,
            )
            _NO_TRITON.add(name)
    return _fused(name)(*(arg.contiguous() if torch.is_tensor(arg) else arg for arg in args))


def _no_autocast(x: torch.Tensor) -> torch.autocast:
    """The sums in float32 or wider, as written, whatever autocast a caller has on."""
    return torch.autocast(x.device.type, enabled=False)


class _LocalResponseNorm(torch.autograd.Function):
    """Forward and a hand-derived backward, so autograd keeps 1-3 tensors instead of
    the ~10 intermediates of the composed ops. With d_i = k + alpha sum_{j in N(i)} a_j^2:
    dL/da_j = g_j d_j^-beta - 2 alpha beta a_j sum_{i: j in N(i)} g_i a_i d_i^(-beta-1).
    Sums are in float32 or wider. Three paths, each direction one pass where it can:
    CUDA (`_on_cuda`), CPU float32 with the paper's beta (`alexnet.lrn_cpu`'s
    kernels), and the eager ops for everything else (float64, bf16, channels_last)."""

    @staticmethod
    def forward(ctx, x, size, alpha, beta, k, groups):
        ctx.options = (size, alpha, beta, k, groups)
        ctx.path = "cuda" if x.is_cuda else "cpu" if lrn_cpu.applies(x, beta) else "eager"
        if ctx.path == "cuda":  # the kernels take NCHW: kept so, the backward copies no more
            x = x.contiguous()
        if ctx.path != "eager":
            ctx.save_for_backward(x)
        if ctx.path == "cuda":
            return _on_cuda("forward", x, size, alpha, beta, k, groups)
        if ctx.path == "cpu":
            return lrn_cpu.forward(x, size, alpha, k, groups)
        xf = _wide(x)
        with _no_autocast(x):  # (bf16 autocast would run the window sum's GEMM in bf16)
            d, scale = _lrn_terms(xf, size, alpha, k, beta, groups)
        ctx.save_for_backward(xf, d, scale)
        return (xf * scale).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        size, alpha, beta, k, groups = ctx.options
        if ctx.path == "cuda":
            (x,) = ctx.saved_tensors
            result = _on_cuda("backward", grad, x, size, alpha, beta, k, groups)
        elif ctx.path == "cpu":
            (x,) = ctx.saved_tensors
            result = lrn_cpu.backward(grad, x, size, alpha, k, groups)
        else:
            xf, d, scale = ctx.saved_tensors
            with _no_autocast(xf):
                result = _lrn_backward(grad, xf, d, scale, size, alpha, beta, groups)
        return result, None, None, None, None, None


def local_response_norm(
    x: torch.Tensor,
    size: int = SIZE,
    alpha: float = ALPHA,
    beta: float = BETA,
    k: float = K,
    groups: int = 1,
    kernels: Kernels = DEFAULTS.compute.kernels,
) -> torch.Tensor:
    """Section 3.3's LRN: `local_response_norm_reference`, or its fast equal (module
    docstring) with `kernels="fast"`."""
    if kernels == "reference":
        return local_response_norm_reference(x, size, alpha, beta, k, groups)
    return _LocalResponseNorm.apply(x, size, alpha, beta, k, groups)


class LRN(nn.Module):
    def __init__(
        self,
        size: int = SIZE,
        alpha: float = ALPHA,
        beta: float = BETA,
        k: float = K,
        groups: int = 1,
        kernels: Kernels = DEFAULTS.compute.kernels,
    ):
        super().__init__()
        self.size, self.alpha, self.beta, self.k, self.groups = size, alpha, beta, k, groups
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return local_response_norm(
            x, self.size, self.alpha, self.beta, self.k, self.groups, self.kernels
        )

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, alpha={self.alpha}, beta={self.beta}, k={self.k}, "
            f"groups={self.groups}, kernels={self.kernels}"
        )
