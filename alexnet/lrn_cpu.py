"""The fast kernels of `alexnet.lrn.local_response_norm_reference` on a CPU (equal to it
within float rounding), one pass each way: numba kernels over tiles of pixels.

In torch's eager ops the LRN is ~10 memory passes each way (square, window sum, power,
products; backward the same again), so on a CPU it was a fifth of a training step.
Here each direction reads its inputs once and writes its output once: a tile of
`_TILE` pixels of every map of a channel group stays in cache while the window sums,
the power and the backward's transposed sum are computed from it. d^-0.75 is
1 / (sqrt(d) sqrt(sqrt(d))), two vector square roots instead of a log and an exp, so
this path serves the paper's beta = 0.75; other betas and dtypes use the eager ops.

Layout: (B, C/G, H*W) float32 rows, one row per (image, channel group); B is split
across torch's threads (`alexnet.threads`).
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from alexnet.threads import run_split

BETA = 0.75  # the exponent these kernels compute
_TILE = 512  # pixels per tile: 48-128 maps x 512 x 4 B = 96-256 KB per buffer (L2)
# no fast-math reciprocal or sqrt approximations (they cost ~5e-7 relative); division
# checks off (error_model="numpy"), which is what lets LLVM vectorise the loops
_JIT = {
    "nogil": True,
    "cache": True,
    "error_model": "numpy",
    "fastmath": {"nnan", "ninf", "nsz", "contract"},
}


@numba.njit(**_JIT)
def _terms(squares, c, size, alpha, k, d, scale, n):
    """d[:n] = k + alpha * (sum of squares over map c's window), window clipped to the
    group: maps c - size//2 ... c + size - 1 - size//2; scale[:n] = d^-0.75."""
    per = squares.shape[0]
    for p in range(n):
        d[p] = k
    for j in range(max(0, c - size // 2), min(per, c + size - size // 2)):
        row = squares[j]
        for p in range(n):
            d[p] += alpha * row[p]
    for p in range(n):
        root = math.sqrt(d[p])
        scale[p] = np.float32(1.0) / (root * math.sqrt(root))


@numba.njit(**_JIT)
def _squares(x, b, start, n, squares):
    for c in range(x.shape[1]):
        row, out = x[b, c, start : start + n], squares[c]
        for p in range(n):
            out[p] = row[p] * row[p]


@numba.njit(**_JIT)
def _forward(x, y, first, last, size, alpha, k):
    """y = x * d^-0.75 for rows first..last-1."""
    per, points = x.shape[1], x.shape[2]
    squares = np.empty((per, _TILE), np.float32)
    d, scale = np.empty(_TILE, np.float32), np.empty(_TILE, np.float32)
    for b in range(first, last):
        for start in range(0, points, _TILE):
            n = min(points - start, _TILE)
            _squares(x, b, start, n, squares)
            for c in range(per):
                _terms(squares, c, size, alpha, k, d, scale, n)
                xr, yr = x[b, c, start : start + n], y[b, c, start : start + n]
                for p in range(n):
                    yr[p] = xr[p] * scale[p]


@numba.njit(**_JIT)
def _backward(g, x, dx, first, last, size, alpha, k, coef):
    """dx_j = g_j d_j^-0.75 - coef x_j sum_{i: j in window(i)} g_i x_i d_i^-1.75, with
    coef = 2 alpha beta; d recomputed from x (cheaper than storing and reading it)."""
    per, points = x.shape[1], x.shape[2]
    squares = np.empty((per, _TILE), np.float32)
    scale = np.empty((per, _TILE), np.float32)  # d^-0.75
    inner = np.empty((per, _TILE), np.float32)  # g x d^-1.75
    acc = np.empty(_TILE, np.float32)
    for b in range(first, last):
        for start in range(0, points, _TILE):
            n = min(points - start, _TILE)
            _squares(x, b, start, n, squares)
            for c in range(per):
                _terms(squares, c, size, alpha, k, acc, scale[c], n)
                xr, gr = x[b, c, start : start + n], g[b, c, start : start + n]
                sr, ir = scale[c], inner[c]
                for p in range(n):
                    ir[p] = gr[p] * xr[p] * sr[p] / acc[p]
            for c in range(per):
                for p in range(n):
                    acc[p] = 0.0
                # the maps i whose window holds c: c - (size - 1 - size//2) ... c + size//2
                for i in range(max(0, c - (size - 1 - size // 2)), min(per, c + size // 2 + 1)):
                    row = inner[i]
                    for p in range(n):
                        acc[p] += row[p]
                xr, gr = x[b, c, start : start + n], g[b, c, start : start + n]
                out, sr = dx[b, c, start : start + n], scale[c]
                for p in range(n):
                    out[p] = gr[p] * sr[p] - coef * xr[p] * acc[p]


def applies(x: torch.Tensor, beta: float) -> bool:
    """Whether these kernels serve this call (else the eager ops do)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and beta == BETA
        and x.is_contiguous()
        and x.dim() == 4
    )


def _rows(t: torch.Tensor, groups: int) -> np.ndarray:
    """A view of contiguous NCHW memory as (N * groups, C / groups, H * W) rows."""
    n, c, h, w = t.shape
    return t.detach().numpy().reshape(n * groups, c // groups, h * w)


def _contiguous_like(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t, memory_format=torch.contiguous_format)


# The operators return contiguous NCHW tensors, whatever the strides they are given.
# torch.compile traces them with the strides of eager calls (where `applies` held), then
# may run its convolutions channels-last (inductor's layout optimisation): tagged
# `needs_contiguous_strides` (`_ops`), they are handed contiguous inputs there. Without
# that, a channels-last x was handed over, its rows view (`_rows`) was a reshaped copy,
# and the kernel wrote its output into a copy: the compiled step's LRN output was garbage.
def _forward_op(x: torch.Tensor, size: int, alpha: float, k: float, groups: int) -> torch.Tensor:
    x = x.contiguous()
    y = _contiguous_like(x)
    options = (size, np.float32(alpha), np.float32(k))
    run_split(_forward, x.shape[0] * groups, (_rows(x, groups), _rows(y, groups)), options)
    return y


def _backward_op(
    grad: torch.Tensor, x: torch.Tensor, size: int, alpha: float, k: float, groups: int
) -> torch.Tensor:
    grad, x = grad.contiguous(), x.contiguous()
    dx = _contiguous_like(x)
    options = (size, np.float32(alpha), np.float32(k), np.float32(2 * alpha * BETA))
    arrays = (_rows(grad, groups), _rows(x, groups), _rows(dx, groups))
    run_split(_backward, x.shape[0] * groups, arrays, options)
    return dx


# Registered as operators, so torch.compile sees two opaque calls with known output
# shapes instead of tracing into numpy and numba (a graph break). Registered on first use,
# not on import: importing the library registers nothing in the host's torch. The
# low-level `Library` API: `torch.library.custom_op` would import torch._dynamo (~3 s) on
# the first call of every process, compiled or not.
_LIBRARY: list[torch.library.Library] = []


def _ops():
    if not _LIBRARY:
        library = torch.library.Library("alexnet", "DEF")
        contiguous = (torch.Tag.needs_contiguous_strides,)  # see `_forward_op`
        library.define(
            "lrn_forward_cpu(Tensor x, int size, float alpha, float k, int groups) -> Tensor",
            tags=contiguous,
        )
        library.define(
            "lrn_backward_cpu(Tensor grad, Tensor x, int size, float alpha, float k, "
            "int groups) -> Tensor",
            tags=contiguous,
        )
        library.impl("lrn_forward_cpu", _forward_op, "CPU")
        library.impl("lrn_backward_cpu", _backward_op, "CPU")
        torch.library.register_fake("alexnet::lrn_forward_cpu", lambda x, *_: _contiguous_like(x))
        torch.library.register_fake(
            "alexnet::lrn_backward_cpu", lambda grad, x, *_: _contiguous_like(x)
        )
        _LIBRARY.append(library)
    return torch.ops.alexnet


def forward(x: torch.Tensor, size: int, alpha: float, k: float, groups: int) -> torch.Tensor:
    """y = x * d^-0.75 (`_forward`), as the operator alexnet::lrn_forward_cpu."""
    return _ops().lrn_forward_cpu(x, size, alpha, k, groups)


def backward(
    grad: torch.Tensor, x: torch.Tensor, size: int, alpha: float, k: float, groups: int
) -> torch.Tensor:
    """dL/dx (`_backward`), as the operator alexnet::lrn_backward_cpu."""
    return _ops().lrn_backward_cpu(grad, x, size, alpha, k, groups)
