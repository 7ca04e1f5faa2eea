"""Base images of one split, decoded in DataLoader workers or held in memory, served in index batches.

With ``decode_device`` set (``data.decode=device``) the workers only read JPEG bytes and the main process
decodes each batch on that device (``data/device_decode.py``); batches then hold images on that device.

A bad image never stops a run silently: it raises ``BadImageError`` naming the file, or, with
``skip_bad``, is dropped from its batch and remembered so results.json can count it.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torch.utils.data import Dataset as TorchDataset

from vlmdistill.data.compact import record_key_path
from vlmdistill.data.dataset import Record
from vlmdistill.data.device_decode import collate_encoded, decode_batch, read_encoded
from vlmdistill.data.images import BadImageError, Interpolation, ResizeMode, load_image
from vlmdistill.data.stream import ShardStream, load_member, shard_groups


def _ignore_stop_signals(_: int) -> None:
    """Workers leave Ctrl-C (sent to the whole process group) to the main process, which saves a checkpoint
    and stops them. SIGTERM keeps its default: torch and multiprocessing stop workers with it, and a worker
    that SLURM's SIGTERM kills mid-step is handled by the loop as the stop it is."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass
class Batch:
    images: torch.Tensor
    index: torch.Tensor


class _Decoded(TorchDataset):
    """Decoded images; with ``encoded``, a plain JPEG's bytes instead (``device_decode.read_encoded``)."""

    def __init__(self, records: Sequence[Record], base_size: int, resize: ResizeMode, skip_bad: bool,
                 interpolation: Interpolation, encoded: bool = False) -> None:
        self.records, self.base_size, self.resize, self.skip_bad = records, base_size, resize, skip_bad
        self.interpolation, self.encoded = interpolation, encoded

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        r = self.records[i]
        try:
            if self.encoded:
                return read_encoded(r, self.base_size, self.resize, self.interpolation), i, True
            if r.shard is not None:
                return load_member(r, self.base_size, self.resize, self.interpolation), i, True
            return load_image(r.path, self.base_size, self.resize, self.interpolation), i, True
        except BadImageError:
            if not self.skip_bad:
                raise
            return torch.zeros(3, self.base_size, self.base_size, dtype=torch.uint8), i, False


class _PassBatches:
    """A batch sampler whose batches are set before each pass, so one DataLoader, and its worker
    processes, serve every pass instead of starting new workers each time."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class ImageSource:
    """Serves ``Batch``es of base images for any order of indices (loose files, or tar shard members read by
    byte offset)."""

    records: Sequence[Record]
    base_size: int
    resize: ResizeMode
    num_workers: int = 0
    skip_bad: bool = False
    preload: bool = False
    interpolation: Interpolation = "bicubic"
    decode_device: torch.device | None = None
    bad: set[int] = field(default_factory=set)
    _images: torch.Tensor | None = None
    _loader: DataLoader | None = field(default=None, repr=False)
    _sampler: _PassBatches = field(default_factory=_PassBatches, repr=False)

    def __post_init__(self) -> None:
        self._dataset = _Decoded(self.records, self.base_size, self.resize, self.skip_bad, self.interpolation,
                                 encoded=self.decode_device is not None)
        self._collate = collate_encoded if self.decode_device is not None else None
        if self.preload and len(self.records) and self.records[0].shard is not None:
            self._images = self._preload_shards()
        elif self.preload:
            chunks = list(self._stream([b.tolist() for b in torch.arange(len(self.records)).split(256)], keep_bad=True))
            self._images = torch.cat([c.images.cpu() for c in chunks]) if chunks else None

    def _preload_shards(self) -> torch.Tensor:
        """Every image, read shard by shard (each worker streams whole shards) and placed at its index."""
        images = torch.zeros(len(self.records), 3, self.base_size, self.base_size, dtype=torch.uint8)
        stream = ShardStream(shard_groups(self.records), self._dataset.__getitem__)
        for batch, index, ok in DataLoader(stream, batch_size=256, num_workers=self.num_workers,
                                           worker_init_fn=_ignore_stop_signals, collate_fn=self._collate):
            batch, ok = self._on_device(batch, index, ok)
            images[index] = batch.cpu()
            self.bad.update(index[~ok].tolist())
        return images

    def __len__(self) -> int:
        return len(self.records)

    def subset(self, index: list[int]) -> ImageSource:
        """Some of the images, sharing the already-decoded pixels when preloaded."""
        sub = self.like([self.records[i] for i in index])
        if self._images is not None:
            sub._images = self._images[torch.tensor(index, dtype=torch.long)]
        sub.bad = {j for j, i in enumerate(index) if i in self.bad}
        return sub

    def concat(self, other: ImageSource) -> ImageSource:
        """This source followed by ``other`` (indices of ``other`` shift by ``len(self)``)."""
        both = self.like(self.records + other.records)
        if self._images is not None and other._images is not None:
            both._images = torch.cat([self._images, other._images])
        both.bad = self.bad | {len(self) + i for i in other.bad}
        return both

    def like(self, records: Sequence[Record]) -> ImageSource:
        """Other images decoded the same way (nothing preloaded)."""
        return ImageSource(records, self.base_size, self.resize, self.num_workers, self.skip_bad,
                           interpolation=self.interpolation, decode_device=self.decode_device)

    @property
    def bad_keys(self) -> list[str]:
        return sorted(self.records[i].key for i in self.bad)

    def _on_device(self, images: torch.Tensor | list[torch.Tensor], index: torch.Tensor, ok: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """A loader batch as uint8 [B, 3, S, S]: as collated, or (``decode_device``) decoded there."""
        if self.decode_device is None:
            return images, ok
        names = [Path(record_key_path(self.records[i])) for i in index.tolist()]
        images, decoded = decode_batch(images, names, self.base_size, self.resize, self.interpolation,
                                       self.decode_device, self.skip_bad)
        return images, ok & decoded

    def _stream(self, batches: list[list[int]], keep_bad: bool = False) -> Iterator[Batch]:
        if self.num_workers == 0:
            loader = DataLoader(self._dataset, batch_sampler=batches, collate_fn=self._collate)
        else:
            if self._loader is None:
                self._loader = DataLoader(self._dataset, batch_sampler=self._sampler, num_workers=self.num_workers,
                                          persistent_workers=True, worker_init_fn=_ignore_stop_signals,
                                          collate_fn=self._collate)
            self._sampler.batches = batches
            loader = self._loader
        for images, index, ok in loader:
            images, ok = self._on_device(images, index, ok)
            self.bad.update(index[~ok].tolist())
            if not keep_bad and not ok.all():
                images, index = images[ok.to(images.device)], index[ok]
            if len(index):
                yield Batch(images, index)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        """Batches in the given index order; bad images are dropped (only with ``skip_bad``)."""
        return self.iter_batches(list(order.split(batch_size)))

    def iter_batches(self, batches: list[torch.Tensor]) -> Iterator[Batch]:
        """The given index batches, in order (the few-shot sampler composes its own)."""
        if self._images is None:
            yield from self._stream([b.tolist() for b in batches])
            return
        for chunk in batches:
            if self.bad:
                chunk = chunk[~torch.isin(chunk, torch.tensor(sorted(self.bad)))]
            if len(chunk):
                images = self._images[chunk]
                yield Batch(images if self.decode_device is None else images.to(self.decode_device), chunk)
