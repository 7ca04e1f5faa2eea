"""The teacher's target for each view a student trains on: replayed from the store, or computed online.

Three sources, chosen once per run from the config:
- ``stored views`` (default): the store holds K random views per image (with ``data.randaugment=consistent``,
  each with its RandAugment ops); each step picks one per image, so the student sees exactly the view the
  teacher's target was computed on;
- ``whole image`` (paper): the target is the teacher's embedding of the whole image, whatever the view;
- ``online``: views that cannot be stored (one augmentation per batch, or ``target_views=0``) are
  rendered for the teacher inside the step.

With ``train.views_per_step`` = V each image gets V views, rows image-major (image i's views are rows
``i*V ... i*V+V-1``). Stored views of one image are distinct while the store holds at least V (K >= V); with
fewer, each of the K is used before any repeats.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmdistill.config import ExperimentConfig
from vlmdistill.data.source import ImageSource
from vlmdistill.data.views import Views, render, sample_randaugment, sample_views
from vlmdistill.targets.store import TargetStore, ViewRecipe, open_store
from vlmdistill.teachers import Teacher


def target_recipe(cfg: ExperimentConfig) -> ViewRecipe | None:
    """The stored views a run needs (view 0 is always the whole image); None when targets run online."""
    if cfg.train.teacher_view == "whole":
        return ViewRecipe(0, cfg.seed, cfg.data.crop_scale, cfg.data.hflip)
    if cfg.train.target_views > 0 and cfg.data.augment_per == "image":
        return ViewRecipe(cfg.train.target_views, cfg.seed, cfg.data.crop_scale, cfg.data.hflip,
                          randaugment=cfg.data.randaugment == "consistent")
    return None


@dataclass
class TargetLookup:
    """Views for the student and the teacher's raw embeddings of them; ``None`` targets when not needed."""

    cfg: ExperimentConfig
    teacher: Teacher | None
    store: TargetStore | None = None

    @property
    def kind(self) -> str:
        return "store" if self.store is not None else "online" if self.teacher is not None else "none"

    def __call__(
        self, index: torch.Tensor, images: torch.Tensor, g: torch.Generator, n_global: int | None = None,
        offset: int = 0, per_image: int = 1,
    ) -> tuple[Views, torch.Tensor | None]:
        """Views and targets of ``index``, ``per_image`` rows per image: images ``offset...`` of a global batch
        of ``n_global`` images (under DDP; all of it by default). Draws are made for the whole global batch, so
        every rank draws as one process would and keeps its own rows."""
        d, v = self.cfg.data, per_image
        n = len(index) if n_global is None else n_global
        mine = slice(offset * v, (offset + len(index)) * v)
        rows = index.repeat_interleave(v) if v > 1 else index
        if self.store is not None and self.cfg.train.teacher_view == "same":
            view_ids = stored_view_ids(n, v, self.store.n_views - 1, g).reshape(-1)[mine]
            return self.store.views(rows, view_ids), self.store.targets(rows, view_ids)
        views = sample_views(n * v, g, d.crop_scale, hflip=d.hflip, per_batch=d.augment_per == "batch")
        if d.randaugment == "consistent":  # drawn with the view, so the teacher below renders the same ops
            views.augment = sample_randaugment(n * v, g)
        views = views[mine]
        if self.store is not None:
            return views, self.store.targets(rows, torch.zeros_like(rows))
        if self.teacher is not None:
            pixels = render(images.repeat_interleave(v, 0) if v > 1 else images, views, self.teacher.image_size)
            return views, self.teacher.encode_images(pixels)
        return views, None


def stored_view_ids(n: int, per_image: int, k: int, g: torch.Generator) -> torch.Tensor:
    """[n, per_image] ids in 1..k of stored views (0 is the whole image): uniform with replacement for one
    view per image (the draw runs always made), else a random order of the k views per image, cycled when
    per_image > k, so an image's views are distinct whenever k >= per_image."""
    if per_image == 1:
        return torch.randint(1, k + 1, (n, 1), generator=g)
    order = torch.rand(n, k, generator=g).argsort(dim=1) + 1
    return order[:, torch.arange(per_image) % k]


def open_targets(cfg: ExperimentConfig, teacher: Teacher, source: ImageSource, needed: bool) -> TargetLookup:
    """The lookup a run trains with: the store when its views can be stored, the teacher online otherwise."""
    if not needed:
        return TargetLookup(cfg, None)
    recipe = target_recipe(cfg)
    if recipe is None:
        return TargetLookup(cfg, teacher)
    return TargetLookup(cfg, None, open_store(teacher, source, recipe, cfg.cache_dir, cfg.train.progress))
