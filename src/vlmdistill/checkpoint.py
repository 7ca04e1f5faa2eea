"""Checkpoints without pickle, each one atomic unit that is verified on load.

A checkpoint is one folder, ``<run>/checkpoints/step-<N>/``, holding ``weights.safetensors`` (the student
alone: what deployment needs; with ``train.ema_decay`` its weight average, the training weights then in
``training.safetensors`` with the number of average updates), ``state.safetensors`` + ``state.json``
(optimiser, scheduler, RNG, loop position: enough for a resumed run to continue exactly as if it had never
stopped), the learned prompt context ``prompt.safetensors`` when there is one, and ``manifest.json`` with
the sha256 of each. The folder is built aside and renamed into place whole (``io.replace_dir``), then
``latest.json`` is repointed at it; the previous checkpoint is kept, so a kill at any moment leaves the old
unit or the new one, and a damaged newest unit is refused by its digests while resume falls back to the
previous one.

This module is the format of one unit; ``runfolder.RunFolder`` is what jobs read a run through.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from vlmdistill.ema import StudentEMA
from vlmdistill.errors import VlmdistillError
from vlmdistill.io import (
    atomic_save_tensors,
    atomic_write_json,
    fsync_path,
    load_tensors,
    read_json,
    replace_dir,
    sha256_file,
)

log = logging.getLogger(__name__)

FORMAT = "vlmdistill-checkpoint/1"
WEIGHTS, STATE_T, STATE_J, PROMPT, MANIFEST, TRAINING = (
    "weights.safetensors", "state.safetensors", "state.json", "prompt.safetensors", "manifest.json",
    "training.safetensors")
LATEST = "latest.json"


class CheckpointError(VlmdistillError):
    """A checkpoint that is missing, damaged or unreadable; the message names the file and the fix."""


@dataclass
class LoopState:
    """Where the loop is: the global step (epoch, pass and batch are derived from it) and the evaluations
    made so far."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    student_images: int = 0  # images (views, pool images included) through the student in training steps


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, entry in state["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optim.{idx}.{name}"] = value
            else:
                scalars.setdefault(str(idx), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, name = key.split(".", 2)
            state.setdefault(int(idx), {})[name] = value
    for idx, entry in meta["scalars"].items():
        state.setdefault(int(idx), {}).update(entry)
    return {"state": state, "param_groups": meta["param_groups"]}


_SCHEDULER_KEYS = ("last_epoch", "_step_count", "_last_lr")


def _scheduler_position(scheduler: Any) -> dict[str, Any]:
    """Only where the schedule is: its shape is rebuilt from the config (and some of its state, such as
    MultiStepLR's milestone Counter, does not survive JSON)."""
    state = scheduler.state_dict()
    return {k: state[k] for k in _SCHEDULER_KEYS if k in state}


# ---- where the current checkpoint is -------------------------------------------------------------------

def _root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_of(folder: Path) -> int:
    return int(folder.name.split("-", 1)[1])


def _units(run_dir: Path) -> list[Path]:
    """Checkpoint folders that are structurally whole (manifest and every file it lists), newest first."""
    root = _root(run_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.glob("step-*"):
        try:
            files = read_json(d / MANIFEST)["files"]
            if d.is_dir() and all((d / name).is_file() for name in files):
                found.append(d)
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return sorted(found, key=_step_of, reverse=True)


def checkpoint_units(run_dir: Path) -> list[Path]:
    """The checkpoint folders to try, best first: the one ``latest.json`` names, then the others by step."""
    units = _units(run_dir)
    try:
        named = _root(run_dir) / read_json(_root(run_dir) / LATEST)["folder"]
    except (OSError, ValueError, KeyError, TypeError):
        return units
    return sorted(units, key=lambda d: d != named)


def current_unit(run_dir: Path) -> Path | None:
    """The checkpoint folder a reader should use: the one ``latest.json`` names, else the newest whole one."""
    units = checkpoint_units(run_dir)
    return units[0] if units else None


def has_checkpoint(run_dir: Path) -> bool:
    return current_unit(run_dir) is not None


def intact_checkpoint(run_dir: Path) -> str:
    """What a failed run still has, for its error line: ``checkpoint step 8 (<folder>) is intact``."""
    unit = current_unit(run_dir)
    return f"checkpoint step {_step_of(unit)} ({unit}) is intact" if unit is not None else "no checkpoint was saved yet"


# ---- verified reading ------------------------------------------------------------------------------------

def _manifest(folder: Path) -> dict[str, Any] | None:
    """The checkpoint manifest of ``folder``, None where there is none (an export folder, the old layout)."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = read_json(path)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint manifest {path} is unreadable ({err}); resume with --resume to fall "
                              "back to the previous checkpoint, or train again") from None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


def verify_file(path: Path) -> None:
    """Refuse a checkpoint file whose sha256 differs from its unit's manifest (no-op outside a unit)."""
    path = Path(path)
    manifest = _manifest(path.parent)
    if manifest is None:
        return
    want = manifest.get("files", {}).get(path.name, {}).get("sha256")
    got = sha256_file(path) if path.is_file() else None
    if want is None or got != want:
        raise CheckpointError(
            f"checkpoint file {path} is damaged (sha256 {str(got)[:12]}, manifest says {str(want)[:12]}); "
            "`vlmdistill train CONFIG --resume` falls back to the previous checkpoint, or train again")


def _read(path: Path, read: Any) -> Any:
    """``read(path)`` with any parse error of a damaged file turned into a ``CheckpointError``."""
    try:
        return read(path)
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint file {path} is unreadable ({type(err).__name__}: {err}); "
                              "resume with --resume to fall back to the previous checkpoint, or train again") from None


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_tensors(path), meta


def read_tensor_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, its digest verified when it belongs to a checkpoint."""
    verify_file(path)
    return _read(Path(path), _read_weights)


def read_model(unit: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], torch.Tensor | None]:
    """A unit's student weights, their metadata and its learned prompt context (None without one), each
    file verified against the unit's digests first."""
    weights, meta = read_tensor_file(unit / WEIGHTS)
    ctx = read_tensor_file(unit / PROMPT)[0]["ctx"] if (unit / PROMPT).is_file() else None
    return weights, meta, ctx


# ---- writing ---------------------------------------------------------------------------------------------

def _write_unit(folder: Path, files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str] | None]],
                state: dict[str, Any], step: int) -> None:
    """Every file of one checkpoint into ``folder``, the manifest of their digests last."""
    for name, (tensors, meta) in files.items():
        atomic_save_tensors(folder / name, tensors, meta)
    atomic_write_json(folder / STATE_J, state)
    digests = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in sorted(folder.iterdir())}
    atomic_write_json(folder / MANIFEST, {"format": FORMAT, "step": step, "files": digests})


def _discard(folder: Path) -> None:
    """Rename aside first, so a half-deleted folder never looks like a checkpoint."""
    gone = folder.parent / f".{folder.name}.del-{os.getpid()}"
    os.rename(folder, gone)
    shutil.rmtree(gone, ignore_errors=True)


def _prune(root: Path, keep: Path) -> None:
    """Keep ``keep`` and the newest unit before it; drop every other unit and leftover temp folders."""
    units = [d for d in root.glob("step-*") if d.is_dir()]
    older = sorted((d for d in units if _step_of(d) < _step_of(keep)), key=_step_of)
    for d in units:
        if d != keep and (not older or d != older[-1]):
            _discard(d)
    for d in root.glob(".step-*"):
        shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loop: LoopState,
    model_meta: dict[str, str],
    prompt_ctx: torch.Tensor | None = None,
    ema: StudentEMA | None = None,
) -> Path:
    """One unit, built aside and renamed into place, then named current; returns its folder. With ``ema`` the
    deployed weights are the average, and the training weights are kept beside them for resuming."""
    root = _root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    files: dict[str, tuple[dict[str, torch.Tensor], dict[str, str] | None]] = {
        WEIGHTS: ((ema.model if ema is not None else model).state_dict(), model_meta), STATE_T: (tensors, None)}
    if ema is not None:
        files[TRAINING] = (model.state_dict(), {"ema_updates": str(ema.updates)})
    if prompt_ctx is not None:
        files[PROMPT] = ({"ctx": prompt_ctx}, None)
    state = {"loop": asdict(loop), "optimizer": optim_meta, "scheduler": _scheduler_position(scheduler),
             "model": model_meta}
    final = root / f"step-{loop.step:09d}"
    with replace_dir(final) as tmp:
        _write_unit(tmp, files, state, loop.step)
    atomic_write_json(root / LATEST, {"folder": final.name, "step": loop.step})
    fsync_path(root)
    _prune(root, final)
    return final


def clear_checkpoints(run_dir: Path) -> None:
    """Remove every checkpoint of a run that starts again from scratch."""
    root = _root(run_dir)
    if root.is_dir():
        (root / LATEST).unlink(missing_ok=True)
        for d in [*root.glob("step-*"), *root.glob(".step-*")]:
            _discard(d) if d.name.startswith("step-") else shutil.rmtree(d, ignore_errors=True)


# ---- resuming --------------------------------------------------------------------------------------------

def _load_unit(unit: Path, model: torch.nn.Module, optimizer: Any, scheduler: Any, ema: StudentEMA | None = None
               ) -> tuple[LoopState, torch.Tensor | None]:
    """Verify every file of one unit, then load it; nothing is applied unless all of it reads."""
    for path in (unit / STATE_T, unit / STATE_J):
        verify_file(path)
    sd, _, ctx = read_model(unit)
    training = read_tensor_file(unit / TRAINING) if (unit / TRAINING).is_file() else None
    tensors = _read(unit / STATE_T, load_tensors)
    meta = _read(unit / STATE_J, read_json)
    try:
        loop = LoopState(step=int(meta["loop"]["step"]), history=list(meta["loop"]["history"]),
                         student_images=int(meta["loop"].get("student_images", 0)))
        _load_weights(model, ema, sd, training)
        optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        positions = dict(meta["scheduler"])
        rng = tensors["rng.torch"]
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint {unit} does not fit this run ({type(err).__name__}: {err}); "
                              "resume with the config it was trained with, or train again") from None
    for key, value in positions.items():
        setattr(scheduler, key, value)
    torch.set_rng_state(rng)
    return loop, ctx


def _load_weights(model: torch.nn.Module, ema: StudentEMA | None, deployed: dict[str, torch.Tensor],
                  training: tuple[dict[str, torch.Tensor], dict[str, str]] | None) -> None:
    """The training weights into ``model`` (``training.safetensors`` when the unit has an average, else the
    deployed weights) and the average into ``ema``; an average that the unit lacks starts afresh."""
    model.load_state_dict(training[0] if training is not None else deployed)
    if ema is None:
        return
    if training is None:
        ema.restart(model)
        return
    ema.model.load_state_dict(deployed)
    ema.updates = int(training[1]["ema_updates"])


def load_checkpoint(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    prompt_ctx: torch.Tensor | None = None, ema: StudentEMA | None = None) -> LoopState:
    """Restore the newest checkpoint that verifies; a damaged newest one falls back to the one before."""
    errors = []
    for unit in checkpoint_units(run_dir):
        try:
            loop, ctx = _load_unit(unit, model, optimizer, scheduler, ema)
        except CheckpointError as err:
            errors.append(str(err))
            log.warning("%s; trying the previous checkpoint", err)
            continue
        if prompt_ctx is not None and ctx is not None:
            with torch.no_grad():
                prompt_ctx.copy_(ctx)
        return loop
    why = errors[0] if errors else "no checkpoint"
    raise CheckpointError(f"{_root(run_dir)} holds no usable checkpoint ({why}); train again with --overwrite")
