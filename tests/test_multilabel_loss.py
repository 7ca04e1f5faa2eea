"""The asymmetric loss on a worked 2x3 example, its constant focusing weights, and the two bias modes."""

from __future__ import annotations

import math

import pytest
import torch

from vlmdistill.multilabel.loss import AsymmetricLoss

# Probabilities and targets of two scenes over three classes; the bias is set so that tanh(b) = -0.1.
PROB = torch.tensor([[0.90, 0.12, 0.70], [0.50, 0.80, 0.40]])
TARGET = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])


def _loss(bias: float, mode: str = "tanh") -> AsymmetricLoss:
    loss = AsymmetricLoss(bias_mode=mode)
    with torch.no_grad():
        loss.bias.fill_(bias)
    return loss


def test_worked_example() -> None:
    # shifted q = p - 0.1 = [[0.8, 0.02, 0.6], [0.4, 0.7, 0.3]]
    # positives (gamma_pos = 1): -(1 - q) log q
    #   q=0.8: 0.2 * 0.2231436 = 0.0446287;  q=0.6: 0.4 * 0.5108256 = 0.2043302;  q=0.7: 0.3 * 0.3566749 = 0.1070025
    # negatives (gamma_neg = 2, clip 0.05): q_neg = min(1 - q + 0.05, 1); -(1 - q_neg)^2 log q_neg
    #   q=0.02: q_neg = 1 -> 0 (clipped: an easy negative costs nothing)
    #   q=0.4:  q_neg = 0.65 -> 0.1225 * 0.4307829 = 0.0527707;  q=0.3: q_neg = 0.75 -> 0.0625 * 0.2876821 = 0.0179801
    # rows: 0.0446287 + 0 + 0.2043302 = 0.2489590;  0.0527707 + 0.1070025 + 0.0179801 = 0.1777533
    # mean over the two scenes: 0.2133561
    loss = _loss(math.atanh(-0.1))
    assert loss(PROB, TARGET).item() == pytest.approx(0.2133561, abs=1e-6)


def test_focusing_weight_is_a_constant_of_the_gradient() -> None:
    # One positive with q = 0.6 (p = 0.7, shift -0.1): d/dq of -(1-q) log q with (1-q) held constant is
    # -(1-q)/q = -0.4/0.6; the batch mean divides by B = 2.
    prob = PROB.clone().requires_grad_(True)
    _loss(math.atanh(-0.1))(prob, TARGET).backward()
    assert prob.grad[0, 2].item() == pytest.approx(-0.4 / 0.6 / 2, rel=1e-5)
    assert prob.grad[0, 1].item() == 0.0  # the clipped negative


def test_bias_is_learned() -> None:
    loss = _loss(0.0)
    loss(PROB, TARGET).backward()
    assert loss.bias.grad is not None and loss.bias.grad.item() != 0.0


def test_bias_modes_differ_at_prediction_only() -> None:
    prob = torch.tensor([[0.98, 0.20]])
    consistent, paper = _loss(-0.5, "tanh"), _loss(-0.5, "paper")
    # same loss: both train with tanh(-0.5) = -0.4621
    assert consistent(prob, torch.tensor([[1.0, 0.0]])).item() == paper(prob, torch.tensor([[1.0, 0.0]])).item()
    # tanh: 0.98 - 0.4621 = 0.5179 > 0.5 -> present; paper (raw b): 0.98 - 0.5 = 0.48 -> absent
    assert consistent.predict(prob).tolist() == [[True, False]]
    assert paper.predict(prob).tolist() == [[False, False]]
    assert consistent.decision_scores(prob)[0, 0].item() == pytest.approx(0.98 + math.tanh(-0.5))
    assert paper.decision_scores(torch.tensor([[0.2]])).item() == 0.0  # clamped at 0


def test_predict_worked_example() -> None:
    # clamp(p - 0.1) > 0.5
    assert _loss(math.atanh(-0.1)).predict(PROB).tolist() == [[True, False, True], [False, True, False]]


def test_unknown_bias_mode() -> None:
    with pytest.raises(ValueError, match="bias_mode"):
        AsymmetricLoss(bias_mode="raw")


def test_an_overshooting_bias_still_learns_in_tanh_mode_only() -> None:
    # tanh(b) = 0.9 clamps every q (p >= 0.12) to 1: the plain clamp (paper mode) passes no gradient, so a run is
    # stuck with every object present; the straight-through clamp (tanh mode) gives the same loss and pulls b
    # back down: each negative's -(1 - q_neg)^2 log(1 - q + clip) has slope 0.95^2 / 0.05 in q.
    values = {}
    for mode in ("tanh", "paper"):
        loss = _loss(math.atanh(0.9), mode)
        value = loss(PROB, TARGET)
        value.backward()
        values[mode] = value.item()
        grad = loss.bias.grad.item()
        expected = 3 * 0.95**2 / 0.05 * (1 - 0.9**2) / 2 if mode == "tanh" else 0.0  # 3 negatives, mean of 2 rows
        assert grad == pytest.approx(expected, rel=1e-4), mode
    assert values["tanh"] == values["paper"]
