"""A multi-label student: the (multi-channel) student encoder, a head on its last feature map, and the
asymmetric loss whose learned score bias decides presence. One module, so one state dict holds all three
(checkpoints, resume and model folders save the bias and the prompt contexts with the weights).

The pooled embedding (``Student.pooled``) stays the teacher-space embedding that L_mse and L_im-cst train; the
head reads the feature map under it, as the official code's DualCoOp head reads EfficientNet's 1280 channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlmdistill.config import ExperimentConfig
from vlmdistill.multilabel.heads import DualPromptHead, RegionCosineHead
from vlmdistill.multilabel.loss import AsymmetricLoss
from vlmdistill.students import Student, StudentSpec, create_student
from vlmdistill.teachers.base import Teacher
from vlmdistill.text.textbank import embed_texts

Text = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


class MultiLabelModel(nn.Module):
    """``forward(pixels, text)`` -> (raw pooled embedding [B, D], P(present) [B, K]); ``text`` from
    ``text_embeddings(names)`` (the training names when omitted)."""

    def __init__(self, student: Student, head: DualPromptHead | RegionCosineHead, asl: AsymmetricLoss,
                 names: Sequence[str]) -> None:
        super().__init__()
        self.student, self.head, self.asl = student, head, asl
        self.names = tuple(names)

    @property
    def spec(self) -> StudentSpec:
        return self.student.spec

    @property
    def out_dim(self) -> int:
        return self.student.out_dim

    def text_embeddings(self, names: Sequence[str] | None = None, descriptions: Sequence[str] | None = None) -> Text:
        """The dual head's (positive, negative) learned-context embeddings of ``names`` (its construction names'
        when None); the region-cosine head's fixed construction embeddings (other names: ``head_text``)."""
        if isinstance(self.head, DualPromptHead):
            return self.head.text_embeddings(None if names is None else list(names), descriptions)
        return self.head.text

    def forward(self, pixels: torch.Tensor, text: Text | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.student.feature_map(pixels)
        return self.student.pooled(fmap), self.head(fmap, text)

    def present(self, prob: torch.Tensor) -> torch.Tensor:
        """Boolean decisions [B, K] (P(present) shifted by the learned bias, against 0.5)."""
        return self.asl.predict(prob)


def object_texts(cfg: ExperimentConfig, names: Sequence[str], descriptions: dict[str, str] | None) -> list[str]:
    """Fixed prompts of the region-cosine head: the text template, or the description template when the run
    uses descriptions and one is known for the name."""
    t = cfg.text
    return [t.description_template.format(name=n, description=descriptions[n])
            if t.use_descriptions and descriptions and n in descriptions else t.template.format(name=n) for n in names]


def build_model(cfg: ExperimentConfig, teacher: Teacher, kinds: Sequence[str], names: Sequence[str],
                descriptions: dict[str, str] | None, asl: AsymmetricLoss,
                region_text: torch.Tensor | None = None) -> MultiLabelModel:
    """The student (``kinds`` stacked inputs), the configured head over ``names`` and the loss's bias holder.
    ``region_text``: the region-cosine head's fixed embeddings when known (a saved model's are in its weights),
    else the teacher embeds the names' prompts."""
    student = create_student(cfg.student, teacher.embed_dim, kinds)
    width = student.net.num_features
    if cfg.multilabel.head == "dual_prompt":
        desc = [descriptions.get(n, "") for n in names] if cfg.text.use_descriptions and descriptions else None
        head: nn.Module = DualPromptHead(teacher, width, names, desc, cfg.text.n_ctx, cfg.loss.temperature)
    else:
        if region_text is None:
            region_text = embed_texts(teacher, object_texts(cfg, names, descriptions), cfg.cache_dir)
        head = RegionCosineHead(width, region_text, cfg.loss.temperature)
    return MultiLabelModel(student, head, asl, names)


def head_text(model: MultiLabelModel, cfg: ExperimentConfig, teacher: Teacher, names: Sequence[str],
              descriptions: dict[str, str] | None) -> Text:
    """The head's text side for any names: learned contexts on them (differentiable unless under no_grad),
    or the teacher's fixed prompts (from the text cache)."""
    device = next(model.parameters()).device
    if isinstance(model.head, DualPromptHead):
        desc = [descriptions.get(n, "") for n in names] if cfg.text.use_descriptions and descriptions else None
        return tuple(t.to(device) for t in model.text_embeddings(names, desc))
    return embed_texts(teacher, object_texts(cfg, names, descriptions), cfg.cache_dir).to(device)
