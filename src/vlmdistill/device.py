"""Where tensors live: one rule for the teacher, the student and evaluation."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU; anything else is a torch device string."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
