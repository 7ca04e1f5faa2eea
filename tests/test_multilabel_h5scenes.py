"""PickClutter h5 reader on files built in the paper's exact layout: records, channels, depth scaling, bad scenes."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from vlmdistill.multilabel.h5scenes import (
    BadSceneError,
    SceneFileError,
    index_scenes,
    load_scene,
    load_scenes,
    object_name,
)
from vlmdistill.multilabel.labels import multi_hot

H, W = 6, 5


def _scene(f: h5py.File, key: str, ids: list[bytes], seed: int, traj_type: bytes | None = None) -> h5py.Group:
    """One scene: base RGB = seed, hand RGB = seed + 100 everywhere; depths 0.5 + seed/10 and 3.0 metres."""
    group = f.create_group(key)
    for camera, value, depth in (("base", seed, 0.5 + seed / 10), ("hand", seed + 100, 3.0)):
        cam = group.create_group(f"dict_str_{camera}_camera")
        cam.create_dataset("dict_str_rgb", data=np.full((H, W, 3), value, dtype=np.uint8))
        cam.create_dataset("dict_str_depth", data=np.full((H, W, 1), depth, dtype=np.float32))
    group.create_dataset("model_ids", data=np.array(ids))
    if traj_type is not None:
        group.create_dataset("traj_type", data=traj_type)
    return group


@pytest.fixture
def h5file(tmp_path: Path) -> Path:
    path = tmp_path / "val.h5"
    with h5py.File(path, "w") as f:
        _scene(f, "traj_1", [b"002_master_chef_can", b"011_banana"], 1, b"grasp")
        _scene(f, "traj_0", [b"077_rubiks_cube"], 2, b"place")
    return path


def test_index_records_in_sorted_order(h5file: Path) -> None:
    index = index_scenes(h5file)
    assert [(r.key, r.objects, r.traj_type) for r in index.records] == [
        ("traj_0", ("rubiks cube",), "place"),
        ("traj_1", ("master chef can", "banana"), "grasp"),
    ]
    assert index.skipped == ()
    vocabulary = ["banana", "master chef can", "rubiks cube"]
    assert multi_hot([r.objects for r in index.records], vocabulary).tolist() == [[0, 0, 1], [1, 1, 0]]


def test_traj_type_filter(h5file: Path) -> None:
    assert [r.key for r in index_scenes(h5file, traj_type="grasp").records] == ["traj_1"]


def test_eight_channels_in_official_order(h5file: Path) -> None:
    record = index_scenes(h5file).records[1]  # seed 1
    x = load_scene(record)
    assert x.shape == (8, H, W) and x.dtype == torch.float32
    # base rgb 1/255, base depth 0.6 m / 2 m, hand rgb 101/255, hand depth 3 m / 2 m clamped to 1
    expected = [1 / 255] * 3 + [0.3] + [101 / 255] * 3 + [1.0]
    assert x.flatten(1).mean(1).tolist() == pytest.approx(expected)
    raw = load_scene(record, depth_max=None)
    assert raw[3].unique().tolist() == pytest.approx([0.6]) and raw[7].unique().tolist() == [3.0]
    hand_depth = load_scene(record, cameras=("hand",), kinds=("depth",), depth_max=4.0)
    assert hand_depth.shape == (1, H, W) and hand_depth.unique().tolist() == [0.75]


def test_resize_keeps_values(h5file: Path) -> None:
    record = index_scenes(h5file).records[1]
    x = load_scene(record, size=16)
    assert x.shape == (8, 16, 16)
    assert x[0].unique().tolist() == pytest.approx([1 / 255]) and x[3].unique().tolist() == pytest.approx([0.3])


def test_load_scenes_stacks(h5file: Path) -> None:
    loaded = load_scenes(index_scenes(h5file).records)
    assert loaded.images.shape == (2, 8, H, W)
    assert loaded.images[:, 3, 0, 0].tolist() == pytest.approx([0.35, 0.3])


def _break(path: Path, how: str) -> None:
    with h5py.File(path, "a") as f:
        scene = f["traj_1"]
        if how == "missing":
            del scene["dict_str_hand_camera/dict_str_depth"]
        elif how == "dtype":
            del scene["dict_str_base_camera/dict_str_rgb"]
            scene.create_dataset("dict_str_base_camera/dict_str_rgb", data=np.zeros((H, W, 3), np.float32))
        elif how == "shape":
            del scene["dict_str_base_camera/dict_str_depth"]
            scene.create_dataset("dict_str_base_camera/dict_str_depth", data=np.zeros((H, W), np.float32))
        elif how == "model_id":
            del scene["model_ids"]
            scene.create_dataset("model_ids", data=np.array([b"banana"]))
        elif how == "nan":
            scene["dict_str_hand_camera/dict_str_depth"][0, 0, 0] = np.nan


@pytest.mark.parametrize(
    ("how", "reason"),
    [
        ("missing", "missing dict_str_hand_camera/dict_str_depth"),
        ("dtype", "dict_str_base_camera/dict_str_rgb is float32"),
        ("shape", r"dict_str_base_camera/dict_str_depth is float32 \[6, 5\]"),
        ("model_id", "not '<number>_<name>'"),
    ],
)
def test_bad_structure_raises_or_is_skipped(h5file: Path, how: str, reason: str) -> None:
    _break(h5file, how)
    with pytest.raises(BadSceneError, match=reason) as err:
        index_scenes(h5file)
    assert str(h5file) in str(err.value) and "'traj_1'" in str(err.value) and "skip_bad=True" in str(err.value)
    index = index_scenes(h5file, skip_bad=True)
    assert [r.key for r in index.records] == ["traj_0"]
    assert [(s.key, s.path) for s in index.skipped] == [("traj_1", h5file)]


def test_other_cameras_are_not_checked(h5file: Path) -> None:
    _break(h5file, "missing")  # hand depth gone: a base-only reader still sees both scenes
    assert len(index_scenes(h5file, cameras=("base",)).records) == 2


def test_nan_depth_raises_or_is_skipped_at_load(h5file: Path) -> None:
    _break(h5file, "nan")
    records = index_scenes(h5file).records  # structure is fine
    with pytest.raises(BadSceneError, match="hand depth holds NaN"):
        load_scene(records[1])
    loaded = load_scenes(records, skip_bad=True)
    assert loaded.images.shape == (1, 8, H, W) and [r.key for r in loaded.records] == ["traj_0"]
    assert [s.key for s in loaded.skipped] == ["traj_1"]


def test_unreadable_file(tmp_path: Path) -> None:
    (tmp_path / "x.h5").write_bytes(b"not hdf5")
    with pytest.raises(SceneFileError, match=r"x\.h5"):
        index_scenes(tmp_path / "x.h5")


def test_object_name() -> None:
    assert object_name("043_phillips_screwdriver") == "phillips screwdriver"
    with pytest.raises(ValueError):
        object_name("banana")
