"""Analysis metrics from §6 of Li et al. (ICCV 2023), which the official code never implemented.

They measure how well a student image encoder reproduces the teacher's geometry:

* ``m_rel``: does each student feature find its own image among the teacher features (coherence)?
* ``m_neigh``: does the student keep each image's nearest neighbours (local structure)?
* ``m_vlalign``: does the student rank the teacher's nearest labels in the same order (vision-language
  alignment)?
* ``feature_gap``: raw distance between paired student and teacher features.
* ``text_mean_pairwise_cosine`` / ``text_svd_spectrum``: how spread out the class text embeddings are
  (paper Table 6 and Fig. 4), which the paper links to out-of-distribution generalisation.

Every function L2-normalises its inputs, so features are compared as unit vectors and scale does not
matter. For unit vectors ``||a - b||² = 2 - 2 cos(a, b)``, so "nearest by squared Euclidean distance" is
"largest cosine", and the code ranks by cosine. Work over image pairs is done in row chunks so that
no N×N (or N×C) matrix is held in memory at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure

from vlmdistill.io import atomic_save_figure

__all__ = [
    "analysis_metrics",
    "feature_gap",
    "m_neigh",
    "m_rel",
    "m_vlalign",
    "plot_text_spectra",
    "text_mean_pairwise_cosine",
    "text_svd_spectrum",
]

DEFAULT_CHUNK = 1024  # rows per block: 1024 × 50k float32 sims ≈ 200 MB, and faster than 4096 on CPU


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Detached float32 unit rows; half-precision caches would make the rankings noisy."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D [rows, dim] tensor, got shape {tuple(x.shape)}")
    return F.normalize(x.detach().float(), dim=-1)


def _paired(s: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalise student/teacher features, which must describe the same images in the same order."""
    if s.shape != t.shape:
        raise ValueError(f"student {tuple(s.shape)} and teacher {tuple(t.shape)} shapes differ")
    if s.shape[0] == 0:
        raise ValueError("need at least one image")
    return _unit(s), _unit(t.to(s.device))


def _chunks(n: int, chunk_size: int) -> Iterator[slice]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def m_rel(s: torch.Tensor, t: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK) -> float:
    """Fraction of images whose student feature's nearest teacher feature (over all N) is its own.

    Higher is better (1 = the student is coherent with the teacher). Ties are broken by
    ``torch.argmax``, which picks the lowest index, and an image counts as correct only if that
    chosen index is its own.
    """
    s, t = _paired(s, t)
    hits = 0
    for rows in _chunks(s.shape[0], chunk_size):
        nearest = (s[rows] @ t.T).argmax(dim=1)
        own = torch.arange(rows.start, rows.stop, device=s.device)
        hits += int((nearest == own).sum())
    return hits / s.shape[0]


def _knn_excluding_self(x: torch.Tensor, rows: slice, k: int) -> torch.Tensor:
    """Ids of the k nearest rows of ``x`` to each of ``x[rows]``, the row itself excluded."""
    sim = x[rows] @ x.T
    local = torch.arange(sim.shape[0], device=x.device)
    sim[local, local + rows.start] = -math.inf
    return sim.topk(k, dim=1).indices


def _neigh_overlaps(s: torch.Tensor, t: torch.Tensor, ks: Sequence[int], chunk_size: int) -> dict[int, float]:
    """M_neigh for several k from one pass: sorted top-k lists for smaller k are prefixes of the largest."""
    s, t = _paired(s, t)
    n = s.shape[0]
    for k in ks:
        if not 1 <= k <= n - 1:
            raise ValueError(f"k must be in [1, N-1] = [1, {n - 1}], got {k}")
    shared = dict.fromkeys(ks, 0)
    for rows in _chunks(n, chunk_size):
        knn_s = _knn_excluding_self(s, rows, max(ks))
        knn_t = _knn_excluding_self(t, rows, max(ks))
        for k in ks:
            # Ids within one top-k list are distinct, so counting matching pairs counts the intersection.
            shared[k] += int((knn_s[:, :k, None] == knn_t[:, None, :k]).sum())
    return {k: shared[k] / (n * k) for k in ks}


def m_neigh(s: torch.Tensor, t: torch.Tensor, k: int, *, chunk_size: int = DEFAULT_CHUNK) -> float:
    """Mean overlap |kNN_S(i) ∩ kNN_T(i)| / k of each image's k nearest other images.

    Neighbours are found within the student set and within the teacher set separately, self
    excluded. Higher is better; ties inside the top k are broken by ``torch.topk``.
    """
    return _neigh_overlaps(s, t, (k,), chunk_size)[k]


def _vlalign_inversions(
    s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, ks: Sequence[int], chunk_size: int
) -> dict[int, float]:
    """M_vlalign for several k from one pass over the images (k clipped to C)."""
    s, t = _paired(s, t)
    w = _unit(w.to(s.device))
    if w.shape[1] != s.shape[1]:
        raise ValueError(f"text dim {w.shape[1]} differs from image dim {s.shape[1]}")
    if any(k < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {tuple(ks)}")
    clipped = {k: min(k, w.shape[0]) for k in ks}
    k_max = max(clipped.values())
    before = torch.ones(k_max, k_max, dtype=torch.bool, device=s.device).triu(diagonal=1)  # pairs a < b
    inversions = dict.fromkeys(ks, 0)
    for rows in _chunks(s.shape[0], chunk_size):
        labels = (t[rows] @ w.T).topk(k_max, dim=1).indices  # sorted: teacher-nearest first
        # Cosine is decreasing in distance, so d_a > d_b  <=>  cos_a < cos_b.
        cos = (s[rows] @ w.T).gather(1, labels)
        inverted = (cos[:, :, None] < cos[:, None, :]) & before
        for k, kc in clipped.items():
            inversions[k] += int(inverted[:, :kc, :kc].sum())
    return {k: inversions[k] / s.shape[0] for k in ks}


def m_vlalign(s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, k: int, *, chunk_size: int = DEFAULT_CHUNK) -> float:
    """Mean number of inversions in the student's ranking of the teacher's k nearest labels.

    For each image the teacher's k nearest class texts are listed nearest first; the student's
    image-to-text distances over that list should then be non-decreasing. Each pair a < b with
    d_a > d_b (strictly, so exact ties are not inversions) is one inversion. Lower is better;
    0 is perfect, k(k-1)/2 a fully reversed order. ``k`` is clipped to the number of classes C.
    """
    return _vlalign_inversions(s, t, w, (k,), chunk_size)[k]


def feature_gap(s: torch.Tensor, t: torch.Tensor) -> dict[str, float]:
    """Mean squared distance (= 2 - 2cos, summed over dims) and mean angle between paired features.

    The angle is taken as 2·asin(||ŝ - t̂|| / 2), equal to arccos(cos) but exact near zero, so a
    student equal to its teacher reports 0° rather than float noise from arccos(0.9999999).
    """
    s, t = _paired(s, t)
    dist = (s.double() - t.double()).norm(dim=1)
    angle = 2 * torch.asin((dist / 2).clamp(max=1.0))
    return {"mse": float((dist**2).mean()), "angle_deg": math.degrees(float(angle.mean()))}


def text_mean_pairwise_cosine(w: torch.Tensor) -> float:
    """Mean cosine between distinct class text embeddings (paper Table 6; lower = more spread).

    Uses sum_{i≠j} ŵ_i·ŵ_j = ||Σ ŵ_i||² - Σ ||ŵ_i||², which avoids building the C×C matrix.
    """
    w = _unit(w).double()
    c = w.shape[0]
    if c < 2:
        raise ValueError("need at least two class embeddings")
    off_diagonal = w.sum(dim=0).square().sum() - w.square().sum()
    return float(off_diagonal / (c * (c - 1)))


def text_svd_spectrum(w: torch.Tensor, top: int = 10) -> torch.Tensor:
    """Top ``top`` eigenvalues, descending, of the covariance of the mean-centred unit text features.

    These are eigenvalues (as in paper Fig. 4), i.e. squared singular values of the centred matrix
    divided by C - 1. Fewer than ``top`` come back when min(C, D) is smaller. A flatter spectrum
    means the class texts use more directions of the embedding space.
    """
    w = _unit(w).double()
    c = w.shape[0]
    if c < 2:
        raise ValueError("need at least two class embeddings")
    centred = w - w.mean(dim=0, keepdim=True)
    eigenvalues = torch.linalg.svdvals(centred).square() / (c - 1)
    return eigenvalues[:top].float().cpu()


def analysis_metrics(
    s: torch.Tensor,
    t: torch.Tensor,
    w: torch.Tensor,
    *,
    neigh_ks: Sequence[int] = (3, 5, 10),
    vlalign_ks: Sequence[int] = (2, 3, 5),
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, float]:
    """All §6 metrics for one student/teacher/label set, as plain floats ready for JSON."""
    out: dict[str, float] = {"m_rel": m_rel(s, t, chunk_size=chunk_size)}
    if neigh_ks:
        for k, value in _neigh_overlaps(s, t, neigh_ks, chunk_size).items():
            out[f"m_neigh@{k}"] = value
    if vlalign_ks:
        for k, value in _vlalign_inversions(s, t, w, vlalign_ks, chunk_size).items():
            out[f"m_vlalign@{k}"] = value
    out.update(feature_gap(s, t))
    out["text_mean_cos"] = text_mean_pairwise_cosine(w)
    return out


def plot_text_spectra(spectra: Mapping[str, torch.Tensor], path: Path) -> None:
    """Line plot of the top text-feature eigenvalues per prompt recipe (paper Fig. 4), saved as PNG.

    Uses a bare ``Figure`` (Agg canvas) rather than pyplot, so it needs no display and leaves the
    global matplotlib state alone.
    """
    if not spectra:
        raise ValueError("no spectra to plot")
    path = Path(path)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for name, values in spectra.items():
        values = values.detach().float().cpu()
        ax.plot(range(1, len(values) + 1), values.tolist(), marker="o", label=name)
    ax.set_xlabel("component (descending)")
    ax.set_ylabel("eigenvalue of centred text features")
    ax.set_title("Text embedding spectrum")
    ax.grid(alpha=0.3)
    ax.legend()
    atomic_save_figure(path, fig, dpi=120)
