"""Hand-worked checks of the §6 analysis metrics, plus brute-force references on random data."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmdistill.analysis import (
    analysis_metrics,
    feature_gap,
    m_neigh,
    m_rel,
    m_vlalign,
    plot_text_spectra,
    text_mean_pairwise_cosine,
    text_svd_spectrum,
)


def _at(degrees: list[float], scale: float = 1.0) -> torch.Tensor:
    """2-D points on a circle of radius ``scale`` at the given angles."""
    rad = torch.tensor(degrees, dtype=torch.float64).deg2rad()
    return (scale * torch.stack([rad.cos(), rad.sin()], dim=1)).float()


# Brute-force references: plain loops in float64 numpy, written from the paper's definitions.


def _unit_np(x: torch.Tensor) -> np.ndarray:
    a = x.double().numpy()
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _ref_m_rel(s: torch.Tensor, t: torch.Tensor) -> float:
    s, t = _unit_np(s), _unit_np(t)
    hits = [int(np.argmin(((t - s[i]) ** 2).sum(1)) == i) for i in range(len(s))]
    return float(np.mean(hits))


def _ref_knn(x: np.ndarray, i: int, k: int) -> set[int]:
    d = ((x - x[i]) ** 2).sum(1)
    d[i] = np.inf
    return set(np.argsort(d)[:k].tolist())


def _ref_m_neigh(s: torch.Tensor, t: torch.Tensor, k: int) -> float:
    s, t = _unit_np(s), _unit_np(t)
    return float(np.mean([len(_ref_knn(s, i, k) & _ref_knn(t, i, k)) / k for i in range(len(s))]))


def _ref_m_vlalign(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, k: int) -> float:
    s, t, w = _unit_np(s), _unit_np(t), _unit_np(w)
    k = min(k, len(w))
    counts = []
    for i in range(len(s)):
        labels = np.argsort(((w - t[i]) ** 2).sum(1))[:k]
        d = ((w[labels] - s[i]) ** 2).sum(1)
        counts.append(sum(d[a] > d[b] for a, b in itertools.combinations(range(k), 2)))
    return float(np.mean(counts))


def test_student_equal_to_teacher_is_perfect() -> None:
    g = torch.Generator().manual_seed(0)
    t = torch.randn(20, 8, generator=g)
    w = torch.randn(6, 8, generator=g)
    s = 3.0 * t  # same directions, different scale
    assert m_rel(s, t) == 1.0
    assert m_neigh(s, t, 1) == m_neigh(s, t, 5) == 1.0
    assert m_vlalign(s, t, w, 2) == m_vlalign(s, t, w, 6) == 0.0
    gap = feature_gap(s, t)
    assert gap["mse"] == pytest.approx(0.0, abs=1e-12)
    assert gap["angle_deg"] == pytest.approx(0.0, abs=1e-4)


def test_hand_worked_swap_m_rel_and_m_neigh() -> None:
    # Teacher at 0°, 60°, 150°, 250°; the student swaps images 2 and 3 (s2 at 250°, s3 at 150°).
    t = _at([0, 60, 150, 250])
    s = _at([0, 60, 250, 150], scale=2.0)
    # M_rel: s0, s1 land on their own teacher; s2 lands on t3 and s3 on t2 -> 2/4.
    assert m_rel(s, t) == 0.5
    # Angular gaps, nearest first (self excluded):
    #   teacher  0: 1(60) 3(110) 2(150)   student 0: 1(60) 2(110) 3(150)
    #            1: 0(60) 2(90)  3(170)           1: 0(60) 3(90)  2(170)
    #            2: 1(90) 3(100) 0(150)           2: 3(100) 0(110) 1(170)
    #            3: 2(100) 0(110) 1(170)          3: 1(90) 2(100) 0(150)
    # k=1: {1}{1} {0}{0} {1}{3} {2}{1}             -> (1+1+0+0)/4 = 0.5
    # k=2: {1,3}{1,2} {0,2}{0,3} {1,3}{3,0} {2,0}{1,2} -> each 1/2 -> 0.5
    # k=3 = N-1: every other image is a neighbour -> 1.
    assert m_neigh(s, t, 1) == 0.5
    assert m_neigh(s, t, 2) == 0.5
    assert m_neigh(s, t, 3) == 1.0


def test_m_neigh_rejects_k_out_of_range() -> None:
    t = _at([0, 60, 150, 250])
    with pytest.raises(ValueError):
        m_neigh(t, t, 4)
    with pytest.raises(ValueError):
        m_neigh(t, t, 0)


# Labels at 10°, 30°, 50°, 70°; a teacher image at 0° ranks them 0, 1, 2, 3 (nearest first).
LABELS = [10, 30, 50, 70]


def test_m_vlalign_reversed_student_is_maximal() -> None:
    w, t = _at(LABELS), _at([0])
    s = _at([80])  # distances 70, 50, 30, 10: exactly the reverse of the teacher's order
    assert m_vlalign(s, t, w, 4) == 6  # k(k-1)/2 with k = 4
    assert m_vlalign(s, t, w, 3) == 3
    # Only the teacher's top 2 (labels 0, 1) are compared: one pair, inverted.
    assert m_vlalign(s, t, w, 2) == 1
    # k is clipped to C = 4.
    assert m_vlalign(s, t, w, 10) == 6


def test_m_vlalign_single_inversion_and_average() -> None:
    w = _at(LABELS)
    # Student at 22°: distances 12, 8, 28, 48 -> only the pair (label 0, label 1) is inverted.
    assert m_vlalign(_at([22]), _at([0]), w, 4) == 1
    # Averaged with a perfect image (student = teacher = 0°): (1 + 0) / 2.
    assert m_vlalign(_at([22, 0]), _at([0, 0]), w, 4) == 0.5


def test_feature_gap_two_pairs_and_scale_invariance() -> None:
    t = _at([0, 0])
    s = _at([60, 90])
    # mse = mean(2 - 2cos): (2 - 1 + 2 - 0) / 2 = 1.5; mean angle (60 + 90) / 2 = 75.
    gap = feature_gap(s, t)
    assert gap["mse"] == pytest.approx(1.5, abs=1e-6)
    assert gap["angle_deg"] == pytest.approx(75.0, abs=1e-4)
    scaled = feature_gap(_at([60, 90], scale=7.0), _at([0, 0], scale=0.1))
    assert scaled == pytest.approx(gap, abs=1e-6)


def test_metrics_are_scale_invariant() -> None:
    g = torch.Generator().manual_seed(1)
    s, t, w = torch.randn(30, 6, generator=g), torch.randn(30, 6, generator=g), torch.randn(7, 6, generator=g)
    scales = torch.rand(30, 1, generator=g) * 10 + 0.1
    assert m_rel(s * scales, t) == m_rel(s, t)
    assert m_neigh(s * scales, t / scales, 4) == m_neigh(s, t, 4)
    assert m_vlalign(s * scales, t, w * 5, 3) == m_vlalign(s, t, w, 3)


def test_matches_brute_force_reference() -> None:
    g = torch.Generator().manual_seed(2)
    t = torch.randn(40, 5, generator=g)
    s = t + 0.6 * torch.randn(40, 5, generator=g)  # correlated, so the metrics are non-trivial
    w = torch.randn(9, 5, generator=g)
    assert m_rel(s, t) == pytest.approx(_ref_m_rel(s, t))
    for k in (1, 3, 7):
        assert m_neigh(s, t, k) == pytest.approx(_ref_m_neigh(s, t, k))
    for k in (2, 4, 9):
        assert m_vlalign(s, t, w, k) == pytest.approx(_ref_m_vlalign(s, t, w, k))


def test_chunked_equals_unchunked() -> None:
    g = torch.Generator().manual_seed(3)
    t = torch.randn(37, 8, generator=g)
    s = t + 0.8 * torch.randn(37, 8, generator=g)
    w = torch.randn(11, 8, generator=g)
    for chunk in (1, 5, 16):
        assert m_rel(s, t, chunk_size=chunk) == m_rel(s, t)
        assert m_neigh(s, t, 4, chunk_size=chunk) == m_neigh(s, t, 4)
        assert m_vlalign(s, t, w, 5, chunk_size=chunk) == m_vlalign(s, t, w, 5)


def test_text_mean_pairwise_cosine() -> None:
    assert text_mean_pairwise_cosine(torch.eye(5) * 3) == pytest.approx(0.0, abs=1e-12)
    assert text_mean_pairwise_cosine(torch.ones(4, 3)) == pytest.approx(1.0, abs=1e-6)
    # 0°, 90°, 180°: pair cosines 0, -1, 0 -> -1/3.
    assert text_mean_pairwise_cosine(_at([0, 90, 180])) == pytest.approx(-1 / 3, abs=1e-6)


def test_text_svd_spectrum_eigenvalues() -> None:
    # ±e1, ±e2 in 3-D: mean 0, covariance (1/3)·diag(2, 2, 0) -> eigenvalues 2/3, 2/3, 0.
    w = torch.tensor([[1.0, 0, 0], [-2, 0, 0], [0, 3, 0], [0, -1, 0]])
    spectrum = text_svd_spectrum(w, top=10)
    assert spectrum.shape == (3,)
    assert torch.allclose(spectrum, torch.tensor([2 / 3, 2 / 3, 0.0]), atol=1e-6)
    top1 = text_svd_spectrum(torch.randn(20, 8, generator=torch.Generator().manual_seed(4)), top=4)
    assert top1.shape == (4,)
    assert bool((top1[:-1] >= top1[1:]).all())


def test_analysis_metrics_keys_and_json() -> None:
    t = _at([0, 60, 150, 250])
    s = _at([0, 60, 250, 150])
    w = _at(LABELS)
    out = analysis_metrics(s, t, w, neigh_ks=(1, 2), vlalign_ks=(2, 3))
    assert set(out) == {
        "m_rel",
        "m_neigh@1",
        "m_neigh@2",
        "m_vlalign@2",
        "m_vlalign@3",
        "mse",
        "angle_deg",
        "text_mean_cos",
    }
    assert all(type(v) is float for v in out.values())
    assert json.loads(json.dumps(out)) == out
    assert out["m_rel"] == out["m_neigh@1"] == 0.5
    # Only images 2 and 3 moved, each by 100°: mse = 2 · (2 - 2cos 100°) / 4, angle = 2 · 100 / 4.
    assert out["mse"] == pytest.approx((2 - 2 * math.cos(math.radians(100))) / 2, abs=1e-6)
    assert out["angle_deg"] == pytest.approx(50.0, abs=1e-4)


def test_plot_text_spectra_writes_png(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(5)
    spectra = {
        "single prompt": text_svd_spectrum(torch.randn(12, 6, generator=g)),
        "ensemble": text_svd_spectrum(torch.randn(12, 6, generator=g)),
    }
    path = tmp_path / "nested" / "dir" / "spectra.png"
    plot_text_spectra(spectra, path)
    data = path.read_bytes()
    assert len(data) > 1000
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
