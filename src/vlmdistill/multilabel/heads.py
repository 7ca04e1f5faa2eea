"""Multi-label heads over a student's last feature map: one score per (image, class name), open vocabulary.

Both heads map the feature map [B, C, H, W] to the teacher's embedding width with a 1x1 conv (no bias, as
the official code) and compare every location with each class's text embedding: a small object occupies a
few locations, so a global average would drown it among the clutter around it (DualCoOp's argument).
Per class the location cosines are pooled by their own softmax(cos / tau) weights (``region_pool``).

- ``DualPromptHead`` (the paper's): learned positive and negative CoOp contexts on the class names;
  P(present) = softmax over the (positive, negative) pooled logits, i.e. sigmoid((pos - neg) / tau).
- ``RegionCosineHead`` (baseline without prompt learning): fixed class text embeddings;
  P(present) = sigmoid(pooled cos / tau + a learned global bias).

Class names enter only through text, so both heads score any vocabulary: pass other names or embeddings
at evaluation (Y_ood on X_ood).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vlmdistill.teachers.base import Teacher
from vlmdistill.text.prompt_learner import PromptLearner, class_prompt_texts

DEFAULT_TEMPERATURE = 0.07


def region_pool(local: torch.Tensor, text: torch.Tensor, temperature: float) -> torch.Tensor:
    """[B, D, H, W] location features and [K, D] class embeddings -> [B, K] pooled cosines.

    For image b and class k, with c_l = cos(local[b, :, l], text[k]) over the H*W locations l:
    sum_l softmax_l(c_l / temperature) * c_l. Neither input needs to be normalised.
    """
    feats = F.normalize(local.flatten(2), dim=1)
    cos = torch.einsum("bdl,kd->bkl", feats, F.normalize(text, dim=-1))
    return ((cos / temperature).softmax(dim=-1) * cos).sum(dim=-1)


class DualPromptHead(nn.Module):
    """DualCoOp-style head on the existing ``PromptLearner``: two contexts of ``n_ctx`` tokens, one per polarity.

    Positive prompts read "{ctx} {name}." or, with descriptions, "{ctx} {name} . {description}."; negative
    prompts read "{ctx'} {name}." (the official code's default when no negative description file is given).
    The teacher's text tower stays frozen: gradients reach the contexts and the 1x1 conv only.
    """

    def __init__(self, teacher: Teacher, in_channels: int, names: Sequence[str],
                 descriptions: Sequence[str] | None = None, n_ctx: int = 8,
                 temperature: float = DEFAULT_TEMPERATURE) -> None:
        super().__init__()
        self.temperature = temperature
        self.project = nn.Conv2d(in_channels, teacher.embed_dim, kernel_size=1, bias=False)
        self.positive = PromptLearner(teacher, _texts(names, descriptions), n_ctx=n_ctx)
        self.negative = PromptLearner(teacher, _texts(names, None), n_ctx=n_ctx)

    def text_embeddings(self, names: Sequence[str] | None = None,
                        descriptions: Sequence[str] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit (positive, negative) embeddings [K, D] of the construction names, or of ``names`` (another
        vocabulary). Differentiable in the contexts: call once per step when training, once per evaluation
        otherwise."""
        if names is None:
            return self.positive(), self.negative()
        return self.positive(_texts(names, descriptions)), self.negative(_texts(names, None))

    def forward(self, feature_map: torch.Tensor, text: tuple[torch.Tensor, torch.Tensor] | None = None
                ) -> torch.Tensor:
        """P(present) [B, K] from the feature map [B, C, H, W] and ``text_embeddings()`` (computed if absent)."""
        positive, negative = self.text_embeddings() if text is None else text
        local = self.project(feature_map)
        logits = torch.stack([region_pool(local, positive, self.temperature),
                              region_pool(local, negative, self.temperature)]) / self.temperature
        return logits.softmax(dim=0)[0]


class RegionCosineHead(nn.Module):
    """Baseline without prompt learning: region-pooled cosine to fixed class text embeddings plus one learned
    bias (global, not per class, so it carries over to names never trained on)."""

    def __init__(self, in_channels: int, text: torch.Tensor, temperature: float = DEFAULT_TEMPERATURE) -> None:
        super().__init__()
        self.temperature = temperature
        self.project = nn.Conv2d(in_channels, text.shape[1], kernel_size=1, bias=False)
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("text", F.normalize(text.detach().float(), dim=-1))

    def forward(self, feature_map: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        """P(present) [B, K] for the construction classes, or for the class embeddings ``text`` [K, D]."""
        pooled = region_pool(self.project(feature_map), self.text if text is None else text, self.temperature)
        return torch.sigmoid(pooled / self.temperature + self.bias)


def _texts(names: Sequence[str], descriptions: Sequence[str] | None) -> list[str]:
    return class_prompt_texts(list(names), None if descriptions is None else list(descriptions))
