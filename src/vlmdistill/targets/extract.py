"""Filling a target store's missing shards: decode each image once, render all its stored views on the teacher's
device, encode them in one call, and write each shard (files, then manifest) once the stream passes it.

The store's layout, key and opening are ``targets/store.py``; which shards are missing is its manifest's.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save

from vlmdistill import distributed
from vlmdistill.data.source import ImageSource
from vlmdistill.data.views import Views, render, sample_randaugment, sample_views
from vlmdistill.io import atomic_write_bytes
from vlmdistill.progress import make_progress
from vlmdistill.targets.manifest import DTYPE, FileEntry, ShardEntry, StoreManifest
from vlmdistill.teachers.base import Teacher


@dataclass(frozen=True)
class ViewRecipe:
    """The stored views: whole image, then ``n_views`` random crops (and flips) per image from ``seed``; with
    ``randaugment``, each random view also draws RandAugment(2, 9) ops, which the teacher sees and the store
    keeps for the student (MobileCLIP's stored augmentations)."""

    n_views: int
    seed: int
    crop_scale: tuple[float, float]
    hflip: bool
    randaugment: bool = False


def _all_views(n_images: int, recipe: ViewRecipe) -> Views:
    """Whole image first, then K random views per image, from one seeded generator."""
    whole = Views.whole(n_images)
    if recipe.n_views == 0:
        return Views(whole.boxes.unsqueeze(1), whole.flips.unsqueeze(1))
    g = torch.Generator().manual_seed(recipe.seed)
    rand = sample_views(n_images * recipe.n_views, g, recipe.crop_scale, hflip=recipe.hflip)
    boxes = torch.cat([whole.boxes.unsqueeze(1), rand.boxes.view(n_images, recipe.n_views, 4)], dim=1)
    flips = torch.cat([whole.flips.unsqueeze(1), rand.flips.view(n_images, recipe.n_views)], dim=1)
    if not recipe.randaugment:
        return Views(boxes, flips)
    codes = sample_randaugment(n_images * recipe.n_views, g).view(n_images, recipe.n_views, -1)
    identity = torch.zeros(n_images, 1, codes.shape[-1], dtype=codes.dtype)  # the whole image stays as it is
    return Views(boxes, flips, torch.cat([identity, codes], dim=1))


def _write_file(directory: Path, name: str, data: bytes) -> FileEntry:
    """Write atomically (a killed write leaves only a hidden temp file) and describe it for the manifest."""
    atomic_write_bytes(directory / name, data)
    return FileEntry(name, len(data), hashlib.sha256(data).hexdigest())


class _ShardWriter:
    """Fills the missing shards in order and writes each (files, then manifest) once the stream passes it."""

    def __init__(self, directory: Path, manifest: StoreManifest, views: Views, todo: list[int]) -> None:
        self.directory, self.manifest, self.views, self.todo = directory, manifest, views, list(todo)
        self._feats: np.ndarray | None = None
        self._valid: np.ndarray | None = None

    def add(self, index: torch.Tensor, feats: torch.Tensor) -> None:
        """Rows of one batch (never spanning two shards, ascending); a shard is written once its last row is in.

        A shard whose last image is bad is written when the stream reaches the next shard, or at the end.
        """
        while self.todo[0] < int(index[0]) // self.manifest.shard_size:
            self._flush()
        start, stop = self._buffers()
        rows = index.numpy() - start
        self._feats[rows] = feats.numpy()
        self._valid[rows] = True
        if int(index[-1]) == stop - 1:
            self._flush()

    def finish(self) -> None:
        while self.todo:
            self._flush()

    def _buffers(self) -> tuple[int, int]:
        start, stop = self.manifest.rows(self.todo[0])
        if self._feats is None:
            m = self.manifest
            self._feats = np.zeros((stop - start, m.n_views, m.embed_dim), dtype=DTYPE)
            self._valid = np.zeros(stop - start, dtype=bool)
        return start, stop

    def _flush(self) -> None:
        start, stop = self._buffers()
        i = self.todo.pop(0)
        meta = {"boxes": self.views.boxes[start:stop].contiguous(), "flips": self.views.flips[start:stop].contiguous(),
                "valid": torch.from_numpy(self._valid)}
        if self.views.augment is not None:
            meta["augment"] = self.views.augment[start:stop].contiguous()
        feats = _write_file(self.directory, f"{i:05d}.feats.f16", self._feats.tobytes())
        metas = _write_file(self.directory, f"{i:05d}.meta.safetensors", save(meta))
        self.manifest.shards[i] = ShardEntry([start, stop], feats, metas)
        if distributed.is_main():  # other ranks' shards are recorded by rank 0 once they are all written
            self.manifest.save(self.directory)
        self._feats = self._valid = None


def _encode(teacher: Teacher, images: torch.Tensor, views: Views) -> torch.Tensor:
    """Every view [m, V] of one decoded batch rendered on the teacher's device, encoded in one call."""
    m, v = views.flips.shape
    images = images.to(teacher.device)
    pixels = torch.cat([render(images, views[:, j], teacher.image_size) for j in range(v)])
    return teacher.encode_images(pixels).view(v, m, -1).transpose(0, 1).cpu().half()


def _plan(manifest: StoreManifest, todo: list[int], per_batch: int) -> list[torch.Tensor]:
    """Decode batches over the missing shards, none spanning two shards."""
    return [rows for i in todo for rows in torch.arange(*manifest.rows(i)).split(per_batch)]


def extract_shards(teacher: Teacher, source: ImageSource, recipe: ViewRecipe, directory: Path,
             manifest: StoreManifest, todo: list[int], progress: bool) -> None:
    """Decode each image once, render all its views, and fill the missing shards in one loader stream."""
    views = _all_views(manifest.n_images, recipe)
    per_batch = max(1, teacher.batch_size // manifest.n_views)
    writer = _ShardWriter(directory, manifest, views, todo)
    done = manifest.n_images - sum(b - a for a, b in map(manifest.rows, todo))
    encoded, start = 0, time.perf_counter()
    with make_progress(progress) as bar:
        task = bar.add_task("teacher targets", total=manifest.n_images, completed=done, info="")
        for batch in source.iter_batches(_plan(manifest, todo, per_batch)):
            writer.add(batch.index, _encode(teacher, batch.images, views[batch.index]))
            encoded += len(batch.index)
            rate = encoded / max(time.perf_counter() - start, 1e-9)
            bar.update(task, advance=len(batch.index), info=f"{rate:.0f} img/s")
        writer.finish()
        bar.update(task, completed=manifest.n_images)
