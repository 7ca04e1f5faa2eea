"""One reader of a run folder: ``RunFolder(run_dir)``.

``runs/<name>/`` holds ``config.yaml`` (the resolved config), ``results.json`` and ``checkpoints/`` (units in
``checkpoint.py``'s format). Resume (``loop``), evaluation and few-shot (``evaluate``, ``fewshot``),
``vlmdistill.load`` (``api``) and ``export`` read a run only through here, so each gets the same checks: the
student weights and the learned prompt context against their checkpoint's sha256 digests, and the
checkpoint's ``ModelMeta`` against the config that asks for it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from vlmdistill.checkpoint import (
    CheckpointError,
    LoopState,
    current_unit,
    load_checkpoint,
    read_model,
    read_tensor_file,
)
from vlmdistill.config import ExperimentConfig, StudentConfig, load_config
from vlmdistill.ema import StudentEMA
from vlmdistill.errors import RunError
from vlmdistill.io import read_json
from vlmdistill.students import Student, create_student

CONFIG, RESULTS = "config.yaml", "results.json"


@dataclass(frozen=True)
class ModelMeta:
    """What a saved student must match to be loaded (teacher, architecture, output size), and what deployment
    reads (input size, normalisation). Stored as the weights file's safetensors metadata, all strings."""

    student_arch: str
    student_id: str
    out_dim: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    teacher_id: str
    closed_set: bool

    @classmethod
    def of(cls, cfg: ExperimentConfig, student: Student, teacher_id: str) -> ModelMeta:
        spec = student.spec
        return cls(cfg.student.arch, spec.id, student.out_dim, cfg.student.image_size, tuple(spec.mean),
                   tuple(spec.std), teacher_id, cfg.loss.closed_set)

    def to_strings(self) -> dict[str, str]:
        return {f.name: ",".join(map(str, v)) if isinstance(v := getattr(self, f.name), tuple) else str(v)
                for f in fields(self)}

    @classmethod
    def from_strings(cls, meta: dict[str, str], where: Path) -> ModelMeta:
        try:
            return cls(meta["student_arch"], meta["student_id"], int(meta["out_dim"]), int(meta["image_size"]),
                       tuple(float(v) for v in meta["mean"].split(",")),
                       tuple(float(v) for v in meta["std"].split(",")), meta["teacher_id"],
                       meta["closed_set"] == "True")
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{where} lacks the student's metadata ({type(err).__name__}: {err}); it was not "
                                  "written by vlmdistill train or export: train or export again") from None

    @staticmethod
    def expected(cfg: ExperimentConfig, teacher_id: str, out_dim: int) -> dict[str, Any]:
        """What a student trained under ``cfg`` must match to be loaded: teacher, architecture, output size."""
        return {"teacher_id": teacher_id, "student_arch": cfg.student.arch, "out_dim": out_dim}

    def check(self, expected: dict[str, Any], where: Path) -> None:
        """Refuse a student made for another teacher, architecture or output size than ``expected`` says."""
        for key, want in expected.items():
            if getattr(self, key) != want:
                raise RunError(
                    f"{where} was made with {key}={getattr(self, key)!r} but the config gives {want!r}; "
                    "use the config it was trained with (its run's config.yaml)")


@dataclass(frozen=True)
class SavedStudent:
    """A verified student: weights, their ``ModelMeta``, the learned prompt context (CoOp runs) and where from."""

    weights: dict[str, torch.Tensor]
    meta: ModelMeta
    context: torch.Tensor | None
    source: Path

    def build(self, cfg: StudentConfig, device: str | torch.device = "cpu") -> Student:
        """The student network with these weights (never fetching pretrained ones: they are overwritten)."""
        student = create_student(cfg.model_copy(update={"pretrained": False}), self.meta.out_dim)
        student.load_state_dict(self.weights)
        return student.to(device)

    @classmethod
    def read(cls, weights: Path, context: Path | None = None) -> SavedStudent:
        """A student saved outside a run (a model folder's files), read with the same checks."""
        tensors, meta = read_tensor_file(weights)
        ctx = read_tensors(context)["ctx"] if context is not None and context.is_file() else None
        return cls(tensors, ModelMeta.from_strings(meta, weights), ctx, weights)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file of a run or model folder (digest-checked inside a checkpoint); a damaged one is a
    ``CheckpointError`` naming it."""
    return read_tensor_file(path)[0]


class RunFolder:
    """A run directory: its config, results and checkpoints, read with every check in one place."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / CONFIG

    @property
    def results_path(self) -> Path:
        return self.path / RESULTS

    def is_run(self) -> bool:
        return self.path.is_dir() and self.config_path.is_file()

    def config(self) -> ExperimentConfig:
        """The resolved config the run was trained with."""
        if not self.config_path.is_file():
            raise RunError(f"{self.path} is not a run directory (no {CONFIG}); give runs/<name> of a trained run")
        return load_config(self.config_path)

    def results(self) -> dict[str, Any] | None:
        """``results.json``, None when absent or unreadable (a run killed before writing it)."""
        try:
            results = read_json(self.results_path)
        except (OSError, ValueError):
            return None
        return results if isinstance(results, dict) else None

    def missing_phases(self) -> list[str]:
        """The phases (``train``, ``analysis``) the run still lacks. A results.json written before phases were
        recorded that says complete but has no analysis it was asked for lacks its analysis (a kill during the
        analysis left it so)."""
        record = self.results()
        if record is None or record.get("complete") is not True:
            return list((record or {}).get("missing_phases") or ["train"])
        cfg = record.get("config") or {}
        asked = (cfg.get("train") or {}).get("analysis", True) and not (cfg.get("loss") or {}).get("closed_set")
        return ["analysis"] if asked and record.get("analysis") is None else []

    def is_complete(self) -> bool:
        return not self.missing_phases()

    def has_checkpoint(self) -> bool:
        return current_unit(self.path) is not None

    def checkpoint_step(self) -> int | None:
        """The step of the checkpoint a resume continues from (None without one)."""
        unit = current_unit(self.path)
        return int(unit.name.split("-", 1)[1]) if unit is not None else None

    def student(self, expected: dict[str, Any] | None = None) -> SavedStudent:
        """The current checkpoint's student, digest-checked, and checked against ``expected`` when given
        (``ModelMeta.expected``)."""
        unit = current_unit(self.path)
        if unit is None:
            raise RunError(f"{self.path} has no checkpoint ({self.path / 'checkpoints'}); train first, or give the "
                           "directory of a trained run")
        weights, meta, ctx = read_model(unit)
        saved = SavedStudent(weights, ModelMeta.from_strings(meta, unit), ctx, unit)
        if expected is not None:
            saved.meta.check(expected, unit)
        return saved

    def resume(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
               prompt_ctx: torch.Tensor | None = None, ema: StudentEMA | None = None) -> LoopState:
        """Training state of the newest checkpoint that verifies (falling back to the one before), with the
        weight average when ``ema`` is given."""
        return load_checkpoint(self.path, model, optimizer, scheduler, prompt_ctx, ema)
