"""An exponential moving average of the student's weights (``train.ema_decay``), for evaluation and export.

After every optimiser step each floating-point parameter moves towards the student's,
``ema = d * ema + (1 - d) * p`` with ``d = min(decay, (1 + n) / (10 + n))`` after ``n`` earlier updates (the
warm-up of TensorFlow's and timm's EMA): without it a run of a few hundred steps would be scored on weights
still mostly made of the random initialisation, so the decay would have to be tuned to each run's length.
Buffers (BatchNorm statistics, counters) are copied, not averaged: the averaged weights are scored with the
statistics of the most recent ones, as timm's ``ModelEmaV3`` does by default. Only the student is averaged; a
learned prompt context is used as trained.

The averaged copy is what a run deploys: evaluation, the checkpoint's ``weights.safetensors`` (so
``vlmdistill.load`` and ``export``), and the analysis. The training weights and ``updates`` are saved beside it
in each checkpoint, so a resumed run continues both exactly.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

WARMUP = 10


class StudentEMA:
    """The averaged copy of a student; ``model`` is a plain module in eval mode that never gets gradients."""

    def __init__(self, student: nn.Module, decay: float) -> None:
        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    def current_decay(self) -> float:
        """The decay of the next update (the warm-up, capped at ``decay``)."""
        return min(self.decay, (1 + self.updates) / (WARMUP + self.updates))

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One step towards ``student`` (same architecture; names may differ by DDP/SyncBN wrapping only)."""
        d = self.current_decay()
        for avg, new in zip(self.model.parameters(), student.parameters(), strict=True):
            avg.lerp_(new.detach(), 1.0 - d)
        for avg, new in zip(self.model.buffers(), student.buffers(), strict=True):
            avg.copy_(new)
        self.updates += 1

    def restart(self, student: nn.Module) -> None:
        """Start the average afresh from ``student``'s weights: a run resumed from a checkpoint that holds no
        average (EMA turned on at the resume, with ``--allow-config-change``)."""
        self.model.load_state_dict(student.state_dict())
        self.updates = 0
