"""The training loop for distillation, readable top to bottom.

One step: sample a view per image (or per batch in ``paper`` mode) -> render it for the student ->
fetch the teacher's embedding of the same view from the target store (or run the teacher online) ->
the Objective's weighted loss terms -> backward -> optimiser step. The LR schedule, evaluation and
checkpoints happen once per outer epoch, each of which runs ``repeat_epochs`` passes over the data,
as in the paper. Every random draw comes from a generator seeded by (seed, epoch, pass, batch), so a
resumed run is identical to an uninterrupted one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.tensorboard import SummaryWriter

from vlmdistill.checkpoint import LoopState, has_checkpoint, load_checkpoint, prompt_path, save_checkpoint
from vlmdistill.config import ExperimentConfig, config_to_dict, save_config
from vlmdistill.data.dataset import Dataset, open_dataset
from vlmdistill.data.source import ImageSource
from vlmdistill.data.views import Views, randaugment, render, sample_views
from vlmdistill.evaluate import closed_set_metrics, embed_source, zero_shot_metrics
from vlmdistill.io import atomic_save_tensors, atomic_write_json, load_tensors
from vlmdistill.losses import LossInputs, Objective
from vlmdistill.progress import console, make_progress
from vlmdistill.students import Student, count_parameters, create_student
from vlmdistill.targets.store import TargetStore, ViewRecipe, open_store
from vlmdistill.teachers import Teacher, load_teacher
from vlmdistill.teachers.base import resolve_device
from vlmdistill.text.captions import captions_for, read_captions
from vlmdistill.text.prompt_learner import PromptLearner
from vlmdistill.text.prompt_learner import class_texts as prompt_class_texts
from vlmdistill.text.textbank import embed_texts

log = logging.getLogger(__name__)


@dataclass
class Workspace:
    """What runs on the same data and teacher share: built once, reused by every variant of a sweep."""

    dataset: Dataset
    teacher: Teacher
    train: ImageSource
    id_val: ImageSource
    ood_val: ImageSource
    teacher_features: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


def build_workspace(cfg: ExperimentConfig, teacher: Teacher | None = None) -> Workspace:
    d = cfg.data
    dataset = open_dataset(d.dir, cfg.text.descriptions, skip_missing=d.skip_bad_images)
    teacher = teacher or load_teacher(cfg.teacher)

    def source(split: Any) -> ImageSource:
        return ImageSource(split.records, d.base_size, d.resize, d.num_workers, d.skip_bad_images, d.preload)

    return Workspace(dataset, teacher, source(dataset.train), source(dataset.id_val), source(dataset.ood_val))


def class_texts(cfg: ExperimentConfig, ws: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm teacher text embeddings of the ID and OOD class prompts."""
    t = cfg.text
    w_id = embed_texts(
        ws.teacher, ws.dataset.id_space.prompts(t.template, t.description_template, t.use_descriptions), cfg.cache_dir
    )
    w_ood = embed_texts(
        ws.teacher, ws.dataset.ood_space.prompts(t.template, t.description_template, t.use_descriptions), cfg.cache_dir
    )
    return w_id, w_ood


@dataclass
class TrainSet:
    """What the loop trains on: images, their labels, and the class text embeddings the labels index.

    ``support`` marks few-shot images; when set, every batch mixes them with base images as the paper's
    FewShotSampler does.
    """

    source: ImageSource
    labels: torch.Tensor
    w: torch.Tensor
    support: torch.Tensor | None = None


@dataclass
class EvalSet:
    """ID-val scored over ID classes, OOD-val over OOD classes (support images already removed)."""

    id_source: ImageSource
    id_labels: torch.Tensor
    ood_source: ImageSource
    ood_labels: torch.Tensor


def default_sets(ws: Workspace, w_id: torch.Tensor) -> tuple[TrainSet, EvalSet]:
    d = ws.dataset
    train = TrainSet(ws.train, torch.tensor(d.train.labels, dtype=torch.long), w_id)
    evals = EvalSet(ws.id_val, torch.tensor(d.id_val.labels, dtype=torch.long),
                    ws.ood_val, torch.tensor(d.ood_val.labels, dtype=torch.long))
    return train, evals


def balanced_batches(
    base: torch.Tensor, support: torch.Tensor, batch_size: int, g: torch.Generator
) -> list[torch.Tensor]:
    """The paper's FewShotSampler: half of each batch few-shot images (all of them if they fit in half)."""
    base = base[torch.randperm(len(base), generator=g)]
    half = batch_size // 2
    if len(support) > half:
        n_batches = len(base) // half + 1
        out = []
        for b in range(n_batches):
            shots = support[torch.randperm(len(support), generator=g)[:half]]
            rest = base[(torch.arange(half) + b * half) % max(len(base), 1)] if len(base) else base
            out.append(torch.cat([shots, rest]))
        return out
    per = max(batch_size - len(support), 1)
    return [torch.cat([support, chunk]) for chunk in base.split(per)] or [support]


def _seed_for(*parts: int) -> int:
    """A generator seed from loop coordinates, so any step's randomness can be recreated on resume."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p + 0x9E3779B9)) * 1099511628211) % (2**63)
    return h


def build_optimizer(cfg: ExperimentConfig, params: Any, steps_per_epoch: int) -> tuple[Any, Any, bool]:
    """Optimiser, scheduler, and whether the scheduler steps per batch (else per outer epoch)."""
    o = cfg.optim
    if o.name == "sgd":
        opt = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay)
    if o.schedule == "step":
        milestones = sorted({max(1, round(f * o.epochs)) for f in o.milestones})
        return opt, torch.optim.lr_scheduler.MultiStepLR(opt, milestones, gamma=o.gamma), False
    if o.schedule == "onecycle":
        per_step = cfg.mode != "paper"
        total = o.epochs * steps_per_epoch if per_step else o.epochs
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=max(total, 2)), per_step
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), False


class Distiller:
    """Holds one run's pieces; ``fit`` trains, ``evaluate`` scores, both write into the run directory."""

    def __init__(
        self, cfg: ExperimentConfig, ws: Workspace, train_set: TrainSet | None = None, eval_set: EvalSet | None = None
    ) -> None:
        self.cfg, self.ws = cfg, ws
        self.device = resolve_device(cfg.device)
        self.w_id, self.w_ood = (w.to(self.device) for w in class_texts(cfg, ws))
        default_train, default_eval = default_sets(ws, self.w_id)
        self.train_set = train_set or default_train
        self.eval_set = eval_set or default_eval
        self.w_train = self.train_set.w.to(self.device)
        self.n_id = len(ws.dataset.id_space)
        self.prompts = self._prompt_learner() if cfg.text.learn_context else None
        self.captions = self._caption_features() if cfg.loss.cap.weight and not cfg.loss.closed_set else None
        self.closed_set = cfg.loss.closed_set
        out_dim = len(ws.dataset.id_space) + len(ws.dataset.ood_space) if self.closed_set else ws.teacher.embed_dim
        self.student: Student = create_student(cfg.student, out_dim).to(self.device)
        self.objective = Objective(cfg.loss)
        self.per_batch = cfg.data.augment_per == "batch"
        self.store: TargetStore | None = None
        self.online_teacher = False

    def _prompt_learner(self) -> PromptLearner:
        """CoOp context over the training classes (ID, or ID then OOD when few-shot data is mixed in)."""
        d, use = self.ws.dataset, self.cfg.text.use_descriptions

        def texts(space: Any) -> list[str]:
            return prompt_class_texts(space.names, [c.description for c in space.classes] if use else None)

        self.id_texts, self.ood_texts = texts(d.id_space), texts(d.ood_space)
        self.train_texts = self.id_texts if len(self.train_set.w) == self.n_id else self.id_texts + self.ood_texts
        learner = PromptLearner(self.ws.teacher, self.train_texts, self.cfg.text.n_ctx)
        return learner.to(self.device)

    def _train_texts(self) -> torch.Tensor:
        return self.prompts() if self.prompts is not None else self.w_train

    def _caption_features(self) -> torch.Tensor:
        """Teacher text embeddings of each training image's caption (for L_cap), cached like class texts."""
        path = self.cfg.text.captions
        texts = captions_for(self.train_set.source.records, read_captions(path), path)
        return embed_texts(self.ws.teacher, texts, self.cfg.cache_dir)

    # ----------------------------------------------------------------- teacher targets
    def prepare_targets(self) -> None:
        """Whole-image targets (paper) or stored random views; online teacher when views can't be stored."""
        cfg = self.cfg
        if cfg.train.teacher_view == "whole":
            recipe = ViewRecipe(0, cfg.seed, cfg.data.crop_scale, cfg.data.hflip)
        elif cfg.train.target_views > 0 and not self.per_batch:
            recipe = ViewRecipe(cfg.train.target_views, cfg.seed, cfg.data.crop_scale, cfg.data.hflip)
        else:
            self.online_teacher = True
            return
        self.store = open_store(self.ws.teacher, self.train_set.source, recipe, cfg.cache_dir, cfg.train.progress)

    def _views_and_targets(self, index: torch.Tensor, images: torch.Tensor, g: torch.Generator) -> tuple[Views, Any]:
        """The student's views of this batch and the teacher's embeddings of the matching views."""
        d = self.cfg.data
        if self.store is not None and self.cfg.train.teacher_view == "same":
            view_ids = torch.randint(1, self.store.n_views, (len(index),), generator=g)
            return self.store.views(index, view_ids), self.store.targets(index, view_ids)
        views = sample_views(len(index), g, d.crop_scale, hflip=d.hflip, per_batch=self.per_batch)
        if self.store is not None:
            return views, self.store.targets(index, torch.zeros_like(index))
        if self.online_teacher:
            return views, self.ws.teacher.encode_images(render(images, views, self.ws.teacher.image_size))
        return views, None

    # ----------------------------------------------------------------- one step
    def step(self, images: torch.Tensor, index: torch.Tensor, optimizer: Any, g: torch.Generator) -> dict[str, float]:
        """Data side of a step: views, the teacher's targets of those views, rendering; then ``update``."""
        views, t_raw = self._views_and_targets(index, images, g)
        if self.cfg.data.randaugment:
            images = randaugment(images, g, per_batch=self.per_batch)
        pixels = render(images, views, self.cfg.student.image_size).to(self.device, non_blocking=True)
        return self.update(pixels, index, t_raw, optimizer)

    def update(
        self, pixels: torch.Tensor, index: torch.Tensor, t_raw: torch.Tensor | None, optimizer: Any
    ) -> dict[str, float]:
        """Compute side of a step: student forward, the loss terms, backward, optimiser step."""
        amp = self.cfg.train.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            s_raw = self.student(pixels).float()
        t_raw = t_raw.to(self.device) if t_raw is not None else None
        inputs = LossInputs(
            s=F.normalize(s_raw, dim=-1),
            y=self.train_set.labels[index].to(self.device),
            w=self._train_texts(),
            t=F.normalize(t_raw, dim=-1) if t_raw is not None else None,
            s_raw=s_raw,
            t_raw=t_raw,
            c=self.captions[index].to(self.device) if self.captions is not None else None,
        )
        loss, named = self.objective(inputs)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.optim.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.cfg.optim.grad_clip)
        optimizer.step()
        return named

    # ----------------------------------------------------------------- evaluation
    @torch.no_grad()
    def embed(self, source: ImageSource) -> tuple[torch.Tensor, torch.Tensor]:
        """Student outputs of a split under the deterministic eval view, and the indices that were read."""
        was_training = self.student.training
        self.student.eval()
        out = embed_source(
            lambda x: self.student(x.to(self.device)),
            source,
            self.cfg.student.image_size,
            lambda n: Views.center(n, self.cfg.data.eval_crop),
            self.cfg.optim.eval_batch_size,
        )
        self.student.train(was_training)
        return out

    def evaluate(self) -> dict[str, Any]:
        e = self.eval_set
        id_f, id_i = self.embed(e.id_source)
        ood_f, ood_i = self.embed(e.ood_source)
        id_y, ood_y = e.id_labels[id_i], e.ood_labels[ood_i]
        if self.closed_set:
            return closed_set_metrics(id_f, id_y, ood_f, ood_y, self.n_id, self.train_set.support is not None)
        w_id, w_ood = self.class_embeddings()
        return zero_shot_metrics(id_f, id_y, ood_f, ood_y, w_id, w_ood)

    @torch.no_grad()
    def class_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ID and OOD class text embeddings (from the learned context when prompt learning is on), on CPU."""
        if self.prompts is None:
            return self.w_id.cpu(), self.w_ood.cpu()
        return self.prompts(self.id_texts).cpu(), self.prompts(self.ood_texts).cpu()

    # ----------------------------------------------------------------- the loop
    def fit(self, resume: bool = False) -> dict[str, Any]:
        cfg, run_dir = self.cfg, self.cfg.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        steps_per_epoch = len(self.pass_batches(0, 0)) * cfg.optim.repeat_epochs
        if self.objective.needs_teacher:
            self.prepare_targets()
        optimizer, scheduler, sched_per_step = build_optimizer(cfg, self.trainable(), steps_per_epoch)
        torch.manual_seed(cfg.seed)
        loop = LoopState()
        if resume and has_checkpoint(run_dir):
            loop = load_checkpoint(run_dir, self.student, optimizer, scheduler)
            self.load_prompt(run_dir)
            console.print(f"resumed {run_dir} at epoch {loop.epoch}, step {loop.step}")
        writer = SummaryWriter(str(run_dir / "tensorboard"))
        total_steps = cfg.optim.epochs * steps_per_epoch
        self.student.train()
        start = time.perf_counter()
        stopped = False
        with make_progress(cfg.train.progress) as bar:
            task = bar.add_task(cfg.name, total=total_steps, completed=loop.step, info="")
            while loop.epoch < cfg.optim.epochs and not stopped:
                while loop.rep < cfg.optim.repeat_epochs and not stopped:
                    batches = self.pass_batches(loop.epoch, loop.rep)[loop.batch :]
                    for batch in self.train_set.source.iter_batches(batches):
                        g = torch.Generator().manual_seed(_seed_for(cfg.seed, loop.epoch, loop.rep, loop.batch, 1))
                        named = self.step(batch.images, batch.index, optimizer, g)
                        if sched_per_step:
                            scheduler.step()
                        loop.batch += 1
                        loop.step += 1
                        if loop.step % cfg.train.log_every == 0:
                            for k, v in named.items():
                                writer.add_scalar(f"train/{k}", v, loop.step)
                            writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], loop.step)
                        terms = " ".join(f"{k}={v:.3f}" for k, v in named.items())
                        bar.update(task, completed=loop.step, info=f"ep {loop.epoch + 1}/{cfg.optim.epochs} {terms}")
                        if cfg.train.max_steps is not None and loop.step >= cfg.train.max_steps:
                            stopped = True
                            break
                    if not stopped:
                        loop.rep, loop.batch = loop.rep + 1, 0
                if stopped:
                    break
                loop.rep = 0
                if not sched_per_step:
                    scheduler.step()
                loop.epoch += 1
                last = loop.epoch == cfg.optim.epochs
                if last or loop.epoch % cfg.train.eval_every == 0:
                    metrics = self.evaluate()
                    loop.history.append({"epoch": loop.epoch, "step": loop.step, **metrics})
                    _log_metrics(writer, metrics, loop.epoch)
                if last or loop.epoch % cfg.train.checkpoint_every == 0:
                    self.save(optimizer, scheduler, loop)
        if stopped:
            self.save(optimizer, scheduler, loop)
        writer.close()
        results = self.results(loop, time.perf_counter() - start, complete=not stopped)
        atomic_write_json(run_dir / "results.json", results)
        return results

    def trainable(self) -> list[torch.nn.Parameter]:
        """The student's parameters, plus the prompt context when it is learned (same lr and decay, as CoOp)."""
        return [*self.student.parameters(), *([self.prompts.ctx] if self.prompts is not None else [])]

    def save(self, optimizer: Any, scheduler: Any, loop: LoopState) -> None:
        save_checkpoint(self.cfg.run_dir, self.student, optimizer, scheduler, loop, self.model_meta())
        if self.prompts is not None:
            atomic_save_tensors(prompt_path(self.cfg.run_dir), {"ctx": self.prompts.ctx.detach()})

    def pass_batches(self, epoch: int, rep: int) -> list[torch.Tensor]:
        """The index batches of one data pass, recreated identically from (seed, epoch, pass) on resume."""
        g = torch.Generator().manual_seed(_seed_for(self.cfg.seed, epoch, rep))
        bs = self.cfg.optim.batch_size
        support = self.train_set.support
        if support is None:
            return list(torch.randperm(len(self.train_set.labels), generator=g).split(bs))
        idx = torch.arange(len(support))
        return balanced_batches(idx[~support], idx[support], bs, g)

    def load_prompt(self, run_dir: Path) -> None:
        """The learned context of a run, when this run learns context too (fresh context otherwise)."""
        path = prompt_path(run_dir)
        if self.prompts is not None and path.is_file():
            with torch.no_grad():
                self.prompts.ctx.copy_(load_tensors(path)["ctx"])

    def model_meta(self) -> dict[str, str]:
        return {
            "student_arch": self.cfg.student.arch,
            "student_id": self.student.spec.id,
            "out_dim": str(self.student.out_dim),
            "image_size": str(self.cfg.student.image_size),
            "teacher_id": self.ws.teacher.id,
            "closed_set": str(self.closed_set),
        }

    def skipped(self) -> dict[str, Any]:
        """Unreadable images met so far in any split (only possible with data.skip_bad_images)."""
        sources = {id(x): x for x in (self.train_set.source, self.eval_set.id_source, self.eval_set.ood_source,
                                      self.ws.train, self.ws.id_val, self.ws.ood_val)}.values()
        keys = sorted({k for src in sources for k in src.bad_keys} | set(self.ws.dataset.missing))
        return {"skipped_images": len(keys), "skipped": keys}

    def results(self, loop: LoopState, seconds: float, complete: bool) -> dict[str, Any]:
        history = loop.history
        metrics = {k: v for k, v in history[-1].items() if k not in ("epoch", "step")} if history else {}
        tail = history[-self.cfg.train.average_last :]
        return {
            "run": self.cfg.name,
            "run_dir": str(self.cfg.run_dir),
            "mode": self.cfg.mode,
            "complete": complete,
            "teacher": {"id": self.ws.teacher.id, "description": self.ws.teacher.description,
                        "params": count_parameters(self.ws.teacher.model)},
            "student": {"id": self.student.spec.id, "params": count_parameters(self.student)},
            "metrics": metrics,
            "metrics_last_avg": average_metrics(tail) if tail else {},
            "history": history,
            "data": self.skipped(),
            "train": {"steps": loop.step, "seconds": round(seconds, 2),
                      "targets": "store" if self.store is not None else "online" if self.online_teacher else "none"},
            "config": config_to_dict(self.cfg),
        }


def average_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each numeric metric over evaluations (the paper reports the last 5 outer epochs)."""
    out: dict[str, Any] = {}
    for split in ("id", "ood", "gzsl"):
        entries = [h[split] for h in history if h.get(split)]
        if entries:
            out[split] = {k: sum(e[k] for e in entries) / len(entries) for k in entries[0] if k in entries[-1]}
    return out


def _log_metrics(writer: SummaryWriter, metrics: dict[str, Any], epoch: int) -> None:
    for split, values in metrics.items():
        for k, v in (values or {}).items():
            writer.add_scalar(f"eval/{split}/{k}", v, epoch)
