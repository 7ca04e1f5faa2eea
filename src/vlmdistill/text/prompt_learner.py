"""CoOp prompt learning: context vectors that replace "a photo of", trained with the student.

The teacher's text encoder stays frozen; only the ``n_ctx`` context vectors (shared by all classes, as
the paper's CoOp) receive gradient. They are spliced in at the token-embedding layer, so the same code
serves every backend whose text tower embeds tokens with an ``nn.Embedding``: open_clip's own text
transformer, open_clip towers built on Hugging Face models, and Hugging Face ``CLIPModel``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from vlmdistill.teachers.base import Teacher

PLACEHOLDER = "x"


def _embedding_slot(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the text token embedding, and its attribute name."""
    for parent_path, attr in (
        ("", "token_embedding"),
        ("text", "token_embedding"),
        ("text.transformer.embeddings", "word_embeddings"),
        ("text_model.embeddings", "token_embedding"),
    ):
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            continue
        if isinstance(getattr(parent, attr, None), nn.Embedding):
            return parent, attr
    raise TypeError(f"cannot find the text token embedding of {type(model).__name__} for prompt learning")


class _WithContext(nn.Module):
    """Token embeddings with positions [start, start + n_ctx) replaced by the learned context."""

    def __init__(self, embedding: nn.Embedding, ctx: nn.Parameter, start: int) -> None:
        super().__init__()
        self.embedding, self.ctx, self.start = embedding, ctx, start

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.embedding(tokens)
        end = self.start + len(self.ctx)
        ctx = self.ctx.to(e.dtype).unsqueeze(0).expand(len(e), -1, -1)
        return torch.cat([e[:, : self.start], ctx, e[:, end:]], dim=1)


class PromptLearner(nn.Module):
    """Learned-context class embeddings for a fixed list of class texts ("{name}." or "{name} . {desc}.")."""

    def __init__(self, teacher: Teacher, class_texts: list[str], n_ctx: int = 8, init_std: float = 0.02,
                 chunk: int = 128) -> None:
        super().__init__()
        self.teacher, self.n_ctx, self.chunk = teacher, n_ctx, chunk
        parent, attr = _embedding_slot(teacher.model)
        width = getattr(parent, attr).embedding_dim
        self.ctx = nn.Parameter(torch.randn(n_ctx, width) * init_std)
        self.prompts = [" ".join([PLACEHOLDER] * n_ctx) + " " + t for t in class_texts]
        self._check_placeholders()

    def _check_placeholders(self) -> None:
        """Each placeholder must be one token right after the start token, or the splice would be misplaced."""
        one = self.teacher.tokenize([PLACEHOLDER])[0]
        many = self.teacher.tokenize([" ".join([PLACEHOLDER] * self.n_ctx)])[0]
        if not torch.equal(many[1 : 1 + self.n_ctx], one[1:2].repeat(self.n_ctx)):
            raise ValueError("the teacher's tokenizer does not map the context placeholder to single tokens")

    @contextmanager
    def _spliced(self) -> Iterator[None]:
        parent, attr = _embedding_slot(self.teacher.model)
        original = getattr(parent, attr)
        setattr(parent, attr, _WithContext(original, self.ctx, start=1))
        try:
            yield
        finally:
            setattr(parent, attr, original)

    def forward(self, texts: list[str] | None = None) -> torch.Tensor:
        """Unit-norm class embeddings [C, D]; differentiable with respect to the context only."""
        prompts = self.prompts if texts is None else [" ".join([PLACEHOLDER] * self.n_ctx) + " " + t for t in texts]
        out = []
        with self._spliced():
            for i in range(0, len(prompts), self.chunk):
                tokens = self.teacher.tokenize(prompts[i : i + self.chunk]).to(self.teacher.device)
                out.append(self.teacher.encode_tokens(tokens).float())
        return F.normalize(torch.cat(out), dim=-1)


def class_prompt_texts(names: list[str], descriptions: list[str | None] | None) -> list[str]:
    """The paper's CoOp suffixes: "{label}." or "{label} . {description}."."""
    if descriptions is None:
        return [f"{n}." for n in names]
    return [f"{n} . {d.rstrip('.')}." for n, d in zip(names, descriptions, strict=True)]
