"""Training-time data augmentation of paper section 4.1, on whole batches on the device.

From a batch of 256x256 uint8 images: subtract the mean image (section 2), take a random
224x224 patch (the same window of the mean image), reflect it horizontally with p=0.5,
and add PCA lighting noise -- one offset `eigvecs @ (a * eigvals)`, a ~ N(0, sigma) per
image per use, added to every pixel. No per-image Python: crops are one gather.

`Augment.reference` is the transform in plain torch ops; with `kernels="fast"` (params
`compute.kernels`, the default) a CPU batch in the loader's layout goes through
`alexnet.augment_cpu`, one numba pass that equals the reference bit for bit (tested).

PCA scale (docs/paper.md, "The scale trap"): the stats stage stores the eigen-decomposition of
0-255 pixels. `lighting_scale` turns it into an offset in 0-255 units:
- "unit": eigenvalues of [0, 1] pixels (fb.resnet.torch's convention; ~5.5 grey levels
  along PC1 at sigma 0.1 on ImageNet): offset = 255 * V (a * lambda / 255^2);
- "std255": square roots of the 0-255 eigenvalues (cuda-convnet2's; ~12 levels):
  offset = V (a * sqrt(lambda)).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from alexnet import augment_cpu
from alexnet.crops import centre_offset, crop_windows
from alexnet.params import DEFAULTS, Kernels, LightingScale


class Draws(NamedTuple):
    """One batch's random choices: crop corners, reflections, lighting draws a."""

    tops: torch.Tensor  # (N,) int64
    lefts: torch.Tensor  # (N,) int64
    flips: torch.Tensor  # (N,) bool
    alphas: torch.Tensor  # (N, 3) float32, already times sigma

    def rows(self, index: slice | torch.Tensor) -> Draws:
        return Draws(*(t[index] for t in self))


def lighting_offsets(
    alphas: torch.Tensor,
    eigvals: torch.Tensor,
    eigvecs: torch.Tensor,
    scale: LightingScale = DEFAULTS.train.lighting_scale,
) -> torch.Tensor:
    """(N, 3) RGB offsets in 0-255 units from (N, 3) draws a; eigvecs has the vectors as
    columns, eigvals are of the 0-255 covariance."""
    if scale == "unit":
        weights = alphas * (eigvals / 255.0**2) * 255.0
    elif scale == "std255":
        weights = alphas * eigvals.clamp(min=0).sqrt()
    else:
        raise ValueError(f"unknown lighting scale {scale!r}")
    return weights @ eigvecs.T  # row n: sum_i w[n, i] * p_i


class Augment:
    """The per-batch training transform; each step switchable for the paper's ablations."""

    def __init__(
        self,
        mean: torch.Tensor,
        eigvals: torch.Tensor,
        eigvecs: torch.Tensor,
        crop: int = DEFAULTS.model.input_size,
        flip: bool = DEFAULTS.train.flip,
        random_crop: bool = DEFAULTS.train.random_crop,
        lighting: float = DEFAULTS.train.lighting,
        lighting_scale: LightingScale = DEFAULTS.train.lighting_scale,
        subtract_mean: bool = DEFAULTS.train.subtract_mean,
        kernels: Kernels = DEFAULTS.compute.kernels,
    ):
        self.mean = mean.float()  # (3, 256, 256), 0-255
        self.means = torch.stack([self.mean, self.mean.flip(-1)])  # as is, and reflected
        self.eigvals, self.eigvecs = eigvals.float(), eigvecs.float()
        self.crop, self.flip, self.random_crop = crop, flip, random_crop
        self.lighting, self.lighting_scale = lighting, lighting_scale
        self.subtract_mean, self.kernels = subtract_mean, kernels

    def to(self, device: torch.device | str) -> Augment:
        self.mean, self.means, self.eigvals, self.eigvecs = (
            t.to(device) for t in (self.mean, self.means, self.eigvals, self.eigvecs)
        )
        return self

    def draw(
        self,
        n: int,
        height: int = DEFAULTS.prepare.size,
        width: int = DEFAULTS.prepare.size,
        generator: torch.Generator | None = None,
        device: torch.device | str = "cpu",
    ) -> Draws:
        """The random choices for a batch of n images, in a fixed order (tops, lefts,
        flips, lighting), so a data-parallel rank can draw for the whole global batch and
        keep its own rows: every image gets what it would get in a one-process run."""
        if self.random_crop:
            tops = torch.randint(
                0, height - self.crop + 1, (n,), generator=generator, device=device
            )
            lefts = torch.randint(
                0, width - self.crop + 1, (n,), generator=generator, device=device
            )
        else:
            tops = torch.full((n,), centre_offset(height, self.crop), device=device)
            lefts = torch.full((n,), centre_offset(width, self.crop), device=device)
        flips = (
            torch.rand(n, generator=generator, device=device) < 0.5
            if self.flip
            else torch.zeros(n, dtype=torch.bool, device=device)
        )
        alphas = (
            torch.randn(n, 3, generator=generator, device=device) * self.lighting
            if self.lighting > 0
            else torch.zeros(n, 3, device=device)
        )
        return Draws(tops, lefts, flips, alphas)

    def apply(self, images: torch.Tensor, draws: Draws) -> torch.Tensor:
        """(N, 3, H, W) uint8 -> (N, 3, crop, crop) float32, mean-subtracted 0-255: the
        reference, or its one-pass numba equal for a CPU batch with `kernels="fast"`
        (not under torch.compile, which fuses the reference's ops itself)."""
        fast = self.kernels == "fast" and not torch.compiler.is_compiling()
        if fast and augment_cpu.applies(images):
            flips = draws.flips if self.flip else torch.zeros_like(draws.flips)
            means = self.means if self.subtract_mean else torch.zeros_like(self.means)
            return augment_cpu.crops(
                images, draws.tops, draws.lefts, flips, means, self._offsets(draws), self.crop
            )
        return self.reference(images, draws)

    def reference(self, images: torch.Tensor, draws: Draws) -> torch.Tensor:
        """Section 4.1 in plain torch: the window of each image at its corner, reflected
        when drawn so, minus the same window of the mean image, plus the lighting offset.

        Reflect(crop - mean window) is computed as reflect(crop), reflected while still
        uint8 (a quarter of the bytes), minus the window of the reflected mean image at
        the mirrored column, gathered in the same op as the others; the subtraction
        writes into that window. Same values as the direct order, fewer memory passes."""
        flips = draws.flips if self.flip else torch.zeros_like(draws.flips)
        out = crop_windows(images, draws.tops, draws.lefts, self.crop)  # (N, 3, c, c) uint8
        # one select, not a masked assignment: counting a mask's rows waits for the device
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
        if self.subtract_mean:
            mirrored = images.shape[-1] - self.crop - draws.lefts
            lefts = torch.where(flips, mirrored, draws.lefts)
            window = crop_windows(self.means, draws.tops, lefts, self.crop, flips.long())
            out = torch.sub(out, window, out=window)  # uint8 - float32 -> float32
        else:
            out = out.float()
        if self.lighting > 0:
            out += self._offsets(draws)[:, :, None, None]
        return out

    def _offsets(self, draws: Draws) -> torch.Tensor:
        """(N, 3) lighting offsets; zeros when lighting is off (adding 0.0 changes no bits)."""
        if self.lighting <= 0:
            return torch.zeros(len(draws.alphas), 3, device=draws.alphas.device)
        return lighting_offsets(draws.alphas, self.eigvals, self.eigvecs, self.lighting_scale)

    def __call__(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Draw for this batch and apply: (N, 3, 256, 256) uint8 -> (N, 3, crop, crop)."""
        n, _, height, width = images.shape
        return self.apply(images, self.draw(n, height, width, generator, images.device))
