"""Section 6.1's nearest neighbours: the training images whose last-hidden-layer vectors
(fc7 after its ReLU, of the centre crop: 4096-d in the paper's net) lie closest in
Euclidean distance to a query image's.

The training store is read once, in store order, `batch` images at a time; for each
query only its k nearest so far are kept. Memory is one batch (its images, crops and
vectors) plus queries x k, whatever the size of the store: ImageNet's 1.28M training
images take one pass, as long as a centre-crop evaluation of them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from alexnet.crops import centre_crop
from alexnet.jpeg import to_device
from alexnet.lmdb_store import key
from alexnet.params import DEFAULTS, JpegDecoder
from alexnet.reader import LmdbSplit, batch_loader, encoded_for, in_order, read


@dataclass
class Neighbours:
    """For each query (rows): its k nearest training records, nearest first; ties go
    to the lower store index."""

    indices: torch.Tensor  # (Q, k) int64 indices into the training store
    labels: torch.Tensor  # (Q, k) their classes
    distances: torch.Tensor  # (Q, k) float32 Euclidean distances


@torch.no_grad()
def hidden_vectors(
    model: torch.nn.Module, images: torch.Tensor, mean: torch.Tensor | None, crop: int
) -> torch.Tensor:
    """(N, 4096 x model.width) float32 last-hidden-layer vectors of the centre crops of
    uint8 images."""
    return model.hidden(centre_crop(images, mean, crop)).float()


def query_vectors(
    model: torch.nn.Module,
    val: LmdbSplit,
    queries: list[int],
    mean: torch.Tensor | None,
    crop: int,
    device: torch.device,
    decoder: JpegDecoder = DEFAULTS.compute.jpeg_decoder,
) -> torch.Tensor:
    """`hidden_vectors` of the val records `queries`, decoded as `nearest` decodes its
    candidates (and the evaluation its batches): on CUDA a jpeg store's payloads by
    `decoder`, whose pixels differ from the host's libjpeg by a level or so, so one
    image in both stores would not be at distance 0 from itself."""
    images, _ = read(val, queries, encoded_for(val, device, decoder))
    mean = None if mean is None else mean.to(device)
    return hidden_vectors(model, to_device(images, device, val.shape, decoder), mean, crop)


def distances(queries: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """(Q, N) Euclidean distances, from the differences themselves: the |a|^2 - 2ab +
    |b|^2 shortcut loses the small distances that matter here to cancellation."""
    return torch.cdist(queries, vectors, compute_mode="donot_use_mm_for_euclid_dist")


def keep_nearest(best: Neighbours, batch: Neighbours, k: int) -> Neighbours:
    """The k nearest of two candidate sets per query, ordered by (distance, index)."""
    merged = [torch.cat(pair, 1) for pair in zip(_fields(best), _fields(batch), strict=True)]
    indices, labels, dist = merged
    by_index = indices.argsort(dim=1, stable=True)
    order = by_index.gather(1, dist.gather(1, by_index).argsort(dim=1, stable=True))[:, :k]
    return Neighbours(*(field.gather(1, order) for field in merged))


def candidates(
    rows: range, labels: torch.Tensor, queries: torch.Tensor, vectors: torch.Tensor
) -> Neighbours:
    """A batch's records (store rows `rows`, `labels` pinned on the host) as candidates for
    each query, on the queries' device. Nothing here waits for the device: the row numbers
    are made there, and the labels' copy is left to run in order."""
    count, device = len(queries), queries.device
    return Neighbours(
        torch.arange(rows.start, rows.stop, device=device).expand(count, -1),
        labels.to(device, non_blocking=True).expand(count, -1),
        distances(queries, vectors),
    )


def _fields(n: Neighbours) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return n.indices, n.labels, n.distances


@torch.no_grad()
def nearest(
    model: torch.nn.Module,
    queries: torch.Tensor,
    train: LmdbSplit,
    mean: torch.Tensor | None,
    crop: int,
    k: int,
    batch: int,
    device: torch.device,
    on_batch: Callable[[int], None] | None = None,
    workers: int = DEFAULTS.evaluate.loader_workers,
    decoder: JpegDecoder = DEFAULTS.compute.jpeg_decoder,
) -> Neighbours:
    """The k (at most the store's size) training records nearest to each of the query
    vectors (Q, D) from `hidden_vectors`, by one streamed pass over `train`, read
    ahead by `workers` processes (a jpeg store's batches decoded on CUDA by `decoder`)."""
    model.eval()
    queries = queries.to(device).float()
    mean = None if mean is None else mean.to(device)
    count = len(queries)
    # on the device: the host reads the k best once, at the end, instead of waiting for
    # each batch's forward (on a GPU the next batch's read and decode then overlap it)
    best = Neighbours(
        torch.empty(count, 0, dtype=torch.long, device=device),
        torch.empty(count, 0, dtype=torch.long, device=device),
        torch.empty(count, 0, device=device),
    )
    batches = in_order(train, batch, encoded=encoded_for(train, device, decoder))
    loader = batch_loader(batches, range(len(batches)), workers, device.type == "cuda")
    for rows, (images, labels) in zip(batches.batches, loader, strict=True):
        images = to_device(images, device, train.shape, decoder)
        found = candidates(rows, labels, queries, hidden_vectors(model, images, mean, crop))
        best = keep_nearest(best, found, k)
        if on_batch:
            on_batch(len(rows))
    return Neighbours(*(field.cpu() for field in _fields(best)))


def images_of(train: LmdbSplit, found: Neighbours) -> torch.Tensor:
    """(Q, k, 3, H, W) uint8: the neighbours' images, for the figure."""
    images, _ = train.read_batch(found.indices.flatten())
    return images.reshape(*found.indices.shape, *images.shape[1:])


def table(
    queries: list[int], query_labels: list[int], found: Neighbours, names: list[str]
) -> list[dict]:
    """`metrics/eval/neighbours.csv`: one row per (query, neighbour), nearest first; keys
    are the records' keys in the val and train stores."""
    return [
        {
            "query_key": key(query).decode(),
            "query_class": names[query_labels[q]],
            "rank": rank + 1,
            "neighbour_key": key(int(found.indices[q, rank])).decode(),
            "neighbour_class": names[int(found.labels[q, rank])],
            "distance": round(float(found.distances[q, rank]), 6),
        }
        for q, query in enumerate(queries)
        for rank in range(found.indices.shape[1])
    ]
