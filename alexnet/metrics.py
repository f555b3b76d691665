"""Top-k error, the one rule for training, validation, evaluation and reports (paper
section 6 reports top-1 and top-5): an image is a top-k mistake when its label is not
among the k highest-scoring classes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

# A label whose score is NaN (a diverged model) ranks beyond every class: wrong at every k.
NAN_RANK = torch.iinfo(torch.int64).max


def label_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(N,) how many other classes score at least as high as the label: 0 = top-1 right,
    < k = top-k right. Ties count against the label: a model whose scores are all equal
    (dead units; bf16 logits round close classes alike) knows nothing, and is wrong."""
    true = scores.gather(1, labels[:, None])
    rank = (scores >= true).sum(1) - 1  # (the label's own score is one of them)
    return torch.where(torch.isnan(true[:, 0]), NAN_RANK, rank)


def predicted(scores: torch.Tensor, labels: torch.Tensor, rank: torch.Tensor) -> torch.Tensor:
    """(N,) the class each image is taken for, by `label_ranks`' rule: the label where it
    ranks first, else the best-scoring other class (a tie is not the label's: argmax would
    give the lower index, and call right what the ranks count wrong)."""
    others = scores.scatter(1, labels[:, None], float("-inf"))
    return torch.where(rank == 0, labels, others.argmax(1))


def top_classes(scores: torch.Tensor, labels: Sequence[int], k: int = 5) -> list[list[int]]:
    """Each image's k highest-scoring classes, best first, by `label_ranks`' rule: a
    class scoring as high as the label goes before it. So a picture or a table shows the
    label among them exactly where the top-k error counts the image right (`topk` orders
    a tie as it likes). For a few images: a gallery's."""
    shown = []
    for row, label, rank in zip(
        scores.tolist(), labels, label_ranks(scores, torch.as_tensor(labels)).tolist(), strict=True
    ):
        # (NaN last: it has no order, and `sorted` would mix up the classes around it)
        others = sorted(
            (c for c in range(len(row)) if c != label),
            key=lambda c: (math.isnan(row[c]), -row[c]),
        )
        if rank < k:
            others.insert(rank, label)
        shown.append(others[:k])
    return shown


def missed(rank: torch.Tensor, k: int) -> torch.Tensor:
    """(N,) bool: top-k mistakes from `label_ranks`. With fewer than k classes only a NaN
    score is a mistake."""
    return rank >= k


def top_k_errors(scores: torch.Tensor, labels: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Counts of top-k mistakes for each k in `ks`."""
    rank = label_ranks(scores, labels)
    return [int(missed(rank, k).sum()) for k in ks]
