"""Zero-shot metrics under the paper's protocol, plus the generalized (ID ∪ OOD) setting.

Headline metric: mean per-class recall (balanced accuracy), in percent, as the paper's code computes it.
- ``id``: ID-val images scored over the ID classes only;
- ``ood``: OOD-val images scored over the OOD classes only (zero-shot: the student never saw them);
- ``gzsl``: both sets scored over all classes together; ``seen``/``unseen`` recalls and their harmonic mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def mean_per_class_recall(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Unweighted mean over the classes present in ``target`` of #correct / #images, in percent."""
    classes = target.unique()
    recalls = [(pred[target == c] == c).float().mean() for c in classes]
    return float(torch.stack(recalls).mean() * 100) if recalls else float("nan")


def classification_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    pred = logits.argmax(1)
    return {
        "acc1": float((pred == target).float().mean() * 100),
        "mean_per_class_recall": mean_per_class_recall(pred, target),
        "n_images": len(target),
    }


def harmonic(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def zero_shot_metrics(
    id_feats: torch.Tensor,
    id_labels: torch.Tensor,
    ood_feats: torch.Tensor,
    ood_labels: torch.Tensor,
    w_id: torch.Tensor,
    w_ood: torch.Tensor,
) -> dict[str, dict[str, float]]:
    """Cosine logits against class text embeddings; feats need not be normalised."""
    id_f, ood_f = F.normalize(id_feats, dim=-1), F.normalize(ood_feats, dim=-1)
    w_all = torch.cat([w_id, w_ood])
    out: dict[str, dict[str, float]] = {}
    if len(id_labels):
        out["id"] = classification_metrics(id_f @ w_id.T, id_labels)
    out["ood"] = classification_metrics(ood_f @ w_ood.T, ood_labels)
    ood_all = classification_metrics(ood_f @ w_all.T, ood_labels + len(w_id))
    gz: dict[str, float] = {"unseen": ood_all["mean_per_class_recall"]}
    if len(id_labels):
        gz["seen"] = classification_metrics(id_f @ w_all.T, id_labels)["mean_per_class_recall"]
        gz["harmonic"] = harmonic(gz["seen"], gz["unseen"])
    out["gzsl"] = gz
    return out


def closed_set_metrics(
    id_logits: torch.Tensor,
    id_labels: torch.Tensor,
    ood_logits: torch.Tensor,
    ood_labels: torch.Tensor,
    n_id: int,
    ood_trained: bool,
    id_over_all: bool = False,
) -> dict[str, dict[str, float] | None]:
    """The closed-set baseline: ID over its ID slice (or, as the official code, the argmax over all logits);
    OOD (its OOD slice) only after few-shot, else NA."""
    id_scores = id_logits if id_over_all else id_logits[:, :n_id]
    out: dict[str, dict[str, float] | None] = {"id": classification_metrics(id_scores, id_labels)}
    out["ood"] = classification_metrics(ood_logits[:, n_id:], ood_labels) if ood_trained else None
    out["gzsl"] = None
    return out
