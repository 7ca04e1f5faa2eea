"""The training job: distill a student as configured, score it, and write ``results.json``.

Data flow: workspace (splits, teacher) -> ``DistillTask`` (student, prompts, Objective, target lookup)
-> ``loop.fit`` (evaluating through ``evaluate.score_student`` at the end of outer epochs) -> results
(+ the paper's analysis metrics). Under torchrun every rank runs all of it (training, evaluation and the
analysis gather across ranks); rank 0 alone holds the run lock and writes the run folder.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlmdistill import distributed
from vlmdistill.checkpoint import clear_checkpoints, intact_checkpoint
from vlmdistill.config import ConfigError, ExperimentConfig
from vlmdistill.data.multilabel_set import is_multilabel
from vlmdistill.errors import RunError
from vlmdistill.evaluate import analyse, score_student, skipped_images
from vlmdistill.integrity import Diverged, stop_on_lost_rank
from vlmdistill.io import atomic_write_json, out_of_space
from vlmdistill.loop import FitResult, fit
from vlmdistill.mltrain import train_multilabel
from vlmdistill.progress import console
from vlmdistill.results import RunResults
from vlmdistill.resume_check import check_resume, config_history, record_config
from vlmdistill.runfolder import RunFolder
from vlmdistill.runlock import LOCK_FILE, run_lock
from vlmdistill.students import count_parameters, open_clip_blocker
from vlmdistill.targets.lookup import open_targets
from vlmdistill.task import DistillTask, open_pool
from vlmdistill.workspace import EvalSet, Workspace, build_workspace, class_text_embeddings, default_sets


def train_task(task: DistillTask, ws: Workspace, eval_set: EvalSet, resume: bool = False) -> RunResults:
    """Fit ``task`` (opening its teacher targets and pool first), evaluating on ``eval_set``; returns its
    results. A run that does not resume starts from no checkpoint, with its resolved config saved."""
    cfg = task.cfg
    task.targets = open_targets(cfg, ws.teacher, task.train_set.source, task.objective.needs_teacher)
    task.pool = open_pool(cfg, ws) if task.wants_pool else None
    ood_trained = task.train_set.support is not None
    _begin(cfg, resume)

    def evaluate() -> dict[str, Any]:
        return score_student(task.eval_student, cfg, eval_set, task.class_embeddings(), task.n_id, ood_trained)

    try:
        result = fit(task, evaluate, resume=resume)
    except Diverged as err:
        err.recorded(_results(task, ws, eval_set, FitResult(err.state, 0.0, False)))
        raise
    return _results(task, ws, eval_set, result)


def _results(task: DistillTask, ws: Workspace, eval_set: EvalSet, fit_result: FitResult) -> RunResults:
    cfg = task.cfg
    student = {"id": task.student.spec.id, "params": count_parameters(task.student)}
    results = RunResults.of_training(cfg, ws.teacher, student, fit_result.state.history, fit_result.complete)
    results.config_changes = config_history(cfg.run_dir)
    pool = [task.pool.source] if task.pool is not None else []
    results.data = skipped_images(ws, task.train_set.source, eval_set.id_source, eval_set.ood_source, *pool)
    results.train = {"steps": fit_result.state.step, "seconds": round(fit_result.seconds, 2),
                     "targets": task.targets.kind, "processes": distributed.world_size(),
                     "threads": torch.get_num_threads(), "student_images": fit_result.state.student_images}
    return results


def _begin(cfg: ExperimentConfig, resume: bool) -> None:
    """Rank 0 saves the resolved config (a resume first records what it changes, from the step it continues
    at); a run that does not resume drops any checkpoint left in its folder."""
    if not distributed.is_main():
        return
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        clear_checkpoints(cfg.run_dir)
    record_config(cfg, cfg.run_dir, RunFolder(cfg.run_dir).checkpoint_step() if resume else None)


def _check_reuse(run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to train over an existing run unless asked to continue it or start it again."""
    if resume and overwrite:
        raise RunError(f"give --resume (continue {run_dir}) or --overwrite (start it again), not both")
    run = RunFolder(run_dir)
    if resume or overwrite or not (run.results_path.is_file() or run.has_checkpoint()):
        return
    missing = run.missing_phases()
    if not missing:
        raise RunError(f"run {run_dir} is complete ({run.results_path}); --overwrite trains it again, or use "
                       "another name")
    raise RunError(f"run {run_dir} holds an unfinished run (missing: {', '.join(missing)}); --resume continues it, "
                   "--overwrite starts it again")


def _start_again(run_dir: Path) -> None:
    """Empty a run folder for --overwrite, keeping its lock and the teacher's own results."""
    for entry in run_dir.iterdir():
        if entry.name in (LOCK_FILE, "teacher"):
            continue
        shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()


def distill(cfg: ExperimentConfig, ws: Workspace | None = None, resume: bool = False,
            overwrite: bool = False, allow_config_change: bool = False) -> dict[str, Any]:
    """Train a student as configured, add the analysis metrics, and write results.json.

    The run folder is locked against a second writer; an existing run is refused unless ``resume``
    continues it (with its own config, unless ``allow_config_change``) or ``overwrite`` empties it first.
    results.json says ``complete`` only once every phase asked for (training, analysis) is done."""
    with run_lock(cfg.run_dir), stop_on_lost_rank(cfg.run_dir), out_of_space(
            "the run folder", cfg.run_dir, lambda: f"{intact_checkpoint(cfg.run_dir)}; free space there"):
        _check_reuse(cfg.run_dir, resume, overwrite)
        if resume:
            check_resume(cfg, allow_config_change)
        if overwrite and distributed.is_main():
            _start_again(cfg.run_dir)
        distributed.barrier()
        torch.manual_seed(cfg.seed)
        if is_multilabel(cfg.data.dir):  # scenes with several objects each: the multi-label job (mltrain)
            _begin(cfg, resume)
            teacher = ws.teacher if ws is not None else None
            results = _recording_divergence(cfg, lambda: train_multilabel(cfg, resume, teacher))
            _write_results(cfg.run_dir, results)
            return results.to_dict()
        if cfg.loss.asl.weight:
            raise ConfigError(f"loss.asl trains a multi-label head, but {cfg.data.dir} is a single-label dataset: "
                              "set loss.asl.weight=0, or prepare multi-label data (prepare --multilabel-csv / --h5)")
        _note_open_clip(cfg, resume)
        ws = ws or build_workspace(cfg)
        train_set, eval_set = default_sets(ws, class_text_embeddings(cfg, ws)[0])
        task = DistillTask(cfg, ws, train_set)
        results = _recording_divergence(cfg, lambda: train_task(task, ws, eval_set, resume=resume))
        if cfg.train.analysis and not task.closed_set:
            results.phase("analysis", False)
            _write_results(cfg.run_dir, results)
            results.analysis = analyse(cfg, ws, task.eval_student, task.class_embeddings())
            results.phase("analysis", True)
        _write_results(cfg.run_dir, results)
        return results.to_dict()


def _note_open_clip(cfg: ExperimentConfig, resume: bool) -> None:
    """Say at the start, not at export, that this student will not become an open_clip model."""
    blocker = open_clip_blocker(cfg.student)
    if blocker is not None and cfg.teacher.backend == "open_clip" and not resume and distributed.is_main():
        console.print(f"[yellow]note:[/] this run will export to model.onnx and vlmdistill.load but not "
                      f"--open-clip: {blocker}")


def _recording_divergence(cfg: ExperimentConfig, job: Callable[[], RunResults]) -> RunResults:
    """Run a training job; on a divergence, write the job's record of it (never complete) before it propagates."""
    try:
        return job()
    except Diverged as err:
        if err.results is not None:
            _write_results(cfg.run_dir, err.results)
        raise


def _write_results(run_dir: Path, results: RunResults) -> None:
    if distributed.is_main():
        atomic_write_json(run_dir / "results.json", results.to_dict())
