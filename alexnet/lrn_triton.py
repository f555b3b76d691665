"""The LRN on CUDA, each direction one pass over memory (Triton).

Section 3.3's b_i = a_i d_i^-beta, d_i = k + alpha sum_{j in N(i)} a_j^2, and its gradient

    dL/da_j = g_j d_j^-beta - 2 alpha beta a_j sum_{i: j in N(i)} g_i a_i d_i^(-beta-1),

which needs each map's d over its window and then a second window sum over the maps
whose window holds j. Composed ops (or torch.compile's kernels) write d and the inner
products to memory between the two sums: the backward took ~6x the forward on an H100.

Here one program takes one image's channel group at a block of pixel positions and walks
its maps in order, the window of rows it needs held in registers as a tuple that shifts
one map each step: each step loads one row of x (and, backward, one of the incoming
gradient), a step before it is used, and stores one row. The forward keeps the `size`
rows of map i's window; the backward keeps the rows of map m's window, the inner
products g_i a_i d_i^(-beta-1) of the `size` maps whose window holds j = m - size//2 (the
last of them is m), and g_i d_i^-beta of maps j ... m: d_m and its power are computed once
a map. (A first version held every map of the group and a band matrix as a tile, and
spilled registers on an H200: the LRN took 88% of the training step. A second recomputed
each window from rows reloaded from the cache: `size` loads and a power a map forward,
`size` x (`size` + 2) loads and `size` powers a map backward.)

The window constants are compile-time values (`tl.constexpr`): inside a `torch.compile`d
step inductor passes a Python float argument as float64, which a float32 kernel cannot
mix. Inputs of any float dtype but float64 (`alexnet.lrn` sends those elsewhere); sums
in float32.

It must equal `alexnet.lrn.local_response_norm_reference` (differentiated by autograd for
the backward): tests/test_lrn.py runs both kernels in Triton's interpreter on the CPU,
tests/test_gpu.py on CUDA at the model's sizes, float32 and bf16.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

PIXELS, WARPS = 256, 4  # positions per program, and 2 a thread: ~60 registers, no spills


@triton.jit
def _block(channels, per, hw, PIXELS: tl.constexpr):
    """This program's pixel positions, which of them lie in the maps, and where its
    image's channel group starts."""
    image, group, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pixels = block * PIXELS + tl.arange(0, PIXELS)
    start = (image * channels + group * per).to(tl.int64) * hw
    return pixels, pixels < hw, start


@triton.jit
def _row(ptr, start, hw, m, per, pixels, inside):
    """Map `m`'s values at `pixels` as float32; 0 for a map outside the group."""
    valid = inside & (m >= 0) & (m < per)
    return tl.load(ptr + start + m * hw + pixels, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _first_window(x_ptr, start, hw, per, pixels, inside, BEFORE: tl.constexpr, AFTER: tl.constexpr):
    """Rows of maps -BEFORE-1 ... AFTER-1 (zeros before map 0): map -1's window, into
    which the first step shifts map AFTER."""
    window = (tl.zeros_like(pixels).to(tl.float32),) * (BEFORE + 1)
    for r in tl.static_range(AFTER):
        window = window + (_row(x_ptr, start, hw, r, per, pixels, inside),)
    return window


@triton.jit
def _denominator(window, alpha: tl.constexpr, k: tl.constexpr, SIZE: tl.constexpr):
    """d = k + alpha * (sum of the squares of the window's rows)."""
    total = window[0] * window[0]
    for r in tl.static_range(1, SIZE):
        total += window[r] * window[r]
    return k + alpha * total


@triton.jit
def _power(d, beta: tl.constexpr):
    """d^-beta, as exp(-beta log d) (d >= k > 0)."""
    return tl.exp(-beta * tl.log(d))


@triton.jit
def _forward_kernel(
    x_ptr,
    out_ptr,
    channels,
    per,
    hw,
    alpha: tl.constexpr,
    beta: tl.constexpr,
    k: tl.constexpr,
    SIZE: tl.constexpr,
    BEFORE: tl.constexpr,  # maps before i in its window (size // 2)
    AFTER: tl.constexpr,  # maps after i in its window (size - 1 - size // 2)
    PIXELS: tl.constexpr,
):
    pixels, inside, start = _block(channels, per, hw, PIXELS)
    window = _first_window(x_ptr, start, hw, per, pixels, inside, BEFORE, AFTER)
    ahead = _row(x_ptr, start, hw, AFTER, per, pixels, inside)
    for first in range(0, per, SIZE):  # SIZE steps a turn: see _backward_kernel
        for r in tl.static_range(SIZE):
            i = first + r
            window = window[1:] + (ahead,)  # maps i - BEFORE ... i + AFTER
            ahead = _row(x_ptr, start, hw, i + AFTER + 1, per, pixels, inside)  # the next's
            d = _denominator(window, alpha, k, SIZE)
            b = window[BEFORE] * _power(d, beta)
            out = out_ptr + start + i * hw + pixels
            tl.store(out, b.to(out_ptr.dtype.element_ty), mask=inside & (i < per))


@triton.jit
def _backward_kernel(
    x_ptr,
    g_ptr,
    out_ptr,
    channels,
    per,
    hw,
    alpha: tl.constexpr,
    beta: tl.constexpr,
    k: tl.constexpr,
    SIZE: tl.constexpr,
    BEFORE: tl.constexpr,
    AFTER: tl.constexpr,
    PIXELS: tl.constexpr,
):
    pixels, inside, start = _block(channels, per, hw, PIXELS)
    window = _first_window(x_ptr, start, hw, per, pixels, inside, BEFORE, AFTER)
    x_ahead = _row(x_ptr, start, hw, AFTER, per, pixels, inside)
    g_ahead = _row(g_ptr, start, hw, 0, per, pixels, inside)
    zero = tl.zeros_like(pixels).to(tl.float32)
    inner = (zero,) * SIZE  # g_i a_i d_i^(-beta-1), maps i = j - AFTER ... j + BEFORE
    scaled = (zero,) * (BEFORE + 1)  # g_i d_i^-beta, maps i = j ... j + BEFORE
    # Step m takes map m's terms; map j = m - BEFORE then has all of its window's. The
    # loop turns SIZE steps at a time, so that every row carried from one turn to the
    # next is new (shifting one row a turn carried rows into each other's places, which
    # LLVM's SLP vectorizer in Triton 3.8 fails an assertion on).
    for first in range(0, per + BEFORE, SIZE):
        for r in tl.static_range(SIZE):
            m = first + r
            window = window[1:] + (x_ahead,)  # maps m - BEFORE ... m + AFTER
            g = g_ahead
            x_ahead = _row(x_ptr, start, hw, m + AFTER + 1, per, pixels, inside)  # the next's
            g_ahead = _row(g_ptr, start, hw, m + 1, per, pixels, inside)
            d = _denominator(window, alpha, k, SIZE)
            power = _power(d, beta)  # d_m^-beta
            inner = inner[1:] + (g * window[BEFORE] * power / d,)  # 0 past the last map
            scaled = scaled[1:] + (g * power,)
            total = inner[0]
            for t in tl.static_range(1, SIZE):
                total += inner[t]
            j = m - BEFORE  # window[0] holds a_j, scaled[0] g_j d_j^-beta
            grad = scaled[0] - 2.0 * alpha * beta * window[0] * total
            out = out_ptr + start + j * hw + pixels
            store = inside & (j >= 0) & (j < per)
            tl.store(out, grad.to(out_ptr.dtype.element_ty), mask=store)


def constants(size: int, alpha: float, beta: float, k: float) -> dict:
    """The kernels' compile-time arguments for a window of `size` maps."""
    before = size // 2
    return {
        "alpha": float(alpha), "beta": float(beta), "k": float(k), "SIZE": size,
        "BEFORE": before, "AFTER": size - 1 - before, "PIXELS": PIXELS,
    }  # fmt: skip


def _launch(kernel, tensors: list[torch.Tensor], size, alpha, beta, k, groups) -> torch.Tensor:
    """`kernel` over NCHW-contiguous copies of `tensors` (x first); the output like x."""
    tensors = [t.contiguous() for t in tensors]
    n, c, h, w = tensors[0].shape
    per = c // groups
    out = torch.empty_like(tensors[0])
    grid = (n, groups, triton.cdiv(h * w, PIXELS))
    options = constants(size, alpha, beta, k)
    # Triton launches on the current device's stream, whichever device the tensors are
    # on: the second column of a two-GPU model runs its LRN with the first GPU current
    with torch.cuda.device(out.device) if out.is_cuda else contextlib.nullcontext():
        kernel[grid](*tensors, out, c, per, h * w, **options, num_warps=WARPS)
    return out


def forward(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int):
    """The LRN of `x` (NCHW; made contiguous)."""
    return _launch(_forward_kernel, [x], size, alpha, beta, k, groups)


def backward(
    grad: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int
) -> torch.Tensor:
    """dL/dx of the LRN of `x` for the incoming `grad` (both NCHW, made contiguous)."""
    return _launch(_backward_kernel, [x, grad], size, alpha, beta, k, groups)
