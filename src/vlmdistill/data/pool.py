"""Unlabelled image pools: images of the domain that nobody labelled, for the label-free loss terms.

A pool is a folder (scanned recursively), a list file (one image path a line) or a CSV with a ``path``
column; relative paths are relative to the list's folder. ``vlmdistill prepare --unlabeled`` records
one in ``prepare.json``; ``data.unlabeled`` names one (or another) per run.

The zero-shot protocol must stay honest: no pool image may be an image of any split (OOD-val above all),
so the pool is checked against every split by resolved path and by the sha256 of its bytes, and an
overlap is an error naming the file. Hashes are remembered per (path, size, mtime) for the process, so a
sweep of runs over one pool hashes each file once.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Iterable
from io import StringIO
from pathlib import Path

from vlmdistill.data.dataset import IMAGE_EXTENSIONS, Dataset, DatasetError, Record
from vlmdistill.io import read_json, sha256_file

_HASHES: dict[tuple[str, int, int], str] = {}


class PoolError(DatasetError):
    """An unlabelled pool that cannot be used; the message names the file and the fix."""


def read_pool(spec: Path, skip_missing: bool = False) -> tuple[list[Record], list[str]]:
    """The pool's images (no labels: ``class_dir`` is empty) and the listed entries that do not exist.

    A missing entry is an error unless ``skip_missing`` (then it is returned, to be counted)."""
    spec = Path(spec)
    if spec.is_dir():
        files = sorted(f for f in spec.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        entries = [f.relative_to(spec).as_posix() for f in files]
    elif spec.is_file():
        entries = _csv_paths(spec) if spec.suffix.lower() == ".csv" else _list_paths(spec)
    else:
        raise PoolError(f"unlabeled pool {spec} does not exist; give a folder, a list file or a CSV with a "
                        "'path' column")
    base = spec if spec.is_dir() else spec.parent
    records = [Record(path=base / e, class_dir="", key=e) for e in entries]
    missing = [r.key for r in records if not r.path.is_file()]
    if missing and not skip_missing:
        raise PoolError(f"unlabeled pool {spec}: {len(missing)} listed images do not exist (first: {missing[0]}); "
                        "fix the list or set data.skip_bad_images=true to skip them")
    records = [r for r in records if r.path.is_file()]
    if not records:
        raise PoolError(f"unlabeled pool {spec} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    return records, missing


def _list_paths(path: Path) -> list[str]:
    text = path.read_bytes().decode("utf-8", "surrogateescape")
    return [line.strip() for line in text.splitlines() if line.strip()]


def _csv_paths(path: Path) -> list[str]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise PoolError(f"{path} is not UTF-8 (byte {err.start}); save it as UTF-8") from err
    reader = csv.DictReader(StringIO(text, newline=""))
    if reader.fieldnames is None or "path" not in reader.fieldnames:
        raise PoolError(f"{path} needs a header with a 'path' column (other columns are ignored)")
    return [row["path"].strip() for row in reader if (row["path"] or "").strip()]


def recorded_pool(root: Path) -> Path | None:
    """The pool ``prepare --unlabeled`` recorded for the dataset at ``root``, if any."""
    meta = Path(root) / "prepare.json"
    if not meta.is_file():
        return None
    pool = read_json(meta).get("unlabeled")
    return Path(pool) if isinstance(pool, str) else None


def file_hash(image: Path | Record) -> str:
    """sha256 of an image's bytes (a file, or a tar shard member), remembered while its file's size and mtime
    stay the same."""
    shard = image.shard if isinstance(image, Record) else None
    real = os.path.realpath(shard if shard is not None else getattr(image, "path", image))
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns, image.offset if shard is not None else 0)
    if key not in _HASHES:
        if shard is None:
            _HASHES[key] = sha256_file(Path(real))
        else:
            with open(real, "rb") as f:
                _HASHES[key] = hashlib.sha256(os.pread(f.fileno(), image.size, image.offset)).hexdigest()
    return _HASHES[key]


def check_disjoint(pool: Iterable[Path], splits: dict[str, list[Path | Record]], where: Path) -> None:
    """Refuse a pool that holds any split's image: the same file (resolved path) or the same bytes."""
    pool = list(pool)
    by_path = {os.path.realpath(getattr(p, "path", p)): (split, getattr(p, "path", p))
               for split, paths in splits.items() for p in paths}
    for p in pool:
        hit = by_path.get(os.path.realpath(p))
        if hit is not None:
            _overlap(where, p, *hit, "is the same file as")
    by_hash: dict[str, tuple[str, Path]] = {}
    for split, paths in splits.items():
        for p in paths:
            by_hash.setdefault(file_hash(p), (split, getattr(p, "path", p)))
    for p in pool:
        hit = by_hash.get(file_hash(p))
        if hit is not None:
            _overlap(where, p, *hit, "has the same bytes as")


def _overlap(where: Path, pool_file: Path, split: str, split_file: Path, how: str) -> None:
    raise PoolError(f"unlabeled pool {where}: {pool_file} {how} {split} image {split_file}; remove it from the pool "
                    "(pool images must not be images of any split, or evaluation would see training images)")


def split_files(dataset: Dataset) -> dict[str, list[Record]]:
    """Every split's images (loose files or tar shard members), by split name, for ``check_disjoint``."""
    return {s.name: list(s.records) for s in (dataset.train, dataset.id_val, dataset.ood_val)}
