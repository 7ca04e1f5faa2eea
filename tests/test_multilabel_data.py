"""Prepared multi-label data: the ID/OOD object split, stacked cameras, the teacher camera's RGB and its store
key, views cropping every channel together, and bad scenes."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image

from vlmdistill.data.dataset import DatasetError
from vlmdistill.data.multilabel_set import open_multilabel, prepare_multilabel
from vlmdistill.data.scenes import SceneLayout, SceneSource
from vlmdistill.data.views import Views, render
from vlmdistill.multilabel.h5scenes import BadSceneError

S = 8
ID = ["apple", "banana", "dice"]


def _scene(f: h5py.File, key: str, names: list[str], value: int, depth: float = 1.0) -> None:
    """Base RGB = value, hand RGB = value + 100, hand RGB's red channel a column ramp; depths ``depth`` / 0.5 m."""
    group = f.create_group(key)
    base = np.full((S, S, 3), value, dtype=np.uint8)
    hand = np.full((S, S, 3), value + 100, dtype=np.uint8)
    hand[:, :, 0] = np.arange(S, dtype=np.uint8)[None, :] * 10
    for camera, rgb, d in (("base", base, depth), ("hand", hand, 0.5)):
        group.create_dataset(f"dict_str_{camera}_camera/dict_str_rgb", data=rgb)
        group.create_dataset(f"dict_str_{camera}_camera/dict_str_depth", data=np.full((S, S, 1), d, np.float32))
    group.create_dataset("model_ids", data=np.array([f"{i:03d}_{n.replace(' ', '_')}".encode()
                                                      for i, n in enumerate(names)]))


@pytest.fixture
def h5file(tmp_path: Path) -> Path:
    path = tmp_path / "scenes.h5"
    with h5py.File(path, "w") as f:
        for i in range(6):  # ID-only scenes
            _scene(f, f"id_{i}", [ID[i % 3], ID[(i + 1) % 3]], 10 + i)
        _scene(f, "ood_0", ["apple", "golf ball"], 50)
        _scene(f, "ood_1", ["power drill", "dice", "golf ball"], 60)
    return path


def test_h5_object_split(h5file: Path, tmp_path: Path) -> None:
    counts = prepare_multilabel(tmp_path / "ds", h5=[(None, h5file)], id_objects=ID, seed=0)
    assert counts == {"train": 5, "val_on_train": 1, "val": 2, "skipped": 0}  # ceil(0.7 * 6) = 5
    ds = open_multilabel(tmp_path / "ds")
    assert ds.id_objects == tuple(ID) and ds.ood_objects == ("golf ball", "power drill")
    assert {i.scene for i in ds.splits["val"]} == {"ood_0", "ood_1"}
    assert all(set(i.objects) <= set(ID) for s in ("train", "val_on_train") for i in ds.splits[s])
    again = prepare_multilabel(tmp_path / "ds2", h5=[(None, h5file)], id_objects=ID, seed=0)
    assert again == counts and open_multilabel(tmp_path / "ds2").splits == ds.splits


def test_given_train_split_must_hold_only_id_objects(h5file: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"ood_0 is given as train but holds non-ID objects \['golf ball'\]"):
        prepare_multilabel(tmp_path / "ds", h5=[("train", h5file)], id_objects=ID)


def test_csv_split_column_gives_the_id_objects(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (10, 6), (200, 10, 10)).save(tmp_path / name)
    (tmp_path / "l.csv").write_text("path,labels,split\na.png,apple;dice,train\nb.png,dice,val_on_train\n"
                                    "c.png,pear;apple,val\n")
    assert prepare_multilabel(tmp_path / "ds", csv_path=tmp_path / "l.csv") == \
        {"train": 1, "val_on_train": 1, "val": 1, "skipped": 0}
    ds = open_multilabel(tmp_path / "ds")
    assert ds.id_objects == ("apple", "dice") and ds.ood_objects == ("pear",)
    source = SceneSource(ds.splits["train"], 4, SceneLayout(("base", "hand"), ("rgb", "depth"), 2.0))
    (batch,) = source.iter_batches([torch.tensor([0])])
    assert batch.images.shape == (1, 3, 4, 4)  # a plain image is one RGB camera
    assert torch.allclose(batch.images[0, 0], torch.full((4, 4), 200 / 255))


def test_stacked_channels_and_teacher_camera(h5file: Path, tmp_path: Path) -> None:
    prepare_multilabel(tmp_path / "ds", h5=[(None, h5file)], id_objects=ID)
    items = open_multilabel(tmp_path / "ds").splits["val"]
    source = SceneSource(items, S, SceneLayout(("base", "hand"), ("rgb", "depth"), 2.0))
    (batch,) = source.iter_batches([torch.tensor([1, 0])])
    x = batch.images
    assert x.shape == (2, 8, S, S) and batch.index.tolist() == [1, 0]
    value = {i.scene: v for i, v in zip(items, (50, 60), strict=True)}[items[1].scene]
    assert torch.allclose(x[0, :3], torch.full((3, S, S), value / 255))           # base rgb
    assert torch.allclose(x[0, 3], torch.full((S, S), 0.5))                        # base depth 1 m / 2 m
    assert torch.allclose(x[0, 4], (torch.arange(S) * 10 / 255).expand(S, S))      # hand red ramp
    assert torch.allclose(x[0, 7], torch.full((S, S), 0.25))                       # hand depth
    hand = source.camera_rgb("hand")
    (rgb,) = hand.iter_batches([torch.tensor([1, 0])])
    assert rgb.images.dtype == torch.uint8 and torch.equal(rgb.images.float() / 255, x[:, 4:7])
    base = source.camera_rgb("base")
    assert hand.records[0].key.endswith("@hand") and base.records[0].key.endswith("@base")


def test_store_key_names_the_teacher_camera(h5file: Path, tmp_path: Path) -> None:
    from vlmdistill.targets.store import images_fingerprint

    prepare_multilabel(tmp_path / "ds", h5=[(None, h5file)], id_objects=ID)
    source = SceneSource(open_multilabel(tmp_path / "ds").splits["train"], S,
                         SceneLayout(("base", "hand"), ("rgb", "depth"), 2.0))
    hand, base = source.camera_rgb("hand"), source.camera_rgb("base")
    assert images_fingerprint(hand) != images_fingerprint(base)
    assert hand.resize != base.resize


def test_views_crop_every_channel_together() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 8, 16, 16, generator=g)
    views = Views(torch.tensor([[0.25, 0.0, 0.75, 0.5], [0.0, 0.5, 0.5, 1.0]]), torch.tensor([False, True]))
    out = render(x, views, 8)
    assert out.shape == (2, 8, 8, 8)
    assert torch.allclose(out[0], x[0, :, 0:8, 4:12], atol=1e-6)            # a box of 8x8 pixels: exact crop
    assert torch.allclose(out[1], x[1, :, 8:16, 0:8].flip(-1), atol=1e-6)
    as_uint8 = (x[:, :3] * 255).round().to(torch.uint8)
    assert torch.allclose(render(as_uint8, views, 8), render(as_uint8.float() / 255, views, 8), atol=1e-6)


def test_bad_scene_named_or_skipped_and_counted(h5file: Path, tmp_path: Path) -> None:
    prepare_multilabel(tmp_path / "ds", h5=[(None, h5file)], id_objects=ID)
    items = open_multilabel(tmp_path / "ds").splits["val"]
    with h5py.File(h5file, "a") as f:
        f[f"{items[0].scene}/dict_str_base_camera/dict_str_depth"][0, 0, 0] = np.nan
    layout = SceneLayout(("base", "hand"), ("rgb", "depth"), 2.0)
    with pytest.raises(BadSceneError, match=f"bad scene '{items[0].scene}'.*NaN"):
        list(SceneSource(items, S, layout).iter_batches([torch.tensor([0, 1])]))
    source = SceneSource(items, S, layout, skip_bad=True)
    (batch,) = source.iter_batches([torch.tensor([0, 1])])
    assert batch.index.tolist() == [1] and source.bad_keys == [items[0].key]
