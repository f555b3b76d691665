"""Reading an LMDB split (docs/design.md, "LMDB") as uint8 tensors, for torch.

`LmdbSplit` is a map-style `Dataset` of (CHW uint8 tensor, label) that is safe with
`DataLoader(num_workers>0)`: the environment is opened lazily in each process,
read-only, without a lock file. `read_batch(indices)` returns one contiguous (N, 3, H, W)
uint8 tensor for the training loop; JPEG payloads are decoded on `threads` threads
(`alexnet.jpeg`). `read_encoded(indices)` leaves them encoded, for a GPU to decode.
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from alexnet.errors import AlexnetError
from alexnet.forkserver import forkserver, start_ignoring
from alexnet.jpeg import Encoded, decode_into, decode_threads, joined
from alexnet.lmdb_store import (
    KEY_DIGITS,
    StoreError,
    decode_value,
    get_record,
    read_meta,
    shared_readonly,
    store_version,
)
from alexnet.params import DEFAULTS, JpegDecoder


class LmdbSplit(torch.utils.data.Dataset):
    """`threads`: how many threads decode a JPEG batch (default: every core)."""

    def __init__(self, path: str | Path, threads: int | None = None):
        self.path = Path(path)
        self.threads = decode_threads(0) if threads is None else threads
        self.version = store_version(self.path)  # the store this object reads, to the end
        self.meta = read_meta(self.path)
        self.encoding = self.meta["encoding"]
        self.shape = (3, self.meta["height"], self.meta["width"])

    def __len__(self) -> int:
        return self.meta["count"]

    @property
    def classes(self) -> list[dict]:
        return self.meta["classes"]

    def _txn(self):
        # The environment is shared per process and reopened after a fork (DataLoader
        # workers), so this object itself holds no handle and pickles as a path.
        return shared_readonly(self.path, self.version).begin(buffers=True)

    def _value(self, txn, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range 0..{len(self) - 1}")
        value = get_record(txn, index, self.path)
        where = f"{self.path}: key {index:0{KEY_DIGITS}d}"
        if value is None:
            raise StoreError(f"{where}: missing")
        label, height, width, payload = decode_value(value, where, self.encoding)
        if (3, height, width) != self.shape:
            raise StoreError(f"{where}: image is {height}x{width}, store says {self.shape[1:]}")
        if label >= len(self.classes):  # a store another tool wrote (pack checks its own)
            raise StoreError(
                f"{where}: label {label} is out of range "
                f"({len(self.classes)} classes in __meta__: 0..{len(self.classes) - 1})"
            )
        return label, payload, where

    def _copy_into(self, out: np.ndarray, payload) -> None:
        """Write one raw image into `out`, a (3, H, W) uint8 numpy view of the result."""
        # A numpy copy: the payload is a read-only view into the memory map.
        hwc = np.frombuffer(payload, dtype=np.uint8).reshape(self.shape[1], self.shape[2], 3)
        out.transpose(1, 2, 0)[...] = hwc  # a memcpy when `out` is an NHWC row

    def read_encoded(self, indices) -> Encoded:
        """The JPEG payloads of `indices` (a `jpeg` store), their labels and keys."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.encoding != "jpeg":
            raise StoreError(f"{self.path}: a {self.encoding} store has no JPEG payloads")
        labels, values, where = np.empty(len(indices), dtype=np.int64), [], []
        with self._txn() as txn:
            for row, index in enumerate(indices.tolist()):
                label, payload, place = self._value(txn, index)
                labels[row] = label
                values.append(payload)
                where.append(place)
            data, sizes = joined(values)  # copied while the transaction holds them
        return Encoded(data, sizes, torch.from_numpy(labels), where)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        images, labels = self.read_batch([index])
        return images[0], int(labels[0])

    def read_batch(self, indices, channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, 3, H, W) uint8 images and (N,) int64 labels of `indices`, in that order, in
        one contiguous buffer. `channels_last`: the buffer is (N, H, W, 3), as raw payloads
        are stored, so reading is a plain copy and the transpose is left to the device."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        _, height, width = self.shape
        if channels_last:
            buffer = np.empty((len(indices), height, width, 3), dtype=np.uint8)
            images = buffer.transpose(0, 3, 1, 2)  # an NCHW view of the NHWC buffer
        else:
            buffer = images = np.empty((len(indices), *self.shape), dtype=np.uint8)
        if self.encoding == "jpeg":
            encoded = self.read_encoded(indices)
            decode_into(images, encoded, self.threads)
            labels = encoded.labels.numpy()
        else:
            labels = np.empty(len(indices), dtype=np.int64)
            with self._txn() as txn:
                for row, index in enumerate(indices.tolist()):
                    label, payload, _ = self._value(txn, index)
                    self._copy_into(images[row], payload)
                    labels[row] = label
        tensor = torch.from_numpy(buffer)
        return (tensor.permute(0, 3, 1, 2) if channels_last else tensor), torch.from_numpy(labels)


def read(split: LmdbSplit, indices, encoded: bool) -> tuple[torch.Tensor | Encoded, torch.Tensor]:
    """(images, labels) of `indices`: pixels in channels-last layout, or, with `encoded`
    (a JPEG store whose batches a GPU decodes), the payloads (`alexnet.jpeg.to_device`)."""
    if encoded:
        batch = split.read_encoded(indices)
        return batch, batch.labels
    return split.read_batch(indices, channels_last=True)


def encoded_for(
    split: LmdbSplit, device: torch.device, decoder: JpegDecoder = DEFAULTS.compute.jpeg_decoder
) -> bool:
    """Whether batches of `split` travel encoded, for `decoder` to decode on `device`: a
    jpeg store for a CUDA device, unless its decoder is the loader's own threads."""
    return split.encoding == "jpeg" and device.type == "cuda" and decoder != "cpu"


class Batches(torch.utils.data.Dataset):
    """Item i = the whole batch `batches[i]` read at once (one transaction, no collate),
    as `read` gives it. Batches given as ranges stay ranges: no list of every index in
    each loader process (ImageNet's train split, read by evaluate: 1.28M ints, 52 MB)."""

    def __init__(self, split: LmdbSplit, batches: Sequence[Sequence[int]], encoded: bool = False):
        self.split, self.batches, self.encoded = split, list(batches), encoded

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor | Encoded, torch.Tensor]:
        return read(self.split, self.batches[index], self.encoded)


def in_order(
    split: LmdbSplit, size: int, rows: slice = slice(None), encoded: bool = False
) -> Batches:
    """The split in store order, `size` records a batch (the last may be short), in
    channels-last layout (or `encoded`); `rows` keeps a rank's share of the batches."""
    starts = range(0, len(split), size)[rows]
    return Batches(split, [range(s, min(s + size, len(split))) for s in starts], encoded)


class Loader:
    """A `DataLoader`'s batches, where a worker that died (torch raises a RuntimeError: a
    traceback) is one `StoreError` line naming the store, the signal and its likely
    cause, and a user's error a worker raised is itself again (torch re-raises it with
    its traceback in the message)."""

    def __init__(self, loader: torch.utils.data.DataLoader, store: str | os.PathLike):
        self.loader, self.store = loader, store

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        batches = iter(self.loader)
        try:
            yield from batches
        except AlexnetError as error:
            message = _worker_message(error)
            if message is None:
                raise
            raise _same_kind(error, message) from None
        except RuntimeError as error:
            if not _DIED.search(str(error)):
                raise  # a worker's own RuntimeError, with its traceback
            killer = _killer(str(error), batches)
            how = f" ({killer.name})" if killer else ""
            raise StoreError(
                f"{self.store}: a loader worker died reading it{how}{_CAUSES.get(killer, '')}"
            ) from None


# torch's words for a worker that died, not one that raised
_DIED = re.compile(r"DataLoader worker \(pid.*\) (exited unexpectedly|is killed by signal)")
# torch's words for an exception a worker raised: "Caught StoreError in DataLoader worker
# process 0.\nOriginal Traceback (most recent call last): ...\nalexnet....StoreError: <it>"
_CAUGHT = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.\nOriginal Traceback")


def _worker_message(error: Exception) -> str | None:
    """The message of the exception a loader worker raised, from torch's re-raised text:
    all after the traceback's last `module.Type: ` (a message of several lines whole)."""
    text = str(error)
    if not _CAUGHT.match(text):
        return None
    kind = type(error)
    return text.rpartition(f"{kind.__module__}.{kind.__qualname__}: ")[2].rstrip()


def _same_kind(error: Exception, message: str) -> Exception:
    try:
        return type(error)(message)
    except Exception:  # an error type that takes other arguments
        return StoreError(message)


def _killer(message: str, batches: Iterator) -> signal.Signals | None:
    """The signal that killed a loader worker: as torch's message names it ("killed by
    signal: Bus error"), else from the workers' exit codes ("exited unexpectedly")."""
    if named := re.search(r"killed by signal: ([^.]+)", message):
        return next((s for s in signal.Signals if signal.strsignal(s) == named[1]), None)
    codes = [worker.exitcode for worker in getattr(batches, "_workers", ())]  # (torch's own)
    return next((signal.Signals(-code) for code in codes if code and code < 0), None)


# What most likely killed a loader worker, by the signal
_CAUSES = {
    signal.SIGBUS: ": /dev/shm too small for the batches read ahead (in a container: "
    "--shm-size; or fewer loader_workers), or a damaged store (run pack again)",
    signal.SIGKILL: ": out of memory? (fewer loader_workers, or a smaller batch)",
}


def batch_loader(
    dataset: torch.utils.data.Dataset, keys: Sequence, workers: int = 0, pin_memory: bool = False
) -> Loader:
    """`dataset[key]` for each key in order, each item a whole batch; `workers` processes
    read 2 items each ahead (none: read in the loop). Workers are forked from a forkserver
    that imported this module (torch) once: a fork of a process that has run Prefect flows
    or CUDA inherits threads that break it, and a spawned one imports torch afresh.

    A SIGTERM to the trainer's process group (torchrun's stop, a stage's) is the
    trainer's to act on: it reads on to its next loss read, saves a checkpoint there and
    stops. So the server ignores it, and each worker leaves the group as it starts; the
    workers end with the loader (or, at exit, by multiprocessing's SIGTERM to each), the
    server with this process."""
    context = None
    if workers:
        context = forkserver(__name__)
        start_ignoring(signal.SIGTERM)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=keys,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        multiprocessing_context=context,
        worker_init_fn=_own_group if workers else None,
    )
    return Loader(loader, getattr(getattr(dataset, "split", None), "path", "the store"))


def _own_group(worker: int) -> None:
    """A loader worker's first step: a process group of its own. (Until then, a few
    milliseconds as the run's loader starts, a group SIGTERM still ends it.)"""
    os.setpgid(0, 0)


def check_together(first: LmdbSplit, second: LmdbSplit) -> None:
    """Two stores one run reads together (training and validation; evaluate's gallery
    and queries): the same classes, from one pack run where both say which (`pack` in
    `__meta__`; a store another tool wrote need not), and images of one size, which one
    mean image's windows fit (a smaller one would silently take the wrong window)."""
    if first.classes != second.classes:
        raise StoreError(f"{first.path} and {second.path} list different classes")
    if (ours := first.meta.get("pack")) and (theirs := second.meta.get("pack")) != ours:
        raise StoreError(
            f"{first.path} and {second.path} were written by different pack runs (pack "
            f"{ours}, {theirs}: one stopped between its splits?): run pack again"
        )
    if first.shape != second.shape:
        sizes = [f"{h}x{w}" for _, h, w in (first.shape, second.shape)]
        raise StoreError(
            f"{first.path} holds {sizes[0]} images, {second.path} {sizes[1]}: pack both "
            "from one prepare"
        )
