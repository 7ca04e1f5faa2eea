"""Reader of the paper's PickClutter h5 files (and of the demo's clutter files, written in the same layout).

Each top-level key is one scene::

    <scene>/dict_str_base_camera/dict_str_rgb     uint8 [H, W, 3]
    <scene>/dict_str_base_camera/dict_str_depth   float [H, W, 1], metres
    <scene>/dict_str_hand_camera/...               the same two for the hand camera
    <scene>/model_ids                              bytes like b"002_master_chef_can" -> "master chef can"
    <scene>/traj_type                              optional bytes; ``traj_type=`` keeps the scenes that match

``index_scenes`` checks structure (members, shapes, dtypes, object names: no pixels read); ``load_scene``
checks values (depth must be finite and >= 0). A bad scene raises ``BadSceneError`` naming file, scene and fix,
or, with ``skip_bad``, is left out and listed in ``skipped`` so the caller can count it.

Depth normalisation: metres / ``depth_max`` clamped to [0, 1] (default 2 m, beyond any tabletop camera's
range). A fixed scale keeps depth metric, so the same value means the same distance in every scene and
camera; per-image min-max would erase how far the pile is. ``depth_max=None`` keeps raw metres, which is
what the official code feeds the student (its ``normalize_all`` passes depth through).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from vlmdistill.errors import VlmdistillError

Camera = Literal["base", "hand"]
Kind = Literal["rgb", "depth"]
CAMERAS: tuple[Camera, ...] = ("base", "hand")
KINDS: tuple[Kind, ...] = ("rgb", "depth")
CHANNELS = {"rgb": 3, "depth": 1}
DEFAULT_DEPTH_MAX = 2.0


class BadSceneError(VlmdistillError, ValueError):
    """A scene that cannot be used; the message names the file, the scene and the way out."""

    def __init__(self, path: Path, scene: str, reason: str) -> None:
        self.path, self.scene, self.reason = Path(path), scene, reason
        super().__init__(
            f"bad scene {scene!r} in {path}: {reason}. Fix: regenerate or delete that scene, or pass "
            "skip_bad=True to skip such scenes (they are listed in `skipped`)"
        )


class SceneFileError(VlmdistillError, OSError):
    """An h5 file that cannot be opened at all."""


@dataclass(frozen=True)
class SceneRecord:
    """One usable scene: where it is and which objects it holds (names, in ``model_ids`` order)."""

    path: Path
    key: str
    objects: tuple[str, ...]
    traj_type: str | None


@dataclass(frozen=True)
class SkippedScene:
    """A bad scene left out under ``skip_bad``, and why."""

    path: Path
    key: str
    reason: str


@dataclass(frozen=True)
class SceneIndex:
    """The usable scenes of one file and the bad ones skipped."""

    records: tuple[SceneRecord, ...]
    skipped: tuple[SkippedScene, ...]


@dataclass(frozen=True)
class LoadedScenes:
    """Stacked scenes [N, C, S, S] with the records they come from (bad ones left out and listed)."""

    images: torch.Tensor
    records: tuple[SceneRecord, ...]
    skipped: tuple[SkippedScene, ...]


def member_path(camera: Camera, kind: Kind) -> str:
    return f"dict_str_{camera}_camera/dict_str_{kind}"


def object_name(model_id: str) -> str:
    """"002_master_chef_can" -> "master chef can": the text after the first "_", with "_" as spaces."""
    _, sep, rest = model_id.partition("_")
    if not sep or not rest:
        raise ValueError(f"model id {model_id!r} is not '<number>_<name>'")
    return rest.replace("_", " ")


def _open(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except (OSError, ValueError) as err:
        raise SceneFileError(f"cannot open h5 file {path}: {err}. Fix: check the path or re-download the file") from err


def _text(value: object) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def _traj_type(path: Path, key: str, group: h5py.Group) -> str | None:
    if "traj_type" not in group:
        return None
    value = group["traj_type"]
    if not isinstance(value, h5py.Dataset) or value.shape != () or value.dtype.kind not in "SO":
        raise BadSceneError(path, key, "traj_type is not a single string")
    return _text(value[()])


def _objects(path: Path, key: str, group: h5py.Group) -> tuple[str, ...]:
    ids = group.get("model_ids")
    if not isinstance(ids, h5py.Dataset) or ids.ndim != 1 or ids.dtype.kind not in "SO":
        raise BadSceneError(path, key, "model_ids is missing or not a 1-D array of strings")
    try:
        return tuple(object_name(_text(v)) for v in ids[()])
    except (ValueError, UnicodeDecodeError) as err:
        raise BadSceneError(path, key, f"model_ids: {err}") from err


def _check_images(path: Path, key: str, group: h5py.Group, cameras: Sequence[Camera], kinds: Sequence[Kind]) -> None:
    """Each requested member exists with its shape and dtype; one camera's members are pixel-aligned."""
    for camera in cameras:
        sizes = set()
        for kind in kinds:
            data = group.get(member_path(camera, kind))
            if not isinstance(data, h5py.Dataset):
                raise BadSceneError(path, key, f"missing {member_path(camera, kind)}")
            dtype_ok = data.dtype == np.uint8 if kind == "rgb" else data.dtype.kind == "f"
            if not dtype_ok or data.ndim != 3 or data.shape[2] != CHANNELS[kind] or 0 in data.shape:
                want = "uint8 [H, W, 3]" if kind == "rgb" else "float [H, W, 1]"
                raise BadSceneError(path, key, f"{member_path(camera, kind)} is {data.dtype} {list(data.shape)}, "
                                               f"not {want}")
            sizes.add(data.shape[:2])
        if len(sizes) > 1:
            raise BadSceneError(path, key, f"{camera} camera's rgb and depth differ in size: {sorted(sizes)}")


def index_scenes(path: Path | str, cameras: Sequence[Camera] = CAMERAS, kinds: Sequence[Kind] = KINDS,
                 traj_type: str | None = None, skip_bad: bool = False) -> SceneIndex:
    """The scenes of one file in sorted key order (the official loader's order), checked for the requested
    cameras and kinds. With ``traj_type``, only scenes whose ``traj_type`` equals it (others, and scenes
    without one, are left out before they are checked). The official loader's filter tests ``hasattr`` on the
    h5 group, which is always false, so it never filters."""
    path = Path(path)
    records, skipped = [], []
    with _open(path) as f:
        for key in sorted(f.keys()):
            try:
                group = f[key]
                if not isinstance(group, h5py.Group):
                    raise BadSceneError(path, key, "is a dataset, not a scene group")
                kind = _traj_type(path, key, group)
                if traj_type is not None and kind != traj_type:
                    continue
                _check_images(path, key, group, cameras, kinds)
                records.append(SceneRecord(path, key, _objects(path, key, group), kind))
            except BadSceneError as err:
                if not skip_bad:
                    raise
                skipped.append(SkippedScene(path, key, err.reason))
    return SceneIndex(tuple(records), tuple(skipped))


def _channels(data: np.ndarray, kind: Kind, depth_max: float | None, size: int | None) -> torch.Tensor:
    """[H, W, c] -> float [c, S, S]: RGB /255 (bilinear, antialiased); depth scaled (nearest, so an object's
    edge never blends into the table behind it into a depth that exists nowhere)."""
    x = torch.from_numpy(np.ascontiguousarray(data)).permute(2, 0, 1).float()
    if kind == "rgb":
        x = x / 255.0
    elif depth_max is not None:
        x = (x / depth_max).clamp(0.0, 1.0)
    if size is not None and x.shape[1:] != (size, size):
        if kind == "rgb":
            x = F.interpolate(x[None], (size, size), mode="bilinear", antialias=True, align_corners=False)[0]
        else:
            x = F.interpolate(x[None], (size, size), mode="nearest-exact")[0]
    return x


def _read(f: h5py.File, record: SceneRecord, cameras: Sequence[Camera], kinds: Sequence[Kind],
          depth_max: float | None, size: int | None) -> torch.Tensor:
    if record.key not in f:
        raise BadSceneError(record.path, record.key, "the scene is no longer in the file")
    group = f[record.key]
    _check_images(record.path, record.key, group, cameras, kinds)
    parts = []
    for camera in cameras:
        for kind in kinds:
            data = group[member_path(camera, kind)][()]
            if kind == "depth" and not (np.isfinite(data).all() and (data >= 0).all()):
                raise BadSceneError(record.path, record.key, f"{camera} depth holds NaN, infinite or negative values")
            parts.append(_channels(data, kind, depth_max, size))
    if len({p.shape[1:] for p in parts}) > 1:
        raise BadSceneError(record.path, record.key, "cameras differ in size; pass size= to resize them to one square")
    return torch.cat(parts)


def _check_args(cameras: Sequence[Camera], kinds: Sequence[Kind], depth_max: float | None, size: int | None) -> None:
    if not cameras or not set(cameras) <= set(CAMERAS) or not kinds or not set(kinds) <= set(KINDS):
        raise ValueError(f"cameras must be among {CAMERAS} and kinds among {KINDS}, got {cameras} and {kinds}")
    if (depth_max is not None and depth_max <= 0) or (size is not None and size <= 0):
        raise ValueError(f"depth_max and size must be positive, got {depth_max} and {size}")


def load_scene(record: SceneRecord, cameras: Sequence[Camera] = CAMERAS, kinds: Sequence[Kind] = KINDS,
               depth_max: float | None = DEFAULT_DEPTH_MAX, size: int | None = None) -> torch.Tensor:
    """One scene as float [C, H, W]: for each camera in order, its kinds in order (base+hand RGB-D gives the
    official 8 channels: base rgb, base depth, hand rgb, hand depth). ``size`` resizes every channel to a
    square (the paper uses 224); without it all cameras must share one size."""
    _check_args(cameras, kinds, depth_max, size)
    with _open(record.path) as f:
        return _read(f, record, cameras, kinds, depth_max, size)


def load_scenes(records: Sequence[SceneRecord], cameras: Sequence[Camera] = CAMERAS, kinds: Sequence[Kind] = KINDS,
                depth_max: float | None = DEFAULT_DEPTH_MAX, size: int | None = None, skip_bad: bool = False
                ) -> LoadedScenes:
    """``load_scene`` for many records, each file opened once; bad scenes raise or (``skip_bad``) are listed.
    Memory is N x C x S x S float32: 3000 scenes of 8 x 224^2 are 4.8 GB, so batch large splits."""
    _check_args(cameras, kinds, depth_max, size)
    images, kept, skipped = [], [], []
    with ExitStack() as stack:
        files: dict[Path, h5py.File] = {}
        for record in records:
            if record.path not in files:
                files[record.path] = stack.enter_context(_open(record.path))
            try:
                image = _read(files[record.path], record, cameras, kinds, depth_max, size)
                if images and image.shape != images[0].shape:
                    raise BadSceneError(record.path, record.key, f"its size {list(image.shape[1:])} differs from "
                                        f"the first scene's {list(images[0].shape[1:])}; pass size= to stack them")
                images.append(image)
                kept.append(record)
            except BadSceneError as err:
                if not skip_bad:
                    raise
                skipped.append(SkippedScene(record.path, record.key, err.reason))
    empty = (0, sum(CHANNELS[k] for k in kinds) * len(cameras), size or 0, size or 0)
    stacked = torch.stack(images) if images else torch.zeros(empty)
    return LoadedScenes(stacked, tuple(kept), tuple(skipped))
