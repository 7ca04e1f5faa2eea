"""The demo world's unlabelled pools: a user's unlabelled photos of the domain, and an ID-only control.

Written beside an existing world without touching its files (they stay byte-identical, so caches keyed on
them stay valid). Every image comes from its own generator stream (``render.STREAM_UNLABELED*``), so no
pool image is a split image, and image ``i`` is the same whatever the pool's size: a larger pool only adds
images. A pool is a list file over one folder, written after its images, so its presence marks it complete:

    unlabeled/pool_00000.png ...          images of all of the world's classes in turn (no labels, no class
                                          in the name)
    unlabeled_id_only/pool_00000.png ...  the control: images of the ID classes only
    unlabeled_<m>x.txt, unlabeled_id_only_<m>x.txt   the first m times the labelled train set's size
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np

from vlmdistill.demo.classes import make_classes
from vlmdistill.demo.render import STREAM_UNLABELED, STREAM_UNLABELED_ID, image_rng, png_bytes, render_class_image
from vlmdistill.demo.world import TRAIN_FRACTION, WorldParams
from vlmdistill.io import atomic_write_bytes, atomic_write_text

PoolKind = Literal["full", "id_only"]
FOLDERS: dict[str, tuple[str, int]] = {"full": ("unlabeled", STREAM_UNLABELED),
                                       "id_only": ("unlabeled_id_only", STREAM_UNLABELED_ID)}


def train_size(params: WorldParams) -> int:
    """Images in the world's labelled training split (ceil(0.7 n) per ID class)."""
    return params.n_id * math.ceil(TRAIN_FRACTION * params.images_per_class)


def pool_path(world: Path, kind: PoolKind, multiple: int) -> Path:
    """The list file ``data.unlabeled`` names for a pool of ``multiple`` times the train set's size."""
    return Path(world) / f"{FOLDERS[kind][0]}_{multiple}x.txt"


def ensure_pool(world: Path, params: WorldParams, kind: PoolKind, multiple: int) -> Path:
    """The pool's list file, generating whatever images it lacks first."""
    path = pool_path(world, kind, multiple)
    if path.is_file():
        return path
    specs, _ = make_classes(np.random.default_rng(params.seed), params.n_id, params.n_ood)
    classes = [ci for ci, s in enumerate(specs) if s.is_id or kind == "full"]
    folder, stream = FOLDERS[kind]
    lines = []
    for i in range(multiple * train_size(params)):
        name = f"{folder}/pool_{i:05d}.png"
        if not (Path(world) / name).is_file():
            ci = classes[i % len(classes)]
            image, _ = render_class_image(specs[ci], image_rng(params.seed, stream, ci, i), params.image_size)
            atomic_write_bytes(Path(world) / name, png_bytes(image))
        lines.append(f"{name}\n")
    atomic_write_text(path, "".join(lines))
    return path
