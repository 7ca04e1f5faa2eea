"""Few-shot adaptation of a distilled student to the OOD classes (paper §4.2, Table 10).

Two methods, both scored on the OOD images that are not support images, over the OOD classes:
- ``finetune``: continue training on ID-train ∪ K shots per OOD class, with balanced batches and a
  OneCycle schedule, text embeddings of all classes (ID then OOD), the same loss terms as distillation;
- ``retrieval``: training-free Tip-Adapter, a key/value cache of the support embeddings added to the
  zero-shot text logits (student keys by default; the paper's code uses teacher keys).
``continual`` (Table 11) adapts on half of the OOD classes and scores both halves before and after.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vlmdistill import distributed
from vlmdistill.config import ExperimentConfig
from vlmdistill.data.dataset import Split
from vlmdistill.data.source import ImageSource
from vlmdistill.data.views import randaugment, render, sample_views
from vlmdistill.errors import RunError
from vlmdistill.evaluate import ClassEmbeddings, restore_student, skipped_images, student_features, teacher_features
from vlmdistill.io import atomic_write_json, read_json
from vlmdistill.metrics import classification_metrics, mean_per_class_recall
from vlmdistill.runfolder import RunFolder
from vlmdistill.runlock import run_lock
from vlmdistill.students import Student
from vlmdistill.task import DistillTask
from vlmdistill.train import train_task
from vlmdistill.workspace import (
    EvalSet,
    TrainSet,
    Workspace,
    class_text_embeddings,
    default_sets,
    student_eval_view,
    teacher_eval_view,
)


def select_support(split: Split, shots: int, seed: int, rule: str) -> list[int]:
    """K images per class, by seed or (paper) the first K in sorted file-name order; one stays for testing."""
    by_class: dict[int, list[int]] = {}
    for i, label in enumerate(split.labels):
        by_class.setdefault(label, []).append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label]
        k = min(shots, len(idx) - 1)
        if k < 1:
            cls = split.space.classes[label].dir
            raise RunError(f"OOD class {cls} has {len(idx)} image(s): a few-shot run needs at least 2")
        if rule == "first":
            idx = sorted(idx, key=lambda i: split.records[i].path.name)
            chosen += idx[:k]
        else:
            chosen += sorted(rng.sample(idx, k))
    return chosen


def fewshot_sets(cfg: ExperimentConfig, ws: Workspace, support: list[int]) -> tuple[TrainSet, EvalSet]:
    """Train on ID-train + support (labels ID then OOD); evaluate OOD without the support images."""
    w_id, w_ood = class_text_embeddings(cfg, ws)
    base, e = default_sets(ws, w_id)
    ood = ws.dataset.ood_val
    rest = sorted(set(range(len(ood))) - set(support))
    ood_labels = torch.tensor(ood.labels, dtype=torch.long)
    train = TrainSet(
        source=base.source.concat(ws.ood_val.subset(support)),
        labels=torch.cat([base.labels, ood_labels[support] + len(w_id)]),
        w=torch.cat([w_id, w_ood]),
        support=torch.arange(len(base.labels) + len(support)) >= len(base.labels),
    )
    evals = EvalSet(e.id_source, e.id_labels, ws.ood_val.subset(rest), ood_labels[rest])
    return train, evals


def fewshot_config(base: ExperimentConfig, from_run: Path, method: str) -> ExperimentConfig:
    """The distilled run's config with the few-shot schedule (OneCycle at ``fewshot.lr``), writing into
    ``<from_run>/fewshot-<K>shot-<method>``."""
    f = base.fewshot
    optim = base.optim.model_copy(update={"lr": f.lr, "epochs": f.epochs, "schedule": "onecycle",
                                          "repeat_epochs": f.repeat_epochs or base.optim.repeat_epochs})
    name = f"fewshot-{f.shots}shot-{method}"
    return base.model_copy(update={"optim": optim, "output_dir": Path(from_run), "name": name})


def finetune(
    cfg: ExperimentConfig, ws: Workspace, from_run: Path, support: list[int], method: str = "finetune"
) -> tuple[dict[str, Any], DistillTask, EvalSet]:
    """The paper's few-shot finetuning, starting from the distilled weights with a fresh optimiser."""
    ft_cfg = fewshot_config(cfg, from_run, method)
    train_set, eval_set = fewshot_sets(ft_cfg, ws, support)
    task = DistillTask(ft_cfg, ws, train_set)
    task.load_saved(RunFolder(from_run).student())
    results = train_task(task, ws, eval_set).to_dict()
    if distributed.is_main():
        atomic_write_json(ft_cfg.run_dir / "results.json", results)
    return results, task, eval_set


def _per_half(cfg: ExperimentConfig, student: Student, class_embeddings: ClassEmbeddings, eval_set: EvalSet,
              halves: list[set[int]]) -> dict[str, float]:
    """OOD recall over all OOD classes, reported separately for the images of each half of the classes."""
    feats, idx = student_features(student, cfg, eval_set.ood_source)
    labels = eval_set.ood_labels[idx]
    pred = (F.normalize(feats, dim=-1) @ class_embeddings[1].T).argmax(1)
    out = {}
    for i, half in enumerate(halves, start=1):
        mask = torch.tensor([int(y) in half for y in labels])
        out[f"ood{i}"] = mean_per_class_recall(pred[mask], labels[mask])
    return out


def run_continual(cfg: ExperimentConfig, ws: Workspace, from_run: Path) -> dict[str, Any]:
    """Paper Table 11: adapt on half of the OOD classes, then score both halves (before and after)."""
    n_ood = len(ws.dataset.ood_space)
    order = torch.randperm(n_ood, generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    halves = [set(order[: (n_ood + 1) // 2]), set(order[(n_ood + 1) // 2 :])]
    support_all = select_support(ws.dataset.ood_val, cfg.fewshot.shots, cfg.seed, cfg.fewshot.selection)
    support = [i for i in support_all if ws.dataset.ood_val.labels[i] in halves[0]]
    eval_set = fewshot_sets(cfg, ws, support)[1]
    before = _per_half(cfg, *restore_student(cfg, ws, from_run), eval_set, halves)
    _, after, _ = finetune(cfg, ws, from_run, support, method="continual")
    names = ws.dataset.ood_space.dirs
    return {
        "halves": [[names[c] for c in sorted(h)] for h in halves],
        "support_images": len(support),
        "before": before,
        "after": _per_half(after.cfg, after.eval_student, after.class_embeddings(), eval_set, halves),
    }


def tip_adapter_logits(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, key_labels: torch.Tensor,
                       alpha: float, beta: float, text_scale: float) -> torch.Tensor:
    """text_scale * cos(q, w) + alpha * sum over keys of exp(-beta (1 - cos(q, key))) into the key's class.

    Inputs are unit vectors. With one key per support image and averaged views this is Tip-Adapter; with
    every view a separate key (paper mode) the cache term sums over all 10 K views, as the official code.
    """
    values = F.one_hot(key_labels, len(w)).to(q.dtype)
    return text_scale * q @ w.T + alpha * torch.exp(-beta * (1 - q @ keys.T)) @ values


def merge_key_views(views: torch.Tensor, labels: torch.Tensor, merge: str) -> tuple[torch.Tensor, torch.Tensor]:
    """[V, K, D] unit view embeddings of K support images -> keys and their labels: one averaged key per
    image (``mean``), or all V K views as keys with repeated labels (``separate``)."""
    if merge == "mean":
        return F.normalize(views.mean(0), dim=-1), labels
    return views.reshape(-1, views.shape[-1]), labels.repeat(len(views))


@torch.no_grad()
def tip_adapter(cfg: ExperimentConfig, ws: Workspace, from_run: Path, support: list[int]) -> dict[str, Any]:
    """Training-free retrieval over a cache of the support images' embeddings (see ``tip_adapter_logits``)."""
    f = cfg.fewshot
    student, (_, w_ood) = restore_student(cfg, ws, from_run)
    _, eval_set = fewshot_sets(cfg, ws, support)
    labels = torch.tensor(ws.dataset.ood_val.labels, dtype=torch.long)[support]
    shots = ws.ood_val.subset(support)
    keys, key_labels = merge_key_views(_key_views(cfg, ws, student, shots), labels, f.key_merge)
    q, q_i = student_features(student, cfg, eval_set.ood_source)
    logits = tip_adapter_logits(F.normalize(q, dim=-1), w_ood, keys, key_labels, f.alpha, f.beta, f.text_scale)
    return {"ood": classification_metrics(logits, eval_set.ood_labels[q_i]), "keys": f.keys, "alpha": f.alpha,
            "beta": f.beta, "text_scale": f.text_scale, "key_views": f.key_views, "key_merge": f.key_merge,
            "key_view_kind": f.key_view_kind, "n_keys": len(keys),
            "skipped": skipped_images(ws, shots, eval_set.ood_source)["skipped"]}


def _key_views(cfg: ExperimentConfig, ws: Workspace, student: Student, shots: ImageSource) -> torch.Tensor:
    """[V, K, D] unit embeddings of each support image: its eval view, then ``key_views - 1`` random crops
    or (paper) RandAugment(2, 9) versions of the whole eval view."""
    if cfg.fewshot.keys == "teacher":
        base, _ = teacher_features(cfg, ws, shots)
        encode, size, view = ws.teacher.encode_images, ws.teacher.image_size, teacher_eval_view(cfg)
    else:
        base, _ = student_features(student, cfg, shots)
        student.eval()
        device = next(student.parameters()).device
        encode, size = (lambda x: student(x.to(device)).cpu()), cfg.student.image_size
        view = student_eval_view(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    out = [F.normalize(base, dim=-1)]
    for _ in range(cfg.fewshot.key_views - 1):
        feats = []
        for batch in shots.batches(torch.arange(len(shots)), 256):
            n = len(batch.index)
            if cfg.fewshot.key_view_kind == "randaugment":
                pixels = render(randaugment(batch.images, g, per_batch=False), view(n), size)
            else:
                pixels = render(batch.images, sample_views(n, g, cfg.data.crop_scale, hflip=cfg.data.hflip), size)
            feats.append(encode(pixels).float())
        out.append(F.normalize(torch.cat(feats), dim=-1))
    return torch.stack(out)


def run_fewshot(cfg: ExperimentConfig, ws: Workspace, from_run: Path) -> dict[str, Any]:
    """Every configured method; the summary also lands in the distilled run's results.json. The run is
    locked meanwhile: its ``fewshot-*`` folders and results must not mix with another writer's."""
    from_run = Path(from_run)
    with run_lock(from_run):
        rule = cfg.fewshot.selection
        support = select_support(ws.dataset.ood_val, cfg.fewshot.shots, cfg.seed, rule)
        out: dict[str, Any] = {"shots": cfg.fewshot.shots, "selection": rule, "support_images": len(support)}
        skipped = set(skipped_images(ws)["skipped"])
        if "finetune" in cfg.fewshot.methods:
            res, _, _ = finetune(cfg, ws, from_run, support)
            skipped |= set(res["data"]["skipped"])
            out["finetune"] = {**res["metrics_last_avg"], "averaged_over": res["averaged_over"],
                               "last": res["metrics"],
                               "run": str(from_run / f"fewshot-{cfg.fewshot.shots}shot-finetune")}
        if "retrieval" in cfg.fewshot.methods:
            out["retrieval"] = tip_adapter(cfg, ws, from_run, support)
            skipped |= set(out["retrieval"]["skipped"])
        if cfg.fewshot.continual:
            out["continual"] = run_continual(cfg, ws, from_run)
        skipped |= set(skipped_images(ws)["skipped"])
        out["data"] = {"skipped_images": len(skipped), "skipped": sorted(skipped)}
        results_path = from_run / "results.json"
        if not distributed.is_main():
            return out
        if results_path.is_file():
            results = read_json(results_path)
            results["fewshot"] = out
            atomic_write_json(results_path, results)
        atomic_write_json(from_run / "fewshot.json", out)
        return out
