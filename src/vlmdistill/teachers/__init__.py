"""Teacher backends behind one protocol; ``load_teacher`` picks the backend named in the config."""

from __future__ import annotations

from collections.abc import Callable

from vlmdistill.config import TeacherConfig
from vlmdistill.teachers.base import Teacher, TeacherLoadError

_BACKENDS: dict[str, Callable[[TeacherConfig], Teacher]] = {}


def register_backend(name: str) -> Callable[[Callable[[TeacherConfig], Teacher]], Callable[[TeacherConfig], Teacher]]:
    def deco(fn: Callable[[TeacherConfig], Teacher]) -> Callable[[TeacherConfig], Teacher]:
        _BACKENDS[name] = fn
        return fn

    return deco


@register_backend("open_clip")
def _open_clip(cfg: TeacherConfig) -> Teacher:
    from vlmdistill.teachers.open_clip_teacher import OpenClipTeacher

    return OpenClipTeacher(cfg)


@register_backend("hf")
def _hf(cfg: TeacherConfig) -> Teacher:
    from vlmdistill.teachers.hf_teacher import HFClipTeacher

    return HFClipTeacher(cfg)


def list_backends() -> list[str]:
    return sorted(_BACKENDS)


def load_teacher(cfg: TeacherConfig) -> Teacher:
    if cfg.backend not in _BACKENDS:
        raise TeacherLoadError(f"unknown teacher backend {cfg.backend!r}; choose from {list_backends()}")
    return _BACKENDS[cfg.backend](cfg)


__all__ = ["Teacher", "TeacherLoadError", "list_backends", "load_teacher", "register_backend"]
