"""Top-k error (section 6): the one rule, with ties, NaN scores and fewer than k classes."""

from __future__ import annotations

import torch

from alexnet.metrics import NAN_RANK, label_ranks, missed, top_classes, top_k_errors

NAN = float("nan")


def test_rank_counts_the_classes_at_or_above_and_ties_count_against_the_label():
    scores = torch.tensor(
        [
            [0.5, 0.1, 0.1, 0.1, 0.1, 0.1],  # label 0: rank 0
            [0.3, 0.3, 0.1, 0.1, 0.1, 0.1],  # label 1 ties the best: top-1 wrong
            [0.6, 0.2, 0.05, 0.05, 0.05, 0.05],  # label 2 in a four-way tie: rank 5
            [0.3, 0.2, 0.2, 0.15, 0.14, 0.01],  # label 5: five classes above: top-5 wrong
            [0.1, 0.1, 0.1, 0.1, 0.1, 0.1],  # all tied (a dead model): wrong but at k = 6
        ]
    )
    labels = torch.tensor([0, 1, 2, 5, 3])
    rank = label_ranks(scores, labels)
    assert rank.tolist() == [0, 1, 5, 5, 5]
    assert missed(rank, 1).tolist() == [False, True, True, True, True]
    assert missed(rank, 5).tolist() == [False, False, True, True, True]
    assert top_k_errors(scores, labels) == [4, 3]
    assert top_k_errors(scores, labels, ks=(1, 2, 3, 6)) == [4, 3, 3, 0]
    # a model that scores every class alike is wrong everywhere, whatever the label
    constant = torch.full((8, 1000), 1e-3)
    assert top_k_errors(constant, torch.arange(8)) == [8, 8]


def test_top_k_error_is_label_outside_the_k_best_by_sorting():
    # Without ties, against a direct computation: the label among torch.topk's k classes.
    generator = torch.Generator().manual_seed(0)
    scores = torch.randn(200, 12, generator=generator)
    labels = torch.randint(0, 12, (200,), generator=generator)
    for k in (1, 3, 5, 12):
        top = scores.topk(k, dim=1).indices
        expected = int((top != labels[:, None]).all(1).sum())
        assert top_k_errors(scores, labels, ks=(k,)) == [expected], k


def test_a_nan_label_score_is_wrong_at_every_k():
    scores = torch.tensor([[NAN, NAN, NAN], [0.1, 0.7, 0.2], [NAN, 0.5, 0.2], [0.3, NAN, 0.1]])
    labels = torch.tensor([0, 1, 0, 1])
    rank = label_ranks(scores, labels)
    assert rank.tolist() == [NAN_RANK, 0, NAN_RANK, NAN_RANK]
    for k in (1, 2, 3, 5, 1000):  # 3 classes: k = 5 and 1000 exceed the class count
        assert missed(rank, k).tolist() == [True, False, True, True], k
    assert top_k_errors(scores, labels, ks=(1, 5)) == [3, 3]


def test_a_nan_score_of_another_class_does_not_outrank_the_label():
    # A NaN ranks last: it never counts above a finite label score.
    scores = torch.tensor([[NAN, 0.2, 0.1], [0.9, NAN, NAN]])
    labels = torch.tensor([1, 0])
    assert label_ranks(scores, labels).tolist() == [0, 0]
    assert top_k_errors(scores, labels) == [0, 0]


def test_k_beyond_the_class_count_only_misses_nan_scores():
    scores = torch.tensor([[0.1, 0.5, 0.4], [0.6, 0.3, 0.1], [NAN] * 3])
    labels = torch.tensor([0, 2, 1])
    rank = label_ranks(scores, labels)
    assert rank.tolist() == [2, 2, NAN_RANK]
    assert missed(rank, 1).tolist() == [True, True, True]
    assert missed(rank, 3).tolist() == [False, False, True]  # k = the class count
    assert missed(rank, 5).tolist() == [False, False, True]
    assert missed(rank, 10**9).tolist() == [False, False, True]
    assert top_k_errors(scores, labels, ks=(1, 5)) == [3, 1]


def test_empty_batch():
    empty = torch.zeros(0, 5)
    assert label_ranks(empty, torch.zeros(0, dtype=torch.long)).shape == (0,)
    assert top_k_errors(empty, torch.zeros(0, dtype=torch.long)) == [0, 0]


def test_the_classes_shown_hold_the_label_exactly_where_the_error_counts_it_right():
    # The gallery and top5.csv took `topk`, which orders a tie as it likes: they showed
    # the label among the top 5 where the top-5 error counted the image wrong.
    assert top_classes(torch.tensor([[1.0, 1.0, 0.0]]), [0], k=1) == [[1]]  # topk: [[0]]
    generator = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 4, (200, 9), generator=generator).float()  # many ties
    labels = torch.randint(0, 9, (200,), generator=generator)
    ranks = label_ranks(scores, labels).tolist()
    for k in (1, 3, 5, 9):
        for row, label, rank, classes in zip(
            scores, labels.tolist(), ranks, top_classes(scores, labels.tolist(), k), strict=True
        ):
            assert len(set(classes)) == len(classes) == k
            assert row[classes].tolist() == sorted(row[classes].tolist(), reverse=True)
            assert (label in classes) == (rank < k)
