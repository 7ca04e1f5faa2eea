"""Each loss term against a small worked example whose value is computed by hand in the test.

The examples use the standard basis of R^3 as the class text features w, so that cos(s, w_c) is just
the c-th coordinate of the unit vector s and the logits can be read off the vectors. The expected values
are written out with ``math`` (exp, log, explicit log-sum-exp), never with torch's own softmax/CE.
"""

from __future__ import annotations

import math

import pytest
import torch

from vlmdistill.config import LossConfig
from vlmdistill.losses import (
    ClosedSetLoss,
    ClsLoss,
    ImageContrastiveLoss,
    LogitKdLoss,
    LossInputs,
    MseLoss,
    Objective,
    VlAlignLoss,
)

E = math.exp
LN = math.log
R = math.sqrt(0.5)  # cos 45 degrees

# Three classes: the standard basis, so cos(v, w_c) = v[c] for any unit vector v.
W3 = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
# Two images. Teacher features (unit): t1 = (.8, .6, 0), t2 = (0, .6, .8); student: s1 = (.6, 0, .8), s2 = (.6, .8, 0).
T2 = [[0.8, 0.6, 0.0], [0.0, 0.6, 0.8]]
S2 = [[0.6, 0.0, 0.8], [0.6, 0.8, 0.0]]
# Labels: image 1 is class 0 (teacher argmax 0: correct), image 2 is class 1 (teacher argmax 2: wrong).
Y2 = [0, 1]
TAU = 0.5  # so the logits are 2 * the coordinates


def tensor(rows: list[list[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def vl_inputs(grad: bool = False) -> LossInputs:
    return LossInputs(s=tensor(S2, grad), y=torch.tensor(Y2), w=tensor(W3), t=tensor(T2))


def kl2(p0: float, q0: float) -> float:
    """KL between two-outcome distributions (p0, 1-p0) || (q0, 1-q0)."""
    return p0 * LN(p0 / q0) + (1 - p0) * LN((1 - p0) / (1 - q0))


# ---------------------------------------------------------------------------------------------- L_cls
def test_cls_loss_is_cross_entropy_over_cosine_over_tau() -> None:
    # w1 = e1, w2 = e2, w3 = (cos45, sin45); s1 = e1 (label 0), s2 = e2 (label 2); tau = 0.5.
    s = tensor([[1.0, 0.0], [0.0, 1.0]])
    w = tensor([[1.0, 0.0], [0.0, 1.0], [R, R]])
    # logits row 1: cos = (1, 0, r) -> (2, 0, 2r);  row 2: cos = (0, 1, r) -> (0, 2, 2r)
    ce1 = LN(E(2) + E(0) + E(2 * R)) - 2
    ce2 = LN(E(0) + E(2) + E(2 * R)) - 2 * R
    got = ClsLoss(temperature=0.5)(LossInputs(s=s, y=torch.tensor([0, 2]), w=w))
    assert got.item() == pytest.approx((ce1 + ce2) / 2, rel=1e-9)


def test_cls_loss_gradient_reaches_the_student_as_softmax_minus_onehot() -> None:
    # d CE / d logits = p - onehot; logits = s @ I / tau; mean over B = 2 images.
    x = vl_inputs(grad=True)
    ClsLoss(TAU)(x).backward()
    for i, (row, y) in enumerate(zip(S2, Y2, strict=True)):
        z = [v / TAU for v in row]
        denom = sum(E(v) for v in z)
        expected = [(E(z[c]) / denom - (c == y)) / TAU / 2 for c in range(3)]
        assert x.s.grad[i].tolist() == pytest.approx(expected, rel=1e-9)


def test_closed_set_loss_is_plain_cross_entropy_on_head_logits() -> None:
    s_raw = tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = ((LN(E(1) + E(2) + E(3)) - 3) + LN(3)) / 2
    got = ClosedSetLoss()(LossInputs(s=tensor(W3[:2]), y=torch.tensor([2, 1]), s_raw=s_raw))
    assert got.item() == pytest.approx(expected, rel=1e-9)


# ---------------------------------------------------------------------------------------------- L_mse
def test_mse_normalized_is_mean_squared_distance_not_divided_by_dimension() -> None:
    c60, s60 = 0.5, math.sqrt(3) / 2
    s = tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    t = tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [c60, s60, 0.0]])
    # ||s-t||^2: orthogonal -> 1 + 1 = 2; equal -> 0; 60 degrees -> (1-.5)^2 + .75 = 1 = 2 - 2 cos 60.
    expected = (2.0 + 0.0 + 1.0) / 3  # = 1.0; divided by D=3 it would be 1/3
    got = MseLoss(normalized=True)(LossInputs(s=s, y=torch.tensor([0, 0, 0]), t=t))
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert got.item() == pytest.approx((2 - 2 * 0) / 3 + (2 - 2 * 1) / 3 + (2 - 2 * c60) / 3, rel=1e-9)


def test_mse_unnormalized_is_log1p_of_raw_mean_squared_distance_over_10() -> None:
    s_raw = tensor([[3.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    t_raw = tensor([[0.0, 4.0, 0.0], [1.0, 1.0, 1.0]])
    # ||S - T||^2 = 9 + 16 = 25 and 0 -> mean 12.5 -> log(1 + 1.25). The unit s/t (identical here)
    # must be ignored: on them the loss would be 0.
    unit = tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    x = LossInputs(s=unit, y=torch.tensor([0, 0]), t=unit, s_raw=s_raw, t_raw=t_raw)
    assert MseLoss(normalized=False)(x).item() == pytest.approx(LN(2.25), rel=1e-9)


# ---------------------------------------------------------------------------------------------- L_im-cst
def _imcst_example() -> tuple[LossInputs, list[list[float]]]:
    # s1 = e1, s2 = e2; t1 = e1, t2 = (cos60, sin60); tau = 0.5.
    s = tensor([[1.0, 0.0], [0.0, 1.0]])
    t = tensor([[1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    # M_ij = cos(s_i, t_j) / tau:  [[1, .5], [0, sqrt3/2]] / .5  (not symmetric)
    m = [[2.0, 1.0], [0.0, math.sqrt(3)]]
    return LossInputs(s=s, y=torch.tensor([0, 1]), t=t), m


def test_image_contrastive_single_is_row_cross_entropy() -> None:
    x, m = _imcst_example()
    row1 = LN(E(m[0][0]) + E(m[0][1])) - m[0][0]
    row2 = LN(E(m[1][0]) + E(m[1][1])) - m[1][1]
    got = ImageContrastiveLoss(0.5, mode="single")(x)
    assert got.item() == pytest.approx((row1 + row2) / 2, rel=1e-9)


def test_image_contrastive_bidirectional_averages_rows_and_columns() -> None:
    x, m = _imcst_example()
    rows = ((LN(E(m[0][0]) + E(m[0][1])) - m[0][0]) + (LN(E(m[1][0]) + E(m[1][1])) - m[1][1])) / 2
    cols = ((LN(E(m[0][0]) + E(m[1][0])) - m[0][0]) + (LN(E(m[0][1]) + E(m[1][1])) - m[1][1])) / 2
    assert rows != pytest.approx(cols)  # the example distinguishes M from M^T
    got = ImageContrastiveLoss(0.5, mode="bidirectional")(x)
    assert got.item() == pytest.approx(0.5 * (rows + cols), rel=1e-9)


# ---------------------------------------------------------------------------------------------- L_vlalign
# Logits (tau = .5, w = basis): u1 = (1.6, 1.2, 0), z1 = (1.2, 0, 1.6); u2 = (0, 1.2, 1.6), z2 = (1.2, 1.6, 0).
# k = 2: image 1 keeps classes {0, 1}: P_T = sigmoid(1.6 - 1.2), P_S = sigmoid(1.2 - 0) on class 0.
KL1_TOP2 = kl2(1 / (1 + E(-0.4)), 1 / (1 + E(-1.2)))
# image 2 keeps classes {2, 1}: P_T(class 2) = sigmoid(1.6 - 1.2), P_S(class 2) = sigmoid(0 - 1.6).
KL2_TOP2 = kl2(1 / (1 + E(-0.4)), 1 / (1 + E(1.6)))


def _kl_full(u: list[float], z: list[float]) -> float:
    zu, zz = sum(E(v) for v in u), sum(E(v) for v in z)
    return sum(E(a) / zu * ((a - LN(zu)) - (b - LN(zz))) for a, b in zip(u, z, strict=True))


def test_vlalign_topk_kl_with_filter_drops_teacher_misclassified_images() -> None:
    got = VlAlignLoss(TAU, k=2, filter=True)(vl_inputs())
    assert got.item() == pytest.approx(KL1_TOP2, rel=1e-9)


def test_vlalign_without_filter_averages_all_images() -> None:
    got = VlAlignLoss(TAU, k=2, filter=False)(vl_inputs())
    assert got.item() == pytest.approx((KL1_TOP2 + KL2_TOP2) / 2, rel=1e-9)


@pytest.mark.parametrize("k", [3, 256])
def test_vlalign_with_k_at_least_c_is_the_full_softmax_kl(k: int) -> None:
    full = (_kl_full([1.6, 1.2, 0.0], [1.2, 0.0, 1.6]) + _kl_full([0.0, 1.2, 1.6], [1.2, 1.6, 0.0])) / 2
    assert full != pytest.approx((KL1_TOP2 + KL2_TOP2) / 2)  # top-2 truncation really changes the value
    got = VlAlignLoss(TAU, k=k, filter=False)(vl_inputs())
    assert got.item() == pytest.approx(full, rel=1e-9)


def test_vlalign_k1_is_exactly_zero() -> None:
    got = VlAlignLoss(TAU, k=1, filter=False)(vl_inputs())
    assert got.item() == 0.0


def test_vlalign_all_filtered_is_zero_finite_and_backpropagates() -> None:
    x = vl_inputs(grad=True)
    x.y = torch.tensor([1, 0])  # teacher argmaxes are 0 and 2: both wrong
    loss = VlAlignLoss(TAU, k=2, filter=True)(x)
    assert torch.isfinite(loss) and loss.item() == 0.0
    loss.backward()
    assert x.s.grad is not None and torch.equal(x.s.grad, torch.zeros_like(x.s))


def test_vlalign_gradient_is_student_minus_teacher_on_topk_of_kept_images() -> None:
    # d KL(P_T || P_S) / d z_topk = P_S - P_T; z = s @ I / tau; one kept image; dropped image gets 0.
    x = vl_inputs(grad=True)
    VlAlignLoss(TAU, k=2, filter=True)(x).backward()
    pt0, ps0 = 1 / (1 + E(-0.4)), 1 / (1 + E(-1.2))
    expected1 = [(ps0 - pt0) / TAU, ((1 - ps0) - (1 - pt0)) / TAU, 0.0]
    assert x.s.grad[0].tolist() == pytest.approx(expected1, rel=1e-9)
    assert x.s.grad[1].tolist() == [0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------------------------- logit KD
def test_logit_kd_is_t_squared_kl_at_temperature_t() -> None:
    # tau = .5 and T = 2: logits / T = cos / (tau T) = the coordinates themselves.
    kl = (_kl_full([0.8, 0.6, 0.0], [0.6, 0.0, 0.8]) + _kl_full([0.0, 0.6, 0.8], [0.6, 0.8, 0.0])) / 2
    got = LogitKdLoss(TAU, kd_temperature=2.0)(vl_inputs())
    assert got.item() == pytest.approx(4.0 * kl, rel=1e-9)


def test_logit_kd_at_t1_is_plain_full_softmax_kl() -> None:
    kl = (_kl_full([1.6, 1.2, 0.0], [1.2, 0.0, 1.6]) + _kl_full([0.0, 1.2, 1.6], [1.2, 1.6, 0.0])) / 2
    got = LogitKdLoss(TAU, kd_temperature=1.0)(vl_inputs())
    assert got.item() == pytest.approx(kl, rel=1e-9)


# ---------------------------------------------------------------------------------------------- Objective
def _cfg(**weights: float) -> LossConfig:
    terms = {name: {"weight": weights.get(name, 0.0)} for name in ("cls", "mse", "imcst", "vlalign", "kd")}
    return LossConfig.model_validate({"temperature": TAU, **terms, "vlalign": {**terms["vlalign"], "k": 2}})


def test_objective_total_is_the_weighted_sum_of_the_enabled_terms() -> None:
    objective = Objective(_cfg(cls=2.0, mse=0.5, vlalign=3.0))
    total, named = objective(vl_inputs())
    # cls by hand: logits = 2 * s; labels 0 and 1.
    cls = ((LN(E(1.2) + E(0) + E(1.6)) - 1.2) + (LN(E(1.2) + E(1.6) + E(0)) - 1.6)) / 2
    # mse by hand: ||s - t||^2 = 2 - 2 cos; cos(s1, t1) = .48, cos(s2, t2) = .48.
    mse = ((2 - 2 * 0.48) + (2 - 2 * 0.48)) / 2
    vlalign = KL1_TOP2
    assert set(named) == {"cls", "mse", "vlalign", "total"}
    assert named["cls"] == pytest.approx(cls, rel=1e-9)
    assert named["mse"] == pytest.approx(mse, rel=1e-9)
    assert named["vlalign"] == pytest.approx(vlalign, rel=1e-9)
    expected = 2.0 * cls + 0.5 * mse + 3.0 * vlalign
    assert total.item() == pytest.approx(expected, rel=1e-9)
    assert named["total"] == pytest.approx(expected, rel=1e-9)


def test_objective_does_not_compute_zero_weight_terms(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(self: object, x: LossInputs) -> torch.Tensor:
        raise AssertionError("a zero-weight term was computed")

    for cls in (ImageContrastiveLoss, VlAlignLoss, LogitKdLoss):
        monkeypatch.setattr(cls, "forward", boom)
    objective = Objective(_cfg(cls=1.0, mse=1.0))
    assert set(objective.terms) == {"cls", "mse"}
    _, named = objective(vl_inputs())
    assert set(named) == {"cls", "mse", "total"}


def test_objective_cls_only_needs_no_teacher_and_runs_without_one() -> None:
    objective = Objective(_cfg(cls=1.0))
    assert objective.needs_teacher is False
    x = LossInputs(s=tensor(S2), y=torch.tensor(Y2), w=tensor(W3))  # t is None
    total, named = objective(x)
    assert set(named) == {"cls", "total"} and total.item() == pytest.approx(named["cls"])


@pytest.mark.parametrize("term", ["mse", "imcst", "vlalign", "kd"])
def test_objective_needs_teacher_for_teacher_terms(term: str) -> None:
    assert Objective(_cfg(**{term: 1.0})).needs_teacher is True
    assert Objective(_cfg(cls=1.0, **{term: 0.5})).needs_teacher is True


def test_objective_closed_set_uses_only_the_head_ce() -> None:
    cfg = _cfg(cls=1.0, mse=1.0).model_copy(update={"closed_set": True})
    objective = Objective(cfg)
    assert set(objective.terms) == {"closed_set"} and objective.needs_teacher is False
    s_raw = tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    total, named = objective(LossInputs(s=tensor(S2), y=torch.tensor([2, 1]), s_raw=s_raw))
    assert total.item() == pytest.approx(((LN(E(1) + E(2) + E(3)) - 3) + LN(3)) / 2, rel=1e-9)
    assert set(named) == {"closed_set", "total"}


# ---------------------------------------------------------------------------------------------- teacher is constant
TEACHER_TERMS = {
    "mse": lambda: MseLoss(normalized=True),
    "imcst": lambda: ImageContrastiveLoss(TAU),
    "vlalign": lambda: VlAlignLoss(TAU, k=2, filter=False),
    "kd": lambda: LogitKdLoss(TAU, kd_temperature=2.0),
}


@pytest.mark.parametrize("name", sorted(TEACHER_TERMS))
def test_teacher_terms_send_gradient_to_the_student(name: str) -> None:
    x = LossInputs(s=tensor(S2, grad=True), y=torch.tensor(Y2), w=tensor(W3), t=tensor(T2))
    TEACHER_TERMS[name]()(x).backward()
    assert x.s.grad is not None and x.s.grad.abs().sum() > 0


@pytest.mark.parametrize("name", sorted(TEACHER_TERMS))
def test_teacher_features_are_treated_as_constants(name: str) -> None:
    x = LossInputs(s=tensor(S2, grad=True), y=torch.tensor(Y2), w=tensor(W3), t=tensor(T2, grad=True))
    TEACHER_TERMS[name]()(x).backward()
    assert x.t.grad is None or torch.equal(x.t.grad, torch.zeros_like(x.t))
