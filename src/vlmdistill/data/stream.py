"""Reading tar shard members: one member by byte offset, or whole shards streamed in order, the shards split
across ranks and DataLoader workers (``assign_shards``). Layout and index: ``data/shards.py``."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from vlmdistill.data.compact import Record, Records, record_key_path
from vlmdistill.data.images import BadImageError, Interpolation, ResizeMode, decode_image


def read_member(record: Record) -> bytes:
    """The image bytes of a shard member (one ``pread``: safe in forked workers sharing nothing)."""
    fd = os.open(record.shard, os.O_RDONLY)
    try:
        data = os.pread(fd, record.size, record.offset)
    finally:
        os.close(fd)
    if len(data) != record.size:
        raise OSError(f"shard ends after {len(data)} of the member's {record.size} bytes (truncated shard)")
    return data


def assign_shards(n_shards: int, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1
                  ) -> list[int]:
    """The shards one DataLoader worker of one rank reads: ``range(n)[rank::world_size][worker::num_workers]``.

    Every shard goes to exactly one (rank, worker); a rank with no shard (more ranks than shards) gets none.
    """
    if not (0 <= rank < world_size and 0 <= worker < num_workers):
        raise ValueError(f"rank {rank} of {world_size}, worker {worker} of {num_workers}: out of range")
    return list(range(n_shards))[rank::world_size][worker::num_workers]


def shard_groups(records: Sequence[Record]) -> list[list[int]]:
    """Indices of ``records`` grouped by shard (in first-seen shard order), each group in byte-offset order."""
    if isinstance(records, Records) and records.members is not None:
        m = records.members
        order = np.lexsort((m.offset, m.shard))
        cuts = np.flatnonzero(np.diff(m.shard[order])) + 1
        return [g.tolist() for g in np.split(order, cuts) if len(g)]
    groups: dict[Path, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r.shard, []).append(i)
    return [sorted(g, key=lambda i: records[i].offset) for g in groups.values()]


class ShardStream(IterableDataset):
    """Every member of a rank's shards, read shard by shard: ``item(i)`` for each index, in offset order.

    Shards are split across ranks by (``rank``, ``world_size``) and across the DataLoader's workers.
    """

    def __init__(self, groups: list[list[int]], item: Callable[[int], tuple[torch.Tensor, int, bool]],
                 rank: int = 0, world_size: int = 1) -> None:
        self.groups, self.item, self.rank, self.world_size = groups, item, rank, world_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, int, bool]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        for n in assign_shards(len(self.groups), self.rank, self.world_size, worker, workers):
            for i in self.groups[n]:
                yield self.item(i)



def load_member(record: Record, base_size: int, resize: ResizeMode, interpolation: Interpolation) -> torch.Tensor:
    """A shard member decoded as ``load_image`` decodes a file; unreadable bytes are a ``BadImageError``
    naming ``<shard>.tar:<key>``."""
    name = record_key_path(record)
    try:
        data = read_member(record)
    except OSError as err:
        raise BadImageError(Path(name), f"{type(err).__name__}: {err}") from err
    return decode_image(data, name, base_size, resize, interpolation)
