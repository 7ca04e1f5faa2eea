"""What a training run tells the outside while it runs: TensorBoard scalars, and either a progress bar
(on a terminal) or plain lines (in a log file or pipe: one per outer epoch, one per evaluation, and one
at least every ``train.log_minutes``). Loss values are read back from the device only here, on logging
steps, epoch ends and timed lines. Under DDP only rank 0 logs (every rank's loss is the global batch's).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter

from vlmdistill import distributed
from vlmdistill.config import ExperimentConfig
from vlmdistill.progress import console, interactive, make_progress


class TrainLog:
    def __init__(self, cfg: ExperimentConfig, total: int, steps_per_epoch: int, done: int) -> None:
        self.cfg, self.total, self.steps_per_epoch, self.done = cfg, total, steps_per_epoch, done
        self.main = distributed.is_main()
        self.writer = SummaryWriter(str(cfg.run_dir / "tensorboard")) if self.main else None
        self.bar = make_progress(cfg.train.progress and self.main, plain_lines=False)  # plain lines: written here
        self.plain = cfg.train.progress and self.main and not interactive()
        self.start = self.last_line = time.monotonic()

    def __enter__(self) -> TrainLog:
        self.bar.__enter__()
        self.task = self.bar.add_task(self.cfg.name, total=self.total, completed=self.done, info="")
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.__exit__(*exc)
        if self.writer is not None:
            self.writer.close()

    def step(self, step: int, epoch: int, terms: dict[str, torch.Tensor], optimizer: Any) -> None:
        if self.writer is None:
            return
        epoch_end = step % self.steps_per_epoch == 0
        timed = self.plain and time.monotonic() - self.last_line >= 60 * self.cfg.train.log_minutes
        if step % self.cfg.train.log_every and step != self.total and not epoch_end and not timed:
            self.bar.update(self.task, completed=step)
            return
        values = {k: float(v) for k, v in terms.items()}  # the sync point
        lr = optimizer.param_groups[0]["lr"]
        for k, v in values.items():
            self.writer.add_scalar(f"train/{k}", v, step)
        self.writer.add_scalar("train/lr", lr, step)
        info = " ".join(f"{k}={v:.3f}" for k, v in values.items())
        self.bar.update(self.task, completed=step, info=f"ep {epoch + 1}/{self.cfg.optim.epochs} {info}")
        if self.plain and (epoch_end or timed):
            self._line(step, epoch, f"{info} lr={lr:.4g}")

    def metrics(self, metrics: dict[str, Any], epoch: int) -> None:
        if self.writer is None:
            return
        for split, values in metrics.items():
            for k, v in (values or {}).items():
                self.writer.add_scalar(f"eval/{split}/{k}", v, epoch)
        if self.plain:
            multi = any(values and "f1" in values for values in metrics.values())  # Table 12's columns
            key, unit = ("f1", "F1 %") if multi else ("mean_per_class_recall", "mean per-class accuracy %")
            scores = " ".join(f"{split}={values[key]:.2f}" for split, values in metrics.items()
                              if values and key in values)
            console.print(f"{self.cfg.name} eval epoch {epoch}/{self.cfg.optim.epochs}: {scores} ({unit})",
                          highlight=False)

    def _line(self, step: int, epoch: int, info: str) -> None:
        elapsed = time.monotonic() - self.start
        rate = (step - self.done) * self.cfg.optim.batch_size / max(elapsed, 1e-9)
        console.print(f"{self.cfg.name} epoch {epoch + 1}/{self.cfg.optim.epochs} step {step}/{self.total} {info} "
                      f"{rate:.1f} img/s {elapsed:.0f}s", highlight=False)
        self.last_line = time.monotonic()
