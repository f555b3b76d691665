"""Reading an LMDB split (docs/design.md, "LMDB") as uint8 tensors, for torch.

`LmdbSplit` is a map-style `Dataset` of (CHW uint8 tensor, label) that is safe with
`DataLoader(num_workers>0)`: the environment is opened lazily in each process,
read-only, without a lock file. `read_batch(indices)` returns one contiguous (N, 3, H, W)
uint8 tensor for the training loop. JPEG payloads are decoded by libjpeg-turbo through
`torchvision.io.decode_jpeg`, straight into CHW tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from alexnet.lmdb_store import StoreError, decode_value, key, read_meta, shared_readonly


class LmdbSplit(torch.utils.data.Dataset):
    def __init__(self, path: str | Path):
        self.path = Path(path)
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
        return shared_readonly(self.path).begin(buffers=True)

    def _value(self, txn, index: int):
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: index {index} out of range 0..{len(self) - 1}")
        value = txn.get(key(index))
        where = f"{self.path}: key {index:08d}"
        if value is None:
            raise StoreError(f"{where}: missing")
        label, height, width, payload = decode_value(value, where, self.encoding)
        if (3, height, width) != self.shape:
            raise StoreError(f"{where}: image is {height}x{width}, store says {self.shape[1:]}")
        return label, payload, where

    def _decode_into(self, out: np.ndarray, payload, where: str) -> None:
        """Write one image into `out`, a (3, H, W) uint8 numpy view of the result."""
        if self.encoding == "raw":
            # A numpy copy: the payload is a read-only view into the memory map.
            hwc = np.frombuffer(payload, dtype=np.uint8).reshape(self.shape[1], self.shape[2], 3)
            out.transpose(1, 2, 0)[...] = hwc  # a memcpy when `out` is an NHWC row
            return
        try:
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
            image = decode_jpeg(data, mode=ImageReadMode.RGB)
        except RuntimeError as error:
            raise StoreError(f"{where}: cannot decode JPEG payload ({error})") from None
        if tuple(image.shape) != self.shape:
            raise StoreError(f"{where}: JPEG is {tuple(image.shape)}, store says {self.shape}")
        out[...] = image.numpy()

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
        labels = np.empty(len(indices), dtype=np.int64)
        with self._txn() as txn:
            for row, index in enumerate(indices.tolist()):
                label, payload, where = self._value(txn, index)
                self._decode_into(images[row], payload, where)
                labels[row] = label
        tensor = torch.from_numpy(buffer)
        return (tensor.permute(0, 3, 1, 2) if channels_last else tensor), torch.from_numpy(labels)


class Batches(torch.utils.data.Dataset):
    """Item i = the whole batch `batches[i]` read at once (one transaction, no collate)."""

    def __init__(
        self, split: LmdbSplit, batches: Sequence[Sequence[int]], channels_last: bool = False
    ):
        self.split, self.batches = split, [list(map(int, b)) for b in batches]
        self.channels_last = channels_last

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.split.read_batch(self.batches[index], self.channels_last)


def in_order(split: LmdbSplit, size: int, rows: slice = slice(None)) -> Batches:
    """The split in store order, `size` records a batch (the last may be short), in
    channels-last layout; `rows` keeps a rank's share of the batches."""
    starts = range(0, len(split), size)[rows]
    return Batches(split, [range(s, min(s + size, len(split))) for s in starts], True)


def batch_loader(
    dataset: torch.utils.data.Dataset, keys: Sequence, workers: int = 0, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """`dataset[key]` for each key in order, each item a whole batch; `workers` processes
    read 2 items each ahead (none: read in the loop). Workers start by forkserver: a fork
    of a process that has run Prefect flows or CUDA inherits threads that break it."""
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        sampler=keys,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=2 if workers else None,
        multiprocessing_context="forkserver" if workers else None,
    )
