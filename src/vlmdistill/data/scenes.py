"""Multi-label scenes served in index batches: several cameras' RGB-D stacked into one [C, S, S] tensor.

A scene is a PickClutter h5 scene (``multilabel.h5scenes``) or a plain image of a multi-label CSV. The student
takes every camera and channel the config names (``data.cameras``, ``data.channels``: base + hand RGB-D is the
paper's 8 channels) as float pixels in [0, 1]; the teacher sees one camera's RGB (``data.teacher_camera``),
served as uint8 by ``camera_rgb`` so the target store extracts and keys it as it does any image source. A
plain image is one RGB camera whatever the config says: three channels, and the teacher sees it too.

Bad scenes follow the bad-image contract: ``BadSceneError`` naming file, scene and fix, or (``skip_bad``)
dropped from their batch and remembered in ``bad`` so results.json can count them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlmdistill.data.images import BadImageError, load_image
from vlmdistill.data.source import Batch
from vlmdistill.multilabel.h5scenes import (
    BadSceneError,
    Camera,
    Kind,
    SceneFileError,
    SceneRecord,
    load_scene,
)


@dataclass(frozen=True)
class SceneItem:
    """One scene: an h5 scene (``scene`` is its key) or an image file (``scene`` is None), and its objects.

    ``key`` names it in caches and results; ``shard`` is always None (the target store's fingerprint reads it)."""

    path: Path
    scene: str | None
    objects: tuple[str, ...]
    key: str
    shard: None = None


@dataclass(frozen=True)
class SceneLayout:
    """Which cameras and channels make a scene's tensor, and how depth is scaled (``h5scenes.load_scene``)."""

    cameras: tuple[Camera, ...]
    kinds: tuple[Kind, ...]
    depth_max: float | None


def read_scene(item: SceneItem, layout: SceneLayout, size: int) -> torch.Tensor:
    """float [C, size, size] in [0, 1]; raises ``BadSceneError`` (h5) or ``BadImageError`` (image file)."""
    if item.scene is None:
        return load_image(item.path, size, "squash").float() / 255.0
    record = SceneRecord(item.path, item.scene, item.objects, None)
    try:
        return load_scene(record, layout.cameras, layout.kinds, layout.depth_max, size)
    except SceneFileError as err:
        raise BadSceneError(item.path, item.scene, str(err)) from err


@dataclass
class SceneSource:
    """Serves ``Batch``es of stacked scenes (float [B, C, S, S]) for any order of indices; ``preload`` reads
    every scene once and keeps it in memory. Same surface as ``ImageSource`` where the loop and store use it."""

    records: Sequence[SceneItem]
    base_size: int
    layout: SceneLayout
    skip_bad: bool = False
    preload: bool = False
    bad: set[int] = field(default_factory=set)
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    resize = "squash"
    interpolation = "bilinear"
    decode_device = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def bad_keys(self) -> list[str]:
        return sorted(self.records[i].key for i in self.bad)

    def _read(self, i: int) -> torch.Tensor | None:
        if i in self._cache:
            return self._cache[i]
        if i in self.bad:
            return None
        try:
            x = read_scene(self.records[i], self.layout, self.base_size)
        except (BadSceneError, BadImageError):
            if not self.skip_bad:
                raise
            self.bad.add(i)
            return None
        if self.preload:
            self._cache[i] = x
        return x

    def iter_batches(self, batches: list[torch.Tensor]) -> Iterator[Batch]:
        """The given index batches, in order, bad scenes dropped (only with ``skip_bad``)."""
        for chunk in batches:
            kept = [(int(i), x) for i in chunk.tolist() if (x := self._read(int(i))) is not None]
            if kept:
                yield Batch(torch.stack([x for _, x in kept]), torch.tensor([i for i, _ in kept], dtype=torch.long))

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        return self.iter_batches(list(order.split(batch_size)))

    def camera_rgb(self, camera: Camera) -> CameraRgbSource:
        """The teacher's side: this camera's RGB of every scene (whether or not the student takes it)."""
        own = SceneSource(self.records, self.base_size, SceneLayout((camera,), ("rgb",), None), self.skip_bad,
                          self.preload)
        return CameraRgbSource(own, camera)


@dataclass
class CameraRgbSource:
    """One camera's RGB of some scenes, uint8 [B, 3, S, S] as an ``ImageSource`` serves. Its record keys carry
    the camera (``<key>@<camera>``), so a target store's key names which camera the teacher saw."""

    scenes: SceneSource
    camera: Camera
    records: list[SceneItem] = field(init=False)

    def __post_init__(self) -> None:
        self.records = [SceneItem(r.path, r.scene, r.objects, f"{r.key}@{self.camera}") for r in self.scenes.records]
        self.base_size = self.scenes.base_size
        self.resize, self.interpolation, self.decode_device = f"scene-{self.camera}-rgb", "bilinear", None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def bad(self) -> set[int]:
        return self.scenes.bad

    def iter_batches(self, batches: list[torch.Tensor]) -> Iterator[Batch]:
        for batch in self.scenes.iter_batches(batches):
            yield Batch((batch.images * 255.0).round().to(torch.uint8), batch.index)

    def batches(self, order: torch.Tensor, batch_size: int) -> Iterator[Batch]:
        return self.iter_batches(list(order.split(batch_size)))
