"""End-to-end: a tiny student from a tiny random open_clip teacher, on generated images."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from vlmdistill.config import load_config
from vlmdistill.metrics import mean_per_class_recall
from vlmdistill.train import distill as train


def test_reloaded_checkpoint_gives_the_recorded_scores(base_overrides: list[str]) -> None:
    """The saved run, read back from its folder by a separate evaluation, scores exactly what training recorded
    at its last evaluation: the checkpoint holds the evaluated weights and the run's config reproduces the
    protocol."""
    from vlmdistill.evaluate import evaluate_run
    from vlmdistill.runfolder import RunFolder
    from vlmdistill.workspace import build_workspace

    cfg = load_config(None, [*base_overrides, "name=e2e", "loss.imcst.weight=1", "loss.vlalign.weight=1"])
    ws = build_workspace(cfg)
    res = train(cfg, ws)
    run = RunFolder(cfg.run_dir)
    assert run.is_complete() and run.results()["metrics"] == json.loads(json.dumps(res["metrics"]))
    assert run.config() == cfg
    again = evaluate_run(run.config(), ws, run.path, analysis=False)["metrics"]
    for split in ("id", "ood"):
        assert again[split]["mean_per_class_recall"] == pytest.approx(res["metrics"][split]["mean_per_class_recall"],
                                                                      abs=1e-9)
    assert again["gzsl"]["harmonic"] == pytest.approx(res["metrics"]["gzsl"]["harmonic"], abs=1e-9)


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
    assert c["before"] == pytest.approx(_recall_per_half(cfg, ws, [half1, half2], c["support_images"]), abs=1e-9)
    assert c["after"] != c["before"]  # adapting on half 1 changed the student


def _recall_per_half(cfg, ws, halves: list[list[str]], n_support: int) -> dict[str, float]:
    """Brute force from the saved run: predict every OOD image that is not a support image over all OOD
    classes, then the mean per-class recall of the images of each half's classes."""
    from vlmdistill.evaluate import restore_student, student_features
    from vlmdistill.fewshot import select_support

    student, (_, w_ood) = restore_student(cfg, ws, cfg.run_dir)
    half1 = {ws.dataset.ood_space.dirs.index(d) for d in halves[0]}
    support = [i for i in select_support(ws.dataset.ood_val, cfg.fewshot.shots, cfg.seed, cfg.fewshot.selection)
               if ws.dataset.ood_val.labels[i] in half1]
    assert len(support) == n_support
    feats, idx = student_features(student, cfg, ws.ood_val)
    keep = torch.tensor([int(i) not in set(support) for i in idx])
    labels = torch.tensor(ws.dataset.ood_val.labels)[idx][keep]
    pred = (F.normalize(feats[keep], dim=-1) @ w_ood.T).argmax(1)
    out = {}
    for n, half in enumerate(halves, start=1):
        members = torch.tensor([ws.dataset.ood_space.dirs[int(y)] in half for y in labels])
        out[f"ood{n}"] = mean_per_class_recall(pred[members], labels[members])
    return out
