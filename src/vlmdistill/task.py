"""One distillation task: the student, the learned prompt context, the Objective and the target lookup.

Only training builds a task: the loop hands it a batch and gets back the loss and its named terms. Evaluation
gets the bare student (``task.student``) and the class embeddings (``class_embeddings``), never the task.
One step, top to bottom:

    batch (images, index) -> views (+ the teacher's targets of those views) -> pixels      ``prepare``
    [+ pool images drawn from g -> the same views and stored targets -> pixels, appended]
    pixels -> student -> s;  targets -> t;  labels -> y;  class texts -> w -> Objective      ``forward``

With an unlabelled pool (``data.unlabeled``), each step appends ``data.unlabeled_ratio`` pool images per
labelled one; the student runs once on both and the Objective gets a mask of the labelled rows, so the
terms that need labels never see pool rows. The class texts are the training (ID) classes' either way.

Under torchrun DDP each rank holds a contiguous slice of the global batch (and of the pool draw). ``prepare``
makes every random draw for the whole global batch and keeps its rows, so the views, stored-view ids,
RandAugment and pool draws are those of one process. ``forward`` gathers s (with gradient), t, y, c and the
labelled mask back into the global batch, in one process's row order, and every rank computes the same
Objective on it (open_clip's ``gather_with_grad=True, local_loss=False``): the in-batch negatives of L_im-cst
and L_cap are the whole global batch whatever the number of processes. The gradients then equal one
process's: the all_gather backward sums into each rank's rows the gradient of every rank's (identical) loss,
W times one process's, and DDP averages the parameter gradients over the W ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmdistill import distributed
from vlmdistill.config import ExperimentConfig
from vlmdistill.data.captions import captions_for, read_captions
from vlmdistill.data.source import Batch, ImageSource
from vlmdistill.data.views import randaugment, render
from vlmdistill.device import resolve_device
from vlmdistill.ema import StudentEMA
from vlmdistill.losses import LossInputs, Objective
from vlmdistill.runfolder import ModelMeta, SavedStudent
from vlmdistill.students import Student, create_student
from vlmdistill.targets.lookup import TargetLookup, open_targets
from vlmdistill.text.prompt_learner import PromptLearner
from vlmdistill.text.textbank import embed_texts
from vlmdistill.workspace import TrainSet, Workspace, class_text_embeddings, context_class_texts, unlabeled_source


@dataclass
class StepBatch:
    """The data side of one step, ready for the student: rendered pixels and the teacher's raw targets.

    The first ``len(index)`` rows are the labelled images ``index`` names; the last ``n_pool`` are pool images.
    Under DDP ``counts`` and ``pool_counts`` hold every rank's number of each, in rank order."""

    pixels: torch.Tensor
    index: torch.Tensor
    targets: torch.Tensor | None
    n_pool: int = 0
    counts: list[int] | None = None
    pool_counts: list[int] | None = None

    @property
    def global_rows(self) -> int:
        """Rows the student runs on in this step, over every rank: the compute a run reports."""
        return len(self.pixels) if self.counts is None else sum(self.counts) + sum(self.pool_counts or [])


@dataclass
class UnlabeledPool:
    """The pool's images and their own target lookup (same teacher and view recipe, the pool's store)."""

    source: ImageSource
    targets: TargetLookup
    ratio: float

    def draw(self, n_labelled: int, g: torch.Generator) -> Batch | None:
        """``ratio`` pool images per labelled one (of the global batch), distinct within the step, drawn from
        the step's generator (so a resumed run draws the same); this rank's slice of them is read. None when
        all of them are unreadable and skipped."""
        n = min(max(1, round(self.ratio * n_labelled)), len(self.source))
        index = distributed.shard(torch.randperm(len(self.source), generator=g)[:n])
        return next(iter(self.source.iter_batches([index])), None)


def open_pool(cfg: ExperimentConfig, ws: Workspace) -> UnlabeledPool | None:
    """The run's unlabelled pool with its own target lookup (opening, and if needed extracting, its store);
    None without a pool."""
    source = unlabeled_source(cfg, ws)
    if source is None:
        return None
    return UnlabeledPool(source, open_targets(cfg, ws.teacher, source, needed=True), cfg.data.unlabeled_ratio)


class DistillTask(nn.Module):
    """Everything with parameters or loss maths in one training run; built without touching the store."""

    def __init__(self, cfg: ExperimentConfig, ws: Workspace, train_set: TrainSet) -> None:
        super().__init__()
        self.cfg, self.train_set = cfg, train_set
        self.device = resolve_device(cfg.device)
        self.n_id = len(ws.dataset.id_space)
        self.closed_set = cfg.loss.closed_set
        self.teacher_id = ws.teacher.id
        self.w_id, self.w_ood = class_text_embeddings(cfg, ws)
        self.w_train = train_set.w.to(self.device)
        out_dim = self.n_id + len(ws.dataset.ood_space) if self.closed_set else ws.teacher.embed_dim
        self.student: Student = create_student(cfg.student, out_dim).to(self.device)
        self.ema = StudentEMA(self.student, cfg.train.ema_decay) if cfg.train.ema_decay is not None else None
        self.id_texts, self.ood_texts = context_class_texts(cfg, ws)
        self.prompts = _prompt_learner(cfg, ws, self.id_texts, self.ood_texts, len(train_set.w)).to(self.device) \
            if cfg.text.learn_context else None
        self.objective = Objective(cfg.loss)
        self.caption_embeddings = _caption_embeddings(cfg, ws, train_set) if "captions" in self.objective.needs \
            else None
        # Set by the training job before fitting (``open_targets``, ``open_pool``), so building a task touches
        # no store and decodes no pool.
        self.targets = TargetLookup(cfg, None)
        self.pool: UnlabeledPool | None = None
        self._ddp: nn.Module | None = None  # the student under DDP (``distribute``); not a registered submodule

    @property
    def wants_pool(self) -> bool:
        """Distillation only (few-shot finetuning has support images), with teacher targets, and only when a
        term runs on pool rows."""
        return self.train_set.support is None and self.objective.on_pool and self.targets.kind != "none"

    def load_saved(self, saved: SavedStudent) -> None:
        """Start from a saved student (and its learned context, when both learn one), as few-shot does."""
        saved.meta.check(ModelMeta.expected(self.cfg, self.teacher_id, self.student.out_dim), saved.source)
        self.student.load_state_dict(saved.weights)
        if self.ema is not None:
            self.ema.restart(self.student)
        if self.prompts is not None and saved.context is not None:
            with torch.no_grad():
                self.prompts.ctx.copy_(saved.context)

    # ------------------------------------------------------------------ one step
    def prepare(self, batch: Batch, g: torch.Generator) -> StepBatch:
        """Data side: ``train.views_per_step`` views per image (per batch in paper mode), the teacher's targets
        of those views, optional RandAugment, and the student's pixels on the device; then the pool images,
        prepared the same way. They are drawn from ``g`` after the labelled images' draws, so a run without a
        pool is unchanged. ``index`` then names the image of each labelled row (repeated per view)."""
        step = self._prepared(batch, self.targets, g)
        v = self.cfg.train.views_per_step
        n_global = sum(step.counts) // v if step.counts is not None else len(batch.index)
        extra = self.pool.draw(n_global, g) if self.pool is not None else None
        if extra is None and distributed.active() and self.pool is not None:
            extra = Batch(batch.images[:0], batch.index[:0])  # this rank's pool share was unreadable: no rows
        if extra is None:
            return step
        pool = self._prepared(extra, self.pool.targets, g)
        return StepBatch(torch.cat([step.pixels, pool.pixels]), step.index,
                         torch.cat([step.targets, pool.targets]), len(pool.index), step.counts, pool.counts)

    def _prepared(self, batch: Batch, lookup: TargetLookup, g: torch.Generator) -> StepBatch:
        """Under DDP the ranks first share how many images each holds, to draw for the global batch; with V
        views per image every image becomes V consecutive rows (``counts`` are then rows)."""
        v = self.cfg.train.views_per_step
        counts, n_global, offset = distributed.batch_layout(len(batch.index))
        views, targets = lookup(batch.index, batch.images, g, n_global, offset, per_image=v)
        images, index = batch.images, batch.index
        if v > 1:
            images, index = images.repeat_interleave(v, 0), index.repeat_interleave(v)
            counts = [c * v for c in counts] if counts else None
        if self.cfg.data.randaugment == "student":  # the paper's: the teacher's target does not see these ops
            images = randaugment(images, g, per_batch=self.cfg.data.augment_per == "batch", offset=offset * v)
        pixels = render(images, views, self.cfg.student.image_size).to(self.device, non_blocking=True)
        return StepBatch(pixels, index, targets, counts=counts)

    def forward(self, step: StepBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute side: the student's embedding of the view against the teacher's, the labels and the texts."""
        amp = self.cfg.train.amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=amp):
            s_raw = (self._ddp or self.student)(step.pixels).float()
        t_raw = step.targets.to(self.device) if step.targets is not None else None
        y = self.train_set.labels[step.index]
        c = self.caption_embeddings[step.index] if self.caption_embeddings is not None else None
        n_labelled, n_pool = len(step.index), step.n_pool
        if step.counts is not None:
            s_raw, t_raw, y, c = _global_rows(step, s_raw, t_raw, y, c)
            n_labelled, n_pool = sum(step.counts), sum(step.pool_counts or [0])
        labelled = None
        if n_pool:  # pool rows: no label (-1), no caption (zeros); only the label-free terms see them
            y = torch.cat([y, y.new_full((n_pool,), -1)])
            c = torch.cat([c, c.new_zeros(n_pool, c.shape[1])]) if c is not None else None
            labelled = (torch.arange(len(y)) < n_labelled).to(self.device)
        inputs = LossInputs(
            s=F.normalize(s_raw, dim=-1),
            y=y.to(self.device),
            w=self.prompts() if self.prompts is not None else self.w_train,
            t=F.normalize(t_raw, dim=-1) if t_raw is not None else None,
            s_raw=s_raw,
            t_raw=t_raw,
            c=c.to(self.device) if c is not None else None,
        )
        return self.objective(inputs, labelled)

    def distribute(self) -> None:
        """Under DDP: BatchNorm over the global batch (unless ``train.sync_batchnorm=false``), then the student
        wrapped in ``DistributedDataParallel`` for training steps (checkpoints and evaluation keep the bare one)."""
        if not distributed.active() or self._ddp is not None:
            return
        self.student, ddp = distributed.data_parallel(self.student, self.device, self.cfg.train.sync_batchnorm)
        object.__setattr__(self, "_ddp", ddp)

    # ------------------------------------------------------------------ what evaluation and checkpoints need
    @property
    def eval_student(self) -> nn.Module:
        """The student a run is scored and deployed as: the weight average with ``train.ema_decay``."""
        return self.ema.model if self.ema is not None else self.student

    def trainable(self) -> list[nn.Parameter]:
        """The student's parameters, plus the prompt context when it is learned (same lr and decay, as CoOp)."""
        return [*self.student.parameters(), *([self.prompts.ctx] if self.prompts is not None else [])]

    @torch.no_grad()
    def class_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ID and OOD class text embeddings (from the learned context when prompt learning is on), on CPU."""
        if self.prompts is None:
            return self.w_id.cpu(), self.w_ood.cpu()
        return self.prompts(self.id_texts).cpu(), self.prompts(self.ood_texts).cpu()

    def model_meta(self) -> ModelMeta:
        return ModelMeta.of(self.cfg, self.student, self.teacher_id)


def _global_rows(step: StepBatch, s_raw: torch.Tensor, t_raw: torch.Tensor | None, y: torch.Tensor,
                 c: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """Each rank's rows gathered into the global batch in one process's order: every rank's labelled rows,
    then every rank's pool rows. Only ``s_raw`` carries gradient (teacher targets and captions are constants)."""
    n, counts, pool_counts = len(step.index), step.counts, step.pool_counts
    s = distributed.gather_with_grad(s_raw[:n], counts)
    t = distributed.all_gather_tensors(t_raw[:n], counts) if t_raw is not None else None
    if pool_counts is not None:
        s = torch.cat([s, distributed.gather_with_grad(s_raw[n:], pool_counts)])
        t = torch.cat([t, distributed.all_gather_tensors(t_raw[n:], pool_counts)]) if t is not None else None
    c = distributed.all_gather_tensors(c, counts) if c is not None else None
    return s, t, distributed.all_gather_tensors(y, counts), c


def _prompt_learner(cfg: ExperimentConfig, ws: Workspace, id_texts: list[str], ood_texts: list[str],
                    n_train_classes: int) -> PromptLearner:
    """CoOp context over the training classes (ID, or ID then OOD when few-shot data is mixed in)."""
    train_texts = id_texts if n_train_classes == len(id_texts) else id_texts + ood_texts
    return PromptLearner(ws.teacher, train_texts, cfg.text.n_ctx)


def _caption_embeddings(cfg: ExperimentConfig, ws: Workspace, train_set: TrainSet) -> torch.Tensor:
    """Teacher text embeddings of each training image's caption (for L_cap), cached like class texts."""
    path = cfg.text.captions
    texts = captions_for(train_set.source.records, read_captions(path), path)
    return embed_texts(ws.teacher, texts, cfg.cache_dir)
