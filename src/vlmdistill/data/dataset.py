"""A prepared dataset: the paper's split layout plus its label and description files.

Layout (what ``vlmdistill prepare`` writes, and what the paper's ``split_dataset.py`` produces)::

    <root>/label2text.txt            classes (optional: folder names are used without it)
    <root>/chatgpt.txt               one description per class (optional)
    <root>/train_data.txt            one image a line: train/<class_dir>/<file>
    <root>/val_on_train_data.txt     ID validation
    <root>/val_data.txt              OOD validation
    <root>/{train,val_on_train,val}/<class_dir>/<file>

Without list files the split folders are scanned instead.

Every entry must stay inside ``<root>``: a list entry that is absolute or has a ``..`` part is refused,
and so is a file whose real path (symlinks followed) is outside ``<root>``, except for the links
``prepare`` made, whose targets must lie in the images folder it recorded in ``prepare.json``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vlmdistill.data.compact import ListEntryError, Record, Records, from_pairs, read_entries
from vlmdistill.data.shards import open_shards
from vlmdistill.errors import VlmdistillError
from vlmdistill.io import read_json
from vlmdistill.text.labels import (
    ClassInfo,
    LabelFileError,
    LabelSpace,
    classes_from_folders,
    read_descriptions,
    read_label_file,
)

SPLITS = ("train", "val_on_train", "val")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


class DatasetError(VlmdistillError, ValueError):
    """A dataset folder that cannot be used; the message names the file and the fix."""


__all__ = ["SPLITS", "Dataset", "DatasetError", "Record", "Split", "open_dataset", "read_list_file"]


@dataclass
class Split:
    """One split's images (a list of ``Record``s, or compact ``Records`` from a list file) and their labels."""

    name: str
    records: Sequence[Record]
    space: LabelSpace
    labels: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        index = self.space.index()
        if isinstance(self.records, Records):
            self.labels = self.records.labels(index)
        else:
            self.labels = [index[r.class_dir] for r in self.records]

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class Dataset:
    """The three splits over one set of classes; ID classes are those of ``train``."""

    root: Path
    classes: list[ClassInfo]
    train: Split
    id_val: Split
    ood_val: Split
    missing: list[str] = field(default_factory=list)

    @property
    def id_space(self) -> LabelSpace:
        return self.train.space

    @property
    def ood_space(self) -> LabelSpace:
        return self.ood_val.space


def _read_list(root: Path, split: str) -> Records | None:
    """A split's list file as compact records, or None if there is no list file."""
    path = root / f"{split}_data.txt"
    if not path.is_file():
        return None
    try:
        return read_entries(path, split, root)
    except ListEntryError as err:
        raise DatasetError(str(err)) from err


def read_list_file(path: Path, split: str) -> list[tuple[str, str]]:
    """The paper's list format: one ``<split>/<class_dir>/<file>`` a line; returns (line, class_dir) pairs.

    Bytes that are not UTF-8 (file names are bytes on Linux) come back as the same bytes when opened.
    """
    out = []
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        parts = line.split("/")
        if line.startswith("/") or ".." in parts:
            raise DatasetError(
                f"{path}:{n}: entry {line!r} points outside the dataset folder (absolute or '..'); "
                f"entries must be '{split}/<class_dir>/<file>' under it"
            )
        if len(parts) < 3:
            raise DatasetError(f"{path}:{n}: expected '{split}/<class_dir>/<file>', got {line!r}")
        out.append((line, parts[1]))
    return out


def _prepare_info(root: Path) -> dict:
    """prepare.json's contents ({} without one)."""
    meta = root / "prepare.json"
    if not meta.is_file():
        return {}
    try:
        info = read_json(meta)
    except (OSError, ValueError) as err:
        raise DatasetError(f"{meta} is unreadable ({err}); run `vlmdistill prepare` again") from err
    return info if isinstance(info, dict) else {}


def _linked_images(root: Path) -> str | None:
    """The folder prepare linked images from: ``images_root`` in prepare.json (older versions: ``images``)."""
    info = _prepare_info(root)
    linked = info.get("images_root", info.get("images"))
    return linked if isinstance(linked, str) else None


class _Containment:
    """Checks that an entry's real file lies in the dataset folder or the images folder prepare linked from.

    Real paths of folders are cached, so a large split costs one ``lstat`` per file.
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self.allowed = [os.path.realpath(root)]
        linked = _linked_images(root)
        if linked is not None:
            self.allowed.append(os.path.realpath(linked))
        self._dirs: dict[str, str] = {}

    def check(self, line: str) -> None:
        path = os.path.join(self.root, line)
        parent = os.path.dirname(path)
        if parent not in self._dirs:
            self._dirs[parent] = os.path.realpath(parent)
        real = os.path.join(self._dirs[parent], os.path.basename(path))
        real = os.path.realpath(real) if os.path.islink(real) else real
        if not any(real == a or real.startswith(a.rstrip(os.sep) + os.sep) for a in self.allowed):
            raise DatasetError(
                f"{path} leads to {real}, outside the dataset folder {self.root}"
                + (f" and the images folder prepare linked from ({self.allowed[1]})" if len(self.allowed) > 1 else "")
                + "; only links made by `vlmdistill prepare` may leave the dataset folder"
            )


def _scan_split(root: Path, split: str) -> list[tuple[str, str]]:
    split_dir = root / split
    if not split_dir.is_dir():
        return []
    out = []
    for class_dir in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        files = sorted(
            f for f in class_dir.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not files:
            raise DatasetError(
                f"class folder {class_dir} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
                "add images or remove the folder"
            )
        out += [(f.relative_to(root).as_posix(), class_dir.name) for f in files]
    return out


def _load_classes(root: Path, found: set[str], descriptions: Path | None) -> list[ClassInfo]:
    label_path = root / "label2text.txt"
    if label_path.is_file():
        classes = read_label_file(label_path)
        unknown = sorted(found - {c.dir for c in classes})
        if unknown:
            raise DatasetError(
                f"class folders {unknown[:5]} are not in {label_path}; add a line for each "
                "('<class_dir> <id> <name>') or remove them from the split"
            )
    else:
        classes = classes_from_folders(sorted(found))
    desc = descriptions if descriptions is not None else root / "chatgpt.txt"
    if descriptions is not None or desc.is_file():
        classes = read_descriptions(desc, classes, label_path if label_path.is_file() else None)
    return classes


def _records(
    root: Path, entries: dict[str, Records], skip_missing: bool
) -> tuple[dict[str, Records], list[str]]:
    """Records of the entries that exist (all inside the allowed folders), and the missing entries."""
    inside = _Containment(root)
    missing: list[str] = []
    records: dict[str, Records] = {}
    for split, items in entries.items():
        keep = np.ones(len(items), dtype=bool)
        for i in range(len(items)):
            line = items.key(i)
            inside.check(line)
            if not os.path.exists(os.path.join(root, line)):
                missing.append(line)
                keep[i] = False
        records[split] = items if keep.all() else items.take(keep)
    if missing and not skip_missing:
        raise DatasetError(
            f"{len(missing)} images listed under {root} do not exist (first: {missing[0]}); "
            "fix the list files or set data.skip_bad_images=true to skip them"
        )
    return records, missing


def open_dataset(root: Path, descriptions: Path | None = None, skip_missing: bool = False) -> Dataset:
    """Read a prepared dataset; missing image files are an error unless ``skip_missing`` (then counted)."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"dataset folder {root} does not exist; create it with `vlmdistill prepare`")
    sharded = _prepare_info(root).get("format") == "shards"
    if sharded:
        entries, missing = open_shards(root, SPLITS, skip_missing)
    else:
        entries = {s: _read_list(root, s) or from_pairs(root, _scan_split(root, s)) for s in SPLITS}
    for split in ("train", "val"):
        if not entries[split]:
            raise DatasetError(
                f"{root} has no '{split}' split ({split}_data.txt or a {split}/ folder); "
                "run `vlmdistill prepare` to make one"
            )
    found = {c for items in entries.values() for c in items.present_dirs()}
    try:
        classes = _load_classes(root, found, descriptions)
    except LabelFileError as err:
        raise DatasetError(str(err)) from err
    if sharded:
        records = entries
    else:
        records, missing = _records(root, entries, skip_missing)
    desc_file = str(descriptions if descriptions is not None else root / "chatgpt.txt")

    def space(split: str) -> LabelSpace:
        present = entries[split].present_dirs()
        return LabelSpace(tuple(c for c in classes if c.dir in present), desc_file)

    id_space, ood_space = space("train"), space("val")
    overlap = set(id_space.dirs) & set(ood_space.dirs)
    if overlap:
        raise DatasetError(f"{root}: classes {sorted(overlap)[:5]} are in both train (ID) and val (OOD)")
    stray = records["val_on_train"].present_dirs() - set(id_space.dirs)
    if stray:
        raise DatasetError(f"{root}: val_on_train holds classes {sorted(stray)[:5]} that are not in train")
    return Dataset(
        root=root,
        classes=classes,
        train=Split("train", records["train"], id_space),
        id_val=Split("val_on_train", records["val_on_train"], id_space),
        ood_val=Split("val", records["val"], ood_space),
        missing=missing,
    )
