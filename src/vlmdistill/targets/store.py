"""The target store: teacher embeddings of each training image under several stored views.

View 0 is the whole image (the paper's single un-augmented target). Views 1..K are random crops with
flips whose parameters are stored with their embeddings; training replays one of them for the student,
so the teacher never runs inside the training loop and its target always matches what the student sees.

Layout, one directory per key (teacher id, preprocessing, image-list fingerprint, view recipe), named by
the key's digest so stores for different keys coexist::

    <cache_dir>/targets/<digest>/manifest.json        key, N, V, D, shard size, dtype, per-shard files
    <cache_dir>/targets/<digest>/00000.feats.f16      raw fp16 embeddings [n, V, D], memory-mapped
    <cache_dir>/targets/<digest>/00000.meta.safetensors  boxes [n, V, 4] f32, flips [n, V], valid [n]
                                                         (+ augment [n, V, 2] RandAugment codes, when drawn)

Shards hold ``shard_size`` consecutive images. Each is written atomically (temp file + ``os.replace``)
and only then recorded, with its row range and the sha256 and size of its files, in the manifest
(also written atomically): a killed extraction resumes at the missing shards and nothing is duplicated
or lost. Views are drawn from one seeded generator over the whole dataset up front, so resumed shards
use the same views (and every shard stores its own views next to its embeddings anyway).

Extraction (``targets/extract.py``) fills the missing shards. Integrity (``targets/manifest.py``): on open
every shard's file sizes are checked, and its sha256 unless a past verification of exactly this size and
mtime is remembered. The store thus trusts size + mtime: a file changed in place with both restored is not
re-hashed; ``verify_store`` re-hashes all.
A shard that fails is re-extracted by itself (``open_store``) or refused (``load_store``); never read.

Under torchrun DDP every rank calls ``open_store``: rank 0 alone checks and writes the manifest, each rank
extracts every W-th missing shard, and rank 0 records them all in the one manifest before anyone reads it.

Embeddings stay on disk (one read-only ``numpy.memmap`` per shard; rows are gathered per batch), so a
store larger than RAM trains with bounded resident memory; boxes, flips and valid (17 bytes per view)
are held in memory. Files are replaced, never rewritten in place, so a training process's mappings stay
valid while another process repairs the store.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load

from vlmdistill import distributed
from vlmdistill.data.images import GEOMETRY
from vlmdistill.data.shards import shards_fingerprint
from vlmdistill.data.source import ImageSource
from vlmdistill.data.views import Views
from vlmdistill.io import out_of_space, sha256_strings
from vlmdistill.targets.extract import ViewRecipe, extract_shards
from vlmdistill.targets.manifest import (
    DTYPE,
    MANIFEST,
    StoreError,
    StoreManifest,
    drop_bad_shards,
    verify_store,
    verify_stores,
)
from vlmdistill.teachers.base import Teacher

__all__ = ["MANIFEST", "StoreError", "StoreManifest", "StoreMismatchError", "TargetStore", "ViewRecipe",
           "load_store", "open_store", "store_footprint", "store_key", "store_path", "verify_store", "verify_stores"]

log = logging.getLogger(__name__)

RENDER_VERSION = "roi_align-v1"
DEFAULT_SHARD_SIZE = 4096


class StoreMismatchError(StoreError):
    """The stored key differs from the wanted one; ``fields`` names the differing key fields."""

    def __init__(self, where: Path, stored: dict[str, str], wanted: dict[str, str]) -> None:
        self.fields = _differing(stored, wanted)
        super().__init__(f"target store {where} was made for another {_describe(stored, wanted)}")


def images_fingerprint(source: ImageSource) -> str:
    """Keys, sizes and modification times of every image: cheap, and changes when any image does.
    Members of tar shards: keys, byte ranges, and each shard's size and mtime (one stat per shard)."""
    if len(source.records) and source.records[0].shard is not None:
        return shards_fingerprint(source.records)
    parts = []
    for r in source.records:
        st = r.path.stat()
        parts.append(f"{r.key}|{st.st_size}|{st.st_mtime_ns}")
    return sha256_strings(parts)


def store_key(teacher: Teacher, source: ImageSource, recipe: ViewRecipe) -> dict[str, str]:
    """What the targets depend on. JPEGs decoded on a device (``data.decode=device``) differ slightly from PIL's
    pixels, so that path, and its device type, is named; PIL's key reads as before, so its stores are reused."""
    device = source.decode_device
    decode = "" if device is None else f",decode=torchvision-{torch.device(device).type}"
    resize = GEOMETRY.get(source.resize, source.resize)  # a scene source names its teacher camera here
    return {
        "teacher_id": teacher.id,
        "preprocess": f"base={source.base_size},resize={resize},interp={source.interpolation},"
                      f"size={teacher.image_size},{RENDER_VERSION}{decode}",
        "images": images_fingerprint(source),
        "views": f"n={recipe.n_views},seed={recipe.seed},scale={recipe.crop_scale},hflip={recipe.hflip}"
                 + (",randaugment=2x9" if recipe.randaugment else ""),
    }


def store_path(cache_dir: Path, key: dict[str, str]) -> Path:
    """The store's directory: named by the digest of its key."""
    digest = sha256_strings([f"{k}={v}" for k, v in sorted(key.items())])
    return Path(cache_dir) / "targets" / digest[:32]


def _differing(stored: dict[str, str], wanted: dict[str, str]) -> list[str]:
    return sorted(k for k in stored.keys() | wanted.keys() if stored.get(k) != wanted.get(k))


def _describe(stored: dict[str, str], wanted: dict[str, str]) -> str:
    def short(v: str | None) -> str:
        return repr(v if v is None or len(v) <= 60 else v[:57] + "...")

    return "; ".join(f"{k} (stored {short(stored.get(k))}, wanted {short(wanted.get(k))})"
                     for k in _differing(stored, wanted))


# ---------------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class Shard:
    """Rows [start, stop) of the store; ``feats`` maps their fp16 embeddings [n, V, D] read-only."""

    start: int
    stop: int
    feats: np.memmap


@dataclass
class TargetStore:
    path: Path
    key: dict[str, str]
    shard_size: int
    embed_dim: int
    shards: list[Shard]
    boxes: torch.Tensor
    flips: torch.Tensor
    valid: torch.Tensor
    augment: torch.Tensor | None = None

    @property
    def n_views(self) -> int:
        return self.boxes.shape[1]

    @property
    def feats(self) -> torch.Tensor:
        """Every embedding [N, V, D] read into memory: for small stores and tests; training uses ``targets``."""
        if not self.shards:
            return torch.zeros(0, self.n_views, self.embed_dim, dtype=torch.float16)
        return torch.from_numpy(np.concatenate([s.feats for s in self.shards]))

    def views(self, index: torch.Tensor, view_ids: torch.Tensor) -> Views:
        augment = None if self.augment is None else self.augment[index, view_ids]
        return Views(self.boxes[index, view_ids], self.flips[index, view_ids], augment)

    def targets(self, index: torch.Tensor, view_ids: torch.Tensor) -> torch.Tensor:
        """Unnormalised fp32 teacher embeddings of the given images under the given views.

        Rows are gathered shard by shard from the memory maps, so only the pages of this batch are read.
        """
        if not bool(self.valid[index].all()):
            bad = index[~self.valid[index]].tolist()
            raise StoreError(f"no teacher targets for images {bad}: they could not be decoded at extraction")
        idx, vid = index.cpu().numpy(), view_ids.cpu().numpy()
        out = np.empty((len(idx), self.embed_dim), dtype=np.float32)
        shard_of = idx // self.shard_size
        order = np.argsort(shard_of, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(shard_of[order])) + 1):
            if len(group):
                shard = self.shards[shard_of[group[0]]]
                out[group] = shard.feats[idx[group] - shard.start, vid[group]]
        return torch.from_numpy(out)


def store_footprint(store: TargetStore) -> dict[str, float]:
    """Disk bytes (all shard files and the manifest) and the resident metadata, per image-view."""
    disk = sum(f.stat().st_size for f in store.path.iterdir() if not f.name.startswith("."))
    n, v = len(store.valid), store.n_views
    held = (store.boxes, store.flips, store.valid, store.augment)
    ram = sum(t.numel() * t.element_size() for t in held if t is not None)
    return {
        "n_images": n,
        "n_views": v,
        "embed_dim": store.embed_dim,
        "shards": len(store.shards),
        "disk_bytes": disk,
        "disk_bytes_per_1000_image_views": 1000 * disk / max(n * v, 1),
        "ram_bytes": ram,
    }


# ---------------------------------------------------------------------------------------------- opening


def _nearest(cache_dir: Path, key: dict[str, str]) -> tuple[Path, dict[str, str]] | None:
    """The cached store whose key differs from ``key`` in the fewest fields, to say why it is not reused."""
    found = []
    for path in sorted((Path(cache_dir) / "targets").glob(f"*/{MANIFEST}")):
        try:
            manifest = StoreManifest.read(path.parent)
        except StoreError:
            continue
        if manifest is not None and manifest.key != key:
            found.append((len(_differing(manifest.key, key)), path.parent, manifest.key))
    if not found:
        return None
    _, directory, stored = min(found, key=lambda t: t[0])
    return directory, stored


def _load(directory: Path, manifest: StoreManifest) -> TargetStore:
    """Map every shard's embeddings and read its views and validity (the manifest was checked)."""
    v, d = manifest.n_views, manifest.embed_dim
    shards, metas = [], []
    for i in range(manifest.n_shards):
        entry = manifest.shards[i]
        start, stop = manifest.rows(i)
        feats = np.memmap(directory / entry.feats.name, dtype=DTYPE, mode="r", shape=(stop - start, v, d))
        shards.append(Shard(start, stop, feats))
        metas.append(load((directory / entry.meta.name).read_bytes()))
    empty = {"boxes": torch.zeros(0, v, 4), "flips": torch.zeros(0, v, dtype=torch.bool),
             "valid": torch.zeros(0, dtype=torch.bool)}
    if metas and "augment" in metas[0]:  # RandAugment codes, in stores extracted with them
        empty["augment"] = torch.zeros(0, v, metas[0]["augment"].shape[-1], dtype=metas[0]["augment"].dtype)
    held = {name: torch.cat([empty[name]] + [m[name] for m in metas]) for name in empty}
    return TargetStore(directory, manifest.key, manifest.shard_size, d, shards, **held)


def load_store(cache_dir: Path, key: dict[str, str]) -> TargetStore:
    """The complete, intact store for ``key``, for callers that must not extract; raises ``StoreError``.

    ``StoreMismatchError`` (naming the differing key fields) when the stored key differs, or when no
    store has this key but another one is cached (the nearest is named).
    """
    directory = store_path(cache_dir, key)
    manifest = StoreManifest.read(directory)
    if manifest is None:
        near = _nearest(cache_dir, key)
        if near is not None:
            raise StoreMismatchError(*near, key)
        raise StoreError(f"no target store under {Path(cache_dir) / 'targets'}")
    if manifest.key != key:
        raise StoreMismatchError(directory, manifest.key, key)
    bad = drop_bad_shards(directory, manifest)
    missing = manifest.missing()
    if missing:
        raise StoreError(f"target store {directory} lacks shards {missing} (corrupted: {bad}); "
                         "open_store extracts them")
    return _load(directory, manifest)


def _usable_manifest(directory: Path, key: dict[str, str], shape: tuple[int, int, int]) -> StoreManifest | None:
    """The directory's manifest when it is readable and for this key and shape (else log why not)."""
    try:
        manifest = StoreManifest.read(directory)
    except StoreError as err:
        log.warning("%s; rebuilding", err)
        return None
    if manifest is None:
        return None
    if manifest.key != key:
        log.warning("target store %s was made for another %s; rebuilding", directory, _describe(manifest.key, key))
        return None
    if manifest.shape != shape:
        log.warning("target store %s has shape %s, not %s; rebuilding", directory, manifest.shape, shape)
        return None
    return manifest


def open_store(
    teacher: Teacher,
    source: ImageSource,
    recipe: ViewRecipe,
    cache_dir: Path,
    progress: bool = True,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> TargetStore:
    """The cached store for this key, completed or repaired by extracting only its missing shards.

    ``shard_size`` applies to a new store; a store being resumed keeps the one in its manifest.
    """
    key = store_key(teacher, source, recipe)
    directory = store_path(cache_dir, key)
    shape = (len(source), 1 + recipe.n_views, teacher.embed_dim)
    with distributed.main_first() as main:
        manifest = _checked_manifest(cache_dir, directory, key, shape, shard_size) if main \
            else StoreManifest.read(directory)
    todo = manifest.missing()
    if todo:
        mine = todo[distributed.rank() :: distributed.world_size()]
        with out_of_space("teacher target shards", directory,
                          lambda: f"the {len(manifest.shards)} of {manifest.n_shards} shards written are kept; free "
                                  "space, then run it again (extraction resumes at the missing shards)"):
            extract_shards(teacher, source, recipe, directory, manifest, mine, progress)
        if distributed.active():
            for part in distributed.all_gather_objects({i: manifest.shards[i] for i in mine}):
                manifest.shards.update(part)
            with distributed.main_first() as main:
                if main:
                    manifest.save(directory)
    return _load(directory, manifest)


def _checked_manifest(cache_dir: Path, directory: Path, key: dict[str, str], shape: tuple[int, int, int],
                      shard_size: int) -> StoreManifest:
    """The store's manifest with damaged shards dropped, or a new empty one (written)."""
    manifest = _usable_manifest(directory, key, shape)
    if manifest is None:
        near = _nearest(cache_dir, key)
        if near is not None:
            log.info("extracting a new target store; the nearest cached one (%s) differs in %s",
                     near[0], ", ".join(_differing(near[1], key)))
        manifest = StoreManifest(key, *shape, shard_size)
        directory.mkdir(parents=True, exist_ok=True)
        manifest.save(directory)
    drop_bad_shards(directory, manifest)
    return manifest
