"""The LRN's backward on CUDA in one pass over memory (Triton).

The gradient of section 3.3's b_i = a_i d_i^-beta, d_i = k + alpha sum_{j in N(i)} a_j^2,

    dL/da_j = g_j d_j^-beta - 2 alpha beta a_j sum_{i: j in N(i)} g_i a_i d_i^(-beta-1),

needs each position's d over its window of maps and then a second window sum over the
maps whose window holds j. Composed ops (or torch.compile's kernels) write d and the
inner products to memory between the two sums: ~6x the forward's time on an H100. Here
one program takes one image's channel group at a block of pixel positions, loads a and g
there once (all the group's maps: 48 or 128 with two columns, 96 or 256 with one),
keeps both window sums in registers, as products with the 0/1 band matrix of the window
(`tl.dot` in IEEE float32), and writes the gradient once. Inputs of any float dtype;
sums in float32.

It must equal `alexnet.lrn.local_response_norm_reference` differentiated by autograd
(tests/test_lrn.py, float32 and bf16; on a CPU through Triton's interpreter).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PIXELS = 32  # positions per program: 2 tiles of [maps, 32] float32 in registers


@triton.jit
def _backward_kernel(
    x_ptr,
    g_ptr,
    out_ptr,
    channels,
    per,
    hw,
    alpha,
    beta,
    k,
    BEFORE: tl.constexpr,  # maps before i in its window (size // 2)
    AFTER: tl.constexpr,  # maps after i (size - 1 - size // 2)
    MAPS: tl.constexpr,  # per, rounded up to a power of two (>= 16, for tl.dot)
    PIXELS: tl.constexpr,
):
    image, group, block = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    maps = tl.arange(0, MAPS)
    pixels = block * PIXELS + tl.arange(0, PIXELS)
    inside = (maps[:, None] < per) & (pixels[None, :] < hw)
    offsets = (image * channels + group * per + maps)[:, None] * hw + pixels[None, :]
    a = tl.load(x_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
    # band[i, j] = 1 when map j is in map i's window; maps past the group's end are 0
    step = maps[None, :] - maps[:, None]
    band = ((step >= -BEFORE) & (step <= AFTER)).to(tl.float32)
    d = k + alpha * tl.dot(band, a * a, input_precision="ieee")
    scale = tl.exp(-beta * tl.log(d))  # d^-beta (d >= k > 0)
    inner = g * a * scale / d
    # sum over the maps i whose window holds j: the band's transpose
    backward = tl.dot(tl.trans(band), inner, input_precision="ieee")
    grad = g * scale - 2.0 * alpha * beta * a * backward
    tl.store(out_ptr + offsets, grad.to(out_ptr.dtype.element_ty), mask=inside)


def backward(
    grad: torch.Tensor, x: torch.Tensor, size: int, alpha: float, beta: float, k: float, groups: int
) -> torch.Tensor:
    """dL/dx of the LRN of `x` for the incoming `grad` (both NCHW, made contiguous)."""
    x, grad = x.contiguous(), grad.contiguous()
    n, c, h, w = x.shape
    per = c // groups
    out = torch.empty_like(x)
    maps = max(16, triton.next_power_of_2(per))
    grid = (n, groups, triton.cdiv(h * w, PIXELS))
    _backward_kernel[grid](
        x, grad, out, c, per, h * w, alpha, beta, k,
        BEFORE=size // 2, AFTER=size - 1 - size // 2, MAPS=maps, PIXELS=PIXELS,
    )  # fmt: skip
    return out
