"""Training-set statistics (paper sections 2 and 4.1): the mean image and the RGB PCA.

Exact map-reduce: each shard yields its sufficient statistics (image count, per-pixel
sum, RGB sum, sum of RGB outer products), and the reduce adds them in shard order.
Every quantity is a sum of integers (pixel values <= 255, products <= 65025) held in
float64, exact while below 2**53 (~9e15; all of ImageNet's 2.2e15 fits), so the result
has the same bits whatever the number of workers, and equals a direct computation.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from alexnet.errors import AlexnetError
from alexnet.shards import iter_shard


class StatsError(AlexnetError):
    """A shard whose images cannot be decoded (corruption: prepare filtered bad files)."""


@dataclass
class Moments:
    images: int
    image_sum: np.ndarray  # (H, W, 3) float64: sum over images of each pixel
    rgb_outer: np.ndarray  # (3, 3) float64: sum over all pixels of x x^T

    @property
    def rgb_sum(self) -> np.ndarray:
        """(3,) sum over all pixels: the image sum summed over positions (exact)."""
        return self.image_sum.sum(axis=(0, 1))

    @property
    def pixels(self) -> int:
        return self.images * self.image_sum.shape[0] * self.image_sum.shape[1]

    def __add__(self, other: Moments) -> Moments:
        return Moments(
            self.images + other.images,
            self.image_sum + other.image_sum,
            self.rgb_outer + other.rgb_outer,
        )


def decode_rgb(jpeg: bytes) -> np.ndarray:
    """(H, W, 3) uint8 pixels of an encoded image."""
    image = Image.open(io.BytesIO(jpeg))
    return np.asarray(image if image.mode == "RGB" else image.convert("RGB"))


def outer_sum(pixels: np.ndarray) -> np.ndarray:
    """Sum over pixels of x x^T, (3, 3) float64, exact: six channel-pair dot products of
    contiguous float64 rows (faster here than X.T @ X); each is an integer < 2**53."""
    channels = np.ascontiguousarray(pixels.reshape(-1, 3).T, dtype=np.float64)  # (3, H*W)
    out = np.empty((3, 3))
    for i in range(3):
        for j in range(i, 3):
            out[i, j] = out[j, i] = channels[i] @ channels[j]
    return out


def shard_moments(path: str | Path, size: int = 256) -> Moments:
    """The sufficient statistics of one prepared shard."""
    images = 0
    image_sum = np.zeros((size, size, 3), np.uint32)  # exact up to 16.8M images of 255
    rgb_outer = np.zeros((3, 3))
    try:
        for record in iter_shard(Path(path)):
            pixels = decode_rgb(record.jpeg)
            if pixels.shape != (size, size, 3):
                raise ValueError(f"image {record.key} is {pixels.shape}, expected {size}x{size}")
            images += 1
            image_sum += pixels
            rgb_outer += outer_sum(pixels)
    except (OSError, ValueError) as error:
        raise StatsError(f"{path}: cannot read shard: {error}") from None
    return Moments(images, image_sum.astype(np.float64), rgb_outer)


def reduce_moments(parts: list[Moments]) -> Moments:
    """Sum in the given (shard) order."""
    total = parts[0]
    for part in parts[1:]:
        total = total + part
    return total


def mean_image(moments: Moments) -> np.ndarray:
    """(H, W, 3) float32, RGB, 0-255 scale."""
    return (moments.image_sum / moments.images).astype(np.float32)


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Eigenvectors are defined up to sign; make the largest-magnitude component of each
    column positive, so the same covariance always gives the same vectors."""
    rows = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[rows, np.arange(vectors.shape[1])])
    return vectors * np.where(signs == 0, 1.0, signs)


def rgb_pca(moments: Moments) -> dict:
    """Covariance of all RGB pixel values (0-255 scale, population form: divided by the
    pixel count), its eigenvalues in descending order and eigenvectors as matching
    columns."""
    n = moments.pixels
    mean = moments.rgb_sum / n
    covariance = moments.rgb_outer / n - np.outer(mean, mean)
    values, vectors = np.linalg.eigh(covariance)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], fix_signs(vectors[:, order])
    return {
        "images": moments.images,
        "pixels": n,
        "scale": "0-255",
        "rgb_mean": mean.tolist(),
        "covariance": covariance.tolist(),
        "eigenvalues": values.tolist(),
        "eigenvectors": vectors.tolist(),  # rows of a 3x3 matrix whose columns are the vectors
        "sign_rule": "largest-magnitude component of each eigenvector is positive",
    }
