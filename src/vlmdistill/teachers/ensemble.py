"""A teacher ensemble (``teacher:`` given as a list), as MobileCLIP distils from two CLIPs.

Only the image targets are ensembled: the target of a view is the mean of every teacher's unit-normalised
embedding of it, then used exactly as one teacher's target would be (stored, normalised again by the loss).
Everything on the text side (class embeddings, prompt learning, captions, the exported text tower) is the
first teacher's, so a student classifies in teacher 1's text space. The mean is only meaningful when the
teachers' image embeddings live in one space, that is, when each was aligned with teacher 1's text space
(trained against the same locked text tower, as LiT does); two independently trained CLIPs share no axes,
and averaging their embeddings would blur both. The teachers must share ``embed_dim`` and input size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from vlmdistill.config import ConfigError, TeacherConfig
from vlmdistill.teachers import load_teacher
from vlmdistill.teachers.base import Teacher

PREFIX = "ensemble:"


def ensemble_id(ids: Sequence[str]) -> str:
    """The id that names every teacher, in order (store keys and saved students carry it)."""
    return PREFIX + "+".join(ids)


def text_teacher_id(teacher_id: str) -> str:
    """The id of the teacher whose text space a student of ``teacher_id`` classifies in (itself, or an
    ensemble's first teacher)."""
    return teacher_id.removeprefix(PREFIX).split("+", 1)[0] if teacher_id.startswith(PREFIX) else teacher_id


class EnsembleTeacher(Teacher):
    """Image embeddings: the mean of the members' unit-normalised ones. Text: the first member's."""

    def __init__(self, members: Sequence[Teacher]) -> None:  # members are already frozen: no Teacher.__init__
        first = members[0]
        for attr in ("embed_dim", "image_size"):
            values = [getattr(m, attr) for m in members]
            if len(set(values)) > 1:
                raise ConfigError(f"teacher: an ensemble's teachers must share {attr} (image targets are averaged "
                                  f"in one space, on one rendered view); got {values} for {[m.id for m in members]}")
        self.members, self.text_teacher = list(members), first
        self.model, self.device, self.batch_size = first.model, first.device, first.batch_size
        self.precision = "fp32"  # each member runs at its own precision
        self.id = ensemble_id([m.id for m in members])
        self.embed_dim, self.image_size, self.context_length = first.embed_dim, first.image_size, first.context_length
        self.mean, self.std = first.mean, first.std
        self.description = "ensemble of " + "; ".join(getattr(m, "description", m.id) for m in members)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """Identity: each member applies its own mean/std in its ``encode_images``."""
        return pixels

    def _encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([F.normalize(m.encode_images(x), dim=-1).to(x.device) for m in self.members]).mean(0)

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.text_teacher.encode_texts(texts)

    def encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_teacher.encode_tokens(tokens)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return self.text_teacher.tokenize(texts)

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.text_teacher.encode_tokens(tokens)

    def count_tokens(self, text: str) -> int:
        return self.text_teacher.count_tokens(text)


def load_teachers(configs: Sequence[TeacherConfig]) -> Teacher:
    """One teacher, or the ensemble of several (``ExperimentConfig.teachers``)."""
    if len(configs) == 1:
        return load_teacher(configs[0])
    return EnsembleTeacher([load_teacher(c) for c in configs])
