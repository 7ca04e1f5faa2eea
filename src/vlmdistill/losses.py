"""The loss terms of the paper (its eq. 1-8) plus plain logit KD, each a small module with one signature.

Every term takes the same ``LossInputs`` and returns a scalar. ``Objective`` sums the enabled terms
with their config weights and returns the named values, so logs and ablations see each term.

Each term class says whether it ``needs_labels``. A batch may hold unlabelled pool rows (``labelled`` mask):
terms that need labels see only the labelled rows; the label-free ones see the rows ``loss.<term>.on``
selects (labelled, pool or both; both by default).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlmdistill.config import ConfigError, LossConfig


@dataclass
class LossInputs:
    """One batch. ``s``/``t``/``w`` are unit vectors; the raw ones feed the unnormalised MSE variant.

    Teacher-side quantities are constants of the loss: every term detaches them, so a learnable prompt
    (or an online teacher) never receives gradient through the teacher's distribution.
    """

    s: torch.Tensor
    y: torch.Tensor
    w: torch.Tensor | None = None
    t: torch.Tensor | None = None
    s_raw: torch.Tensor | None = None
    t_raw: torch.Tensor | None = None
    c: torch.Tensor | None = None

    def rows(self, mask: torch.Tensor) -> LossInputs:
        """The same batch restricted to the rows ``mask`` selects (the class texts ``w`` are not rows)."""
        picked = {f.name: getattr(self, f.name)[mask] for f in fields(self)
                  if f.name != "w" and getattr(self, f.name) is not None}
        return replace(self, **picked)


class ClsLoss(nn.Module):
    """L_cls (eq. 1): cross-entropy over cos(s, w_c) / tau for all training classes."""

    needs_labels = True

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, x: LossInputs) -> torch.Tensor:
        return F.cross_entropy(x.s @ x.w.T / self.temperature, x.y)


class ClosedSetLoss(nn.Module):
    """The paper's closed-set baseline: plain CE on a linear head's logits (``s_raw`` are logits)."""

    needs_labels = True

    def forward(self, x: LossInputs) -> torch.Tensor:
        return F.cross_entropy(x.s_raw, x.y)


class MseLoss(nn.Module):
    """L_mse (eq. 2): mean ||s - t||^2 of unit vectors (= 2 - 2cos, not divided by the dimension).

    ``normalized=False`` is the official code's extra variant log(1 + mean ||S(x) - T(x)||^2 / 10).
    """

    needs_labels = False

    def __init__(self, normalized: bool = True) -> None:
        super().__init__()
        self.normalized = normalized

    def forward(self, x: LossInputs) -> torch.Tensor:
        if self.normalized:
            return (x.s - x.t.detach()).pow(2).sum(1).mean()
        return torch.log1p((x.s_raw - x.t_raw.detach()).pow(2).sum(1).mean() / 10)


class ImageContrastiveLoss(nn.Module):
    """L_im-cst (eq. 3, code form): InfoNCE over M_ij = cos(s_i, t_j) / tau with in-batch negatives."""

    needs_labels = False

    def __init__(self, temperature: float, mode: str = "bidirectional") -> None:
        super().__init__()
        self.temperature = temperature
        self.mode = mode

    def forward(self, x: LossInputs) -> torch.Tensor:
        logits = x.s @ x.t.detach().T / self.temperature
        target = torch.arange(len(logits), device=logits.device)
        loss = F.cross_entropy(logits, target)
        if self.mode == "bidirectional":
            loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
        return loss


class VlAlignLoss(nn.Module):
    """L_vlalign / L_vlprox (eq. 6): KL(teacher || student) over the teacher's top-k classes.

    Images the teacher misclassifies are dropped when ``filter`` is on. A batch where every image is
    dropped gives 0 (with a graph), not the official code's NaN.
    """

    needs_labels = True

    def __init__(self, temperature: float, k: int = 256, filter: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.k = k
        self.filter = filter
        self.needs_labels = filter  # only the filter compares the teacher's prediction with the label

    def forward(self, x: LossInputs) -> torch.Tensor:
        z = x.s @ x.w.T / self.temperature
        u = (x.t @ x.w.T).detach() / self.temperature
        if self.filter:
            keep = u.argmax(1) == x.y
            if not keep.any():
                return z.sum() * 0.0
            z, u = z[keep], u[keep]
        top = u.topk(min(self.k, u.shape[1]), dim=1).indices
        log_pt = F.log_softmax(u.gather(1, top), dim=1)
        log_ps = F.log_softmax(z.gather(1, top), dim=1)
        return (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()


class LogitKdLoss(nn.Module):
    """Hinton KD on the class distributions: T^2 KL(softmax(u/T) || softmax(z/T)), logits = cos / tau."""

    needs_labels = False

    def __init__(self, temperature: float, kd_temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.kd_temperature = kd_temperature

    def forward(self, x: LossInputs) -> torch.Tensor:
        scale = self.temperature * self.kd_temperature
        log_pt = F.log_softmax((x.t @ x.w.T).detach() / scale, dim=1)
        log_ps = F.log_softmax(x.s @ x.w.T / scale, dim=1)
        return self.kd_temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()


class CaptionLoss(nn.Module):
    """L_cap (eq. 8): each image's student embedding picks its own caption among the batch's captions.

    Captions of other images of the same class are masked out (they are not negatives). The official
    code uses no temperature (``temperature=1``); the paper writes /tau.
    """

    needs_labels = True

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, x: LossInputs) -> torch.Tensor:
        logits = x.s @ x.c.detach().T / self.temperature
        same = x.y.unsqueeze(0) == x.y.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


Rows = Literal["labelled", "pool", "both"]
"""Where a term runs in a batch that holds unlabelled pool rows."""


class Objective(nn.Module):
    """Weighted sum of the enabled terms; ``needs_teacher`` tells the trainer whether to fetch targets and
    ``on_pool`` whether any term runs on unlabelled pool rows (else no pool images are drawn)."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        tau = cfg.temperature
        if cfg.closed_set:
            terms = {"closed_set": (ClosedSetLoss(), 1.0, None)}
        else:
            candidates = {
                "cls": (ClsLoss(tau), cfg.cls),
                "mse": (MseLoss(cfg.mse.normalized), cfg.mse),
                "imcst": (ImageContrastiveLoss(tau, cfg.imcst.mode), cfg.imcst),
                "vlalign": (VlAlignLoss(tau, cfg.vlalign.k, cfg.vlalign.filter), cfg.vlalign),
                "kd": (LogitKdLoss(tau, cfg.kd.temperature), cfg.kd),
                "cap": (CaptionLoss(cfg.cap.temperature), cfg.cap),
            }
            terms = {k: (m, c.weight, c.on) for k, (m, c) in candidates.items() if c.weight != 0}
        self.terms = nn.ModuleDict({k: m for k, (m, _, _) in terms.items()})
        self.weights = {k: w for k, (_, w, _) in terms.items()}
        self.where: dict[str, Rows] = {k: _where(k, m, on) for k, (m, _, on) in terms.items()}
        self.needs_teacher = bool({"mse", "imcst", "vlalign", "kd"} & set(terms))
        self.on_pool = any(w != "labelled" for w in self.where.values())

    def forward(self, x: LossInputs, labelled: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted total (with graph) and each term detached, still on the device: reading them back
        is a device sync, which the loop does only on logging steps. ``labelled`` marks the labelled rows
        of a batch that holds pool rows too (None: every row is labelled)."""
        total = x.s.new_zeros(())
        named: dict[str, torch.Tensor] = {}
        for name, term in self.terms.items():
            rows = _rows(self.where[name], labelled, len(x.s))
            if rows is None:
                value = term(x)
            elif rows.any():
                value = term(x.rows(rows))
            else:  # no row of its kind in this batch: the term adds nothing (with a graph, as a 0 loss)
                value = x.s.sum() * 0.0
            named[name] = value.detach()
            total = total + self.weights[name] * value
        named["total"] = total.detach()
        return total, named


def _where(name: str, term: nn.Module, on: Rows | None) -> Rows:
    """The rows a term runs on: labelled only when it needs labels, else ``on`` (default both)."""
    if not term.needs_labels:
        return on or "both"
    if on not in (None, "labelled"):
        raise ConfigError(f"loss.{name}.on={on}: {name} needs labels, so it runs on labelled images only; "
                          f"drop loss.{name}.on or set it to labelled")
    return "labelled"


def _rows(where: Rows, labelled: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The row mask a term sees; None for every row (no copy)."""
    if labelled is None:
        return None if where != "pool" else torch.zeros(n, dtype=torch.bool)
    if where == "both":
        return None
    return labelled if where == "labelled" else ~labelled
