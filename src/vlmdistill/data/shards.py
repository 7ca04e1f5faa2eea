"""Splits stored as webdataset tar shards, read by byte offset or streamed shard by shard.

Layout (``vlmdistill prepare --shards``; label2text.txt, chatgpt.txt and prepare.json as for loose files)::

    <root>/shards/index.json                    format, shard size, per split: its shards' names, members, bytes
    <root>/shards/<split>-000000.tar ...        members <name>.<ext> (the image's own bytes, never re-encoded),
                                                <name>.cls (class index in label2text order),
                                                <name>.json ({"key", "class_dir", "source"})
    <root>/shards/<split>.keys                  each member's key, one a line, in list-file format
                                                (``<split>/<class_dir>/<file>``, the key a loose file would have)
    <root>/shards/<split>.members.npy           per member: shard number, byte offset and size of its image

Offsets are read from the tar headers right after each shard is written, so an image is one ``pread``
away (``ImageSource`` serves any index batch, and the target store keys members by their keys as it
keys files). ``data/stream.py`` reads them: by offset, or whole shards in order split across ranks and
DataLoader workers.
"""

from __future__ import annotations

import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from vlmdistill.data.compact import ListEntryError, Members, Record, Records, from_pairs, read_entries
from vlmdistill.errors import VlmdistillError
from vlmdistill.io import atomic_write_bytes, atomic_write_json, atomic_write_text, read_json

SHARDS_DIR = "shards"
INDEX = "index.json"
FORMAT = 1
MEMBER_DTYPE = np.dtype([("shard", "<i4"), ("offset", "<i8"), ("size", "<i8")])


class ShardError(VlmdistillError, ValueError):
    """A shard dataset that cannot be used; the message names the file and the fix."""


# ---------------------------------------------------------------------------------------------- writing


def _member_offsets(tar_path: Path, exts: dict[int, str]) -> dict[int, tuple[int, int]]:
    """Member number -> (byte offset, size) of its image, read from the headers of a written tar."""
    out = {}
    with tarfile.open(tar_path) as tar:
        for info in tar:
            name, _, ext = info.name.partition(".")
            number = int(name.rsplit("-", 1)[1])
            if ext == exts[number]:
                out[number] = (info.offset_data, info.size)
    return out


def write_split(folder: Path, split: str, items: list[tuple[str, Path, int]], shard_size: int) -> list[str]:
    """Write one split's images (key, source file, class index) as tar shards of ``shard_size`` images
    plus its key and member index files; returns the shard names. ``folder`` is the dataset being built."""
    import webdataset

    out = Path(folder) / SHARDS_DIR
    out.mkdir(parents=True, exist_ok=True)
    exts = {i: (src.suffix.lower().lstrip(".") or "img") for i, (_, src, _) in enumerate(items)}
    if items:
        with webdataset.ShardWriter(str(out / f"{split}-%06d.tar"), maxcount=shard_size, verbose=0) as sink:
            for i, (key, src, cls) in enumerate(items):
                sink.write({"__key__": f"{split}-{i:07d}", exts[i]: Path(src).read_bytes(), "cls": cls,
                            "json": {"key": key, "class_dir": key.split("/")[1], "source": str(src)}})
    names = sorted(p.name for p in out.glob(f"{split}-*.tar"))
    members = np.zeros(len(items), dtype=MEMBER_DTYPE)
    for number, name in enumerate(names):
        for i, (offset, size) in _member_offsets(out / name, exts).items():
            members[i] = (number, offset, size)
    atomic_write_text(out / f"{split}.keys", "".join(f"{k}\n" for k, _, _ in items), errors="surrogateescape")
    atomic_write_bytes(out / f"{split}.members.npy", _npy_bytes(members))
    return names


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_index(folder: Path, shard_size: int, names: dict[str, list[str]], counts: dict[str, int]) -> None:
    """``shards/index.json``: what ``open_shards`` checks the shards against."""
    out = Path(folder) / SHARDS_DIR
    splits = {s: {"members": counts[s], "shards": [{"name": n, "bytes": (out / n).stat().st_size} for n in ns]}
              for s, ns in names.items()}
    atomic_write_json(out / INDEX, {"format": FORMAT, "shard_size": shard_size, "splits": splits})


# ---------------------------------------------------------------------------------------------- opening


def _read_index(root: Path) -> dict:
    path = root / SHARDS_DIR / INDEX
    try:
        index = read_json(path)
    except (OSError, ValueError) as err:
        raise ShardError(f"{path} is missing or unreadable ({err}); run `vlmdistill prepare --shards` again") from err
    if not isinstance(index, dict) or index.get("format") != FORMAT or not isinstance(index.get("splits"), dict):
        raise ShardError(f"{path} is not a shard index of format {FORMAT}; run `vlmdistill prepare --shards` again")
    return index


def _open_split(root: Path, split: str, info: dict, skip_missing: bool) -> tuple[Records, list[str]]:
    """One split's members with their locations; members of missing shards are dropped (with ``skip_missing``)."""
    folder = root / SHARDS_DIR
    try:
        records = read_entries(folder / f"{split}.keys", split, root)
        members = np.load(folder / f"{split}.members.npy", allow_pickle=False)
    except (OSError, ValueError, ListEntryError) as err:
        raise ShardError(f"index of split {split} under {folder} is unreadable ({err}); "
                         "run `vlmdistill prepare --shards` again") from err
    if len(members) != len(records) or len(records) != info["members"]:
        raise ShardError(f"{folder}/{split}.keys and {split}.members.npy disagree with {INDEX}; "
                         "run `vlmdistill prepare --shards` again")
    shards = tuple(folder / s["name"] for s in info["shards"])
    absent = [n for n, s in enumerate(info["shards"]) if not (folder / s["name"]).is_file()]
    for n, s in enumerate(info["shards"]):
        if n not in absent and (folder / s["name"]).stat().st_size != s["bytes"]:
            raise ShardError(f"shard {folder / s['name']} is not the size {INDEX} records ({s['bytes']} bytes); "
                             "it was rewritten: run `vlmdistill prepare --shards` again")
    records.members = Members(shards, np.ascontiguousarray(members["shard"]), np.ascontiguousarray(members["offset"]),
                              np.ascontiguousarray(members["size"]))
    lost = np.isin(records.members.shard, absent)
    if not lost.any():
        return records, []
    missing = [records.key(i) for i in np.flatnonzero(lost)]
    if not skip_missing:
        raise ShardError(f"shards {[shards[n].name for n in absent][:5]} under {folder} are missing "
                         f"({len(missing)} images); restore them or set data.skip_bad_images=true to skip them")
    return records.take(~lost), missing


def open_shards(root: Path, splits: Sequence[str], skip_missing: bool) -> tuple[dict[str, Records], list[str]]:
    """Every split of a shard dataset as compact records, and the keys of members whose shard is missing."""
    index = _read_index(Path(root))
    out, missing = {}, []
    for split in splits:
        if split not in index["splits"]:
            out[split] = from_pairs(Path(root), [])
            continue
        out[split], lost = _open_split(Path(root), split, index["splits"][split], skip_missing)
        missing += lost
    return out, missing


def shards_fingerprint(records: Sequence[Record]) -> str:
    """What the target store keys shard members by: each member's key and location, and every shard's size
    and mtime (one ``stat`` per shard, not per image), so rewriting a shard makes a new key."""
    from vlmdistill.io import sha256_strings

    stats: dict[Path, str] = {}
    parts = []
    for r in records:
        if r.shard not in stats:
            st = r.shard.stat()
            stats[r.shard] = f"{r.shard.name}|{st.st_size}|{st.st_mtime_ns}"
        parts.append(f"{r.key}|{stats[r.shard]}|{r.offset}|{r.size}")
    return sha256_strings(parts)
