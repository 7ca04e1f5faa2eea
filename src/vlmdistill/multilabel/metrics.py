"""Multi-label metrics of the paper's Table 12, plus mAP; all in percent, NaN where undefined.

Every function takes ``classes`` (column indices) to score one group of names, as Table 12 scores "Y_id on
X_ood" and "Y_ood on X_ood" on the same OOD scenes.

- accuracy (Table 12 a): the fraction of (scene, class) decisions that are right, present or absent.
- F1 (Table 12 b, "F1 over present objects"): precision and recall of the *present* decision only, so the
  many easy absent entries cannot inflate it; F1 = 2PR / (P + R) from class-averaged P and R:
  - ``average="macro"`` (default, the paper's wording "class-averaged"): over the classes present in at
    least one scene, P = mean_c TP_c / predicted_c (0 when a class is never predicted) and
    R = mean_c TP_c / positives_c. A class absent from every scene has no recall and is left out, so its
    false alarms count in accuracy only.
  - ``average="micro"``: P = sum TP / sum predicted and R = sum TP / sum positives over the group's
    classes, which is what the official ``robotics.py`` prints per class group (its "Avg val class
    precision/recall"), false alarms on absent classes included.
- mAP: average precision per class (mean, over its positives, of the precision among scenes scored at least
  as high), averaged over classes with at least one positive. Threshold-free, so the score bias is moot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch

Average = Literal["macro", "micro"]


def _columns(x: torch.Tensor, classes: Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    if classes is None:
        return x
    return x[:, torch.as_tensor(classes, dtype=torch.long, device=x.device)]


def _f1(precision: float, recall: float) -> float:
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def presence_metrics(pred: torch.Tensor, target: torch.Tensor, classes: Sequence[int] | torch.Tensor | None = None,
                     average: Average = "macro") -> dict[str, float]:
    """``accuracy``, ``precision``, ``recall`` and ``f1`` (percent) of boolean decisions [N, K] against {0, 1}
    targets [N, K], over the columns ``classes`` (all by default)."""
    if average not in ("macro", "micro"):
        raise ValueError(f"average must be 'macro' or 'micro', got {average!r}")
    p, t = _columns(pred.bool(), classes), _columns(target.bool(), classes)
    tp, predicted, positives = (p & t).sum(0).double(), p.sum(0).double(), t.sum(0).double()
    accuracy = float((p == t).double().mean() * 100) if p.numel() else float("nan")
    if average == "micro":
        precision = float(tp.sum() / predicted.sum()) if predicted.sum() > 0 else 0.0
        recall = float(tp.sum() / positives.sum()) if positives.sum() > 0 else float("nan")
    else:
        present = positives > 0
        if not present.any():
            recall = precision = float("nan")
        else:
            recall = float((tp[present] / positives[present]).mean())
            precision = float((tp[present] / predicted[present].clamp(min=1)).mean())
    out = {"accuracy": accuracy, "precision": precision * 100, "recall": recall * 100}
    out["f1"] = float("nan") if math.isnan(recall) else _f1(precision, recall) * 100
    return out


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    """AP of one class (fraction, not percent): sum over distinct score thresholds of (recall gained) x
    precision, so tied scores count as one threshold, as scikit-learn's ``average_precision_score``."""
    order = scores.argsort(descending=True, stable=True)
    s, t = scores[order], target[order].bool().double()
    if t.sum() == 0:
        return float("nan")
    hits = t.cumsum(0)
    seen = torch.arange(1, len(s) + 1, dtype=torch.double, device=s.device)
    last = torch.ones(len(s), dtype=torch.bool, device=s.device)
    last[:-1] = s[:-1] != s[1:]
    hits, seen = hits[last], seen[last]
    gained = torch.diff(hits, prepend=hits.new_zeros(1))
    return float((gained * hits / seen).sum() / t.sum())


def mean_average_precision(scores: torch.Tensor, target: torch.Tensor,
                           classes: Sequence[int] | torch.Tensor | None = None) -> float:
    """Mean AP (percent) over the columns of ``classes`` that hold at least one positive; NaN if none do."""
    s, t = _columns(scores, classes), _columns(target, classes)
    aps = [average_precision(s[:, k], t[:, k]) for k in range(s.shape[1]) if t[:, k].bool().any()]
    return float(sum(aps) / len(aps) * 100) if aps else float("nan")
