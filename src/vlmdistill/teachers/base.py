"""The Teacher: a frozen vision-language model seen through the few calls distillation needs."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from vlmdistill.errors import VlmdistillError


class TeacherLoadError(VlmdistillError, RuntimeError):
    """A teacher that cannot be built; the message says what was asked for and how to get it."""


_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class Teacher(ABC):
    """Frozen, eval mode, no grad. Images arrive as float tensors already cropped to ``image_size``.

    ``id`` names the weights and the image transform: every cache built from this teacher is keyed by it,
    so switching teachers can never reuse another teacher's features.
    """

    id: str
    embed_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    context_length: int

    def __init__(self, model: nn.Module, device: torch.device, precision: str, batch_size: int) -> None:
        self.model = model.eval().requires_grad_(False).to(device)
        self.device = device
        self.precision = precision
        self.batch_size = batch_size

    def _autocast(self) -> torch.autocast | nullcontext:
        if self.precision == "fp32":
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=_DTYPES[self.precision])

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] -> the teacher's mean/std normalisation."""
        mean = torch.tensor(self.mean, device=pixels.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=pixels.device).view(1, 3, 1, 1)
        return (pixels - mean) / std

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [0, 1] -> unnormalised fp32 embeddings [B, D], in chunks of ``batch_size``."""
        out = []
        for chunk in pixels.split(self.batch_size):
            x = self.normalize(chunk.to(self.device, non_blocking=True).float())
            if self.device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with self._autocast():
                out.append(self._encode_images(x).float())
        return torch.cat(out)

    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unnormalised fp32 text embeddings [N, D]; prompts longer than the context are truncated."""
        out = []
        for i in range(0, len(texts), self.batch_size):
            tokens = self.tokenize(list(texts[i : i + self.batch_size])).to(self.device)
            with self._autocast():
                out.append(self._encode_tokens(tokens).float())
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Text embeddings of already-tokenised prompts, with autograd (for learned prompt context)."""
        with self._autocast():
            return self._encode_tokens(tokens)

    @abstractmethod
    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids [N, L], start token first, padded to the teacher's context."""

    @abstractmethod
    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def _encode_images(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def count_tokens(self, text: str) -> int:
        """Tokens of a prompt including start/end tokens, to report truncation against ``context_length``."""
