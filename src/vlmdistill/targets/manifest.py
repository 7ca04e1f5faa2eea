"""The target store's manifest and integrity checks: what a store holds, and whether its files still do.

``manifest.json`` is read and written here only, as a ``StoreManifest``; the JSON layout (format 2) is::

    {"format": 2, "key": {...}, "n_images": N, "n_views": V, "embed_dim": D, "shard_size": S,
     "dtype": "float16", "shards": {"<i>": {"rows": [start, stop],
                                            "files": {"feats": FILE, "meta": FILE}}}}
    FILE = {"name": ..., "bytes": ..., "sha256": ..., "verified": [size, mtime_ns] | null}

Integrity, and what it trusts: on open every shard file's size is checked; its sha256 is checked too
unless ``verified`` remembers a past verification of exactly this size and mtime (recorded only for
files whose mtime was older than ``SETTLE_NS`` then, so a later write cannot share it). A file changed
in place with its size and mtime restored is therefore trusted without re-hashing: ``verify_store``
(``vlmdistill cache --verify``) re-hashes every file whatever was remembered.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from json import JSONDecodeError
from pathlib import Path
from typing import Any

import numpy as np

from vlmdistill.errors import VlmdistillError
from vlmdistill.io import atomic_write_json, read_json, sha256_file

log = logging.getLogger(__name__)

FORMAT = 2
MANIFEST = "manifest.json"
SETTLE_NS = 2_000_000_000
DTYPE = np.dtype(np.float16)


class StoreError(VlmdistillError, RuntimeError):
    """A target store that cannot be used as it is; the message says why."""


@dataclass
class FileEntry:
    """One shard file as written: its name, size, sha256 and the [size, mtime_ns] last verified."""

    name: str
    bytes: int
    sha256: str
    verified: list[int] | None = None


@dataclass
class ShardEntry:
    rows: list[int]
    feats: FileEntry
    meta: FileEntry


@dataclass
class StoreManifest:
    """What a store directory holds: its key, shape, shard size and the shards written so far."""

    key: dict[str, str]
    n_images: int
    n_views: int
    embed_dim: int
    shard_size: int
    shards: dict[int, ShardEntry] = field(default_factory=dict)
    format: int = FORMAT
    dtype: str = DTYPE.name

    def __post_init__(self) -> None:
        if self.shard_size < 1:
            raise ValueError(f"shard_size must be at least 1, got {self.shard_size}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.n_images, self.n_views, self.embed_dim

    @property
    def n_shards(self) -> int:
        return -(-self.n_images // self.shard_size)

    def rows(self, i: int) -> tuple[int, int]:
        return i * self.shard_size, min((i + 1) * self.shard_size, self.n_images)

    def feats_bytes(self, i: int) -> int:
        start, stop = self.rows(i)
        return (stop - start) * self.n_views * self.embed_dim * DTYPE.itemsize

    def missing(self) -> list[int]:
        return [i for i in range(self.n_shards) if i not in self.shards]

    def save(self, directory: Path) -> None:
        atomic_write_json(Path(directory) / MANIFEST, self.to_json())

    def to_json(self) -> dict[str, Any]:
        shards = {str(i): {"rows": list(e.rows), "files": {"feats": asdict(e.feats), "meta": asdict(e.meta)}}
                  for i, e in sorted(self.shards.items())}
        return {"format": self.format, "key": self.key, "n_images": self.n_images, "n_views": self.n_views,
                "embed_dim": self.embed_dim, "shard_size": self.shard_size, "dtype": self.dtype, "shards": shards}

    @classmethod
    def read(cls, directory: Path) -> StoreManifest | None:
        """The directory's manifest, None when there is none; ``StoreError`` when unreadable or of another format."""
        path = Path(directory) / MANIFEST
        if not path.is_file():
            return None
        try:
            raw = read_json(path)
        except (OSError, JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreError(f"target store manifest {path} is unreadable ({err})") from err
        header = {"format": int, "key": dict, "n_images": int, "n_views": int, "embed_dim": int,
                  "shard_size": int, "shards": dict}
        if not isinstance(raw, dict) or any(not isinstance(raw.get(k), t) for k, t in header.items()):
            raise StoreError(f"target store manifest {path} is malformed")
        if raw["format"] != FORMAT or raw.get("dtype") != DTYPE.name or raw["shard_size"] < 1:
            raise StoreError(f"target store {directory} has another format ({raw['format']}, {raw.get('dtype')})")
        manifest = cls(raw["key"], raw["n_images"], raw["n_views"], raw["embed_dim"], raw["shard_size"])
        for i, entry in raw["shards"].items():
            shard = _shard_entry(i, entry)
            if shard is None:
                log.warning("target store %s: shard entry %r is malformed; it is re-extracted", directory, i)
            else:
                manifest.shards[int(i)] = shard
        return manifest


def _shard_entry(i: str, entry: Any) -> ShardEntry | None:
    try:
        files = entry["files"]
        shard = ShardEntry(list(entry["rows"]), FileEntry(**files["feats"]), FileEntry(**files["meta"]))
    except (KeyError, TypeError, AttributeError):
        return None
    return shard if i.isdigit() else None


# ---------------------------------------------------------------------------------------------- integrity


def _file_ok(directory: Path, entry: FileEntry, size: int, rehash: bool) -> bool:
    """Size always; sha256 when ``rehash`` or no past verification of this exact size and mtime is remembered."""
    try:
        st = (directory / entry.name).stat()
    except FileNotFoundError:
        return False
    if st.st_size != size or st.st_size != entry.bytes:
        return False
    stamp = [st.st_size, st.st_mtime_ns]
    if entry.verified == stamp and not rehash:
        return True
    if sha256_file(directory / entry.name) != entry.sha256:
        return False
    entry.verified = stamp if time.time_ns() - st.st_mtime_ns > SETTLE_NS else None
    return True


def _shard_ok(directory: Path, manifest: StoreManifest, i: int, rehash: bool) -> bool:
    """The shard's row range is the expected one and both its files are intact."""
    entry = manifest.shards[i]
    return (i < manifest.n_shards and entry.rows == list(manifest.rows(i))
            and _file_ok(directory, entry.feats, manifest.feats_bytes(i), rehash)
            and _file_ok(directory, entry.meta, entry.meta.bytes, rehash))


def drop_bad_shards(directory: Path, manifest: StoreManifest, rehash: bool = False) -> list[int]:
    """Forget (and return) shards whose files are missing, truncated or corrupted; save new verifications."""
    before = manifest.to_json()
    bad = [i for i in sorted(manifest.shards) if not _shard_ok(directory, manifest, i, rehash)]
    for i in bad:
        log.warning("target store %s: shard %s is missing, truncated or corrupted; it is not read", directory, i)
        del manifest.shards[i]
    if manifest.to_json() != before:
        manifest.save(directory)
    return bad


def verify_store(directory: Path) -> list[int]:
    """Re-hash every file of every shard of the store in ``directory`` against the manifest's sha256.

    Returns the damaged shards (sorted), which are dropped from the manifest so that the next
    ``open_store`` re-extracts exactly them; ``StoreError`` when there is no readable manifest.
    """
    manifest = StoreManifest.read(Path(directory))
    if manifest is None:
        raise StoreError(f"{directory} holds no target store ({MANIFEST} is missing)")
    return drop_bad_shards(Path(directory), manifest, rehash=True)


def verify_stores(cache_dir: Path) -> dict[Path, list[int]]:
    """``verify_store`` on every store under ``<cache_dir>/targets``: store directory -> damaged shards."""
    return {m.parent: verify_store(m.parent) for m in sorted((Path(cache_dir) / "targets").glob(f"*/{MANIFEST}"))}
