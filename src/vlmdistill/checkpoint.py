"""Checkpoints without pickle: safetensors for every tensor, JSON for everything else.

``<run>/checkpoints/last.safetensors`` holds the student weights alone (what deployment needs);
``last_state.safetensors`` + ``last_state.json`` hold the optimiser, scheduler, RNG and loop position,
enough for a resumed run to continue exactly as if it had never stopped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from vlmdistill.io import atomic_save_tensors, atomic_write_json, load_tensors, read_json


@dataclass
class LoopState:
    """Where the loop is: the global step (epoch, pass and batch are derived from it) and the evaluations
    made so far."""

    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


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


def checkpoint_paths(run_dir: Path) -> tuple[Path, Path, Path]:
    d = Path(run_dir) / "checkpoints"
    return d / "last.safetensors", d / "last_state.safetensors", d / "last_state.json"


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loop: LoopState,
    model_meta: dict[str, str],
) -> None:
    """Weights first, state last: a crash between the two leaves the previous state, never a mismatch."""
    weights, state_t, state_j = checkpoint_paths(run_dir)
    tensors, optim_meta = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_save_tensors(weights, model.state_dict(), model_meta)
    atomic_save_tensors(state_t, tensors)
    atomic_write_json(
        state_j,
        {
            "loop": asdict(loop),
            "optimizer": optim_meta,
            "scheduler": _scheduler_position(scheduler),
            "model": model_meta,
        },
    )


def prompt_path(run_dir: Path) -> Path:
    """Learned prompt context (CoOp), kept apart from the student weights that deployment needs."""
    return Path(run_dir) / "checkpoints" / "last_prompt.safetensors"


def has_checkpoint(run_dir: Path) -> bool:
    return all(p.is_file() for p in checkpoint_paths(run_dir))


def load_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_tensors(path), meta


def load_checkpoint(
    run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> LoopState:
    weights, state_t, state_j = checkpoint_paths(run_dir)
    sd, _ = load_weights(weights)
    model.load_state_dict(sd)
    tensors = load_tensors(state_t)
    meta = read_json(state_j)
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    for key, value in meta["scheduler"].items():
        setattr(scheduler, key, value)
    torch.set_rng_state(tensors["rng.torch"])
    return LoopState(step=meta["loop"]["step"], history=meta["loop"]["history"])
