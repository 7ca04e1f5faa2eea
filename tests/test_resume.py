"""A run stopped part-way and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import torch

from vlmdistill.checkpoint import TRAINING, WEIGHTS, current_unit, read_tensor_file
from vlmdistill.config import load_config
from vlmdistill.runfolder import RunFolder
from vlmdistill.train import distill
from vlmdistill.workspace import build_workspace


def test_resume_equals_uninterrupted(base_overrides: list[str]) -> None:
    common = [*base_overrides, "loss.imcst.weight=1", "optim.epochs=3", "train.analysis=false"]
    full = load_config(None, [*common, "name=full"])
    ws = build_workspace(full)
    steps = distill(full, ws)["train"]["steps"]
    stopped = load_config(None, [*common, "name=resumed", f"train.max_steps={steps // 2 + 1}"])
    first = distill(stopped, ws)
    assert first["complete"] is False
    resumed = load_config(None, [*common, "name=resumed"])
    res = distill(resumed, ws, resume=True)
    assert res["complete"] is True and res["train"]["steps"] == steps
    a = RunFolder(full.run_dir).student().weights
    b = RunFolder(resumed.run_dir).student().weights
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_resume_with_ema_and_views_equals_uninterrupted(base_overrides: list[str]) -> None:
    """With a weight average and two views per image: the deployed weights (what ``vlmdistill.load`` and export
    read) are the average, the training weights and update count are kept beside them, and a resumed run ends
    with the same average, training weights and count of images through the student."""
    common = [*base_overrides, "loss.imcst.weight=1", "optim.epochs=2", "train.analysis=false",
              "train.ema_decay=0.9", "train.views_per_step=2", "train.average_last=1"]
    full = load_config(None, [*common, "name=full"])
    ws = build_workspace(full)
    done = distill(full, ws)
    assert done["train"]["student_images"] == 2 * 2 * len(ws.train)  # epochs x views x images, no pool
    stopped = load_config(None, [*common, "name=resumed", f"train.max_steps={done['train']['steps'] // 2 + 1}"])
    assert distill(stopped, ws)["complete"] is False
    res = distill(load_config(None, [*common, "name=resumed"]), ws, resume=True)
    assert res["train"]["student_images"] == done["train"]["student_images"]
    (deployed, _), (training, meta) = (read_tensor_file(current_unit(full.run_dir) / n) for n in (WEIGHTS, TRAINING))
    assert int(meta["ema_updates"]) == done["train"]["steps"]
    assert torch.equal(RunFolder(full.run_dir).student().weights["net.fc.weight"], deployed["net.fc.weight"])
    assert not torch.equal(deployed["net.fc.weight"], training["net.fc.weight"])
    for name in (WEIGHTS, TRAINING):
        a = read_tensor_file(current_unit(full.run_dir) / name)
        b = read_tensor_file(current_unit(stopped.run_dir) / name)
        assert a[1].get("ema_updates") == b[1].get("ema_updates")
        for k in a[0]:
            assert torch.equal(a[0][k], b[0][k]), (name, k)
