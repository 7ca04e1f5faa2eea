"""Object-name sets to multi-hot targets, shared by the h5 and CSV readers."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from vlmdistill.errors import VlmdistillError


class UnknownLabelError(VlmdistillError, ValueError):
    """A label that the vocabulary being scored does not hold."""


def multi_hot(label_sets: Sequence[Sequence[str]], vocabulary: Sequence[str]) -> torch.Tensor:
    """Float targets [N, K]: 1 where item n holds name k. A name outside ``vocabulary`` is an error, never a
    silent all-absent row, since that would score a present object as absent."""
    column = {name: k for k, name in enumerate(vocabulary)}
    target = torch.zeros(len(label_sets), len(vocabulary))
    for n, labels in enumerate(label_sets):
        for name in labels:
            if name not in column:
                raise UnknownLabelError(
                    f"label {name!r} (item {n}) is not in the vocabulary of {len(vocabulary)} names. Fix: score with "
                    "a vocabulary that holds every object of the split (e.g. ID + OOD names for an OOD split)"
                )
            target[n, column[name]] = 1.0
    return target
