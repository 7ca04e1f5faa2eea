"""A prepared multi-label dataset: scenes (PickClutter h5 scenes or CSV images), their objects, and the paper's
ID/OOD object split (its §8), written as one ``multilabel.json`` in the prepared folder.

The split rule: ID objects are given (``id_objects``), or, for a CSV with a split column, are every object of
its ``train`` rows. A scene holding only ID objects is an ID scene: ``train`` or ``val_on_train`` (X_id),
as its split says; ID scenes without one are all X_id when some scenes are given as ``train`` (the paper's
train file and val file), else ``ceil(train_fraction * n)`` of them, seeded, train. A scene holding any other object
is an OOD scene (``val``, X_ood: ID and OOD objects mixed). A scene given as ``train`` or ``val_on_train``
that holds an OOD object is refused, naming it: training scenes hold only ID objects. The OOD objects are
those of the OOD scenes that are not ID.

h5 files are given whole (the rule splits them) or with their split (``split=FILE``). Scenes are referenced,
not copied: the prepared folder records absolute paths of the h5 files and images.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmdistill.data.dataset import SPLITS, DatasetError
from vlmdistill.data.scenes import SceneItem
from vlmdistill.io import atomic_write_json, read_json
from vlmdistill.multilabel.csvsource import read_multilabel_csv
from vlmdistill.multilabel.h5scenes import index_scenes

MANIFEST = "multilabel.json"
FORMAT = 1


@dataclass(frozen=True)
class MultiLabelSet:
    """The three splits of scenes and the ID / OOD object names (sorted)."""

    root: Path
    id_objects: tuple[str, ...]
    ood_objects: tuple[str, ...]
    splits: dict[str, tuple[SceneItem, ...]]
    skipped: tuple[str, ...] = ()

    @property
    def objects(self) -> tuple[str, ...]:
        """ID then OOD names: the vocabulary an OOD scene is scored against."""
        return self.id_objects + self.ood_objects


def is_multilabel(root: Path) -> bool:
    return (Path(root) / MANIFEST).is_file()


def _h5_items(files: Sequence[tuple[str | None, Path]], traj_type: str | None, skip_bad: bool
              ) -> tuple[list[tuple[str | None, SceneItem]], list[str]]:
    items, skipped = [], []
    for split, path in files:
        path = Path(path).resolve()
        index = index_scenes(path, traj_type=traj_type, skip_bad=skip_bad)
        items += [(split, SceneItem(path, r.key, r.objects, f"{path.name}#{r.key}")) for r in index.records]
        skipped += [f"{s.path.name}#{s.key}: {s.reason}" for s in index.skipped]
    return items, skipped


def _csv_items(csv_path: Path, skip_missing: bool) -> tuple[list[tuple[str | None, SceneItem]], list[str]]:
    table = read_multilabel_csv(csv_path, SPLITS, skip_missing=skip_missing)
    root = Path(csv_path).resolve().parent
    items = []
    for r in table.records:
        path = r.path.resolve()
        key = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
        items.append((r.split, SceneItem(path, None, r.labels, key)))
    return items, [f"{p}: missing" for p in table.missing]


def split_scenes(items: Sequence[tuple[str | None, SceneItem]], id_objects: Sequence[str] | None, seed: int,
                 train_fraction: float = 0.7) -> tuple[tuple[str, ...], dict[str, list[SceneItem]]]:
    """The ID objects and the scenes of each split under the rule of the module docstring."""
    if id_objects is None:
        id_objects = sorted({o for split, item in items if split == "train" for o in item.objects})
        if not id_objects:
            raise DatasetError("no ID objects: pass id_objects (--id-objects 'a;b;c') or give the scenes a split "
                               "column whose train rows name them")
    id_set = set(id_objects)
    out: dict[str, list[SceneItem]] = {s: [] for s in SPLITS}
    unsplit: list[SceneItem] = []
    for split, item in items:
        only_id = set(item.objects) <= id_set
        if split in ("train", "val_on_train") and not only_id:
            extra = sorted(set(item.objects) - id_set)
            raise DatasetError(f"scene {item.key} is given as {split} but holds non-ID objects {extra}: training "
                               "and ID-val scenes hold only ID objects. Fix: move it to val or add the objects to "
                               "the ID objects")
        if split is not None:
            out[split].append(item)
        elif only_id:
            unsplit.append(item)
        else:
            out["val"].append(item)
    random.Random(seed).shuffle(unsplit)
    n_train = 0 if out["train"] else math.ceil(train_fraction * len(unsplit))
    out["train"] += unsplit[:n_train]
    out["val_on_train"] += unsplit[n_train:]
    if not out["train"]:
        raise DatasetError("no training scenes hold only ID objects; check the ID objects")
    return tuple(sorted(id_set)), out


def _entry(item: SceneItem) -> dict[str, object]:
    return {"path": str(item.path), "scene": item.scene, "objects": list(item.objects), "key": item.key}


def prepare_multilabel(out: Path, csv_path: Path | None = None, h5: Sequence[tuple[str | None, Path]] = (),
                       id_objects: Sequence[str] | None = None, seed: int = 0, train_fraction: float = 0.7,
                       traj_type: str | None = None, skip_bad: bool = False) -> dict[str, int]:
    """Write ``out/multilabel.json`` from a CSV or h5 files; returns the scene count of each split (and of
    the scenes skipped as bad, with ``skip_bad``)."""
    if (csv_path is None) == (not h5):
        raise DatasetError("give a multi-label CSV or h5 files (not both, not neither)")
    if csv_path is not None:
        items, skipped = _csv_items(csv_path, skip_bad)
    else:
        items, skipped = _h5_items(h5, traj_type, skip_bad)
    ids, splits = split_scenes(items, id_objects, seed, train_fraction)
    ood = sorted({o for item in splits["val"] for o in item.objects} - set(ids))
    Path(out).mkdir(parents=True, exist_ok=True)
    atomic_write_json(Path(out) / MANIFEST, {
        "format": FORMAT, "id_objects": list(ids), "ood_objects": ood, "seed": seed, "skipped": skipped,
        "splits": {s: [_entry(i) for i in splits[s]] for s in SPLITS}})
    return {**{s: len(splits[s]) for s in SPLITS}, "skipped": len(skipped)}


def open_multilabel(root: Path) -> MultiLabelSet:
    """The prepared multi-label dataset at ``root``; a missing or malformed manifest names the fix."""
    path = Path(root) / MANIFEST
    try:
        raw = read_json(path)
        splits = {s: tuple(SceneItem(Path(e["path"]), e["scene"], tuple(e["objects"]), e["key"])
                           for e in raw["splits"][s]) for s in SPLITS}
        return MultiLabelSet(Path(root), tuple(raw["id_objects"]), tuple(raw["ood_objects"]), splits,
                             tuple(raw.get("skipped", ())))
    except (OSError, KeyError, TypeError, ValueError) as err:
        raise DatasetError(f"{path} is not a prepared multi-label dataset ({type(err).__name__}: {err}). Fix: run "
                           "vlmdistill prepare OUT --multilabel-csv FILE (or --h5 FILE) again") from err
