"""The training loop: one global step counter (as nanoGPT's ``iter_num``), run until the last step or a stop
signal.

Epoch, data pass and batch are derived from the step (``LoopShape.coords``); every random draw comes
from a generator seeded by those coordinates, so a run resumed at any step is identical to one that
never stopped. Each outer epoch runs ``optim.repeat_epochs`` passes over the data, as in the paper; the
per-epoch schedule, evaluation and checkpoints happen at its end. Loss values are read back from the
device only on logging steps.

Under torchrun DDP the global batches are the same (they depend on the seed, never on the world size); each
rank reads its contiguous slice (``distributed.shard``) and the task rebuilds the global batch for the loss.
Every rank runs the same steps and evaluations; rank 0 alone writes logs and checkpoints. A checkpoint holds
nothing per rank, so it resumes under any number of processes. Starting a run (its config, clearing an old
one's checkpoints) is the training job's (``train.py``); the loop only continues from what is there.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import torch

from vlmdistill import distributed
from vlmdistill.checkpoint import LoopState, intact_checkpoint, save_checkpoint
from vlmdistill.config import ExperimentConfig
from vlmdistill.data.source import Batch
from vlmdistill.errors import RunError
from vlmdistill.integrity import nonfinite_loss, nonfinite_weight, stop_if_diverged
from vlmdistill.io import out_of_space
from vlmdistill.progress import console
from vlmdistill.runfolder import RunFolder
from vlmdistill.task import DistillTask, StepBatch
from vlmdistill.trainlog import TrainLog
from vlmdistill.workspace import TrainSet

Evaluate = Callable[[], dict[str, Any]]


def step_seed(*parts: int) -> int:
    """A generator seed from loop coordinates, so any step's randomness can be recreated on resume."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (p + 0x9E3779B9)) * 1099511628211) % (2**63)
    return h


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
            rest = base[b * half : (b + 1) * half]  # the last batch holds the remainder: no wrap-around
            out.append(torch.cat([shots, rest]))
        return out
    per = max(batch_size - len(support), 1)
    return [torch.cat([support, chunk]) for chunk in base.split(per)] or [support]


def pass_batches(cfg: ExperimentConfig, train_set: TrainSet, epoch: int, pass_index: int) -> list[torch.Tensor]:
    """The index batches of one data pass, recreated identically from (seed, epoch, pass) on resume."""
    g = torch.Generator().manual_seed(step_seed(cfg.seed, epoch, pass_index))
    if train_set.support is None:
        return list(torch.randperm(len(train_set.labels), generator=g).split(cfg.optim.batch_size))
    idx = torch.arange(len(train_set.support))
    return balanced_batches(idx[~train_set.support], idx[train_set.support], cfg.optim.batch_size, g)


@dataclass(frozen=True)
class LoopShape:
    """How the global step maps to (outer epoch, data pass, batch)."""

    steps_per_pass: int
    passes_per_epoch: int
    epochs: int

    @classmethod
    def of(cls, cfg: ExperimentConfig, train_set: TrainSet) -> LoopShape:
        return cls(len(pass_batches(cfg, train_set, 0, 0)), cfg.optim.repeat_epochs, cfg.optim.epochs)

    @property
    def steps_per_epoch(self) -> int:
        return self.steps_per_pass * self.passes_per_epoch

    @property
    def total(self) -> int:
        return self.steps_per_epoch * self.epochs

    def coords(self, step: int) -> tuple[int, int, int]:
        epoch, within = divmod(step, self.steps_per_epoch)
        return (epoch, *divmod(within, self.steps_per_pass))


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
        per_step = o.onecycle_per == "step"
        total = o.epochs * steps_per_epoch if per_step else o.epochs
        return opt, torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=o.lr, total_steps=max(total, 2)), per_step
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0), False


def train_step(task: DistillTask, optimizer: torch.optim.Optimizer, batch: StepBatch) -> dict[str, torch.Tensor]:
    """Loss terms of one prepared batch, backward, (clipped) optimiser step; the terms stay on the device."""
    loss, terms = task(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if task.cfg.optim.grad_clip:
        torch.nn.utils.clip_grad_norm_(task.trainable(), task.cfg.optim.grad_clip)
    optimizer.step()
    if task.ema is not None:
        task.ema.update(task.student)
    return terms


@dataclass
class FitResult:
    state: LoopState
    seconds: float
    complete: bool


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped a run after a step; its checkpoint at ``step`` is saved, so it can resume."""

    def __init__(self, signum: int, step: int, total: int, run_dir: Path) -> None:
        super().__init__(f"{signal.Signals(signum).name}: {run_dir} stopped at step {step} of {total}")
        self.signum, self.step, self.total, self.run_dir = signum, step, total, run_dir

    @property
    def exit_code(self) -> int:
        """What a shell reports for a process killed by the signal: 130 for SIGINT, 143 for SIGTERM."""
        return 128 + self.signum


class StopSignals:
    """While active, SIGINT and SIGTERM (SLURM preemption) only ask the loop to stop after its step; a
    second one does what it did before. Installed in the main thread only; the old handlers come back."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # asked twice: stop now, as without us
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
            return
        self.signum = signum
        console.print(f"{signal.Signals(signum).name}: saving a checkpoint after this step "
                      "(send it again to stop at once)")

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def fit(task: DistillTask, evaluate: Evaluate, resume: bool = False) -> FitResult:
    """Train ``task`` as its config says, evaluating and checkpointing at the end of outer epochs.

    SIGINT/SIGTERM stop it after the current step with a checkpoint there, raising ``RunInterrupted``."""
    cfg, run_dir = task.cfg, task.cfg.run_dir
    _check_world_size(cfg, task.train_set)
    task.distribute()
    shape = LoopShape.of(cfg, task.train_set)
    optimizer, scheduler, per_step = build_optimizer(cfg, task.trainable(), shape.steps_per_epoch)
    torch.manual_seed(cfg.seed)
    state = LoopState()
    if resume and RunFolder(run_dir).has_checkpoint():
        state = restore(task, optimizer, scheduler)
        console.print(f"resumed {run_dir} at step {state.step} of {shape.total}")
    stop_at = shape.total if cfg.train.max_steps is None else min(shape.total, cfg.train.max_steps)
    start = time.perf_counter()
    task.student.train()
    batches: Iterator[Batch] | None = None
    with StopSignals() as stop, TrainLog(cfg, shape.total, shape.steps_per_epoch, state.step) as log:
        while state.step < stop_at and not _stop_asked(stop):
            epoch, pass_index, batch_index = shape.coords(state.step)
            if batches is None or batch_index == 0:
                order = pass_batches(cfg, task.train_set, epoch, pass_index)[batch_index:]
                batches = iter(task.train_set.source.iter_batches([distributed.shard(b) for b in order]))
            try:
                batch = next(batches, None)  # None only when a whole batch was unreadable and skipped
            except RuntimeError:  # a loader worker killed by the same SIGTERM: stop here, at this step
                if stop.signum is None:
                    raise
                break
            if batch is None and distributed.active():  # the other ranks still step: take part with no rows
                batch = _no_rows(task.train_set.source.base_size)
            if batch is not None:
                g = torch.Generator().manual_seed(step_seed(cfg.seed, epoch, pass_index, batch_index, 1))
                step = task.prepare(batch, g)
                terms = train_step(task, optimizer, step)
                state.student_images += step.global_rows
                log.step(state.step + 1, epoch, terms, optimizer)
                if _logging_step(cfg, shape, state.step + 1, stop_at):
                    stop_if_diverged(state.step + 1, nonfinite_loss(terms), run_dir, state)
            if per_step:
                scheduler.step()
            state.step += 1
            if state.step % shape.steps_per_epoch == 0:
                _end_of_epoch(task, evaluate, state, state.step // shape.steps_per_epoch, (optimizer, scheduler),
                              per_step, log)
    complete = state.step == shape.total
    if not complete:
        save(task, optimizer, scheduler, state)
    if stop.signum is not None and not complete:
        raise RunInterrupted(stop.signum, state.step, shape.total, run_dir)
    return FitResult(state, time.perf_counter() - start, complete)


def _check_world_size(cfg: ExperimentConfig, train_set: TrainSet) -> None:
    """Every rank needs at least one image of every global batch (an empty slice cannot be told apart from
    unreadable images by the loader)."""
    smallest = min((len(b) for b in pass_batches(cfg, train_set, 0, 0)), default=0)
    if smallest < distributed.world_size():
        raise RunError(f"a global batch of {smallest} images cannot be split over {distributed.world_size()} "
                       "processes: use fewer processes, or a batch size and training set with at least one image "
                       "per process in every batch (the last batch holds the remainder)")


def _logging_step(cfg: ExperimentConfig, shape: LoopShape, step: int, last: int) -> bool:
    """The steps whose loss terms are read back and checked: every ``train.log_every``-th, each epoch's last and
    the run's last (TrainLog's, less its timed lines: those are rank 0's alone)."""
    return step % cfg.train.log_every == 0 or step % shape.steps_per_epoch == 0 or step == last


def _check_weights(task: DistillTask, state: LoopState) -> None:
    """Stop before broken weights are evaluated or saved (``integrity``)."""
    ctx = task.prompts.ctx if task.prompts is not None else None
    average = task.ema.model if task.ema is not None else None
    stop_if_diverged(state.step, nonfinite_weight({"": task.student, "prompt context": ctx, "weight average": average}),
                     task.cfg.run_dir, state)


def _stop_asked(stop: StopSignals) -> bool:
    """Whether a stop signal came; under DDP the first one any rank received stops every rank at this step."""
    stop.signum = distributed.agree_max(stop.signum or 0) or None
    return stop.signum is not None


def _no_rows(base_size: int) -> Batch:
    return Batch(torch.zeros(0, 3, base_size, base_size, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))


def _end_of_epoch(task: DistillTask, evaluate: Evaluate, state: LoopState, epochs_done: int,
                  optim: tuple[Any, Any], per_step: bool, log: TrainLog) -> None:
    """The per-epoch schedule, then evaluation and a checkpoint when due (always after the last epoch)."""
    cfg, (optimizer, scheduler) = task.cfg, optim
    if not per_step:
        scheduler.step()
    last = epochs_done == cfg.optim.epochs
    in_tail = epochs_done > cfg.optim.epochs - cfg.train.average_last  # the epochs the headline averages
    if last or in_tail or epochs_done % cfg.train.eval_every == 0:
        _check_weights(task, state)
        metrics = evaluate()
        state.history.append({"epoch": epochs_done, "step": state.step, **metrics})
        log.metrics(metrics, epochs_done)
    if last or epochs_done % cfg.train.checkpoint_every == 0:
        save(task, optimizer, scheduler, state)


def save(task: DistillTask, optimizer: Any, scheduler: Any, state: LoopState) -> None:
    """Student weights, optimiser/scheduler/RNG/loop state and the learned prompt context: one unit, written
    by rank 0 (every rank holds the same weights and state); never weights that are not finite."""
    _check_weights(task, state)
    if not distributed.is_main():
        return
    ctx = task.prompts.ctx.detach() if task.prompts is not None else None
    run_dir = task.cfg.run_dir
    with out_of_space(f"checkpoint step {state.step}", run_dir / "checkpoints",
                      lambda: f"{intact_checkpoint(run_dir)}; free space there"):
        save_checkpoint(run_dir, task.student, optimizer, scheduler, state, task.model_meta().to_strings(), ctx,
                        task.ema)


def restore(task: DistillTask, optimizer: Any, scheduler: Any) -> LoopState:
    """The newest checkpoint that verifies (with its own prompt context), falling back to the one before."""
    ctx = task.prompts.ctx if task.prompts is not None else None
    return RunFolder(task.cfg.run_dir).resume(task.student, optimizer, scheduler, ctx, task.ema)
