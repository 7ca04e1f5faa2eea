"""vlmdistill: distill a CLIP-style teacher into a small open-vocabulary student image encoder.

``vlmdistill.load(MODEL_DIR or RUN_DIR)`` gives the trained student ready to use; the import is deferred
so that ``import vlmdistill`` stays cheap (no torch) for the command line and tools.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlmdistill.api import DistilledModel

__version__ = "0.1.0"
__all__ = ["load"]


def load(path: str | Path, device: str = "cpu") -> DistilledModel:
    """A model folder (``vlmdistill export``) or a run directory as a ``DistilledModel`` (see ``api.py``)."""
    from vlmdistill.api import load as _load

    return _load(path, device)
