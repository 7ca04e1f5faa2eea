"""``vlmdistill prepare``: materialise the ID-train / ID-val / OOD-val splits as a prepared dataset.

Three sources: the paper's list files (exact reproduction of its splits), a folder of class folders,
or a CSV ``path,label[,split]``. Without given splits the paper's rule is applied from a seed: a random
ID/OOD class split, then ceil(0.7 n) random training images per ID class, the rest ID-val, and every
image of an OOD class in OOD-val. Images are linked, not copied.

The output folder is built beside OUT and swapped in at the end, so a failed prepare leaves OUT as it
was and a re-run leaves no stale class folders; OUT must be new, empty or an earlier prepare's output.
File names that are not UTF-8 are kept as their bytes; class folder names must be UTF-8 (they become
the class names in prompts).
"""

from __future__ import annotations

import csv
import math
import os
import random
import re
from collections import defaultdict
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

from vlmdistill.data.dataset import IMAGE_EXTENSIONS, SPLITS, DatasetError, read_list_file
from vlmdistill.data.pool import check_disjoint, read_pool
from vlmdistill.data.shards import write_index, write_split
from vlmdistill.io import atomic_write_json, atomic_write_text, out_of_space, replace_dir, sha256_strings
from vlmdistill.text.labels import (
    ClassInfo,
    classes_from_folders,
    format_label_file,
    read_descriptions,
    read_label_file,
)


@dataclass
class PreparedSplits:
    """class_dir -> split -> source image paths, plus the classes in label order."""

    classes: list[ClassInfo]
    assignment: dict[str, dict[str, list[Path]]]


def seeded_split(
    images: dict[str, list[Path]],
    seed: int,
    id_fraction: float = 0.5,
    train_fraction: float = 0.7,
    id_classes: list[str] | None = None,
) -> dict[str, dict[str, list[Path]]]:
    """The paper's rule: random class split, then ceil(train_fraction * n) train images per ID class."""
    rng = random.Random(seed)
    dirs = sorted(images)
    if id_classes is None:
        shuffled = dirs[:]
        rng.shuffle(shuffled)
        id_set = set(shuffled[: math.ceil(id_fraction * len(dirs))])
    else:
        unknown = sorted(set(id_classes) - set(dirs))
        if unknown:
            raise DatasetError(f"ID classes {unknown[:5]} do not exist among the class folders")
        id_set = set(id_classes)
    out: dict[str, dict[str, list[Path]]] = {}
    for d in dirs:
        files = sorted(images[d])
        if d in id_set:
            rng.shuffle(files)
            n_train = math.ceil(train_fraction * len(files))
            out[d] = {"train": files[:n_train], "val_on_train": files[n_train:], "val": []}
        else:
            out[d] = {"train": [], "val_on_train": [], "val": files}
    return out


def _image_files(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)


def from_folders(images_root: Path) -> dict[str, list[Path]]:
    """Class folders under ``images_root`` (nested sub-folders count for their top class folder)."""
    images_root = Path(images_root)
    if not images_root.is_dir():
        raise DatasetError(f"image folder {images_root} does not exist")
    images = {d.name: _image_files(d) for d in sorted(images_root.iterdir()) if d.is_dir()}
    empty = [d for d, files in images.items() if not files]
    if empty:
        raise DatasetError(
            f"class folders {empty[:5]} under {images_root} hold no images; add images or remove them"
        )
    if not images:
        raise DatasetError(f"{images_root} has no class folders (expected <root>/<class>/<image>)")
    return images


def _safe_dir(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label.strip()).strip("_") or "class"


def from_csv(csv_path: Path) -> tuple[dict[str, list[Path]], dict[str, str], dict[Path, str]]:
    """Rows ``path,label[,split]``; paths are relative to the CSV's folder. Returns images, names, splits."""
    csv_path = Path(csv_path)
    images: dict[str, list[Path]] = defaultdict(list)
    names: dict[str, str] = {}
    splits: dict[Path, str] = {}
    try:
        text = csv_path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise DatasetError(f"{csv_path} is not UTF-8 (byte {err.start}); save it as UTF-8") from err
    reader = csv.DictReader(StringIO(text, newline=""))
    if reader.fieldnames is None or not {"path", "label"} <= set(reader.fieldnames):
        raise DatasetError(f"{csv_path} needs a header with columns 'path,label' (optionally 'split')")
    for n, row in enumerate(reader, start=2):
        label = (row["label"] or "").strip()
        if not label or not row["path"]:
            raise DatasetError(f"{csv_path}:{n}: empty path or label")
        path = (csv_path.parent / row["path"].strip()).resolve()
        if not path.is_file():
            raise DatasetError(f"{csv_path}:{n}: image {row['path'].strip()} does not exist (looked for {path})")
        d = _safe_dir(label)
        names[d] = label
        images[d].append(path)
        if row.get("split"):
            split = row["split"].strip()
            if split not in SPLITS:
                raise DatasetError(f"{csv_path}:{n}: split must be one of {SPLITS}, got {split!r}")
            splits[path] = split
    if not images:
        raise DatasetError(f"{csv_path} has no rows")
    return dict(images), names, splits


class _FileIndex:
    """Finds a list-file entry in a raw image tree whatever its layout (class dirs, flat, SUN's letters)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._by_name: dict[str, list[Path]] | None = None

    def find(self, line: str, class_dir: str) -> Path | None:
        name = line.rsplit("/", 1)[-1]
        for cand in (self.root / line, self.root / class_dir / name, self.root / name):
            if cand.is_file():
                return cand
        if self._by_name is None:
            self._by_name = defaultdict(list)
            for dirpath, _, files in os.walk(self.root):
                for f in files:
                    self._by_name[f].append(Path(dirpath) / f)
        hits = self._by_name.get(name, [])
        if len(hits) > 1:
            tokens = set(class_dir.lower().split("_"))
            hits = [h for h in hits if tokens <= set(re.split(r"[/_]", str(h.parent).lower()))] or hits
        return hits[0] if len(hits) == 1 else None


def from_lists(lists_dir: Path, images_root: Path) -> dict[str, dict[str, list[Path]]]:
    """The paper's ``{train,val_on_train,val}_data.txt`` resolved against a raw image tree."""
    index = _FileIndex(Path(images_root))
    out: dict[str, dict[str, list[Path]]] = defaultdict(lambda: {s: [] for s in SPLITS})
    missing: list[str] = []
    for split in SPLITS:
        path = Path(lists_dir) / f"{split}_data.txt"
        if not path.is_file():
            raise DatasetError(f"list file {path} is missing (the paper ships train/val_on_train/val lists)")
        for line, class_dir in read_list_file(path, split):
            found = index.find(line, class_dir)
            if found is None:
                missing.append(line)
            else:
                out[class_dir][split].append(found)
    if missing:
        raise DatasetError(
            f"{len(missing)} images of the list files were not found under {images_root} "
            f"(first: {missing[0]}); point --images at the raw dataset folder"
        )
    return dict(out)


def _check_target(out_dir: Path, classes: list[ClassInfo], assignment: dict[str, dict[str, list[Path]]]) -> None:
    """Refuse what would overwrite a user's folder, give an empty split, or a class name that is not text."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"{out_dir} is a file; give a folder for the prepared dataset")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "prepare.json").is_file():
        raise DatasetError(
            f"{out_dir} is not empty and is not the output of an earlier `vlmdistill prepare` (no prepare.json); "
            "give a new or empty folder"
        )
    bad = [c.dir for c in classes if _undecodable(c.dir)]
    if bad:
        shown = ", ".join(repr(os.fsencode(d)) for d in bad[:5])
        raise DatasetError(f"class folder names {shown} are not valid UTF-8; rename them (they become class names)")
    for split, what in (("train", "ID training"), ("val", "OOD")):
        if not any(assignment.get(c.dir, {}).get(split) for c in classes):
            raise DatasetError(
                f"the '{split}' split of {out_dir} would be empty (no {what} images); "
                "change --id-fraction, --train-fraction or --id-classes, or the split column"
            )


def _undecodable(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _split_items(split: str, classes: list[ClassInfo], assignment: dict) -> list[tuple[str, Path, int]]:
    """One split's images as (``<split>/<class_dir>/<name>``, source, class index); same-named files get a
    hash suffix."""
    items = []
    for n, c in enumerate(classes):
        used: set[str] = set()
        for src in assignment.get(c.dir, {}).get(split, []):
            name = src.name
            if name in used:
                name = f"{src.stem}_{sha256_strings([str(src)])[:8]}{src.suffix}"
            used.add(name)
            items.append((f"{split}/{c.dir}/{name}", Path(src), n))
    return items


def _link_split(out_dir: Path, items: list[tuple[str, Path, int]]) -> list[str]:
    """Link one split's images at their keys under ``out_dir``."""
    for rel, src, _ in items:
        link = out_dir / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(src.resolve())
    return [rel for rel, _, _ in items]


def write_prepared(
    out_dir: Path,
    classes: list[ClassInfo],
    assignment: dict[str, dict[str, list[Path]]],
    provenance: dict,
    shard_size: int | None = None,
) -> dict[str, int]:
    """Link images into the paper's split layout and write its list, label and description files; with
    ``shard_size``, write the splits as tar shards of that many images instead (``data/shards.py``).

    ``prepare.json`` records ``images_root``, the folder every link points into, so ``open_dataset``
    can refuse a link that leads anywhere else, and ``unlabeled``, the pool, once checked against every split.
    """
    out_dir = Path(out_dir)
    _check_target(out_dir, classes, assignment)
    if provenance.get("unlabeled"):
        pool, _ = read_pool(Path(provenance["unlabeled"]), skip_missing=True)
        splits = {s: [p for c in classes for p in assignment.get(c.dir, {}).get(s, [])] for s in SPLITS}
        check_disjoint([r.path for r in pool], splits, Path(provenance["unlabeled"]))
    sources = [Path(p).resolve() for c in classes for ps in assignment.get(c.dir, {}).values() for p in ps]
    images_root = os.path.commonpath([str(p.parent) for p in sources])
    counts, shard_names = {}, {}
    unchanged = f"{out_dir} is as it was (the new one was built aside and removed); free space and run prepare again"
    with out_of_space("the prepared dataset", out_dir, lambda: unchanged), replace_dir(out_dir) as new:
        for split in SPLITS:
            items = _split_items(split, classes, assignment)
            counts[split] = len(items)
            if shard_size is not None:
                shard_names[split] = write_split(new, split, items, shard_size)
                continue
            lines = _link_split(new, items)
            atomic_write_text(new / f"{split}_data.txt", "".join(f"{x}\n" for x in lines), errors="surrogateescape")
        if shard_size is not None:
            write_index(new, shard_size, shard_names, counts)
            provenance = {**provenance, "format": "shards", "shard_size": shard_size}
        atomic_write_text(new / "label2text.txt", format_label_file(classes))
        if all(c.description for c in classes):
            atomic_write_text(new / "chatgpt.txt", "".join(f"{c.description}\n" for c in classes))
        id_classes = [c.dir for c in classes if assignment.get(c.dir, {}).get("train")]
        counts |= {"id_classes": len(id_classes),
                   "ood_classes": sum(bool(assignment[c]["val"]) for c in assignment)}
        meta = {**provenance, "images_root": images_root, "counts": counts, "id_classes": id_classes}
        atomic_write_json(new / "prepare.json", meta)
    return counts


def resolve_classes(
    dirs: list[str], labels: Path | None, descriptions: Path | None, names: dict[str, str] | None = None
) -> list[ClassInfo]:
    """Classes in label-file order when a label file is given, else sorted folder names."""
    if labels is not None:
        classes = read_label_file(labels)
        if descriptions is not None:
            classes = read_descriptions(descriptions, classes, labels)
        unknown = sorted(set(dirs) - {c.dir for c in classes})
        if unknown:
            raise DatasetError(f"class folders {unknown[:5]} are not in {labels}; add a line for each")
        return [c for c in classes if c.dir in set(dirs)]
    classes = classes_from_folders(dirs)
    if names:
        classes = [ClassInfo(c.dir, c.id, names.get(c.dir, c.name)) for c in classes]
    if descriptions is not None:
        classes = read_descriptions(descriptions, classes, labels)
    return classes


def prepare(
    out_dir: Path,
    *,
    lists: Path | None = None,
    images: Path | None = None,
    csv_path: Path | None = None,
    labels: Path | None = None,
    descriptions: Path | None = None,
    seed: int = 0,
    id_fraction: float = 0.5,
    train_fraction: float = 0.7,
    id_classes: list[str] | None = None,
    unlabeled: Path | None = None,
    shards: bool = False,
    shard_size: int = 1000,
) -> dict[str, int]:
    """Build a prepared dataset from list files (+ raw images), a class-folder tree or a CSV; ``unlabeled``
    (a pool of unlabelled images) is recorded with it. ``shards``: the splits as tar shards of ``shard_size``
    images instead of linked files."""
    if shards and shard_size < 1:
        raise DatasetError(f"--shard-size must be at least 1 image per shard, got {shard_size}")
    per_shard = shard_size if shards else None
    provenance: dict = {"seed": seed, "id_fraction": id_fraction, "train_fraction": train_fraction}
    if unlabeled is not None:
        provenance["unlabeled"] = str(Path(unlabeled).resolve())
    if lists is not None:
        if images is None:
            raise DatasetError("--lists needs --images, the raw image folder the list entries live in")
        lists = Path(lists)
        labels = labels or (lists / "label2text.txt" if (lists / "label2text.txt").is_file() else None)
        if descriptions is None and (lists / "chatgpt.txt").is_file():
            descriptions = lists / "chatgpt.txt"
        assignment = from_lists(lists, images)
        provenance |= {"source": "lists", "lists": str(lists), "images": str(images)}
    elif csv_path is not None:
        files, names, given = from_csv(csv_path)
        if given and len(given) != sum(len(v) for v in files.values()):
            raise DatasetError(f"{csv_path}: give a split for every row or for none")
        if given:
            assignment = {d: {s: [p for p in ps if given[p] == s] for s in SPLITS} for d, ps in files.items()}
        else:
            assignment = seeded_split(files, seed, id_fraction, train_fraction, id_classes)
        provenance |= {"source": "csv", "csv": str(csv_path)}
        classes = resolve_classes(sorted(files), labels, descriptions, names)
        return write_prepared(out_dir, classes, assignment, provenance, per_shard)
    elif images is not None:
        assignment = seeded_split(from_folders(images), seed, id_fraction, train_fraction, id_classes)
        provenance |= {"source": "folders", "images": str(images)}
    else:
        raise DatasetError("give --lists DIR --images DIR, --images DIR (class folders) or --csv FILE")
    classes = resolve_classes(sorted(assignment), labels, descriptions)
    return write_prepared(out_dir, classes, assignment, provenance, per_shard)
