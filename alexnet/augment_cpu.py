"""The fast kernel of `alexnet.augment.Augment.reference` (equals it bit for bit): one numba
pass on a CPU from the loader's uint8 batch straight to the float32 network input.

The torch ops make ~5 memory passes over each crop (gather, reflect, widen, subtract,
add); this reads each source row once and writes each output row once. It computes the
same float32 operations in the same order -- (pixel - mean) + lighting offset -- so its
output is bit-identical to the torch ops' (tested). Reflected images read the reflected
mean image at the mirrored column, as `Augment.reference` does. Chosen by params
`compute.kernels: fast`.

Input: the NHWC buffer the loader reads (`LmdbSplit.read_batch(channels_last=True)`,
viewed as NCHW); rows of the batch are split across torch's threads.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from alexnet.threads import run_split

# error_model="numpy": no Python error checks in the loops, so LLVM vectorises them; no
# fast-math flags, so every operation rounds as torch's does.
_JIT = {"nogil": True, "cache": True, "error_model": "numpy"}


@numba.njit(**_JIT)
def _crops(images, tops, lefts, flips, means, offsets, out, first, last):
    """out[n, c, y, x] = (image n's window pixel, reflected if flips[n]) - mean window
    + offsets[n, c], for n in first..last-1. images (N, H, W, 3) uint8; means (2, 3, H, W)
    float32, the mean image and its reflection; out (N, 3, S, S) float32."""
    size, width = out.shape[2], images.shape[2]
    for n in range(first, last):
        top, left, flip = tops[n], lefts[n], flips[n]
        mean = means[1 if flip else 0]
        mean_left = width - size - left if flip else left  # the window, mirrored
        for y in range(size):
            row = images[n, top + y].reshape(-1)[3 * left : 3 * (left + size)]  # RGBRGB...
            for c in range(3):
                window = mean[c, top + y, mean_left : mean_left + size]
                target, offset = out[n, c, y], offsets[n, c]
                if flip:
                    for x in range(size):
                        pixel = np.float32(row[3 * (size - 1 - x) + c])
                        target[x] = (pixel - window[x]) + offset
                else:
                    for x in range(size):
                        target[x] = (np.float32(row[3 * x + c]) - window[x]) + offset


def applies(images: torch.Tensor) -> bool:
    """A CPU uint8 batch in the loader's NHWC memory (NCHW view), where the kernel runs."""
    return (
        images.device.type == "cpu"
        and images.dtype == torch.uint8
        and images.dim() == 4
        and images.shape[1] == 3
        and images.permute(0, 2, 3, 1).is_contiguous()
    )


def crops(
    images: torch.Tensor,
    tops: torch.Tensor,
    lefts: torch.Tensor,
    flips: torch.Tensor,
    means: torch.Tensor,
    offsets: torch.Tensor,
    size: int,
) -> torch.Tensor:
    """(N, 3, H, W) uint8 (NHWC memory) -> (N, 3, size, size) float32; see `_crops`."""
    n, _, height, width = images.shape
    if n and (
        int(tops.max()) + size > height
        or int(lefts.max()) + size > width
        or int(tops.min()) < 0
        or int(lefts.min()) < 0
    ):
        raise ValueError(f"crop windows of {size} outside {height}x{width} images")
    if tuple(means.shape) != (2, 3, height, width):  # the kernel does not check bounds
        raise ValueError(
            f"mean images {tuple(means.shape)[1:]} do not match the batch's {(3, height, width)}"
        )
    out = torch.empty(n, 3, size, size)
    arrays = (
        images.permute(0, 2, 3, 1).numpy(),
        tops.numpy(),
        lefts.numpy(),
        flips.numpy(),
        means.contiguous().numpy(),
        offsets.float().contiguous().numpy(),
        out.numpy(),
    )
    run_split(_crops, n, arrays)
    return out
