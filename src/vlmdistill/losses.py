"""The loss terms of the paper (its eq. 1-8) plus plain logit KD, each a small module with one signature.

Every term takes the same ``LossInputs`` and returns a scalar. ``Objective`` sums the enabled terms
with their config weights and returns the named values, so logs and ablations see each term.

A term is one ``Term`` subclass registered under its ``LossConfig`` field (``class KdLoss(Term, key="kd")``)
that declares what it ``needs``: labels, teacher targets, class texts, captions. Everything else derives
from the declarations: whether targets are fetched, which rows a term sees, and the config checks
(``check_loss_config``). A new term is one class here and one field in ``LossConfig``.

A batch may hold unlabelled pool rows (``labelled`` mask): terms that need labels see only the labelled
rows; the label-free ones see the rows ``loss.<term>.on`` selects (labelled, pool or both; both by default).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from vlmdistill.config import ConfigError, LossConfig, LossTerm
from vlmdistill.multilabel.loss import AsymmetricLoss

Need = Literal["labels", "teacher", "texts", "captions", "multi_hot"]
SINGLE_LABEL: frozenset[Need] = frozenset({"labels", "texts", "captions"})
"""Needs that only single-label data meets (one class per image, class texts as logits); refused beside a term
that needs multi-hot targets (``check_loss_config``)."""
TERMS: dict[str, type[Term]] = {}
"""Every registered term by its ``LossConfig`` field name, in registration order."""


@dataclass
class LossInputs:
    """One batch. ``s``/``t``/``w`` are unit vectors; the raw ones feed the unnormalised MSE variant. Multi-label
    batches hold multi-hot ``y`` [B, K] and the head's P(present) ``p`` [B, K].

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
    p: torch.Tensor | None = None

    def rows(self, mask: torch.Tensor) -> LossInputs:
        """The same batch restricted to the rows ``mask`` selects (the class texts ``w`` are not rows)."""
        picked = {f.name: getattr(self, f.name)[mask] for f in fields(self)
                  if f.name != "w" and getattr(self, f.name) is not None}
        return replace(self, **picked)


class Term(nn.Module):
    """A loss term: ``needs`` says what its ``LossInputs`` must hold; ``build`` makes it from its config."""

    needs: ClassVar[frozenset[Need]] = frozenset()

    def __init_subclass__(cls, key: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if key is not None:
            TERMS[key] = cls

    @classmethod
    def build(cls, term: LossTerm, loss: LossConfig) -> Term:
        return cls()

    @classmethod
    def requires(cls, term: LossTerm) -> frozenset[Need]:
        """What this term needs under its config (by default its declaration)."""
        return cls.needs


class ClsLoss(Term, key="cls"):
    """L_cls (eq. 1): cross-entropy over cos(s, w_c) / tau for all training classes."""

    needs = frozenset({"labels", "texts"})

    def __init__(self, temperature: float) -> None:
        super().__init__()
        self.temperature = temperature

    @classmethod
    def build(cls, term: LossTerm, loss: LossConfig) -> Term:
        return cls(loss.temperature)

    def forward(self, x: LossInputs) -> torch.Tensor:
        return F.cross_entropy(x.s @ x.w.T / self.temperature, x.y)


class ClosedSetLoss(Term):
    """The paper's closed-set baseline: plain CE on a linear head's logits (``s_raw`` are logits). Not a
    registered term: ``loss.closed_set`` replaces every term with it."""

    needs = frozenset({"labels"})

    def forward(self, x: LossInputs) -> torch.Tensor:
        return F.cross_entropy(x.s_raw, x.y)


class MseLoss(Term, key="mse"):
    """L_mse (eq. 2): mean ||s - t||^2 of unit vectors (= 2 - 2cos, not divided by the dimension).

    ``normalized=False`` is the official code's extra variant log(1 + mean ||S(x) - T(x)||^2 / 10).
    """

    needs = frozenset({"teacher"})

    def __init__(self, normalized: bool = True) -> None:
        super().__init__()
        self.normalized = normalized

    @classmethod
    def build(cls, term: LossTerm, loss: LossConfig) -> Term:
        return cls(term.normalized)

    def forward(self, x: LossInputs) -> torch.Tensor:
        if self.normalized:
            return (x.s - x.t.detach()).pow(2).sum(1).mean()
        return torch.log1p((x.s_raw - x.t_raw.detach()).pow(2).sum(1).mean() / 10)


class ImageContrastiveLoss(Term, key="imcst"):
    """L_im-cst (eq. 3, code form): InfoNCE over M_ij = cos(s_i, t_j) / tau with in-batch negatives."""

    needs = frozenset({"teacher"})

    def __init__(self, temperature: float, mode: str = "bidirectional") -> None:
        super().__init__()
        self.temperature = temperature
        self.mode = mode

    @classmethod
    def build(cls, term: LossTerm, loss: LossConfig) -> Term:
        return cls(loss.temperature, term.mode)

    def forward(self, x: LossInputs) -> torch.Tensor:
        logits = x.s @ x.t.detach().T / self.temperature
        target = torch.arange(len(logits), device=logits.device)
        loss = F.cross_entropy(logits, target)
        if self.mode == "bidirectional":
            loss = 0.5 * (loss + F.cross_entropy(logits.T, target))
        return loss


class VlAlignLoss(Term, key="vlalign"):
    """L_vlalign / L_vlprox (eq. 6): KL(teacher || student) over the teacher's top-k classes.

    Images the teacher misclassifies are dropped when ``filter`` is on. A batch where every image is
    dropped gives 0 (with a graph), not the official code's NaN.
    """

    needs = frozenset({"labels", "teacher", "texts"})

    def __init__(self, temperature: float, k: int = 256, filter: bool = True) -> None:
        super().__init__()
        self.temperature = temperature
        self.k = k
        self.filter = filter

    @classmethod
    def build(cls, term: LossTerm, loss: LossConfig) -> Term:
        return cls(loss.temperature, term.k, term.filter)

    @classmethod
    def requires(cls, term: LossTerm) -> frozenset[Need]:
        """Only the filter compares the teacher's prediction with the label."""
        return cls.needs if term.filter else cls.needs - {"labels"}

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


class LogitKdLoss(Term, key="kd"):
    """Hinton KD on the class distributions: T^2 KL(softmax(u/T) || softmax(z/T)), logits = cos / tau."""

    needs = frozenset({"teacher", "texts"})

    def __init__(self, temperature: float, kd_temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature
        self.kd_temperature = kd_temperature

    @classmethod
    def build(cls, term: LossTerm, loss: LossConfig) -> Term:
        return cls(loss.temperature, term.temperature)

    def forward(self, x: LossInputs) -> torch.Tensor:
        scale = self.temperature * self.kd_temperature
        log_pt = F.log_softmax((x.t @ x.w.T).detach() / scale, dim=1)
        log_ps = F.log_softmax(x.s @ x.w.T / scale, dim=1)
        return self.kd_temperature**2 * (log_pt.exp() * (log_pt - log_ps)).sum(1).mean()


class CaptionLoss(Term, key="cap"):
    """L_cap (eq. 8): each image's student embedding picks its own caption among the batch's captions.

    Captions of other images of the same class are masked out (they are not negatives). The official
    code uses no temperature (``temperature=1``); the paper writes /tau.
    """

    needs = frozenset({"labels", "captions"})

    def __init__(self, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    @classmethod
    def build(cls, term: LossTerm, loss: LossConfig) -> Term:
        return cls(term.temperature)

    def forward(self, x: LossInputs) -> torch.Tensor:
        logits = x.s @ x.c.detach().T / self.temperature
        same = x.y.unsqueeze(0) == x.y.unsqueeze(1)
        same.fill_diagonal_(False)
        logits = logits.masked_fill(same, float("-inf"))
        return F.cross_entropy(logits, torch.arange(len(logits), device=logits.device))


class AsymmetricTerm(Term, key="asl"):
    """The multi-label head's loss: ASL on P(present) against multi-hot targets, with its learned score bias
    (``multilabel.loss.AsymmetricLoss``; the bias is a parameter of this term, trained with the student)."""

    needs = frozenset({"multi_hot"})

    def __init__(self, loss: AsymmetricLoss) -> None:
        super().__init__()
        self.loss = loss

    @classmethod
    def build(cls, term: LossTerm, loss: LossConfig) -> Term:
        return cls(AsymmetricLoss(term.gamma_neg, term.gamma_pos, term.clip, bias_mode=term.bias_mode))

    def forward(self, x: LossInputs) -> torch.Tensor:
        return self.loss(x.p, x.y)


Rows = Literal["labelled", "pool", "both"]
"""Where a term runs in a batch that holds unlabelled pool rows."""


def enabled_terms(cfg: LossConfig) -> dict[str, tuple[type[Term], LossTerm]]:
    """The registered terms with a non-zero weight, with their config."""
    return {k: (term, getattr(cfg, k)) for k, term in TERMS.items() if getattr(cfg, k).weight != 0}


def check_loss_config(cfg: LossConfig, captions: bool) -> None:
    """What the terms' declarations require of a config: at least one term, labelled rows for the terms that
    need labels, and a captions file for those that need captions (``captions``: one is given)."""
    if cfg.closed_set:
        return
    enabled = enabled_terms(cfg)
    if not enabled:
        raise ConfigError(f"every loss weight is 0: enable at least one of loss.{{{','.join(TERMS)}}}")
    multi = sorted(k for k, (term, c) in enabled.items() if "multi_hot" in term.requires(c))
    for name, (term, c) in enabled.items():
        needs = term.requires(c)
        if multi and needs & SINGLE_LABEL:
            raise ConfigError(f"loss.{name} needs {', '.join(sorted(needs & SINGLE_LABEL))} of single-label data "
                              f"(one class per image), undefined for the multi-hot targets loss.{multi[0]} trains "
                              f"on: set loss.{name}.weight=0 (multi-label runs combine {multi[0]} with the "
                              "teacher-only terms: mse, imcst)")
        if needs & {"labels", "multi_hot"} and c.on not in (None, "labelled"):
            raise ConfigError(f"loss.{name}.on={c.on}: {name} needs labels, so it runs on labelled images only; "
                              f"drop loss.{name}.on or set it to labelled")
        if "captions" in needs and not captions:
            raise ConfigError(f"loss.{name} needs text.captions: a JSONL or CSV file of (path, caption) per "
                              "training image")


class Objective(nn.Module):
    """Weighted sum of the enabled terms. ``needs`` is the union of what they need (``needs_teacher``: fetch
    targets), and ``on_pool`` whether any term runs on unlabelled pool rows (else no pool images are drawn)."""

    def __init__(self, cfg: LossConfig) -> None:
        super().__init__()
        check_loss_config(cfg, captions=True)  # the captions file itself is the config's to check
        if cfg.closed_set:
            terms: dict[str, tuple[Term, float, frozenset[Need], Any]] = {
                "closed_set": (ClosedSetLoss(), 1.0, ClosedSetLoss.needs, None)}
        else:
            terms = {k: (term.build(c, cfg), c.weight, term.requires(c), c.on)
                     for k, (term, c) in enabled_terms(cfg).items()}
        self.terms = nn.ModuleDict({k: m for k, (m, _, _, _) in terms.items()})
        self.weights = {k: w for k, (_, w, _, _) in terms.items()}
        self.where: dict[str, Rows] = {k: "labelled" if needs & {"labels", "multi_hot"} else (on or "both")
                                       for k, (_, _, needs, on) in terms.items()}
        self.needs: frozenset[Need] = frozenset().union(*(needs for _, _, needs, _ in terms.values()))
        self.needs_teacher = "teacher" in self.needs
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


def _rows(where: Rows, labelled: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """The row mask a term sees; None for every row (no copy)."""
    if labelled is None:
        return None if where != "pool" else torch.zeros(n, dtype=torch.bool)
    if where == "both":
        return None
    return labelled if where == "labelled" else ~labelled
