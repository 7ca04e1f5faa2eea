"""Datasets in tar shards: the same images, keys, classes, training and target store as loose files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from vlmdistill.config import TeacherConfig, load_config
from vlmdistill.data.dataset import open_dataset
from vlmdistill.data.images import BadImageError
from vlmdistill.data.prepare import prepare
from vlmdistill.data.source import ImageSource
from vlmdistill.data.stream import ShardStream, assign_shards, shard_groups
from vlmdistill.runfolder import RunFolder
from vlmdistill.targets.store import ViewRecipe, open_store
from vlmdistill.teachers import load_teacher
from vlmdistill.train import distill
from vlmdistill.workspace import build_workspace

SPLIT_NAMES = ("train", "id_val", "ood_val")


@pytest.fixture(scope="module")
def sharded(prepared: Path, raw_images: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``prepared`` dataset's images, split by the same seed, written as shards of 5 images."""
    out = tmp_path_factory.mktemp("sharded") / "ds"
    prepare(out, images=raw_images, descriptions=raw_images.parent / "descriptions.json", seed=0,
            shards=True, shard_size=5)
    return out


def test_prepare_shards_round_trip(prepared: Path, sharded: Path) -> None:
    loose, shards = open_dataset(prepared), open_dataset(sharded)
    assert json.loads((sharded / "prepare.json").read_text())["format"] == "shards"
    assert not (sharded / "train_data.txt").exists() and (sharded / "label2text.txt").is_file()
    assert [c.name for c in loose.classes] == [c.name for c in shards.classes]
    for name in SPLIT_NAMES:
        a, b = getattr(loose, name), getattr(shards, name)
        assert [r.key for r in a.records] == [r.key for r in b.records]
        assert a.labels == b.labels and a.space.dirs == b.space.dirs
        for ra, rb in zip(a.records, b.records, strict=True):
            with rb.shard.open("rb") as f:
                f.seek(rb.offset)
                assert f.read(rb.size) == ra.path.read_bytes()
    with tarfile.open(sharded / "shards" / "train-000000.tar") as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("train-0000000.json").read())
        cls = int(tar.extractfile("train-0000000.cls").read())
    assert set(names[:3]) == {"train-0000000.png", "train-0000000.cls", "train-0000000.json"} and len(names) == 15
    first = shards.train.records[0]
    assert meta["key"] == first.key and meta["class_dir"] == first.class_dir
    assert shards.classes[cls].dir == first.class_dir


def test_training_on_shards_equals_loose_files(base_overrides: list[str], sharded: Path) -> None:
    """Bit-identical: shard members are the files' own bytes, decoded by the same code in the same order,
    so pixels, stored teacher views and every step are the same on CPU."""
    common = [*base_overrides, "loss.imcst.weight=1", "train.analysis=false", "optim.epochs=1"]
    loose = load_config(None, [*common, "name=loose"])
    shards = load_config(None, [*common, "name=shards", f"data.dir={sharded}", "data.preload=false"])
    ra, rb = distill(loose, build_workspace(loose)), distill(shards, build_workspace(shards))
    assert ra["metrics"] == rb["metrics"]
    a = RunFolder(loose.run_dir).student().weights
    b = RunFolder(shards.run_dir).student().weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_preload_streams_the_same_pixels(sharded: Path) -> None:
    records = open_dataset(sharded).ood_val.records
    streamed = ImageSource(records, 40, "center_crop", preload=True)
    read = torch.cat([b.images for b in ImageSource(records, 40, "center_crop").batches(torch.arange(24), 7)])
    assert torch.equal(streamed._images, read)


def test_store_keyed_by_members_reused_and_rebuilt(open_clip_teacher_files: tuple[Path, Path], sharded: Path,
                                                   tmp_path: Path) -> None:
    cfg_path, ckpt = open_clip_teacher_files
    teacher = load_teacher(TeacherConfig(model_config=cfg_path, checkpoint=ckpt, device="cpu"))
    data = tmp_path / "ds"
    shutil.copytree(sharded, data)
    recipe = ViewRecipe(1, 0, (0.5, 1.0), True)
    calls: list[int] = []
    encode = teacher.encode_images
    teacher.encode_images = lambda x: (calls.append(len(x)), encode(x))[1]

    def store() -> object:
        return open_store(teacher, ImageSource(open_dataset(data).train.records, 40, "center_crop"), recipe,
                          tmp_path / "cache", progress=False)

    first = store()
    assert first.key["images"] and sum(calls) > 0
    calls.clear()
    again = store()
    assert again.path == first.path and not calls
    shard = data / "shards" / "train-000001.tar"
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    rebuilt = store()
    assert rebuilt.path != first.path and sum(calls) > 0 and torch.equal(rebuilt.feats, first.feats)


def test_corrupt_member_is_a_bad_image(sharded: Path, tmp_path: Path) -> None:
    data = tmp_path / "ds"
    shutil.copytree(sharded, data)
    record = open_dataset(data).train.records[7]
    with record.shard.open("r+b") as f:
        f.seek(record.offset)
        f.write(b"\0" * record.size)
    records = open_dataset(data).train.records
    with pytest.raises(BadImageError, match=rf"{record.shard.name}:{record.key}"):
        list(ImageSource(records, 40, "center_crop").batches(torch.arange(len(records)), 8))
    source = ImageSource(records, 40, "center_crop", skip_bad=True)
    seen = torch.cat([b.index for b in source.batches(torch.arange(len(records)), 8)])
    assert 7 not in seen.tolist() and len(seen) == len(records) - 1 and source.bad_keys == [record.key]


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("num_workers", [1, 2])
def test_rank_and_worker_split_cover_every_member_once(sharded: Path, world_size: int, num_workers: int) -> None:
    records = open_dataset(sharded).ood_val.records
    groups = shard_groups(records)
    assert len(groups) == 5
    seen = []
    for rank in range(world_size):
        for worker in range(num_workers):
            for n in assign_shards(len(groups), rank, world_size, worker, num_workers):
                seen += groups[n]
    assert sorted(seen) == list(range(len(records)))
    by_rank = [[i for _, i, _ in ShardStream(groups, lambda i: (None, i, True), r, world_size)]
               for r in range(world_size)]
    assert sorted(i for part in by_rank for i in part) == list(range(len(records)))
    with pytest.raises(ValueError):
        assign_shards(5, world_size, world_size)


def _make_large(root: Path, n: int) -> None:
    """A shard dataset index of ``n`` train entries (and 10 OOD), over two small placeholder shards."""
    folder = root / "shards"
    folder.mkdir(parents=True)
    splits = {}
    for split, count in (("train", n), ("val", 10)):
        (folder / f"{split}-000000.tar").write_bytes(b"\0" * 1024)
        keys = [f"{split}/c{i % 100:03d}{'' if split == 'train' else 'x'}/img_{i:08d}.jpg" for i in range(count)]
        (folder / f"{split}.keys").write_text("\n".join(keys) + "\n")
        members = np.zeros(count, dtype=[("shard", "<i4"), ("offset", "<i8"), ("size", "<i8")])
        np.save(folder / f"{split}.members.npy", members)
        splits[split] = {"members": count, "shards": [{"name": f"{split}-000000.tar", "bytes": 1024}]}
    (folder / "index.json").write_text(json.dumps({"format": 1, "shard_size": n, "splits": splits}))
    (root / "prepare.json").write_text(json.dumps({"format": "shards"}))


def _peak_rss_mb(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code + "\nimport resource\nprint(resource.getrusage("
                          "resource.RUSAGE_SELF).ru_maxrss)"], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1]) / 1024


def test_large_list_opens_in_bounded_memory(tmp_path: Path) -> None:
    """2*10^5 entries: opening adds under 40 MB over importing (a list of Records would add ~100 MB)."""
    _make_large(tmp_path / "big", 200_000)
    imports = "from vlmdistill.data.dataset import open_dataset"
    base = _peak_rss_mb(imports)
    opened = _peak_rss_mb(f"{imports}\nd = open_dataset({str(tmp_path / 'big')!r})\nassert len(d.train) == 200000")
    assert opened - base < 40, (base, opened)
