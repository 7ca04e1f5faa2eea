"""``vlmdistill ARGS`` as a real process, forked from a forkserver that imported the toolkit once (a fork,
not a fresh interpreter), with its exit code and output; optionally with a fault planted in that child alone."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from pathlib import Path

import torch

_CTX = mp.get_context("forkserver")
_CTX.set_forkserver_preload(["vlmdistill.cli", "vlmdistill.train", "vlmdistill.evaluate"])


def _sigkill_self(*args: object, **kwargs: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _plant(fault: str | None) -> None:
    """``kill_in_analysis``: the process is SIGKILLed as the analysis phase starts (after training's results)."""
    if fault == "kill_in_analysis":
        import vlmdistill.train

        vlmdistill.train.analyse = _sigkill_self  # type: ignore[assignment]


def _cli_child(args: list[str], log: str, fault: str | None) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    torch.set_num_threads(1)
    _plant(fault)
    from vlmdistill.cli import app

    app(args, prog_name="vlmdistill")


class Child:
    """``vlmdistill ARGS`` in a forked process, its output in ``log``."""

    def __init__(self, args: list[str], log: Path, fault: str | None = None) -> None:
        self.log = log
        self.proc = _CTX.Process(target=_cli_child, args=(args, str(log), fault))
        self.proc.start()

    @property
    def pid(self) -> int:
        return int(self.proc.pid or 0)

    def wait(self, timeout: float = 120) -> int:
        self.proc.join(timeout)
        assert self.proc.exitcode is not None, f"still running after {timeout}s: {self.output()}"
        return self.proc.exitcode

    def output(self) -> str:
        """Everything it printed, whitespace collapsed (the console wraps long lines)."""
        return " ".join(self.log.read_text(errors="replace").split()) if self.log.exists() else ""

    def run(self, timeout: float = 120) -> tuple[int, str]:
        return self.wait(timeout), self.output()
