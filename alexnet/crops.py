"""Crop windows of paper section 4.1: training patches, the centre patch and the ten test
patches, as batched gathers on whichever device the batch is on.

Every window position comes from here: `centre_offset` is the one rule for "central"
(torchvision's, round((size - crop) / 2)), used by validation, evaluation and training
without random crops alike.
"""

from __future__ import annotations

import functools
import math

import torch

from alexnet.params import DEFAULTS


def centre_offset(size: int, crop: int) -> int:
    """Offset of the central `crop` window along a side of `size` (torchvision's rule)."""
    return int(round((size - crop) / 2.0))


def crop_windows(
    images: torch.Tensor,
    tops: torch.Tensor,
    lefts: torch.Tensor,
    size: int,
    sources: torch.Tensor | None = None,
) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, size, size): image n's window at (tops[n], lefts[n]); with
    `sources`, window n is taken from image sources[n] instead.

    `unfold` makes every possible window a strided view (no copy); indexing it with the
    N corners is one gather that copies whole window rows -- ~15x faster on a CPU than
    indexing every pixel with row and column index tensors."""
    views = images.unfold(2, size, 1).unfold(3, size, 1)  # (N, C, H-size+1, W-size+1, s, s)
    if sources is None:
        sources = torch.arange(len(tops), device=images.device)
    return views[sources, :, tops, lefts]


def centre_crop(
    images: torch.Tensor, mean: torch.Tensor | None, crop: int = DEFAULTS.model.input_size
) -> torch.Tensor:
    """Validation input: the central crop as float32, minus the same window of the mean."""
    height, width = images.shape[-2:]
    top, left = centre_offset(height, crop), centre_offset(width, crop)
    # One copy, always: contiguous (the batch may arrive channels-last: LmdbSplit.
    # read_batch), and never the caller's images (float32 of the crop's size would be
    # the same tensor, and the mean would be taken off in place).
    window = images[..., top : top + crop, left : left + crop]
    out = window.to(torch.float32, memory_format=torch.contiguous_format, copy=True)
    if mean is not None:
        out -= mean[..., top : top + crop, left : left + crop]
    return out


def ten_crop_windows(height: int, width: int, crop: int) -> tuple[list[int], list[int], list[bool]]:
    """Tops, lefts and reflections of the ten test patches in torchvision's `ten_crop`
    order: top-left, top-right, bottom-left, bottom-right, centre; then the same five of
    the reflected image (a crop of the reflection at left L is the reflection of the
    original's crop at W-crop-L)."""
    centre = (centre_offset(height, crop), centre_offset(width, crop))
    corners = [(0, 0), (0, width - crop), (height - crop, 0), (height - crop, width - crop), centre]
    tops = [top for top, _ in corners] * 2
    lefts = [left for _, left in corners] + [width - crop - left for _, left in corners]
    return tops, lefts, [False] * 5 + [True] * 5


CENTRE = 4  # index of the (unreflected) centre patch among the ten


def ten_crops(
    images: torch.Tensor, mean: torch.Tensor | None, crop: int = DEFAULTS.model.input_size
) -> torch.Tensor:
    """(N, 3, H, W) uint8 -> (N, 10, 3, crop, crop) float32, mean-subtracted 0-255 (each
    patch loses its own window of the mean, as in training).

    The windows are a strided view of the batch (`unfold` on a grid whose step divides
    every crop offset), so the ten crops are one gather of whole rows from that view."""
    height, width = images.shape[-2:]
    tops, lefts, flips = ten_crop_windows(height, width, crop)
    x = images.float()
    if mean is not None:
        x = x - mean
    step_y, step_x = math.gcd(*tops) or 1, math.gcd(*lefts) or 1
    grid = x.unfold(2, crop, step_y).unfold(3, crop, step_x)  # (N, 3, gy, gx, crop, crop)
    grid = grid.permute(0, 2, 3, 1, 4, 5)  # (N, gy, gx, 3, crop, crop), still a view
    rows = _indices(tuple(t // step_y for t in tops), x.device)
    columns = _indices(tuple(left // step_x for left in lefts), x.device)
    crops = grid[:, rows, columns]
    reflected = flips.index(True)  # the last five (torchvision's order)
    crops[:, reflected:] = crops[:, reflected:].flip(-1)
    return crops


@functools.cache
def _indices(values: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """`values` as an index tensor on `device`, made once: indexing a CUDA tensor with a
    list copies the list there each time, and the copy waits for the work queued before."""
    return torch.tensor(values, device=device)
