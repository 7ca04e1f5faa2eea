"""A run never records a broken model as a result, and a lost rank is one line, not a traceback.

Divergence: the loop checks what it is about to report or keep.

Loss terms are checked on logging steps (where they are read back from the device anyway), the weights
before every evaluation and every checkpoint. A non-finite value stops the run with ``Diverged``: no
evaluation of the broken weights, no checkpoint of them (the last good one stays current), and the job
writes ``results.json`` with ``complete: false`` and the failure. Under DDP every rank checks and the ranks
agree, so all of them stop at the same step.

A lost rank (``stop_on_lost_rank``): a collective failing because a process of the job is gone becomes
``RankLost``, naming the rank (from the heartbeats in ``distributed``) and the last complete checkpoint.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from vlmdistill import distributed
from vlmdistill.checkpoint import LoopState, intact_checkpoint
from vlmdistill.errors import RunError

if TYPE_CHECKING:
    from vlmdistill.results import RunResults


class Diverged(RunError):
    """Training produced a non-finite loss or weight; ``state`` holds the evaluations made before it."""

    def __init__(self, step: int, what: str, run_dir: Path, state: LoopState) -> None:
        self.step, self.what, self.state = step, what, state
        self.results: RunResults | None = None  # the job's record of ``state``, filled by the job that caught it
        self.checkpoint = intact_checkpoint(run_dir)
        super().__init__(
            f"training diverged at step {step}: {what}; nothing of it was evaluated or saved, {self.checkpoint} "
            "and results.json records the failure: lower optim.lr or set optim.grad_clip, then continue from that "
            "checkpoint with --resume --allow-config-change, or start again with --overwrite")

    def record(self) -> dict[str, Any]:
        """The failure as ``results.json`` keeps it."""
        return {"kind": "diverged", "step": self.step, "what": self.what, "checkpoint": self.checkpoint}

    def recorded(self, results: RunResults) -> Diverged:
        """This failure with ``results`` (the evaluations before it) marked failed, for the job to write."""
        results.failure = self.record()
        results.train = {**(results.train or {}), "steps": self.step, "seconds": None}
        self.results = results
        return self


def nonfinite_loss(terms: dict[str, torch.Tensor]) -> str | None:
    """The first loss term that is NaN or infinite, described; None when all are finite."""
    if not terms:
        return None
    values = torch.stack([v.detach().float().reshape(()) for v in terms.values()]).cpu()  # one sync
    bad = (~values.isfinite()).nonzero().flatten().tolist()
    if not bad:
        return None
    name = list(terms)[bad[0]]
    return f"loss term {name} is {values[bad[0]].item()}"


def nonfinite_weight(modules: dict[str, nn.Module | torch.Tensor | None]) -> str | None:
    """The first floating-point parameter or buffer holding NaN or infinity, described; None when all are
    finite. One read-back per module (on a GPU each is a sync)."""
    for prefix, module in modules.items():
        named = module.state_dict() if isinstance(module, nn.Module) else {"": module} if module is not None else {}
        tensors = {k: t.detach() for k, t in named.items() if t.is_floating_point()}
        if not tensors:
            continue
        finite = torch.stack([t.isfinite().all() for t in tensors.values()]).cpu()
        if bool(finite.all()):
            continue
        key, t = list(tensors.items())[int((~finite).nonzero()[0])]
        n = int((~t.isfinite()).sum())
        return f"{n} of {t.numel()} values of {'.'.join(filter(None, (prefix, key)))} are not finite"
    return None


def stop_if_diverged(step: int, what: str | None, run_dir: Path, state: LoopState) -> None:
    """Raise ``Diverged`` for ``what`` (a finding of ``nonfinite_*``); under DDP on every rank when any rank
    found one, so all of them stop at the same step."""
    if distributed.agree_max(int(what is not None)):
        raise Diverged(step, what or "another process found a non-finite value", run_dir, state)


class RankLost(RunError):
    """Another process of a torchrun job is gone (killed, or its node lost); ``speaks``: whether this survivor
    is the one that reports it (the lowest surviving rank), so a job prints one line."""

    def __init__(self, lost: list[int] | None, cause: str, run_dir: Path) -> None:
        world = distributed.world_size()
        if lost is None:
            who = "a rank (which one is unknown: the rendezvous store is unreachable too)"
        else:
            who = f"rank {', '.join(map(str, lost))}" if lost else "contact with another rank (all still beat)"
        survivors = sorted(set(range(world)) - set(lost or []))
        self.speaks = lost is None or not survivors or distributed.rank() == survivors[0]
        super().__init__(f"lost {who} of {world} processes ({cause}): its process or node is gone; "
                         f"{intact_checkpoint(run_dir)}")


@contextmanager
def stop_on_lost_rank(run_dir: Path) -> Iterator[None]:
    """Turn a collective that failed because a rank is gone into ``RankLost``, which names it, instead of a
    gloo/NCCL traceback; SIGTERM and SIGINT (torchrun stopping the survivors) no longer cut that line short."""
    try:
        yield
    except RuntimeError as err:
        if not distributed.peer_lost(err):
            raise
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, signal.SIG_IGN)
        cause = next(s for s in distributed.PEER_GONE if s in str(err))
        raise RankLost(distributed.lost_ranks(), cause, run_dir) from None
