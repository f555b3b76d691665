"""Training-set statistics (paper sections 2 and 4.1): the mean image and the RGB PCA.

Exact map-reduce: each shard yields its sufficient statistics (image count, per-pixel
sum, RGB sum, sum of RGB outer products), and the reduce adds them in shard order.
Every quantity is a sum of integers (pixel values <= 255, products <= 65025) held in
float64, exact while below 2**53 (~9e15; all of ImageNet's 2.2e15 fits), so the result
has the same bits whatever the number of workers, and equals a direct computation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numba
import numpy as np

from alexnet.atomic import atomic_output, folder_target, mark_owner, write_json
from alexnet.errors import AlexnetError
from alexnet.shards import (
    CLASSES_FILE,
    PREPARE_OWNER,
    bad_image,
    iter_shard,
    load_classes,
    open_rgb,
    shard_files,
)

if TYPE_CHECKING:
    import torch


class StatsError(AlexnetError):
    """A shard image that cannot be decoded (corruption: prepare filtered bad files), or
    missing stats; names the shard and member, or the folder."""


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


def decode_rgb(jpeg: bytes, size: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 pixels of a prepared image (`alexnet.shards.open_rgb`)."""
    return np.asarray(open_rgb(jpeg, size))


# The kernel below walks an image's bytes (HWC, so R G B R G B ...) in blocks of _LANES,
# a multiple of 3: lane l always holds channel l % 3. Per lane it adds each byte's square
# and its products with the next two bytes, which, for the right lanes, are R*G, G*B
# and R*B of the same pixel. Contiguous, branch-free, so LLVM vectorises it: one pass
# over the image instead of a float64 copy plus six dot products (~5x faster here).
_LANES = 24
_FLUSH = 16384  # blocks summed in int32 lanes before moving to int64: 16384 * 255**2 < 2**31


@numba.njit(nogil=True, cache=True)
def _accumulate(flat: np.ndarray, image_sum: np.ndarray, lanes: np.ndarray) -> None:
    """image_sum += flat (uint32); lanes[0|1|2, l] += sum of flat[i] * flat[i + 0|1|2]
    over the i in lane l (int64), exact integer arithmetic throughout."""
    n = flat.size
    blocks = (n - 2) // _LANES  # whole blocks whose i + 2 stays inside the image
    # three 1-d int32 arrays, not one 2-d array: that is the form LLVM vectorises
    squares = np.zeros(_LANES, np.int32)
    next1 = np.zeros(_LANES, np.int32)
    next2 = np.zeros(_LANES, np.int32)
    for block in range(blocks):
        base = block * _LANES
        for lane in range(_LANES):
            a = np.int32(flat[base + lane])
            image_sum[base + lane] += a
            squares[lane] += a * a
            next1[lane] += a * np.int32(flat[base + lane + 1])
            next2[lane] += a * np.int32(flat[base + lane + 2])
        if block % _FLUSH == _FLUSH - 1 or block == blocks - 1:
            lanes[0] += squares
            lanes[1] += next1
            lanes[2] += next2
            squares[:], next1[:], next2[:] = 0, 0, 0
    for i in range(blocks * _LANES, n):  # the last few bytes, one at a time
        a = np.int64(flat[i])
        image_sum[i] += a
        lanes[0, i % _LANES] += a * a
        for shift in (1, 2):
            if i + shift < n:
                lanes[shift, i % _LANES] += a * np.int64(flat[i + shift])


def lanes_to_outer(lanes: np.ndarray) -> np.ndarray:
    """The (3, 3) sum of x x^T (float64, exact below 2**53) from the kernel's lanes: keep
    the products within a pixel (R*G, G*B at shift 1; R*B at shift 2), drop the rest."""
    by_channel = lanes.reshape(3, -1, 3).sum(axis=1)  # [shift, channel of the first byte]
    rr, gg, bb = by_channel[0]
    rg, gb, rb = by_channel[1, 0], by_channel[1, 1], by_channel[2, 0]
    return np.array([[rr, rg, rb], [rg, gg, gb], [rb, gb, bb]], np.float64)


def image_moments(images: Iterable[np.ndarray], size: int) -> Moments:
    """The sufficient statistics of (size, size, 3) uint8 images."""
    count = 0
    image_sum = np.zeros(size * size * 3, np.uint32)  # exact up to 16.8M images of 255
    lanes = np.zeros((3, _LANES), np.int64)
    for pixels in images:
        if pixels.shape != (size, size, 3) or pixels.dtype != np.uint8:  # no bounds checks
            shape = f"{pixels.shape} {pixels.dtype}"
            raise ValueError(f"image is {shape}, expected {size}x{size} uint8")
        _accumulate(np.ascontiguousarray(pixels).reshape(-1), image_sum, lanes)
        count += 1
    image_sum = image_sum.reshape(size, size, 3).astype(np.float64)
    return Moments(count, image_sum, lanes_to_outer(lanes))


def shard_pixels(path: str | Path, size: int, classes: int | None = None) -> Iterator[np.ndarray]:
    """The decoded size x size images of a shard; a damaged shard, a label out of range
    (of `classes`, when known) or an image that does not decode raises one line naming
    the shard and the member."""
    for record in iter_shard(Path(path), classes):
        try:
            pixels = decode_rgb(record.jpeg, size)
        except Exception as error:  # whatever the decoder raises, the line names the member
            raise StatsError(bad_image(path, record.key, error)) from None
        yield pixels


def shard_moments(path: str | Path, size: int, classes: int | None = None) -> Moments:
    """The sufficient statistics of one prepared shard of size x size images."""
    return image_moments(shard_pixels(path, size, classes), size)


def class_count(train: str | Path) -> int | None:
    """The number of classes of the prepared folder that `train` lies in (its
    classes.json), against which stats checks the labels; None for shards on their own
    (stats needs only images: it then checks that labels are not negative). A folder
    prepare made but did not finish (no classes.json: it is written last) is refused:
    its shards may be any part of the data."""
    folder = Path(train).parent
    finished = (folder / CLASSES_FILE).exists() or mark_owner(folder) == PREPARE_OWNER
    return len(load_classes(folder)) if finished else None


def reduce_moments(parts: Iterable[Moments], train: str | Path = "") -> Moments:
    """Sum in the given (shard) order, holding one part at a time; `StatsError` where
    they hold no image (a mean and a covariance of nothing: 0/0, then a page of numpy's
    traceback), naming the folder `train`."""
    parts = iter(parts)
    total = next(parts)
    count = 1
    for part in parts:
        total, count = total + part, count + 1
    if not total.images:
        raise StatsError(f"{train}: no images in its {count} shards (run prepare again)")
    return total


def moments_bytes(size: int) -> int:
    """The bytes of one shard's `Moments` (its image sum; the rest is small)."""
    return size * size * 3 * np.dtype(np.float64).itemsize


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


MEAN_FILE, PCA_FILE = "mean.npy", "pca.json"  # the stats stage's outputs, in its folder
STATS_OWNER = "stats"  # the stage named in its folder's mark (alexnet.atomic.OWNED)


def save_stats(folder: Path, mean: np.ndarray, pca: dict) -> None:
    """Write the mean image (H, W, 3 float32, no pickle) and pca.json as one folder,
    replaced whole: a run killed between the two files cannot leave a new mean beside
    an old PCA."""
    with atomic_output(folder, folder=STATS_OWNER) as temporary:
        np.save(temporary / MEAN_FILE, mean, allow_pickle=False)
        write_json(temporary / PCA_FILE, pca)


def load_stats(folder: Path) -> tuple[torch.Tensor, dict]:
    """The stats stage's outputs: the mean image as (3, H, W) float32 and pca.json,
    checked: a NaN or a wrong shape would otherwise train on, or fail deep in a step."""
    import torch  # here: the stats stage itself runs without torch

    mean = _read_stat(folder, MEAN_FILE, _npy)
    pca = _read_stat(folder, PCA_FILE, lambda path: json.loads(path.read_text()))
    problem = mean_problem(mean) or pca_problem(pca)
    if problem:
        raise StatsError(f"{folder}: corrupt stats: {problem}; run stats")
    return torch.from_numpy(mean.astype(np.float32, copy=False)).permute(2, 0, 1).contiguous(), pca


def _read_stat(folder: Path, name: str, read: Callable[[Path], Any]) -> Any:
    """`read` of the stats file `name`; `StatsError` says, in one line, which is missing
    or not what stats writes. (Another refusal of the system, a file not readable, is the
    CLI's one line `PATH: reason`, as everywhere.)"""
    try:
        return read(folder / name)
    except (FileNotFoundError, NotADirectoryError):
        if folder.is_dir():
            what = f"no {name}"
        else:
            what = "not a folder" if folder.exists() else "no such stats folder"
        raise StatsError(
            f"{folder}: {what}; run stats (it writes {MEAN_FILE}, {PCA_FILE})"
        ) from None
    except (ValueError, EOFError) as error:  # not .npy (an empty one: EOFError) or not JSON
        raise StatsError(f"{folder}: corrupt stats: {name} ({error}); run stats") from None


def _npy(path: Path) -> np.ndarray:
    array = np.load(path, allow_pickle=False)
    if not isinstance(array, np.ndarray):  # np.load opens an .npz archive by its contents
        raise ValueError("an .npz archive, not an .npy array")
    return array


def mean_problem(mean: np.ndarray) -> str | None:
    """What is wrong with a mean image, or None: (H, W, 3) floats within 0-255."""
    if mean.ndim != 3 or mean.shape[2] != 3 or not np.issubdtype(mean.dtype, np.floating):
        return f"{MEAN_FILE} is {mean.dtype} {mean.shape}, not an (H, W, 3) float image"
    if not np.isfinite(mean).all() or mean.min() < 0 or mean.max() > 255:
        return f"{MEAN_FILE} has values outside 0-255 (NaN, infinite or out of range)"
    return None


def pca_problem(pca: object) -> str | None:
    """What is wrong with pca.json, or None: 3 eigenvalues (a covariance's: not below 0
    but by rounding) and a 3x3 matrix of eigenvectors, all finite."""
    if not isinstance(pca, dict):
        return f"{PCA_FILE} is not a JSON object"
    try:
        values = np.asarray(pca["eigenvalues"], dtype=np.float64)
        vectors = np.asarray(pca["eigenvectors"], dtype=np.float64)
    except (KeyError, TypeError, ValueError) as error:
        return f"{PCA_FILE}: no numeric eigenvalues and eigenvectors ({type(error).__name__})"
    if values.shape != (3,) or vectors.shape != (3, 3):
        return f"{PCA_FILE}: eigenvalues {values.shape}, eigenvectors {vectors.shape}, not 3, 3x3"
    if not (np.isfinite(values).all() and np.isfinite(vectors).all()):
        return f"{PCA_FILE}: eigenvalues and eigenvectors must be finite"
    if values.min() < -1e-9 * max(np.abs(values).max(), 1.0):  # beyond eigh's rounding
        return f"{PCA_FILE}: a negative eigenvalue {values.min()}"
    return None


def refuse(train: str, out: str, **_: object) -> None:
    """What stops the stage before any work, as one line (`flows.stages.Stage.refusal`)."""
    folder_target(out, STATS_OWNER)  # a folder it may not replace
    shard_files(train)
    class_count(train)
