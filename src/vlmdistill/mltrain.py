"""The multi-label training job: distill a multi-label student on prepared scenes, scoring it zero-shot at the
end of outer epochs (``mlevaluate``); ``train.distill`` runs it (run lock, resume checks, results.json) when
``data.dir`` holds a multi-label dataset (``multilabel.json``).

Object descriptions (``text.use_descriptions``) come from ``text.descriptions``, a JSON file
``{object name: description}``.
"""

from __future__ import annotations

from typing import Any

import torch

from vlmdistill.config import ConfigError, ExperimentConfig
from vlmdistill.data.multilabel_set import MultiLabelSet, open_multilabel
from vlmdistill.integrity import Diverged
from vlmdistill.io import read_json
from vlmdistill.loop import FitResult, fit
from vlmdistill.mlevaluate import score_scenes
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
    x_id, x_ood = scene_source(cfg, ds, "val_on_train"), scene_source(cfg, ds, "val")

    def evaluate() -> dict[str, Any]:
        return score_scenes(task.student, cfg, teacher, x_id, x_ood, ds.id_objects, ds.ood_objects, descriptions)

    sources = [task.train_set.source, x_id, x_ood]
    try:
        fitted = fit(task, evaluate, resume=resume)
    except Diverged as err:
        err.recorded(results_of(task, teacher, FitResult(err.state, 0.0, False), sources, ds))
        raise
    return results_of(task, teacher, fitted, sources, ds)


def results_of(task: MultiLabelTask, teacher: Teacher, fitted: FitResult, sources: list[Any],
             ds: MultiLabelSet) -> RunResults:
    """The results of a fitted task (not yet written): headline = mean of the last ``train.average_last``
    evaluations, as single-label runs; skipped bad scenes (at prepare and since) counted and listed."""
    cfg = task.cfg
    student = {"id": task.student.spec.id, "params": count_parameters(task.student.student),
               "head_params": count_parameters(task.student.head)}
    results = RunResults.of_training(cfg, teacher, student, fitted.state.history, fitted.complete)
    results.config_changes = config_history(cfg.run_dir)
    skipped = sorted({k for s in sources for k in s.bad_keys} | set(ds.skipped))
    results.data = {"skipped_images": len(skipped), "skipped": skipped}
    results.train = {"steps": fitted.state.step, "seconds": round(fitted.seconds, 2), "targets": task.targets.kind,
                     "processes": 1, "threads": torch.get_num_threads()}
    return results
