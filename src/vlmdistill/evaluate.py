"""Evaluation jobs: score any image encoder under the paper's protocol, the teacher alone, a saved run,
and the paper's §6 analysis metrics.

Evaluation takes a plain encoder (pixels in [0, 1] -> embedding) and class embeddings, as open_clip's
``zero_shot_eval(model, ...)`` does: nothing here builds a training task. A saved run is read through
``RunFolder`` (``restore_student``). The metrics themselves are in ``metrics.py``.

Under torchrun DDP each rank embeds a contiguous slice of a split with the student and the slices are
gathered in rank order (``student_features``), so every rank computes the metrics of one process; only rank 0
writes results.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from vlmdistill import distributed
from vlmdistill.analysis import analysis_metrics
from vlmdistill.config import ExperimentConfig, save_config
from vlmdistill.data.source import ImageSource
from vlmdistill.data.views import render
from vlmdistill.device import resolve_device
from vlmdistill.io import atomic_write_json
from vlmdistill.metrics import closed_set_metrics, zero_shot_metrics
from vlmdistill.results import RunResults
from vlmdistill.runfolder import ModelMeta, RunFolder
from vlmdistill.students import Student, count_parameters
from vlmdistill.workspace import (
    EvalSet,
    ViewFactory,
    Workspace,
    class_text_embeddings,
    default_sets,
    run_class_embeddings,
    student_eval_view,
    teacher_eval_view,
)

Encoder = Callable[[torch.Tensor], torch.Tensor]
ClassEmbeddings = tuple[torch.Tensor, torch.Tensor]
"""Unit-norm ID and OOD class embeddings [C, D], on CPU."""


@torch.no_grad()
def embed_images(
    encode: Encoder, source: ImageSource, size: int, view: ViewFactory, batch_size: int,
    order: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Outputs [N, D] (on CPU) of the images that could be read (of ``order``, default all), and their indices."""
    feats, index = [], []
    for batch in source.batches(torch.arange(len(source)) if order is None else order, batch_size):
        pixels = render(batch.images, view(len(batch.index)), size)
        feats.append(encode(pixels).float().cpu())
        index.append(batch.index)
    if not feats:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(index)


def student_features(student: torch.nn.Module, cfg: ExperimentConfig, source: ImageSource) -> tuple[
        torch.Tensor, torch.Tensor]:
    """A student's outputs on a split under the deterministic eval view (in eval mode, restored after).

    Under DDP every rank embeds its slice and gets the whole split back, in the order of one process."""
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    feats, index = embed_images(lambda x: student(x.to(device)), source, cfg.student.image_size,
                                student_eval_view(cfg), cfg.optim.eval_batch_size,
                                distributed.shard(torch.arange(len(source))))
    student.train(was_training)
    if not distributed.active():
        return feats, index
    if not len(index):  # no readable image in this rank's slice: rows of the right width for the gather
        feats = feats.new_zeros(0, getattr(student, "out_dim", feats.shape[1]))
    counts = distributed.sizes(len(index))
    return distributed.all_gather_tensors(feats, counts), distributed.all_gather_tensors(index, counts)


def score_student(student: torch.nn.Module, cfg: ExperimentConfig, eval_set: EvalSet,
                  class_embeddings: tuple[torch.Tensor, torch.Tensor], n_id: int, ood_trained: bool = False
                  ) -> dict[str, Any]:
    """Zero-shot ID / OOD / generalized metrics (closed-set: logits read directly)."""
    id_f, id_i = student_features(student, cfg, eval_set.id_source)
    ood_f, ood_i = student_features(student, cfg, eval_set.ood_source)
    id_y, ood_y = eval_set.id_labels[id_i], eval_set.ood_labels[ood_i]
    if cfg.loss.closed_set:
        return closed_set_metrics(id_f, id_y, ood_f, ood_y, n_id, ood_trained,
                                  id_over_all=cfg.loss.closed_set_id_logits == "all")
    return zero_shot_metrics(id_f, id_y, ood_f, ood_y, *class_embeddings)


def teacher_features(cfg: ExperimentConfig, ws: Workspace, source: ImageSource) -> tuple[torch.Tensor, torch.Tensor]:
    """The frozen teacher's eval-view embeddings of a split; the workspace's own splits are embedded once."""

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        return embed_images(ws.teacher.encode_images, source, ws.teacher.image_size, teacher_eval_view(cfg),
                            ws.teacher.batch_size)

    if not ws.owns(source):
        return run()
    key = (id(source), f"{cfg.data.teacher_eval_view}:{cfg.data.eval_crop}")
    if key not in ws.teacher_features:
        ws.teacher_features[key] = run()
    return ws.teacher_features[key]


def skipped_images(ws: Workspace, *sources: ImageSource) -> dict[str, Any]:
    """Unreadable images met so far in the workspace's splits and ``sources`` (only with skip_bad_images); under
    DDP those every rank met in its slices."""
    unique = {id(x): x for x in (ws.train, ws.id_val, ws.ood_val, *sources)}.values()
    met = {k for src in unique for k in src.bad_keys}
    keys = sorted(set().union(*distributed.all_gather_objects(met)) | set(ws.dataset.missing))
    return {"skipped_images": len(keys), "skipped": keys}


def evaluate_teacher(cfg: ExperimentConfig, ws: Workspace, out_dir: Path | None = None) -> dict[str, Any]:
    """The teacher's own zero-shot numbers under the same protocol and prompts as the student's.

    Written to ``out_dir`` (default ``<run>/teacher``) so a trained run's own results are never replaced.
    """
    out_dir = Path(out_dir) if out_dir is not None else cfg.run_dir / "teacher"
    w_id, w_ood = class_text_embeddings(cfg, ws)
    id_f, id_i = teacher_features(cfg, ws, ws.id_val)
    ood_f, ood_i = teacher_features(cfg, ws, ws.ood_val)
    id_y = torch.tensor(ws.dataset.id_val.labels, dtype=torch.long)[id_i]
    ood_y = torch.tensor(ws.dataset.ood_val.labels, dtype=torch.long)[ood_i]
    metrics = zero_shot_metrics(id_f, id_y, ood_f, ood_y, w_id, w_ood)
    results = RunResults.start("teacher", cfg, f"{cfg.name} (teacher)", str(out_dir), ws.teacher, None, metrics)
    results.data = skipped_images(ws)
    if distributed.is_main():
        save_config(cfg, out_dir / "config.yaml")
        atomic_write_json(out_dir / "results.json", results.to_dict())
    return results.to_dict()


def restore_student(cfg: ExperimentConfig, ws: Workspace, run_dir: Path) -> tuple[Student, ClassEmbeddings]:
    """A run's student (refusing one of another teacher or architecture than ``cfg``'s) and the class
    embeddings it is scored against (from its learned prompt context when it learned one)."""
    n_classes = len(ws.dataset.id_space) + len(ws.dataset.ood_space)
    out_dim = n_classes if cfg.loss.closed_set else ws.teacher.embed_dim
    saved = RunFolder(run_dir).student(ModelMeta.expected(cfg, ws.teacher.id, out_dim))
    student = saved.build(cfg.student, resolve_device(cfg.device))
    return student, run_class_embeddings(cfg, ws, saved.context)


def analyse(cfg: ExperimentConfig, ws: Workspace, student: torch.nn.Module, class_embeddings: ClassEmbeddings
            ) -> dict[str, Any]:
    """The paper's §6 metrics on the training set and on the OOD set: all images (as the paper's Tables
    14-16), or a seeded subset of ``train.analysis_max_images`` per set, recorded under ``images``."""
    out: dict[str, Any] = {"images": {}}
    g = torch.Generator().manual_seed(cfg.seed)
    w_id, w_ood = class_embeddings
    limit = cfg.train.analysis_max_images
    for name, source, w in (("train", ws.train, w_id), ("ood", ws.ood_val, w_ood)):
        total = len(source)
        if limit is not None and total > limit:
            keep = torch.randperm(total, generator=g)[:limit].sort().values
            source = source.like([source.records[i] for i in keep.tolist()])
        s, s_i = student_features(student, cfg, source)
        t, t_i = teacher_features(cfg, ws, source)
        common = torch.isin(s_i, t_i)
        s, t = s[common], t[torch.isin(t_i, s_i)]
        out[name] = analysis_metrics(s, t, w, neigh_ks=tuple(k for k in (3, 5, 10) if k < len(s)))
        out["images"][name] = {"used": len(s), "of": total, "subsampled": len(source) < total}
    return out


def eval_results_path(cfg: ExperimentConfig, run_dir: Path) -> Path:
    """``eval.json`` on the run's own dataset; ``eval-<dataset>.json`` on another, so neither replaces the other."""
    run = RunFolder(run_dir)
    if run.is_run() and Path(run.config().data.dir).resolve() != Path(cfg.data.dir).resolve():
        return run_dir / f"eval-{Path(cfg.data.dir).resolve().name}.json"
    return run_dir / "eval.json"


def evaluate_run(cfg: ExperimentConfig, ws: Workspace, run_dir: Path, analysis: bool = True) -> dict[str, Any]:
    """Re-score a saved student on ``cfg``'s data; writes ``eval.json`` (see ``eval_results_path``)."""
    run_dir = Path(run_dir)
    student, class_embeddings = restore_student(cfg, ws, run_dir)
    _, eval_set = default_sets(ws, class_embeddings[0])
    metrics = score_student(student, cfg, eval_set, class_embeddings, len(ws.dataset.id_space))
    info = {"id": student.spec.id, "params": count_parameters(student)}
    results = RunResults.start("eval", cfg, str(run_dir), str(run_dir), ws.teacher, info, metrics)
    if analysis and not cfg.loss.closed_set:
        results.analysis = analyse(cfg, ws, student, class_embeddings)
    results.data = skipped_images(ws)
    if distributed.is_main():
        atomic_write_json(eval_results_path(cfg, run_dir), results.to_dict())
    return results.to_dict()
