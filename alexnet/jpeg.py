"""Decoding a JPEG store's batches where they are used.

A batch of the `jpeg` encoding leaves the LMDB reader as `Encoded`: each image's JPEG
bytes and its label. `to_device` turns it into the (N, 3, H, W) uint8 batch the
augmentation and the model take, on the device they run on:
- CUDA: one batched nvJPEG call (`torchvision.io.decode_jpeg` on a list of images,
  `device="cuda"`), on a stream of its own that overlaps the training step
  (`_decode_beside`). The loader's workers then only copy bytes out of the store, and the
  host's cores are free: a 256x256 JPEG costs ~0.45 ms a core to decode (2,000-2,300 a
  second on one thread in `bench/gpu.py --cpu`), so 15,000 images a second would take
  ~7 cores doing nothing else.
- a CPU: libjpeg-turbo (`torchvision.io.decode_jpeg`), on a pool of threads (the op
  releases the GIL), each image written straight into its row of the batch.
With params `compute.jpeg_decoder: dali`, NVIDIA DALI decodes the batch instead
(`alexnet.jpeg_dali`), where it imports; with `cpu`, batches for CUDA are not left
encoded (`alexnet.reader.encoded_for`): the loader's threads decode them, as for a CPU.

All give what `PIL` gives for the same bytes within JPEG decoder differences (nvJPEG's
IDCT and upsampling are not libjpeg-turbo's): tests/test_jpeg.py and tests/test_gpu.py
state the tolerances.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np
import torch

from alexnet import jpeg_dali
from alexnet.lmdb_store import StoreError
from alexnet.params import DEFAULTS, JpegDecoder
from alexnet.threads import share_of_cores


class Encoded(NamedTuple):
    """A batch of JPEG payloads: their bytes end to end in one uint8 tensor (`data`),
    each one's length (`sizes`), their labels, and where each comes from (`"store: key
    00000042"`, for an error line).

    One buffer, not a tensor an image: a loader worker hands each tensor of a batch to
    the main process as a file descriptor of its own, sent on a connection of its own
    (~0.6 ms apiece on a 2-core VM), which held the encoded stream to a tenth of what one
    buffer carries (`bench/gpu.py --cpu`, "encoded batches"; BENCHMARKS.md)."""

    data: torch.Tensor
    sizes: list[int]
    labels: torch.Tensor
    where: list[str]

    def payloads(self) -> list[torch.Tensor]:
        """Each image's bytes, as views of `data` (made at each call)."""
        return list(torch.split(self.data, self.sizes)) if self.sizes else []


def decode_threads(workers: int) -> int:
    """Threads a process decodes with: the cores, shared among `workers` loader
    processes (none: the main process decodes alone), and among torchrun's ranks."""
    return share_of_cores(workers)


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    """This process's pool of `threads` threads (a forked loader worker makes its own)."""
    key = (os.getpid(), threads)
    if key not in _POOLS:
        _POOLS[key] = ThreadPoolExecutor(threads, thread_name_prefix="jpeg")
    return _POOLS[key]


def rgb(payloads: torch.Tensor | list[torch.Tensor], **options) -> torch.Tensor | list:
    """torchvision's `decode_jpeg` to RGB. Imported at the first call: importing
    torchvision takes ~1.3 s (its models import torch._dynamo), which a raw store's
    stage and each of its loader workers would pay for nothing."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(payloads, mode=ImageReadMode.RGB, **options)


def decode_one(payload: torch.Tensor, where: str, shape: tuple[int, int, int]) -> torch.Tensor:
    """(3, H, W) uint8 RGB of one payload on the CPU; `StoreError` names it when it does
    not decode or is not `shape`."""
    try:
        image = rgb(payload)
    except RuntimeError as error:
        raise StoreError(f"{where}: cannot decode JPEG payload ({error})") from None
    return _checked(image, where, shape)


def _checked(image: torch.Tensor, where: str, shape: tuple[int, int, int]) -> torch.Tensor:
    if tuple(image.shape) != shape:
        raise StoreError(f"{where}: JPEG is {tuple(image.shape)}, store says {shape}")
    return image


def decode_into(out: np.ndarray, batch: Encoded, threads: int = 1) -> None:
    """Decode every payload of `batch` into its row of `out`, (N, 3, H, W) uint8 (a view
    of an NHWC buffer takes libjpeg-turbo's HWC output as one copy), on `threads`
    threads of this process."""
    payloads = batch.payloads()
    shape, count = out.shape[1:], len(payloads)

    def rows(part: range) -> None:
        for index in part:
            out[index] = decode_one(payloads[index], batch.where[index], shape).numpy()

    threads = min(threads, count)
    if threads <= 1:
        rows(range(count))
        return
    # one task a thread (a task an image cost as much as 2 threads gained)
    list(_pool(threads).map(rows, (range(t, count, threads) for t in range(threads))))


def decode_on(
    batch: Encoded,
    device: torch.device,
    shape: tuple[int, int, int],
    decoder: JpegDecoder = DEFAULTS.compute.jpeg_decoder,
) -> torch.Tensor:
    """(N, 3, H, W) uint8 on `device`, the whole batch in one call of `decoder`: on CUDA,
    torchvision's batched nvJPEG or DALI (`alexnet.jpeg_dali`); on a CPU (or with
    `decoder` "cpu"), our pool of threads or DALI's. A payload that does not decode is
    found again on the CPU, to be named."""
    if not batch.sizes:  # a rank's share of a short last batch (the batched calls take none)
        return torch.empty((0, *shape), dtype=torch.uint8, device=device)
    if device.type == "cuda" and device.index is None:
        # one spelling a device: torchvision keeps one nvJPEG decoder, made again (and the
        # last one leaked) whenever the device it is asked for compares unequal
        device = torch.device("cuda", torch.cuda.current_device())
    if usable(decoder) == "dali":
        hwc_shape = (*shape[1:], shape[0])
        try:
            # DALI's host threads (parsing on CUDA, decoding on a CPU): the cores, as ours
            hwc = jpeg_dali.decode(batch.payloads(), device, decode_threads(0), hwc_shape)
        except (RuntimeError, ValueError):
            _name_the_damaged(batch, shape)
            raise
        return hwc.permute(0, 3, 1, 2)  # the channels-last layout the augmentation takes
    if device.type != "cuda" or decoder == "cpu":
        out = np.empty((len(batch.sizes), *shape), dtype=np.uint8)
        decode_into(out, batch, decode_threads(0))
        return torch.from_numpy(out).to(device)
    return _decode_beside(batch, device, shape)


@functools.cache
def _decode_stream(device: torch.device) -> torch.cuda.Stream:
    """The stream `device`'s batch decodes run on (one per device, made at first use)."""
    return torch.cuda.Stream(device)


def _decode_beside(batch: Encoded, device: torch.device, shape: tuple[int, int, int]):
    """torchvision's batched nvJPEG decode on a stream of its own, handed to the caller's.

    torchvision's CUDA decoder allocates its outputs on the current stream, then writes
    them from a stream of its own that does not wait for that one: a block just freed
    there, which queued kernels still read, can be overwritten before they run
    (pytorch/vision#9606; on an H200 training from a jpeg store stopped with a NaN loss at
    step 2). The caching allocator gives a stream only blocks freed on that stream, so
    the decode runs on a stream where nothing else is queued: waiting for it costs only
    its own last stack, not the training step queued on the caller's stream, which the
    decode now overlaps. The batch is then ordered before the caller's work (`wait_stream`)
    and kept from reuse until that work has read it (`record_stream`).

    For the same reason torch's deterministic mode must not fill those outputs: it
    queues each new tensor's fill on the current stream, which the decoder's stream does
    not wait for either, so a fill that runs late would overwrite decoded pixels. The
    decode writes every byte of them: nothing is left unfilled (`_unfilled`)."""
    caller, side = torch.cuda.current_stream(device), _decode_stream(device)
    with torch.cuda.stream(side):
        side.synchronize()  # the last batch's stack has read the blocks it may reuse
        try:
            with _unfilled():
                images = rgb(batch.payloads(), device=device)
        except RuntimeError:
            _name_the_damaged(batch, shape)
            raise
        pairs = zip(images, batch.where, strict=True)
        stacked = torch.stack([_checked(*pair, shape) for pair in pairs])
    caller.wait_stream(side)
    stacked.record_stream(caller)
    return stacked


@contextlib.contextmanager
def _unfilled() -> Iterator[None]:
    """New tensors left as allocated, where deterministic mode would fill them."""
    settings = torch.utils.deterministic
    was = settings.fill_uninitialized_memory
    settings.fill_uninitialized_memory = False
    try:
        yield
    finally:
        settings.fill_uninitialized_memory = was


def _name_the_damaged(batch: Encoded, shape: tuple[int, int, int]) -> None:
    """Raise `StoreError` naming the first payload of `batch` that does not decode on the
    CPU to `shape` (a batched decoder's error does not say which)."""
    for payload, where in zip(batch.payloads(), batch.where, strict=True):
        decode_one(payload, where, shape)


@functools.cache
def usable(decoder: JpegDecoder) -> JpegDecoder:
    """`decoder`, or torchvision's where DALI is asked for and does not import here (said
    once, as a warning)."""
    if decoder == "dali" and (why := jpeg_dali.missing()):
        warnings.warn(f"{why}: JPEG batches decode with torchvision instead", stacklevel=2)
        return "torchvision"
    return decoder


def to_device(
    images: torch.Tensor | Encoded,
    device: torch.device,
    shape: tuple[int, int, int],
    decoder: JpegDecoder = DEFAULTS.compute.jpeg_decoder,
) -> torch.Tensor:
    """A loader's batch on `device`: pixels copied (asynchronously from pinned memory),
    or JPEG payloads decoded there by `decoder`."""
    if isinstance(images, Encoded):
        return decode_on(images, device, shape, decoder)
    return images.to(device, non_blocking=True)


def joined(values: Sequence[memoryview]) -> tuple[torch.Tensor, list[int]]:
    """The payloads' bytes end to end, copied out of the store's memory map (valid only
    inside its transaction), and each one's length: `Encoded`'s `data` and `sizes`."""
    parts = [np.frombuffer(value, dtype=np.uint8) for value in values]
    data = np.concatenate(parts) if parts else np.empty(0, dtype=np.uint8)
    return torch.from_numpy(data), [len(part) for part in parts]
