"""Temporary shim: the demo world moved to ``vlmdistill.demo.world`` (issue 8). Delete once no caller imports it.

``ensure_world`` keeps its old keyword form so ``demo/run.py`` works until it passes a ``WorldParams``.
"""

from __future__ import annotations

from pathlib import Path

from vlmdistill.demo.world import WorldInfo, WorldParams, generate_world, load_world, resolve_list_entry
from vlmdistill.demo.world import ensure_world as _ensure_world

__all__ = ["WorldInfo", "WorldParams", "ensure_world", "generate_world", "load_world", "resolve_list_entry"]


def ensure_world(out_dir: Path | str, **params: int | float) -> WorldInfo:
    return _ensure_world(out_dir, WorldParams(**params))
