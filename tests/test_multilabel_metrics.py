"""Accuracy, F1 over present objects (macro and the official micro) and mAP: worked examples and brute force."""

from __future__ import annotations

import math

import pytest
import torch

from vlmdistill.multilabel.metrics import average_precision, mean_average_precision, presence_metrics

# 4 scenes x 3 classes. Class 0: 2 present, predicted in scenes 0 and 3 (TP 1). Class 1: 2 present, both found.
# Class 2: never present, one false alarm in scene 0.
TARGET = torch.tensor([[1, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0]])
PRED = torch.tensor([[1, 0, 1], [0, 1, 0], [0, 1, 0], [1, 0, 0]]).bool()


def test_worked_example_macro() -> None:
    m = presence_metrics(PRED, TARGET)
    assert m["accuracy"] == pytest.approx(75.0)  # 9 of 12 decisions right
    # present classes 0 and 1: P = (1/2 + 2/2) / 2, R = (1/2 + 2/2) / 2, F1 = 0.75
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((75.0, 75.0, 75.0))


def test_worked_example_micro() -> None:
    m = presence_metrics(PRED, TARGET, average="micro")
    # TP 3 of 5 predicted (class 2's false alarm counts), 3 of 4 present found: F1 = 2 * 0.6 * 0.75 / 1.35
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((60.0, 75.0, 200 / 3))


def test_worked_example_class_group() -> None:
    macro = presence_metrics(PRED, TARGET, classes=[1, 2])
    assert macro["accuracy"] == pytest.approx(87.5)  # 7 of 8
    assert macro["f1"] == pytest.approx(100.0)  # only class 1 is present, and it is found exactly
    micro = presence_metrics(PRED, TARGET, classes=[1, 2], average="micro")
    assert (micro["precision"], micro["recall"], micro["f1"]) == pytest.approx((200 / 3, 100.0, 80.0))


def test_nothing_present_is_nan() -> None:
    m = presence_metrics(PRED, TARGET, classes=[2])
    assert m["accuracy"] == pytest.approx(75.0)
    assert math.isnan(m["recall"]) and math.isnan(m["f1"])
    assert math.isnan(mean_average_precision(torch.rand(4, 3), TARGET, classes=[2]))


def _brute_counts(pred: torch.Tensor, target: torch.Tensor) -> tuple[list[int], list[int], list[int], int]:
    n, k = target.shape
    tp, predicted, positives, right = [0] * k, [0] * k, [0] * k, 0
    for i in range(n):
        for c in range(k):
            p, t = bool(pred[i, c]), bool(target[i, c])
            tp[c] += p and t
            predicted[c] += p
            positives[c] += t
            right += p == t
    return tp, predicted, positives, right


def test_against_brute_force_counts() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(40, 7, generator=g) < 0.3
    target[:, 6] = False  # one class never present
    pred = torch.rand(40, 7, generator=g) < 0.4
    tp, predicted, positives, right = _brute_counts(pred, target)
    present = [c for c in range(7) if positives[c]]
    p = sum(tp[c] / predicted[c] if predicted[c] else 0.0 for c in present) / len(present)
    r = sum(tp[c] / positives[c] for c in present) / len(present)
    m = presence_metrics(pred, target)
    assert m["accuracy"] == pytest.approx(100 * right / 280)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((100 * p, 100 * r, 100 * 2 * p * r / (p + r)))
    pm, rm = sum(tp) / sum(predicted), sum(tp) / sum(positives)
    micro = presence_metrics(pred, target, average="micro")
    assert micro["f1"] == pytest.approx(100 * 2 * pm * rm / (pm + rm))


def _brute_ap(scores: list[float], target: list[bool]) -> float:
    """Mean over positives of the precision among items scored at least as high."""
    values = []
    for s, t in zip(scores, target, strict=True):
        if t:
            above = [tt for ss, tt in zip(scores, target, strict=True) if ss >= s]
            values.append(sum(above) / len(above))
    return sum(values) / len(values)


def test_average_precision_worked_examples() -> None:
    # positives at ranks 1, 3, 5: (1/1 + 2/3 + 3/5) / 3
    ap = average_precision(torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5]), torch.tensor([1, 0, 1, 0, 1]))
    assert ap == pytest.approx((1 + 2 / 3 + 3 / 5) / 3)
    # a tie at 0.7 is one threshold: positive there sees 1 of 3; the last sees 2 of 4
    ap = average_precision(torch.tensor([0.9, 0.7, 0.7, 0.2]), torch.tensor([0, 1, 0, 1]))
    assert ap == pytest.approx((1 / 3 + 1 / 2) / 2)


def test_map_against_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    scores = (torch.rand(30, 5, generator=g) * 10).round() / 10  # many ties
    target = torch.rand(30, 5, generator=g) < 0.3
    target[:, 4] = False
    aps = [_brute_ap(scores[:, c].tolist(), target[:, c].tolist()) for c in range(4)]
    assert mean_average_precision(scores, target) == pytest.approx(100 * sum(aps) / 4)
    assert mean_average_precision(scores, target, classes=[1, 4]) == pytest.approx(100 * aps[1])
