"""Top-k accuracy bookkeeping shared by training and evaluation."""

from __future__ import annotations

import torch


def label_ranks(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many classes score strictly above the label (0 = top-1 right; < 5 = top-5
    right). Ties count in the label's favour; a label whose score is NaN (a diverged
    model) ranks last, so it is wrong at every k."""
    true = scores.gather(1, labels[:, None])
    rank = (scores > true).sum(1)
    return torch.where(torch.isnan(true[:, 0]), scores.shape[1], rank)
