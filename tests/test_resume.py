"""A run stopped part-way and resumed ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import torch

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
