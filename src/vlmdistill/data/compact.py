"""A split's images held compactly, so a list of a million entries opens in bounded memory.

A Python ``Record`` costs some hundreds of bytes with its strings; ``Records`` instead holds every key in
one bytes blob with start/stop offsets and each class as an index into a short tuple of class folders
(about 28 bytes an entry, plus the key itself), and makes a ``Record`` only when one is asked for. It is a
read-only sequence: indexing, slicing, iteration and ``+`` (which gives a plain list) work as on the list
of records it replaces. Members of tar shards also carry (shard, byte offset, byte size).
"""

from __future__ import annotations

import io
import os
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import overload

import numpy as np

from vlmdistill.errors import VlmdistillError


class ListEntryError(VlmdistillError, ValueError):
    """A list-file line that cannot be a split entry; the message names the file, the line and the fix."""


@dataclass(frozen=True)
class Record:
    """One image: where it is, its class folder, and the stable key it is cached under.

    A member of a tar shard has ``shard`` (the tar file) and its bytes' ``offset`` and ``size`` there;
    ``path`` is then the path the image would have as a loose file (``<root>/<key>``), for its name.
    """

    path: Path
    class_dir: str
    key: str
    shard: Path | None = None
    offset: int = 0
    size: int = 0


@dataclass(frozen=True)
class Members:
    """Where each entry's bytes are: shard number (into ``shards``), byte offset and size in that tar."""

    shards: tuple[Path, ...]
    shard: np.ndarray
    offset: np.ndarray
    size: np.ndarray

    def take(self, index: np.ndarray) -> Members:
        return Members(self.shards, self.shard[index], self.offset[index], self.size[index])


class Records(Sequence[Record]):
    """Records made on access from a key blob, key offsets and class indices (see the module docstring)."""

    def __init__(self, root: Path, blob: bytes, starts: np.ndarray, stops: np.ndarray, classes: np.ndarray,
                 class_dirs: tuple[str, ...], members: Members | None = None) -> None:
        self.root, self.blob, self.starts, self.stops = Path(root), blob, starts, stops
        self.classes, self.class_dirs, self.members = classes, class_dirs, members

    def __len__(self) -> int:
        return len(self.starts)

    def key(self, i: int) -> str:
        return self.blob[self.starts[i]:self.stops[i]].decode("utf-8", "surrogateescape")

    def _record(self, i: int) -> Record:
        key = self.key(i)
        path, class_dir = self.root / key, self.class_dirs[self.classes[i]]
        m = self.members
        if m is None:
            return Record(path, class_dir, key)
        return Record(path, class_dir, key, m.shards[m.shard[i]], int(m.offset[i]), int(m.size[i]))

    @overload
    def __getitem__(self, i: int) -> Record: ...

    @overload
    def __getitem__(self, i: slice) -> Records: ...

    def __getitem__(self, i: int | slice) -> Record | Records:
        if isinstance(i, slice):
            return self.take(np.arange(len(self))[i])
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range ({n} records)")
        return self._record(int(i) % n)

    def __iter__(self) -> Iterator[Record]:
        return (self._record(i) for i in range(len(self)))

    def __add__(self, other: Sequence[Record]) -> list[Record]:
        return [*self, *other]

    def __radd__(self, other: Sequence[Record]) -> list[Record]:
        return [*other, *self]

    def take(self, index: np.ndarray) -> Records:
        """The entries at ``index`` (an index array or a boolean mask), sharing the key blob."""
        m = None if self.members is None else self.members.take(index)
        return Records(self.root, self.blob, self.starts[index], self.stops[index], self.classes[index],
                       self.class_dirs, m)

    def present_dirs(self) -> set[str]:
        return {self.class_dirs[c] for c in np.unique(self.classes)}

    def labels(self, index: dict[str, int]) -> list[int]:
        """Each entry's class as an index into a label space (``index``: class folder -> label)."""
        table = np.array([index.get(d, -1) for d in self.class_dirs], dtype=np.int64)
        return table[self.classes].tolist() if len(self.classes) else []


def read_entries(path: Path, split: str, root: Path) -> Records:
    """A list file (one ``<split>/<class_dir>/<file>`` a line) as ``Records`` under ``root``.

    Lines are read, checked and packed one at a time, so no string or list the size of the file is built. Bytes
    that are not UTF-8 (file names are bytes on Linux) come back as the same bytes when opened.
    """
    blob, starts, stops, classes = io.BytesIO(), array("q"), array("q"), array("i")
    class_ids: dict[str, int] = {}
    with Path(path).open("rb") as lines:
        for n, raw in enumerate(lines, start=1):
            line = raw.decode("utf-8", "surrogateescape").strip()
            if line:
                _pack(path, split, n, line, blob, starts, stops, classes, class_ids)
    return Records(root, blob.getvalue(), np.frombuffer(starts, dtype=np.int64), np.frombuffer(stops, dtype=np.int64),
                   np.frombuffer(classes, dtype=np.int32), tuple(class_ids))


def _pack(path: Path, split: str, n: int, line: str, blob: io.BytesIO, starts: array, stops: array, classes: array,
          class_ids: dict[str, int]) -> None:
    """Check one list-file line and append it to the packed entries."""
    parts = line.split("/", 2)
    if line.startswith("/") or ".." in line.split("/"):
        raise ListEntryError(
            f"{path}:{n}: entry {line!r} points outside the dataset folder (absolute or '..'); "
            f"entries must be '{split}/<class_dir>/<file>' under it"
        )
    if len(parts) < 3:
        raise ListEntryError(f"{path}:{n}: expected '{split}/<class_dir>/<file>', got {line!r}")
    starts.append(blob.tell())
    blob.write(line.encode("utf-8", "surrogateescape"))
    stops.append(blob.tell())
    classes.append(class_ids.setdefault(parts[1], len(class_ids)))


def from_pairs(root: Path, pairs: list[tuple[str, str]]) -> Records:
    """(key, class_dir) pairs (a scanned split folder) as ``Records``."""
    keys = [k.encode("utf-8", "surrogateescape") for k, _ in pairs]
    stops = np.cumsum([len(k) for k in keys], dtype=np.int64)
    class_ids: dict[str, int] = {}
    classes = np.array([class_ids.setdefault(c, len(class_ids)) for _, c in pairs], dtype=np.int32)
    return Records(root, b"".join(keys), stops - np.array([len(k) for k in keys], dtype=np.int64), stops,
                   classes, tuple(class_ids))


def record_key_path(record: Record) -> str:
    """Where a record's bytes are, as error messages and bad-image lists name them: the file, or ``<tar>:<key>``."""
    return os.fspath(record.path) if record.shard is None else f"{record.shard}:{record.key}"
