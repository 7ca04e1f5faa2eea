"""The cluttered-scene demo: determinism, ID/OOD composition, depth, and a round trip through the h5 reader."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from vlmdistill.demo.clutter import (
    BASE_HEIGHT,
    HAND_HEIGHT,
    OBJECT_HEIGHT,
    ClutterParams,
    clutter_classes,
    generate_clutter,
    make_scene,
)
from vlmdistill.multilabel.h5scenes import index_scenes, load_scenes

PARAMS = ClutterParams(image_size=32)


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    a = generate_clutter(tmp_path / "a", PARAMS, {"train": 6, "val": 6})
    b = generate_clutter(tmp_path / "b", PARAMS, {"train": 6, "val": 6})
    for split in ("train", "val"):
        assert hashlib.sha256(a[split].read_bytes()).digest() == hashlib.sha256(b[split].read_bytes()).digest()
    other = make_scene(clutter_classes(PARAMS), "train", 0, ClutterParams(image_size=32, seed=1))
    assert not np.array_equal(other.rgb["base"], make_scene(clutter_classes(PARAMS), "train", 0, PARAMS).rgb["base"])


def test_splits_hold_the_right_kinds() -> None:
    classes = clutter_classes(PARAMS)
    assert sum(c.is_id for c in classes) == 14 and sum(not c.is_id for c in classes) == 12
    kinds = {"train": set(), "val_on_train": set(), "val": set()}
    for split in kinds:
        for i in range(25):
            objects = make_scene(classes, split, i, PARAMS).objects
            assert 2 <= len(objects) <= 6 and len(set(objects)) == len(objects)
            flags = {classes[k].is_id for k in objects}
            assert flags == ({True} if split != "val" else {True, False})
            kinds[split].add(objects)
    assert kinds["train"] != kinds["val_on_train"]  # the two ID splits are different scenes


def test_depth_is_table_or_object_tops() -> None:
    scene = make_scene(clutter_classes(PARAMS), "val", 0, PARAMS)
    for camera, height in (("base", BASE_HEIGHT), ("hand", HAND_HEIGHT)):
        depth, rgb = scene.depth[camera], scene.rgb[camera]
        assert depth.shape == (32, 32, 1) and depth.dtype == np.float32
        assert rgb.shape == (32, 32, 3) and rgb.dtype == np.uint8
        assert depth.max() == pytest.approx(height)  # the table shows somewhere
        tops = depth[depth < height - 1e-6]
        assert tops.size > 0 and (tops >= height - OBJECT_HEIGHT[1] - 1e-6).all()
        assert (tops <= height - OBJECT_HEIGHT[0] + 1e-6).all()


def test_reader_round_trip(tmp_path: Path) -> None:
    classes = clutter_classes(PARAMS)
    path = generate_clutter(tmp_path, PARAMS, {"val": 4})["val"]
    index = index_scenes(path, traj_type="ood")
    assert [r.key for r in index.records] == [f"scene_{i:05d}" for i in range(4)]
    first = make_scene(classes, "val", 0, PARAMS)
    assert index.records[0].objects == tuple(classes[k].name for k in first.objects)
    images = load_scenes(index.records, depth_max=None).images
    assert images.shape == (4, 8, 32, 32)
    assert np.allclose(images[0, 3].numpy(), first.depth["base"][..., 0])
    assert np.array_equal((images[0, 4:7] * 255).round().byte().permute(1, 2, 0).numpy(), first.rgb["hand"])
    assert index_scenes(path, traj_type="id").records == ()


def test_params_are_checked() -> None:
    with pytest.raises(ValueError, match="min_objects"):
        ClutterParams(min_objects=1)
    with pytest.raises(ValueError, match="n_id"):
        ClutterParams(n_id=5)
    with pytest.raises(ValueError, match="unknown splits"):
        generate_clutter(Path("unused"), PARAMS, {"test": 1})


def _run_result(acc: float, f1: float, m: float) -> dict:
    """One row's results.json as the clutter demo reads it: the same numbers in every column, zero- and few-shot."""
    columns = {c: {"accuracy": acc, "f1": f1, "map": m} for c in ("x_id", "y_id_on_ood", "y_ood_on_ood")}
    return {"metrics_last_avg": columns, "fewshot": {"finetune": columns}, "train": {"seconds": 10.0}}


def test_clutter_table_and_verdicts(tmp_path: Path) -> None:
    """Means ± sample std over seeds per cell; the teacher's mAP heads the mAP table; L_im-cst's verdict per OOD
    column is the comparison of means, flagged when the gap is within one seed std."""
    from vlmdistill.demo.clutter_run import _write

    per_row = {"ml_cls": [_run_result(50, 20, 30), _run_result(52, 22, 31), _run_result(54, 24, 32)],
               "ml_imcst": [_run_result(60, 21, 20), _run_result(62, 23, 21), _run_result(64, 25, 22)]}
    teacher = {c: {"map": 40.0} for c in ("x_id", "y_id_on_ood", "y_ood_on_ood")}
    summary = _write(tmp_path, per_row, teacher, 3, 5.0)
    acc = summary["rows"]["ml_cls"]["metrics"]["ml_ood_on_ood_acc"]
    assert acc["mean"] == pytest.approx(52.0) and acc["std"] == pytest.approx(2.0) and acc["values"] == [50, 52, 54]
    report = (tmp_path / "clutter.md").read_text()
    assert "| L_cls (head + ASL) | 52.0±2.0 / 52.0±2.0 | 52.0±2.0 / 52.0±2.0 | 52.0±2.0 / 52.0±2.0 |" in report
    assert "| teacher (hand camera) | 40.0 / NA | 40.0 / NA | 40.0 / NA |" in report
    verdicts = {line.split(":")[0]: line for line in report.splitlines() if line.startswith("- ")}
    assert "holds (52.0±2.0 -> 62.0±2.0)" in verdicts["- L_im-cst raises Y_ood on X_ood acc"]
    assert "holds (22.0±2.0 -> 23.0±2.0, within noise)" in verdicts["- L_im-cst raises Y_ood on X_ood F1"]
    assert "does not hold (31.0±1.0 -> 21.0±1.0)" in verdicts["- L_im-cst raises Y_id on X_ood mAP few-shot"]
