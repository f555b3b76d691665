"""The LRN on CUDA, each direction one pass over memory (Triton).

Section 3.3's b_i = a_i d_i^-beta, d_i = k + alpha sum_{j in N(i)} a_j^2, and its gradient

    dL/da_j = g_j d_j^-beta - 2 alpha beta a_j sum_{i: j in N(i)} g_i a_i d_i^(-beta-1),

which needs each map's d over its window and then a second window sum over the maps
whose window holds j. Composed ops (or torch.compile's kernels) write d and the inner
products to memory between the two sums: the backward took ~6x the forward on an H100.

Here one program takes one image's channel group at a block of pixel positions and walks
its maps in order. A map's window sums are recomputed from the few rows around it
(`size` for d, `size` x `size` for the backward's sum of inner products): those rows were
read a step or two before and come from the multiprocessor's cache, so memory sees each
input read once and the output written once, and nothing but a block of pixels is held
in registers (a first version held every map of the group and a band matrix as a tile:
on an H200 its registers spilled and the LRN took 88% of the training step).

The window constants are compile-time values (`tl.constexpr`): inside a `torch.compile`d
step inductor passes a Python float argument as float64, which a float32 kernel cannot
mix. Inputs of any float dtype but float64 (`alexnet.lrn` sends those elsewhere); sums
in float32.

It must equal `alexnet.lrn.local_response_norm_reference` (differentiated by autograd for
the backward): tests/test_lrn.py runs both kernels in Triton's interpreter on the CPU,
tests/test_gpu.py on CUDA at the model's sizes, float32 and bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PIXELS = 128  # positions per program: one float32 a thread with 4 warps


@triton.jit
def _row(ptr, start, hw, m, per, pixels, inside):
    """Map `m`'s values at `pixels` as float32; 0 for a map outside the group."""
    valid = inside & (m >= 0) & (m < per)
    return tl.load(ptr + start + m * hw + pixels, mask=valid, other=0.0).to(tl.float32)


@triton.jit
def _denominator(
    x_ptr, start, hw, i, per, pixels, inside,
    alpha: tl.constexpr, k: tl.constexpr, SIZE: tl.constexpr, BEFORE: tl.constexpr,
):  # fmt: skip
    """d_i = k + alpha * (sum of the squares over map i's window)."""
    total = tl.zeros_like(pixels).to(tl.float32)
    for r in tl.static_range(SIZE):
        a = _row(x_ptr, start, hw, i - BEFORE + r, per, pixels, inside)
        total += a * a
    return k + alpha * total


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
    PIXELS: tl.constexpr,
):
    image, group, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pixels = block * PIXELS + tl.arange(0, PIXELS)
    inside = pixels < hw
    start = (image * channels + group * per).to(tl.int64) * hw
    for i in range(0, per):
        d = _denominator(x_ptr, start, hw, i, per, pixels, inside, alpha, k, SIZE, BEFORE)
        a = _row(x_ptr, start, hw, i, per, pixels, inside)
        b = a * tl.exp(-beta * tl.log(d))  # d^-beta (d >= k > 0)
        tl.store(out_ptr + start + i * hw + pixels, b.to(out_ptr.dtype.element_ty), mask=inside)


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
    AFTER: tl.constexpr,  # maps after i in its window (size - 1 - size // 2)
    PIXELS: tl.constexpr,
):
    image, group, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    pixels = block * PIXELS + tl.arange(0, PIXELS)
    inside = pixels < hw
    start = (image * channels + group * per).to(tl.int64) * hw
    for j in range(0, per):
        # the maps i whose window holds j: j - AFTER ... j + BEFORE
        total = tl.zeros_like(pixels).to(tl.float32)
        scale = tl.zeros_like(pixels).to(tl.float32)  # d_j^-beta
        for r in tl.static_range(SIZE):
            i = j - AFTER + r
            d = _denominator(x_ptr, start, hw, i, per, pixels, inside, alpha, k, SIZE, BEFORE)
            power = tl.exp(-beta * tl.log(d))  # d_i^-beta
            a = _row(x_ptr, start, hw, i, per, pixels, inside)
            g = _row(g_ptr, start, hw, i, per, pixels, inside)
            total += g * a * power / d  # 0 for a map outside the group
            if r == AFTER:  # i == j
                scale = power
        a = _row(x_ptr, start, hw, j, per, pixels, inside)
        g = _row(g_ptr, start, hw, j, per, pixels, inside)
        grad = g * scale - 2.0 * alpha * beta * a * total
        tl.store(out_ptr + start + j * hw + pixels, grad.to(out_ptr.dtype.element_ty), mask=inside)


def _launch(
    kernel, tensors: list[torch.Tensor], size, alpha, beta, k, groups, **constants
) -> torch.Tensor:
    """`kernel` over NCHW-contiguous copies of `tensors` (x first); the output like x."""
    tensors = [t.contiguous() for t in tensors]
    n, c, h, w = tensors[0].shape
    per = c // groups
    out = torch.empty_like(tensors[0])
    grid = (n, groups, triton.cdiv(h * w, PIXELS))
    kernel[grid](
        *tensors, out, c, per, h * w, alpha=float(alpha), beta=float(beta), k=float(k),
        SIZE=size, BEFORE=size // 2, PIXELS=PIXELS, **constants,
    )  # fmt: skip
    return out


def forward(x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int):
    """The LRN of `x` (NCHW; made contiguous)."""
    return _launch(_forward_kernel, [x], size, alpha, beta, k, groups)


def backward(
    grad: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int
) -> torch.Tensor:
    """dL/dx of the LRN of `x` for the incoming `grad` (both NCHW, made contiguous)."""
    after = size - 1 - size // 2
    return _launch(_backward_kernel, [x, grad], size, alpha, beta, k, groups, AFTER=after)
