"""The target store: teacher embeddings of each training image under several stored views.

View 0 is the whole image (the paper's single un-augmented target). Views 1..K are random crops with
flips whose parameters are stored with their embeddings; training replays one of them for the student,
so the teacher never runs inside the training loop and its target always matches what the student sees.

The file name is a digest of the key (teacher id, preprocessing, image-list fingerprint, view recipe)
and the key is repeated in the file, so a store made by another teacher or for other images is never
read: it is rebuilt.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from vlmdistill.data.source import ImageSource
from vlmdistill.data.views import Views, render, sample_views
from vlmdistill.io import atomic_save_tensors, load_tensors, sha256_strings
from vlmdistill.progress import make_progress
from vlmdistill.teachers.base import Teacher

log = logging.getLogger(__name__)

RENDER_VERSION = "roi_align-v1"


@dataclass(frozen=True)
class ViewRecipe:
    n_views: int
    seed: int
    crop_scale: tuple[float, float]
    hflip: bool


def images_fingerprint(source: ImageSource) -> str:
    """Keys, sizes and modification times of every image: cheap, and changes when any image does."""
    parts = []
    for r in source.records:
        st = r.path.stat()
        parts.append(f"{r.key}|{st.st_size}|{st.st_mtime_ns}")
    return sha256_strings(parts)


def store_key(teacher: Teacher, source: ImageSource, recipe: ViewRecipe) -> dict[str, str]:
    return {
        "teacher_id": teacher.id,
        "preprocess": f"base={source.base_size},resize={source.resize},size={teacher.image_size},{RENDER_VERSION}",
        "images": images_fingerprint(source),
        "views": f"n={recipe.n_views},seed={recipe.seed},scale={recipe.crop_scale},hflip={recipe.hflip}",
    }


@dataclass
class TargetStore:
    feats: torch.Tensor
    boxes: torch.Tensor
    flips: torch.Tensor
    valid: torch.Tensor
    key: dict[str, str]

    @property
    def n_views(self) -> int:
        return self.feats.shape[1]

    def views(self, index: torch.Tensor, view_ids: torch.Tensor) -> Views:
        return Views(self.boxes[index, view_ids], self.flips[index, view_ids])

    def targets(self, index: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """Unnormalised fp32 teacher embeddings of the given images under the given views."""
        return self.feats[index, view_ids].float()


def _all_views(n_images: int, recipe: ViewRecipe) -> Views:
    """Whole image first, then K random views per image, from one seeded generator."""
    whole = Views.whole(n_images)
    if recipe.n_views == 0:
        return Views(whole.boxes.unsqueeze(1), whole.flips.unsqueeze(1))
    g = torch.Generator().manual_seed(recipe.seed)
    rand = sample_views(n_images * recipe.n_views, g, recipe.crop_scale, hflip=recipe.hflip)
    boxes = torch.cat([whole.boxes.unsqueeze(1), rand.boxes.view(n_images, recipe.n_views, 4)], dim=1)
    flips = torch.cat([whole.flips.unsqueeze(1), rand.flips.view(n_images, recipe.n_views)], dim=1)
    return Views(boxes, flips)


def extract(teacher: Teacher, source: ImageSource, recipe: ViewRecipe, progress: bool = True) -> TargetStore:
    """Decode each image once, render every view at the teacher's resolution, encode in big batches."""
    n = len(source)
    views = _all_views(n, recipe)
    n_views = views.boxes.shape[1]
    feats = torch.zeros(n, n_views, teacher.embed_dim, dtype=torch.float16)
    valid = torch.zeros(n, dtype=torch.bool)
    start = time.perf_counter()
    with make_progress(progress) as bar:
        task = bar.add_task("teacher targets", total=n, info="")
        for batch in source.batches(torch.arange(n), teacher.batch_size):
            for v in range(n_views):
                sub = Views(views.boxes[batch.index, v], views.flips[batch.index, v])
                pixels = render(batch.images, sub, teacher.image_size)
                feats[batch.index, v] = teacher.encode_images(pixels).cpu().half()
            valid[batch.index] = True
            done = int(valid.sum())
            rate = done / max(time.perf_counter() - start, 1e-9)
            bar.update(task, completed=done, info=f"{rate:.0f} img/s")
    return TargetStore(feats, views.boxes, views.flips, valid, store_key(teacher, source, recipe))


def store_path(cache_dir: Path, key: dict[str, str]) -> Path:
    digest = sha256_strings([f"{k}={v}" for k, v in sorted(key.items())])
    return Path(cache_dir) / "targets" / f"{digest[:32]}.safetensors"


def _load(path: Path, key: dict[str, str]) -> TargetStore | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = json.loads((f.metadata() or {}).get("key", "{}"))
        if stored != key:
            differ = sorted(k for k in key if stored.get(k) != key[k])
            log.warning("target store %s differs in %s; rebuilding", path, ", ".join(differ))
            return None
        t = load_tensors(path)
    except (SafetensorError, OSError, json.JSONDecodeError) as err:
        log.warning("target store %s is unreadable (%s); rebuilding", path, err)
        return None
    return TargetStore(t["feats"], t["boxes"], t["flips"], t["valid"], key)


def open_store(
    teacher: Teacher, source: ImageSource, recipe: ViewRecipe, cache_dir: Path, progress: bool = True
) -> TargetStore:
    """The cached store for this key, or a fresh extraction saved under it."""
    key = store_key(teacher, source, recipe)
    path = store_path(cache_dir, key)
    store = _load(path, key)
    if store is None:
        store = extract(teacher, source, recipe, progress)
        atomic_save_tensors(
            path,
            {"feats": store.feats, "boxes": store.boxes, "flips": store.flips, "valid": store.valid},
            {"key": json.dumps(key, sort_keys=True)},
        )
    return store
