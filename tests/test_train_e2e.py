"""End-to-end: a tiny student from a tiny random open_clip teacher, on generated images."""

from __future__ import annotations

import json

import torch

from vlmdistill.checkpoint import checkpoint_paths, load_weights
from vlmdistill.config import load_config
from vlmdistill.train import train


def test_train_writes_results_and_checkpoint(base_overrides: list[str]) -> None:
    cfg = load_config(None, [*base_overrides, "name=e2e", "loss.imcst.weight=1", "loss.vlalign.weight=1"])
    res = train(cfg)
    run = cfg.run_dir
    saved = json.loads((run / "results.json").read_text())
    assert saved["metrics"]["ood"]["mean_per_class_recall"] == res["metrics"]["ood"]["mean_per_class_recall"]
    for key in ("id", "ood", "gzsl"):
        assert key in saved["metrics"]
    assert 0 <= saved["metrics"]["gzsl"]["harmonic"] <= 100
    assert saved["teacher"]["id"].startswith("open_clip:")
    assert (run / "config.yaml").is_file()
    weights, _ = load_weights(checkpoint_paths(run)[0])
    assert any(torch.is_tensor(v) for v in weights.values())
