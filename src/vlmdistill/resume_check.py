"""What ``--resume`` may change: a resumed run is the experiment its own ``config.yaml`` describes.

The resolved config of a resume is compared with the run's. Keys that change a step of the trajectory
(seed, learning rate, loss weights, data, student...) are refused with the list of differences, unless
``--allow-config-change``; keys that only change where the run writes, how fast or how verbosely it runs,
where it stops, or the phases after training (``FREE_KEYS``) are allowed. Every change that goes through is
appended to ``<run>/config_history.jsonl`` with the step it took effect at, and ``results.json`` lists them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from vlmdistill.config import ConfigError, ExperimentConfig, config_to_dict, save_config, validate_config
from vlmdistill.errors import RunError
from vlmdistill.io import append_line

FREE_KEYS = (
    "name", "output_dir", "cache_dir", "device", "teacher.device", "data.num_workers", "data.preload",
    "train.progress", "train.log_every", "train.log_minutes", "train.max_steps", "train.checkpoint_every",
    "train.analysis", "train.analysis_max_images", "fewshot",
)
"""Keys (or whole sections) a resume may change: none of them changes a training step."""

HISTORY = "config_history.jsonl"


class ResumeConfigError(RunError):
    """A resume would change the experiment the run folder records."""


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key != "model_kwargs":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _recorded(path: Path) -> dict[str, Any]:
    """The run's config as it would resolve today (defaults of keys added since), or as written."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    try:
        return config_to_dict(validate_config(raw, [], str(path)))
    except ConfigError:
        return raw


def config_changes(cfg: ExperimentConfig, path: Path) -> dict[str, tuple[Any, Any]]:
    """Each key whose value differs between the config at ``path`` and ``cfg``: (recorded, new)."""
    old, new = _flat(_recorded(path)), _flat(config_to_dict(cfg))
    return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys()) if old.get(k) != new.get(k)}


def free(key: str) -> bool:
    return any(key == f or key.startswith(f + ".") for f in FREE_KEYS)


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changes.items())


def check_resume(cfg: ExperimentConfig, allow: bool) -> None:
    """Refuse a resume whose config changes the trajectory of the run it continues, unless ``allow``."""
    path = cfg.run_dir / "config.yaml"
    if not path.is_file():
        return
    refused = {k: v for k, v in config_changes(cfg, path).items() if not free(k)}
    if refused and not allow:
        raise ResumeConfigError(
            f"--resume would change the experiment {cfg.run_dir} records: {_describe(refused)}; resume with its "
            f"own config ({path}), train under another name, or add --allow-config-change to change them from "
            "the checkpoint's step on (recorded in the run)")


def record_config(cfg: ExperimentConfig, run_dir: Path, resumed_at: int | None) -> None:
    """Write the run's ``config.yaml``; on a resume (``resumed_at``: the step it continues from) first append
    what changed, and at which step, to its history."""
    path = run_dir / "config.yaml"
    if resumed_at is not None and path.is_file():
        changes = config_changes(cfg, path)
        if changes:
            entry = {"step": resumed_at, "changes": {k: list(v) for k, v in changes.items()},
                     "trajectory": [k for k in changes if not free(k)]}
            append_line(run_dir / HISTORY, json.dumps(entry, default=str))
    save_config(cfg, path)


def config_history(run_dir: Path) -> list[dict[str, Any]]:
    """The changes recorded by ``record_config``, oldest first (a line cut short by a kill is skipped)."""
    path = run_dir / HISTORY
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out

