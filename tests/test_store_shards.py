"""The sharded target store resumes, repairs only what is damaged, refuses other keys, and reads via mmap."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import vlmdistill.targets.manifest as manifest_mod
from vlmdistill.config import TeacherConfig
from vlmdistill.data.dataset import open_dataset
from vlmdistill.data.source import ImageSource
from vlmdistill.io import read_json
from vlmdistill.targets.store import (
    MANIFEST,
    StoreError,
    StoreMismatchError,
    TargetStore,
    ViewRecipe,
    load_store,
    open_store,
    store_footprint,
    store_path,
    verify_store,
    verify_stores,
)
from vlmdistill.teachers import load_teacher

RECIPE = ViewRecipe(2, 0, (0.3, 1.0), True)
SHARD = 3


class Killed(Exception):
    """Stands for the process being killed mid-extraction."""


class Teacher:
    """Counts encoder calls and, when told to, dies on call ``fail_at`` as a killed extraction would."""

    def __init__(self, inner: object, fail_at: int | None = None) -> None:
        self.inner, self.calls, self.fail_at = inner, 0, fail_at

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.fail_at:
            raise Killed
        return self.inner.encode_images(x)


@pytest.fixture(scope="module")
def inner(open_clip_teacher_files: tuple[Path, Path]) -> object:
    cfg_path, ckpt = open_clip_teacher_files
    return load_teacher(TeacherConfig(model_config=cfg_path, checkpoint=ckpt, device="cpu"))


@pytest.fixture(scope="module")
def source(prepared: Path) -> ImageSource:
    return ImageSource(open_dataset(prepared).train.records, 40, "center_crop")


@pytest.fixture(scope="module")
def fresh(inner: object, source: ImageSource, tmp_path_factory: pytest.TempPathFactory) -> TargetStore:
    """An uninterrupted extraction to compare against."""
    return open_store(Teacher(inner), source, RECIPE, tmp_path_factory.mktemp("fresh"), False, SHARD)


def _open(teacher: Teacher, source: ImageSource, cache: Path) -> TargetStore:
    return open_store(teacher, source, RECIPE, cache, progress=False, shard_size=SHARD)


def _files(store: TargetStore) -> dict[str, tuple[int, int]]:
    """Identity (inode, mtime) of every shard file, to see which ones were rewritten."""
    return {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in store.path.glob("0*")}


def _assert_same(store: TargetStore, fresh: TargetStore) -> None:
    assert torch.equal(store.feats, fresh.feats)
    assert torch.equal(store.boxes, fresh.boxes) and torch.equal(store.flips, fresh.flips)
    assert torch.equal(store.valid, fresh.valid) and bool(store.valid.all())


def test_killed_extraction_resumes_at_the_missing_shards(
    inner: object, source: ImageSource, fresh: TargetStore, tmp_path: Path
) -> None:
    n_shards = -(-len(source) // SHARD)
    assert n_shards >= 4 and len(fresh.shards) == n_shards
    with pytest.raises(Killed):
        _open(Teacher(inner, fail_at=3), source, tmp_path)  # one teacher call per shard here
    directory = store_path(tmp_path, fresh.key)
    assert sorted(read_json(directory / MANIFEST)["shards"]) == ["0", "1"]
    kept = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in directory.glob("0000[01]*")}
    resumed = Teacher(inner)
    store = _open(resumed, source, tmp_path)
    assert resumed.calls == n_shards - 2
    assert all(_files(store)[name] == ident for name, ident in kept.items())
    rows = [e["rows"] for e in sorted(read_json(directory / MANIFEST)["shards"].values(), key=lambda e: e["rows"])]
    assert [r for a, b in rows for r in range(a, b)] == list(range(len(source)))
    _assert_same(store, fresh)
    again = Teacher(inner)
    _open(again, source, tmp_path)
    assert again.calls == 0


@pytest.mark.parametrize("damage", ["flip_feats", "flip_meta", "truncate_feats", "delete_meta"])
def test_damaged_shard_is_detected_and_only_it_re_extracted(
    inner: object, source: ImageSource, fresh: TargetStore, tmp_path: Path, damage: str
) -> None:
    store = _open(Teacher(inner), source, tmp_path)
    expected, before = store.feats, _files(store)
    kind = "meta.safetensors" if damage.endswith("meta") else "feats.f16"
    path = store.path / f"00001.{kind}"
    if damage.startswith("flip"):
        with open(path, "r+b") as f:
            f.seek(path.stat().st_size // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif damage == "truncate_feats":
        os.truncate(path, path.stat().st_size // 2)
    else:
        path.unlink()
    del store
    with pytest.raises(StoreError, match=r"lacks shards \[1\]"):
        load_store(tmp_path, fresh.key)
    teacher = Teacher(inner)
    repaired = _open(teacher, source, tmp_path)
    assert teacher.calls == 1
    after = _files(repaired)
    assert {n for n in after if after[n] != before.get(n)} == {"00001.feats.f16", "00001.meta.safetensors"}
    assert torch.equal(repaired.feats, expected)
    _assert_same(repaired, fresh)


def test_verification_is_remembered_until_a_file_changes(
    inner: object, source: ImageSource, fresh: TargetStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = _open(Teacher(inner), source, tmp_path)
    old = time.time() - 60
    for f in store.path.glob("0*"):
        os.utime(f, (old, old))
    hashed: list[str] = []
    real = manifest_mod.sha256_file
    monkeypatch.setattr(manifest_mod, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    load_store(tmp_path, fresh.key)
    assert len(hashed) == 2 * len(store.shards)  # settled files: hashed once, then remembered
    hashed.clear()
    load_store(tmp_path, fresh.key)
    assert hashed == []
    path = store.path / "00002.feats.f16"
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))  # same size, new mtime
    with pytest.raises(StoreError, match=r"lacks shards \[2\]"):
        load_store(tmp_path, fresh.key)
    assert hashed == ["00002.feats.f16"]


def test_verify_store_rehashes_what_size_and_mtime_let_pass(
    inner: object, source: ImageSource, fresh: TargetStore, tmp_path: Path
) -> None:
    store = _open(Teacher(inner), source, tmp_path)
    old = time.time() - 60
    for f in store.path.glob("0*"):
        os.utime(f, ns=(int(old * 1e9), int(old * 1e9)))
    load_store(tmp_path, fresh.key)  # hashes once and remembers [size, mtime]
    path = store.path / "00002.feats.f16"
    stamp = path.stat().st_mtime_ns
    data = bytearray(path.read_bytes())
    data[0] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stamp, stamp))  # changed in place, size and mtime restored
    assert np.array_equal(load_store(tmp_path, fresh.key).shards[0].feats, fresh.shards[0].feats)  # trusted
    assert verify_store(store.path) == [2]
    with pytest.raises(StoreError, match=r"lacks shards \[2\]"):
        load_store(tmp_path, fresh.key)
    teacher = Teacher(inner)
    _assert_same(_open(teacher, source, tmp_path), fresh)
    assert teacher.calls == 1
    assert verify_stores(tmp_path) == {store.path: []}
    with pytest.raises(StoreError, match="holds no target store"):
        verify_store(tmp_path)


def test_load_store_names_the_differing_key(inner: object, source: ImageSource, tmp_path: Path) -> None:
    store = _open(Teacher(inner), source, tmp_path)
    other = {**store.key, "teacher_id": "another-teacher"}
    with pytest.raises(StoreMismatchError, match="teacher_id") as info:
        load_store(tmp_path, other)
    assert info.value.fields == ["teacher_id"]
    shutil.copytree(store.path, store_path(tmp_path, {**store.key, "views": "n=5"}))
    with pytest.raises(StoreMismatchError, match="views") as info:
        load_store(tmp_path, {**store.key, "views": "n=5"})
    assert info.value.fields == ["views"]
    with pytest.raises(StoreError, match="no target store"):
        load_store(tmp_path / "empty", store.key)
    assert torch.equal(load_store(tmp_path, store.key).feats, store.feats)


def test_open_store_logs_the_differing_key_and_builds_its_own(
    inner: object, source: ImageSource, fresh: TargetStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = _open(Teacher(inner), source, tmp_path)
    caplog.set_level(logging.INFO, logger="vlmdistill")
    other = open_store(Teacher(inner), source, ViewRecipe(2, 1, (0.3, 1.0), True), tmp_path, False, SHARD)
    assert "differs in views" in caplog.text and other.path != store.path
    assert not torch.equal(other.boxes, store.boxes) and torch.equal(load_store(tmp_path, store.key).feats, fresh.feats)


def test_unreadable_manifest_is_rebuilt(inner: object, source: ImageSource, fresh: TargetStore, tmp_path: Path) -> None:
    store = _open(Teacher(inner), source, tmp_path)
    (store.path / MANIFEST).write_text("{not json")
    teacher = Teacher(inner)
    rebuilt = _open(teacher, source, tmp_path)
    assert teacher.calls == len(fresh.shards)
    _assert_same(rebuilt, fresh)


def test_targets_gather_across_shards_from_memory_maps(fresh: TargetStore) -> None:
    n = len(fresh.valid)
    g = torch.Generator().manual_seed(0)
    index = torch.cat([torch.randperm(n, generator=g), torch.tensor([n - 1, 0, n - 1])])
    view_ids = torch.randint(0, fresh.n_views, (len(index),), generator=g)
    everything = fresh.feats
    got = fresh.targets(index, view_ids)
    assert got.dtype == torch.float32 and torch.equal(got, everything[index, view_ids].float())
    assert fresh.targets(index[:0], view_ids[:0]).shape == (0, fresh.embed_dim)
    for shard in fresh.shards:
        assert isinstance(shard.feats, np.memmap) and shard.feats.mode == "r" and not shard.feats.flags.writeable
        assert Path(shard.feats.filename).parent == fresh.path
    foot = store_footprint(fresh)
    assert (foot["n_images"], foot["n_views"], foot["embed_dim"]) == (n, 3, fresh.embed_dim)
    assert foot["disk_bytes_per_1000_image_views"] > 1000 * fresh.embed_dim * 2


def test_bad_images_are_invalid_and_never_served(
    inner: object, source: ImageSource, fresh: TargetStore, tmp_path: Path
) -> None:
    records = list(source.records)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    bad = {5, 6, 7, 8, len(records) - 1}  # a shard's last row, a whole shard, the very last row
    for i in bad:
        records[i] = type(records[i])(broken, records[i].class_dir, records[i].key)
    bad_source = ImageSource(records, 40, "center_crop", skip_bad=True)
    store = _open(Teacher(inner), bad_source, tmp_path)
    assert store.valid.tolist() == [i not in bad for i in range(len(records))]
    assert bad_source.bad == bad
    ok, view = torch.tensor([3, 4, 9]), torch.ones(3, dtype=torch.long)
    assert torch.allclose(store.targets(ok, view), fresh.targets(ok, view), atol=1e-2)
    with pytest.raises(StoreError, match=r"\[5\]"):
        store.targets(torch.tensor([3, 5]), torch.zeros(2, dtype=torch.long))
