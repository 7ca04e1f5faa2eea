"""The multi-label jobs: distill a multi-label student on prepared scenes, scoring it zero-shot at the end of
outer epochs (``mlevaluate``); ``train.distill`` runs it (run lock, resume checks, results.json) when
``data.dir`` holds a multi-label dataset (``multilabel.json``). ``evaluate_multilabel_run`` re-scores a saved
one, for ``vlmdistill eval``.

Object descriptions (``text.use_descriptions``) come from ``text.descriptions``, a JSON file
``{object name: description}``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vlmdistill import distributed
from vlmdistill.config import ConfigError, ExperimentConfig, save_config
from vlmdistill.data.multilabel_set import MultiLabelSet, open_multilabel
from vlmdistill.data.scenes import SceneSource
from vlmdistill.evaluate import eval_results_path
from vlmdistill.integrity import Diverged
from vlmdistill.io import atomic_write_json, read_json
from vlmdistill.loop import FitResult, fit
from vlmdistill.mlapi import load_multilabel
from vlmdistill.mlevaluate import score_scenes, score_teacher
from vlmdistill.mltask import MultiLabelTask, scene_source, train_set_of
from vlmdistill.results import RunResults
from vlmdistill.resume_check import config_history
from vlmdistill.students import count_parameters
from vlmdistill.teachers import Teacher, load_teacher


def object_descriptions(cfg: ExperimentConfig, ds: MultiLabelSet) -> dict[str, str] | None:
    """Each object's description when the run uses them; every object must have one."""
    if not cfg.text.use_descriptions:
        return None
    path = cfg.text.descriptions
    if path is None:
        raise ConfigError("text.use_descriptions on multi-label data needs text.descriptions: a JSON file "
                          "{object name: description}")
    try:
        found = {str(k): str(v) for k, v in read_json(path).items()}
    except (OSError, ValueError, AttributeError) as err:
        raise ConfigError(f"text.descriptions={path} is not a JSON object of name: description ({err})") from err
    missing = [n for n in ds.objects if n not in found]
    if missing:
        raise ConfigError(f"text.descriptions={path} has no description for {missing[:5]}: add them")
    return found


def train_multilabel(cfg: ExperimentConfig, resume: bool = False, teacher: Teacher | None = None) -> RunResults:
    """Fit a multi-label task as ``cfg`` says and return its results (not yet written)."""
    ds = open_multilabel(cfg.data.dir)
    teacher = teacher or load_teacher(cfg.teacher)
    descriptions = object_descriptions(cfg, ds)
    task = MultiLabelTask(cfg, teacher, ds, train_set_of(cfg, ds), descriptions)
    x_id, x_ood = eval_sources(cfg, ds)

    def evaluate() -> dict[str, Any]:
        return score_scenes(task.student, cfg, teacher, x_id, x_ood, ds.id_objects, ds.ood_objects, descriptions)

    sources = [task.train_set.source, x_id, x_ood]
    try:
        fitted = fit(task, evaluate, resume=resume)
    except Diverged as err:
        err.recorded(results_of(task, teacher, FitResult(err.state, 0.0, False), sources, ds))
        raise
    return results_of(task, teacher, fitted, sources, ds)


def evaluate_multilabel_run(cfg: ExperimentConfig, run_dir: Path) -> dict[str, Any]:
    """Re-score a saved multi-label student on ``cfg``'s scenes (Table 12's three columns and mAP), as ``vlmdistill
    eval`` does single-label runs; writes eval.json (``eval-<dataset>.json`` on another dataset)."""
    ds = open_multilabel(cfg.data.dir)
    saved = load_multilabel(run_dir)
    x_id, x_ood = eval_sources(cfg, ds)
    metrics = score_scenes(saved.model, cfg, saved.teacher, x_id, x_ood, ds.id_objects, ds.ood_objects,
                           object_descriptions(cfg, ds))
    student = {"id": saved.model.student.spec.id, "params": count_parameters(saved.model.student),
               "head_params": count_parameters(saved.model.head)}
    results = RunResults.start("eval", cfg, str(run_dir), str(run_dir), saved.teacher, student, metrics)
    results.data = skipped_data([x_id, x_ood])
    atomic_write_json(eval_results_path(cfg, Path(run_dir)), results.to_dict())
    return results.to_dict()


def evaluate_multilabel_teacher(cfg: ExperimentConfig, out_dir: Path | None = None) -> dict[str, Any]:
    """The teacher's own zero-shot mAP on ``cfg``'s scenes (``score_teacher``: the camera it sees, no threshold),
    the reference a multi-label student is read against; written to ``<run>/teacher/results.json`` as the
    single-label teacher's is, so a trained run's own results are never replaced."""
    out_dir = Path(out_dir) if out_dir is not None else cfg.run_dir / "teacher"
    ds = open_multilabel(cfg.data.dir)
    teacher = load_teacher(cfg.teacher)
    x_id, x_ood = eval_sources(cfg, ds)
    metrics = score_teacher(cfg, teacher, x_id, x_ood, ds.id_objects, ds.ood_objects, object_descriptions(cfg, ds))
    results = RunResults.start("teacher", cfg, f"{cfg.name} (teacher)", str(out_dir), teacher, None, metrics)
    results.data = skipped_data([x_id, x_ood])
    save_config(cfg, out_dir / "config.yaml")
    atomic_write_json(out_dir / "results.json", results.to_dict())
    return results.to_dict()


def eval_sources(cfg: ExperimentConfig, ds: MultiLabelSet) -> tuple[SceneSource, SceneSource]:
    """The scenes every score reads: X_id (ID validation scenes) and X_ood (the OOD scenes)."""
    return scene_source(cfg, ds, "val_on_train"), scene_source(cfg, ds, "val")


def results_of(task: MultiLabelTask, teacher: Teacher, fitted: FitResult, sources: list[Any],
             ds: MultiLabelSet) -> RunResults:
    """The results of a fitted task (not yet written): headline = mean of the last ``train.average_last``
    evaluations, as single-label runs; skipped bad scenes (at prepare and since) counted and listed."""
    cfg = task.cfg
    student = {"id": task.student.spec.id, "params": count_parameters(task.student.student),
               "head_params": count_parameters(task.student.head)}
    results = RunResults.of_training(cfg, teacher, student, fitted.state.history, fitted.complete)
    results.config_changes = config_history(cfg.run_dir)
    results.data = skipped_data(sources, ds.skipped)
    results.train = {"steps": fitted.state.step, "seconds": round(fitted.seconds, 2), "targets": task.targets.kind,
                     "processes": distributed.world_size(), "threads": torch.get_num_threads()}
    return results


def skipped_data(sources: list[Any], at_prepare: tuple[str, ...] = ()) -> dict[str, Any]:
    """results.json's count and list of bad scenes: skipped at prepare, and since by any of ``sources``."""
    skipped = sorted({k for s in sources for k in s.bad_keys} | set(at_prepare))
    return {"skipped_images": len(skipped), "skipped": skipped}
