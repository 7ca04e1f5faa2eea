"""torchrun DDP in one place: the process group, who does what, and the collectives the loop and loss need.

Every function here is a no-op (or the identity) in a single process, so the one-process path is the code
that ran before DDP existed. ``init_from_env`` reads torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``: NCCL
on CUDA (one GPU per process, ``LOCAL_RANK``), gloo on CPU. Rank 0 alone writes (run folder, checkpoints,
results, logs, the target store manifest); the other ranks wait at ``barrier`` where they read what it wrote.

A global batch is split in contiguous slices (``shard``), rank r taking rows ``[r n / W, (r + 1) n / W)``, so
gathering the slices in rank order (``gather_with_grad``, ``all_gather_tensors``) rebuilds the batch in the
order one process would hold it.
"""

from __future__ import annotations

import os
import re
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
from torch import nn

from vlmdistill.errors import VlmdistillError

warnings.filterwarnings("ignore", message="torch.distributed.nn.functional", category=FutureWarning)


def init_from_env() -> bool:
    """Join the process group torchrun describes in the environment; False (nothing done) without torchrun."""
    if dist.is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    torch.set_num_threads(pinned_threads())
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    else:
        dist.init_process_group("gloo")
    _start_heartbeat()
    return True


def pinned_threads() -> int:
    """Intra-op threads of every rank: ``OMP_NUM_THREADS`` when set, else 1. torchrun sets it to 1 only when a
    node runs several processes, so 1 node x 2 processes ran on one thread and 2 nodes x 1 process on every
    core, and their float sums, hence their weights, differed; pinned, the layout does not change a number."""
    found = re.match(r"\s*(\d+)", os.environ.get("OMP_NUM_THREADS", ""))
    return max(1, int(found.group(1))) if found else 1


def shutdown() -> None:
    """Leave the process group; not after a rank was lost, where tearing down a broken group can block."""
    if dist.is_initialized() and not _LOST:
        dist.destroy_process_group()


# ---- a lost rank: which one, without hanging -------------------------------------------------------------

_HEARTBEAT_S, _LOST = 0.5, []  # _LOST: set once a collective failed because a rank is gone
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused",
             "Socket Timeout", "Timed out waiting", "NCCL communicator was aborted", "collective operation timeout")
"""What gloo and NCCL say when a collective fails because the other end is gone (or silent past the timeout)."""


def _store(timeout_s: float = 5.0) -> Any:
    """A client of the job's rendezvous store (torchrun's agent holds it), or None where it is unreachable."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        return dist.TCPStore(host, int(port), is_master=False, timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError):
        return None


def _start_heartbeat() -> None:
    """Each rank counts up its key in the store twice a second, so a survivor can tell which rank stopped."""
    store, key = _store(), f"vlmdistill/alive/{rank()}"
    if store is None:
        return

    def beat() -> None:
        while True:
            try:
                store.add(key, 1)
            except RuntimeError:  # the store is gone: the job is ending
                return
            time.sleep(_HEARTBEAT_S)

    threading.Thread(target=beat, name="vlmdistill-heartbeat", daemon=True).start()


def peer_lost(err: BaseException) -> bool:
    """Whether ``err`` is a collective that failed because another process of the job is gone."""
    ours = isinstance(err, VlmdistillError)
    return active() and isinstance(err, RuntimeError) and not ours and any(s in str(err) for s in PEER_GONE)


def lost_ranks(window_s: float = 4 * _HEARTBEAT_S) -> list[int] | None:
    """The ranks whose heartbeat stopped (their process or node is gone), from a look over ``window_s``; None
    when the store is unreachable as well. Marks the group broken, so ``shutdown`` does not wait on it."""
    _LOST.append(True)
    store = _store()
    if store is None:
        return None
    keys = [f"vlmdistill/alive/{r}" for r in range(world_size())]
    try:
        before = [store.add(k, 0) for k in keys]
        time.sleep(window_s)
        after = [store.add(k, 0) for k in keys]
    except RuntimeError:
        return None
    return [r for r, (a, b) in enumerate(zip(before, after, strict=True)) if a == b]


def active() -> bool:
    return dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (e.g. until rank 0 has written what the others read next)."""
    if active():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[bool]:
    """Rank 0 runs the block first (writing), then the others (reading what it wrote); yields ``is_main()``."""
    if not is_main():
        barrier()
    try:
        yield is_main()
    finally:
        if is_main():
            barrier()


def shard(index: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch of indices (the whole batch in one process)."""
    n, w, r = len(index), world_size(), rank()
    return index[r * n // w : (r + 1) * n // w]


def _device() -> torch.device:
    """Where collectives run: NCCL wants CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sizes(n: int) -> list[int]:
    """Every rank's ``n``, in rank order."""
    if not active():
        return [n]
    out = torch.zeros(world_size(), dtype=torch.long, device=_device())
    dist.all_gather_into_tensor(out, torch.tensor([n], dtype=torch.long, device=_device()))
    return out.tolist()


def _padded(x: torch.Tensor, most: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(most - len(x), *x.shape[1:])]) if len(x) < most else x


def gather_with_grad(x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """Every rank's rows of ``x`` concatenated in rank order, differentiable (as open_clip's ``gather_features``
    with ``gather_with_grad=True``). The backward sums each rank's gradient into the rows it owns; ``counts``
    (from ``sizes``) saves one collective when known. Ranks may hold different numbers of rows."""
    if not active():
        return x
    counts = counts or sizes(len(x))
    parts = dist_nn.all_gather(_padded(x, max(counts)))
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])


@torch.no_grad()
def all_gather_tensors(x: torch.Tensor, counts: list[int] | None = None) -> torch.Tensor:
    """As ``gather_with_grad`` without a graph (evaluation features, indices); the result is on ``x``'s device."""
    if not active():
        return x
    counts = counts or sizes(len(x))
    local = _padded(x, max(counts)).to(_device())
    parts = [torch.empty_like(local) for _ in counts]
    dist.all_gather(parts, local)
    return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(x.device)


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def agree_max(value: int) -> int:
    """The largest ``value`` over the ranks: so that one rank's stop signal stops all of them at the same step."""
    if not active():
        return value
    t = torch.tensor([value], dtype=torch.long, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t)


class CpuSyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the global batch on CPU (gloo), where ``nn.SyncBatchNorm`` refuses to run (and DDP refuses
    ``SyncBatchNorm`` layers), so the DDP path is testable without a GPU.

    In training mode under DDP the batch statistics are all-reduced with autograd (sum and count, then the
    centred sum of squares: the two-pass variance one process computes), so the forward normalises over the
    global batch and the backward is its exact adjoint; otherwise it is plain BatchNorm."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = [0, *range(2, x.dim())]
        shape = (1, -1, *([1] * (x.dim() - 2)))
        first = dist_nn.all_reduce(torch.cat([x.sum(dims), x.new_full((1,), x.numel() / x.shape[1])]))
        n = first[-1]
        mean = first[:-1] / n
        var = dist_nn.all_reduce((x - mean.view(shape)).pow(2).sum(dims)) / n
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * n / (n - 1).clamp(min=1))
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return y * self.weight.view(shape) + self.bias.view(shape) if self.affine else y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        m = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - m).add_(m * mean)
        self.running_var.mul_(1 - m).add_(m * var)


def sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm layer normalising over the global batch: ``nn.SyncBatchNorm`` on a GPU,
    ``CpuSyncBatchNorm`` on CPU; parameters and buffers are shared, state_dict keys unchanged."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, CpuSyncBatchNorm):
        out = CpuSyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats)
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, sync_batchnorm(child, device))
    return module


def data_parallel(module: nn.Module, device: torch.device, sync_bn: bool
                  ) -> tuple[nn.Module, nn.parallel.DistributedDataParallel]:
    """A task's model for DDP training: BatchNorm over the global batch (``sync_bn``), then wrapped in
    ``DistributedDataParallel``. Returns the bare module (what checkpoints and evaluation keep) and the wrapper
    (what training steps call)."""
    if sync_bn:
        module = sync_batchnorm(module, device)
    ids = [torch.cuda.current_device() if device.index is None else device.index] if device.type == "cuda" else None
    return module, nn.parallel.DistributedDataParallel(module, device_ids=ids)


def batch_layout(n: int) -> tuple[list[int] | None, int, int]:
    """This rank's place in a global batch of which it holds ``n`` rows: every rank's count (None in one
    process), the global size and this rank's first row, so that draws made for the whole batch are sliced
    as one process would use them."""
    if not active():
        return None, n, 0
    counts = sizes(n)
    return counts, sum(counts), sum(counts[: rank()])
