"""Cluttered RGB-D scenes of demo-world objects, the offline stand-in for the paper's PickClutter data.

Scenes hold 2-6 distinct classes of the demo world (``demo.classes``, drawn by ``demo.render``) on a table.
ID scenes (``train``, ``val_on_train``) hold ID classes only; OOD scenes (``val``) mix at least one ID
and at least one OOD class, as X_ood does in the paper.

Geometry: a square table of ``TABLE_SIDE`` metres seen straight down by two orthographic cameras: "base"
sees the whole table from ``BASE_HEIGHT``; "hand" sees a ``HAND_SIDE`` window centred on one object (the
gripper closing in on its pick) from ``HAND_HEIGHT``. Each object is a flat-topped prism of random height;
depth is the camera height minus the top height over the object, the camera height over the table. Objects
are drawn lowest first (painter's order), so a taller object hides a lower one in RGB and depth alike.

Files are written in the PickClutter h5 layout (``multilabel.h5scenes``), not PNG + CSV: depth is float
metres, which PNG holds only after a lossy 16-bit scaling, and one reader then serves the demo and the
paper's files, so the demo exercises the real data path. Every scene draws from its own generator keyed
by (seed, split, index): the same parameters give byte-identical files.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from vlmdistill.demo.classes import ClassSpec, make_classes, pick
from vlmdistill.demo.render import _background, _draw, _erode, _jittered, _Object, _shape_mask
from vlmdistill.demo.world import MIN_ID_CLASSES, MIN_OOD_CLASSES
from vlmdistill.io import atomic_write_bytes
from vlmdistill.multilabel.h5scenes import CAMERAS, member_path

SPLITS = {"train": "id", "val_on_train": "id", "val": "ood"}
STREAM_CLUTTER = 10  # beside render.py's streams 0-4: clutter never shares a generator with world images
TABLE_SIDE, HAND_SIDE = 0.5, 0.25  # metres of table each camera sees
BASE_HEIGHT, HAND_HEIGHT = 1.0, 0.4  # camera heights above the table, metres
OBJECT_HEIGHT = (0.02, 0.12)
TABLES = ("light", "sand", "dark")
_DIAMETER = {"small": (0.05, 0.08), "large": (0.09, 0.13)}
_SUPERSAMPLE = 2


@dataclass(frozen=True)
class ClutterParams:
    """Everything that fixes the generated scenes (the split sizes aside). Invalid values raise ValueError."""

    n_id: int = 14
    n_ood: int = 12
    image_size: int = 64
    seed: int = 0
    min_objects: int = 2
    max_objects: int = 6

    def __post_init__(self) -> None:
        if not 2 <= self.min_objects <= self.max_objects:
            raise ValueError(f"need 2 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.n_id < max(MIN_ID_CLASSES, self.max_objects) or self.n_ood < max(MIN_OOD_CLASSES, self.max_objects):
            raise ValueError(f"need n_id >= {max(MIN_ID_CLASSES, self.max_objects)} and n_ood >= "
                             f"{max(MIN_OOD_CLASSES, self.max_objects)}, got {self.n_id}, {self.n_ood}")
        if not 16 <= self.image_size <= 256:
            raise ValueError(f"image_size must be in [16, 256], got {self.image_size}")


@dataclass(frozen=True)
class _Placed:
    """One object on the table (metres; angle in radians)."""

    spec: ClassSpec
    rgb: np.ndarray
    diameter: float
    cx: float
    cy: float
    angle: float
    height: float
    phase: float


@dataclass(frozen=True)
class ClutterScene:
    """One scene: its class indices (into ``clutter_classes``) and per camera uint8 [S, S, 3] RGB and float32
    [S, S, 1] depth in metres."""

    objects: tuple[int, ...]
    rgb: dict[str, np.ndarray]
    depth: dict[str, np.ndarray]


def clutter_classes(params: ClutterParams) -> list[ClassSpec]:
    """The scenes' classes in label order: the demo world's classes for this seed and these counts."""
    return make_classes(np.random.default_rng(params.seed), params.n_id, params.n_ood)[0]


def model_id(index: int, spec: ClassSpec) -> str:
    """PickClutter-style id, "<number>_<name with _>": the reader's ``object_name`` gives back ``spec.name``."""
    return f"{index + 1:03d}_{spec.class_dir}"


def _choose(rng: np.random.Generator, classes: list[ClassSpec], kind: str, params: ClutterParams) -> list[int]:
    """2-6 distinct classes: ID only, or (OOD) at least one of each kind."""
    id_pool = [i for i, c in enumerate(classes) if c.is_id]
    ood_pool = [i for i, c in enumerate(classes) if not c.is_id]
    count = int(rng.integers(params.min_objects, params.max_objects + 1))
    n_ood = int(rng.integers(1, count)) if kind == "ood" else 0
    chosen = rng.choice(id_pool, count - n_ood, replace=False).tolist()
    chosen += rng.choice(ood_pool, n_ood, replace=False).tolist() if n_ood else []
    return sorted(int(i) for i in chosen)


def _place(rng: np.random.Generator, spec: ClassSpec) -> _Placed:
    diameter = float(rng.uniform(*_DIAMETER[spec.size]))
    cx, cy = (float(v) for v in rng.uniform(diameter / 2, TABLE_SIDE - diameter / 2, 2))
    return _Placed(spec, _jittered(rng, spec.colour), diameter, cx, cy, float(rng.uniform(-math.pi, math.pi)),
                   float(rng.uniform(*OBJECT_HEIGHT)), float(rng.uniform(0, 10)))


def _coverage(obj: _Object, k: int) -> np.ndarray:
    """Where ``render._draw`` paints the object at least half (same mask and hollow rule), at output pixels."""
    alpha = _shape_mask(obj.shape, obj.size * k, obj.angle)
    if obj.pattern == "hollow":
        alpha &= ~_erode(alpha, max(1, round(max(1.2, 0.15 * obj.size) * k)))
    return alpha.reshape(obj.size, k, obj.size, k).mean(axis=(1, 3)) >= 0.5


def _view(rng: np.random.Generator, placed: list[_Placed], table: str, origin: tuple[float, float], side: float,
          height: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """One camera's RGB and depth. Drawn on a canvas padded by the largest object, so objects cut by the
    image border need no clipping, then cropped to the ``n`` x ``n`` view."""
    scale = n / side
    sizes = [max(3, round(o.diameter * scale)) for o in placed]
    pad = max(sizes) + 1
    full = n + 2 * pad
    canvas = _background(rng, table, full)
    depth = np.full((full, full), height, dtype=np.float32)
    for o, size in zip(placed, sizes, strict=True):
        x0 = round((o.cx - origin[0]) * scale - size / 2) + pad
        y0 = round((o.cy - origin[1]) * scale - size / 2) + pad
        if not (0 <= x0 <= full - size and 0 <= y0 <= full - size):
            continue  # wholly outside the view: the padding is wider than any object
        obj = _Object(o.spec.shape, o.spec.pattern, o.rgb, size, o.angle, x0, y0, o.phase)
        _draw(canvas, obj, _SUPERSAMPLE)
        depth[y0 : y0 + size, x0 : x0 + size][_coverage(obj, _SUPERSAMPLE)] = height - o.height
    crop = slice(pad, pad + n)
    rgb = np.clip(canvas[crop, crop] + 0.5, 0, 255).astype(np.uint8)
    return rgb, depth[crop, crop, None].copy()


def make_scene(classes: list[ClassSpec], split: str, index: int, params: ClutterParams) -> ClutterScene:
    """Scene ``index`` of ``split`` (one of ``SPLITS``); depends only on the parameters, split and index."""
    kind = SPLITS[split]
    rng = np.random.default_rng([params.seed, STREAM_CLUTTER, list(SPLITS).index(split), index])
    chosen = _choose(rng, classes, kind, params)
    placed = sorted((_place(rng, classes[i]) for i in chosen), key=lambda o: o.height)
    table = pick(rng, list(TABLES))
    target = placed[int(rng.integers(len(placed)))]
    views = {"base": ((0.0, 0.0), TABLE_SIDE, BASE_HEIGHT),
             "hand": ((target.cx - HAND_SIDE / 2, target.cy - HAND_SIDE / 2), HAND_SIDE, HAND_HEIGHT)}
    rgb, depth = {}, {}
    for camera in CAMERAS:
        rgb[camera], depth[camera] = _view(rng, placed, table, *views[camera], params.image_size)
    return ClutterScene(tuple(chosen), rgb, depth)


def write_clutter_h5(path: Path | str, split: str, n_scenes: int, params: ClutterParams) -> Path:
    """``n_scenes`` scenes of ``split`` as one PickClutter-layout h5 file (keys scene_00000, ...; ``traj_type``
    "id" or "ood"), built in memory and written atomically."""
    classes = clutter_classes(params)
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        for i in range(n_scenes):
            scene = make_scene(classes, split, i, params)
            group = f.create_group(f"scene_{i:05d}")
            for camera in CAMERAS:
                group.create_dataset(member_path(camera, "rgb"), data=scene.rgb[camera])
                group.create_dataset(member_path(camera, "depth"), data=scene.depth[camera])
            group.create_dataset("model_ids", data=np.array([model_id(k, classes[k]).encode() for k in scene.objects]))
            group.create_dataset("traj_type", data=SPLITS[split].encode())
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def generate_clutter(out_dir: Path | str, params: ClutterParams, n_scenes: Mapping[str, int]) -> dict[str, Path]:
    """One ``<split>.h5`` per split named in ``n_scenes`` (e.g. {"train": 300, "val_on_train": 50, "val": 100})."""
    unknown = set(n_scenes) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; expected among {list(SPLITS)}")
    return {split: write_clutter_h5(Path(out_dir) / f"{split}.h5", split, n, params) for split, n in n_scenes.items()}
