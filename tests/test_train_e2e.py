"""End-to-end: a tiny student from a tiny random open_clip teacher, on generated images."""

from __future__ import annotations

import json

import torch

from vlmdistill.checkpoint import checkpoint_paths, load_weights
from vlmdistill.config import load_config
from vlmdistill.train import distill as train


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


def test_fewshot_finetune_and_retrieval(base_overrides: list[str]) -> None:
    from vlmdistill.fewshot import run_fewshot
    from vlmdistill.workspace import build_workspace

    cfg = load_config(None, [*base_overrides, "name=fs", "loss.imcst.weight=1", "fewshot.shots=2", "fewshot.epochs=1"])
    ws = build_workspace(cfg)
    train(cfg, ws)
    out = run_fewshot(cfg, ws, cfg.run_dir)
    assert out["support_images"] == 2 * len(ws.dataset.ood_space)
    assert out["finetune"]["ood"]["n_images"] == len(ws.dataset.ood_val) - out["support_images"]
    assert out["retrieval"]["ood"]["n_images"] == out["finetune"]["ood"]["n_images"]
    saved = json.loads((cfg.run_dir / "results.json").read_text())
    ft = out["finetune"]["ood"]["mean_per_class_recall"]
    assert saved["fewshot"]["finetune"]["ood"]["mean_per_class_recall"] == ft


def test_continual_fewshot_reports_both_halves(base_overrides: list[str]) -> None:
    from vlmdistill.fewshot import run_fewshot
    from vlmdistill.workspace import build_workspace

    cfg = load_config(None, [*base_overrides, "name=cont", "optim.epochs=1", "fewshot.shots=2", "fewshot.epochs=1",
                             "fewshot.methods=[]", "fewshot.continual=true", "train.analysis=false"])
    ws = build_workspace(cfg)
    train(cfg, ws)
    c = run_fewshot(cfg, ws, cfg.run_dir)["continual"]
    half1, half2 = c["halves"]
    assert set(half1).isdisjoint(half2) and len(half1) + len(half2) == len(ws.dataset.ood_space)
    assert c["support_images"] == 2 * len(half1)
    assert set(c["before"]) == set(c["after"]) == {"ood1", "ood2"}
