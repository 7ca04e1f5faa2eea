"""A procedural open-vocabulary "demo world" that stands in for the paper's datasets offline.

No CLIP weights or real datasets are reachable here, so the demo draws a deterministic world whose
classes are combinations of visual attributes (``demo.classes``), with images drawn procedurally
(``demo.render``) and a captioned corpus for the teacher (``demo.corpus``). This module fixes the
world's parameters (``WorldParams``) and writes the world in the paper's exact dataset formats
(``label2text.txt``, ``chatgpt.txt``, the three list files over a raw ``images/<class_dir>/<file>``
tree) plus ``corpus/`` (images and ``captions.jsonl``). ``world.json`` is written last, so a folder
with a ``world.json`` matching the parameters is a complete world.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from vlmdistill.demo.classes import BACKGROUNDS, COLOURS, MAX_CLASSES, PATTERNS, SHAPES, SIZES, ClassSpec, make_classes
from vlmdistill.demo.corpus import corpus_pair
from vlmdistill.demo.render import STREAM_IMAGES, STREAM_SPLIT, image_rng, png_bytes, render_class_image
from vlmdistill.io import atomic_write_bytes, atomic_write_text

FORMAT_VERSION = 1
MIN_CLASSES = 24
MIN_ID_CLASSES = 12
MIN_OOD_CLASSES = 8
TRAIN_FRACTION = 0.7
WORLD_JSON = "world.json"
LIST_FILES = {"train": "train_data.txt", "val_on_train": "val_on_train_data.txt", "val": "val_data.txt"}


@dataclass(frozen=True)
class WorldParams:
    """Everything that fixes a world: the same parameters always give byte-identical files.

    Invalid values raise ``ValueError`` on construction: the split sizes must fit the split's guarantees.
    """

    n_classes: int
    images_per_class: int
    corpus_per_class: int
    image_size: int = 32
    seed: int = 0
    id_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not MIN_CLASSES <= self.n_classes <= MAX_CLASSES:
            raise ValueError(f"n_classes must be in [{MIN_CLASSES}, {MAX_CLASSES}], got {self.n_classes}")
        if self.n_id < MIN_ID_CLASSES or self.n_ood < MIN_OOD_CLASSES:
            raise ValueError(
                f"id_fraction={self.id_fraction} gives {self.n_id} ID and {self.n_ood} OOD classes; "
                f"need at least {MIN_ID_CLASSES} ID and {MIN_OOD_CLASSES} OOD"
            )
        if self.images_per_class < 2:
            raise ValueError(f"images_per_class must be >= 2 (train and val_on_train), got {self.images_per_class}")
        if self.corpus_per_class < 2:
            raise ValueError(
                f"corpus_per_class must be >= 2 (name and description captions), got {self.corpus_per_class}"
            )
        if not 16 <= self.image_size <= 256:
            raise ValueError(f"image_size must be in [16, 256], got {self.image_size}")

    @classmethod
    def full(cls) -> WorldParams:
        """The world ``vlmdistill demo`` runs on."""
        return cls(n_classes=120, images_per_class=30, corpus_per_class=40)

    @classmethod
    def quick(cls) -> WorldParams:
        """The small world of ``vlmdistill demo --quick`` and the tests."""
        return cls(n_classes=32, images_per_class=12, corpus_per_class=12)

    @property
    def n_id(self) -> int:
        return round(self.n_classes * self.id_fraction)

    @property
    def n_ood(self) -> int:
        return self.n_classes - self.n_id

    @property
    def tag(self) -> str:
        """A folder name; seed and id_fraction appear only when not the defaults, so existing caches keep theirs."""
        tag = f"c{self.n_classes}-i{self.images_per_class}-k{self.corpus_per_class}-s{self.image_size}"
        if self.seed != 0:
            tag += f"-seed{self.seed}"
        if self.id_fraction != 0.5:
            tag += f"-id{self.id_fraction:g}"
        return tag

    def record(self) -> dict[str, Any]:
        """The parameters as stored in world.json (key order included: it is part of the file's bytes)."""
        return {
            "format_version": FORMAT_VERSION,
            "seed": int(self.seed),
            "n_classes": self.n_classes,
            "images_per_class": self.images_per_class,
            "corpus_per_class": self.corpus_per_class,
            "image_size": self.image_size,
            "id_fraction": float(self.id_fraction),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> WorldParams:
        return cls(**{f.name: record[f.name] for f in fields(cls)})


@dataclass(frozen=True)
class WorldInfo:
    """What a caller needs from a generated world; class order is the label2text order (ids 1..n)."""

    root: Path
    params: WorldParams
    class_dirs: tuple[str, ...]
    names: tuple[str, ...]
    descriptions: tuple[str, ...]
    id_classes: tuple[str, ...]
    ood_classes: tuple[str, ...]
    rare_values: dict[str, str]


# ---------------------------------------------------------------- files


def image_name(class_dir: str, index: int) -> str:
    return f"{class_dir}_{index:04d}.png"


def _write_lines(path: Path, lines: list[str]) -> None:
    atomic_write_text(path, "".join(f"{line}\n" for line in lines))


def _write_images(root: Path, specs: list[ClassSpec], params: WorldParams) -> None:
    for ci, spec in enumerate(specs):
        for i in range(params.images_per_class):
            rng = image_rng(params.seed, STREAM_IMAGES, ci, i)
            image, _ = render_class_image(spec, rng, params.image_size)
            atomic_write_bytes(root / "images" / spec.class_dir / image_name(spec.class_dir, i), png_bytes(image))


def _write_corpus(root: Path, specs: list[ClassSpec], params: WorldParams) -> None:
    lines = []
    for ci, spec in enumerate(specs):
        for i in range(params.corpus_per_class):
            image, caption = corpus_pair(spec, ci, i, params.seed, params.image_size)
            path = f"images/{spec.class_dir}/{image_name(spec.class_dir, i)}"
            atomic_write_bytes(root / "corpus" / path, png_bytes(image))
            lines.append(json.dumps({"path": path, "caption": caption}))
    _write_lines(root / "corpus" / "captions.jsonl", lines)


def _split_lists(specs: list[ClassSpec], params: WorldParams) -> dict[str, list[str]]:
    """The paper's rule: ceil(0.7 n) random train images per ID class, the rest val_on_train; OOD -> val."""
    n = params.images_per_class
    n_train = math.ceil(TRAIN_FRACTION * n)
    lists: dict[str, list[str]] = {split: [] for split in LIST_FILES}
    for ci, spec in enumerate(specs):
        names = [image_name(spec.class_dir, i) for i in range(n)]
        if not spec.is_id:
            lists["val"] += [f"val/{spec.class_dir}/{f}" for f in names]
            continue
        train = set(image_rng(params.seed, STREAM_SPLIT, ci, 0).permutation(n)[:n_train].tolist())
        for i, f in enumerate(names):
            split = "train" if i in train else "val_on_train"
            lists[split].append(f"{split}/{spec.class_dir}/{f}")
    return lists


def _write_label_files(root: Path, specs: list[ClassSpec], params: WorldParams) -> None:
    _write_lines(root / "label2text.txt", [f"{s.class_dir} {i} {s.class_dir}" for i, s in enumerate(specs, 1)])
    _write_lines(root / "chatgpt.txt", [s.description for s in specs])
    for split, lines in _split_lists(specs, params).items():
        _write_lines(root / LIST_FILES[split], lines)


def _class_record(class_id: int, spec: ClassSpec) -> dict[str, Any]:
    return {
        "id": class_id,
        "class_dir": spec.class_dir,
        "name": spec.name,
        "description": spec.description,
        "shape": spec.shape,
        "colour": spec.colour,
        "pattern": spec.pattern,
        "background": spec.background,
        "size": spec.size,
        "split": "id" if spec.is_id else "ood",
    }


def _write_world_json(root: Path, specs: list[ClassSpec], rare: dict[str, str], params: WorldParams) -> None:
    """Written last: its presence marks the world as complete."""
    world = {
        **params.record(),
        "vocabulary": {
            "shape": list(SHAPES),
            "colour": {c: list(rgb) for c, rgb in COLOURS.items()},
            "pattern": list(PATTERNS),
            "background": list(BACKGROUNDS),
            "size": list(SIZES),
        },
        "classes": [_class_record(i, s) for i, s in enumerate(specs, 1)],
        "id_classes": [s.class_dir for s in specs if s.is_id],
        "ood_classes": [s.class_dir for s in specs if not s.is_id],
        "rare_values": rare,
    }
    atomic_write_text(root / WORLD_JSON, json.dumps(world, indent=1))


def _expected_files(root: Path, params: WorldParams, class_dirs: list[str]) -> list[Path]:
    files = [root / name for name in ("label2text.txt", "chatgpt.txt", *LIST_FILES.values())]
    files.append(root / "corpus" / "captions.jsonl")
    for d in class_dirs:
        files += [root / "images" / d / image_name(d, i) for i in range(params.images_per_class)]
        files += [root / "corpus" / "images" / d / image_name(d, i) for i in range(params.corpus_per_class)]
    return files


# ---------------------------------------------------------------- public API


def generate_world(out_dir: Path | str, params: WorldParams) -> WorldInfo:
    """Write a complete world to ``out_dir``, replacing any earlier ``images/`` and ``corpus/`` there."""
    specs, rare = make_classes(np.random.default_rng(params.seed), params.n_id, params.n_ood)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    (root / WORLD_JSON).unlink(missing_ok=True)
    for sub in ("images", "corpus"):
        shutil.rmtree(root / sub, ignore_errors=True)
    _write_images(root, specs, params)
    _write_corpus(root, specs, params)
    _write_label_files(root, specs, params)
    _write_world_json(root, specs, rare, params)
    return load_world(root)


def load_world(out_dir: Path | str) -> WorldInfo:
    """The WorldInfo of an already generated world, read from its world.json."""
    root = Path(out_dir)
    world = json.loads((root / WORLD_JSON).read_text(encoding="utf-8"))
    classes = world["classes"]
    return WorldInfo(
        root=root,
        params=WorldParams.from_record(world),
        class_dirs=tuple(c["class_dir"] for c in classes),
        names=tuple(c["name"] for c in classes),
        descriptions=tuple(c["description"] for c in classes),
        id_classes=tuple(world["id_classes"]),
        ood_classes=tuple(world["ood_classes"]),
        rare_values=dict(world["rare_values"]),
    )


def world_is_complete(out_dir: Path | str, params: WorldParams) -> bool:
    """True when ``out_dir`` holds a finished world made with exactly these parameters."""
    root = Path(out_dir)
    try:
        world = json.loads((root / WORLD_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not isinstance(world, dict) or any(world.get(key) != value for key, value in params.record().items()):
        return False
    class_dirs = [c["class_dir"] for c in world["classes"]]
    return all(path.is_file() for path in _expected_files(root, params, class_dirs))


def ensure_world(out_dir: Path | str, params: WorldParams) -> WorldInfo:
    """The cached world in ``out_dir`` if complete for these parameters, else a freshly generated one."""
    if world_is_complete(out_dir, params):
        return load_world(out_dir)
    return generate_world(out_dir, params)


def resolve_list_entry(out_dir: Path | str, entry: str) -> Path:
    """The image a list line ``<split>/<class_dir>/<file>`` names: the raw tree is ``images/<class_dir>/``."""
    _, class_dir, name = entry.strip().split("/")
    return Path(out_dir) / "images" / class_dir / name
