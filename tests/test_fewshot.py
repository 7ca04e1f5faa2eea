"""Few-shot pieces: support selection, the paper's balanced batches, and Tip-Adapter's logits."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmdistill.data.dataset import open_dataset
from vlmdistill.fewshot import select_support
from vlmdistill.loop import balanced_batches


def test_support_selection_rules(prepared: Path) -> None:
    ood = open_dataset(prepared).ood_val
    a = select_support(ood, 2, seed=0, rule="seeded")
    assert a == select_support(ood, 2, seed=0, rule="seeded")
    assert a != select_support(ood, 2, seed=1, rule="seeded")
    per_class: dict[int, list[int]] = {}
    for i in a:
        per_class.setdefault(ood.labels[i], []).append(i)
    assert sorted(per_class) == sorted(set(ood.labels)) and all(len(v) == 2 for v in per_class.values())
    first = select_support(ood, 2, seed=5, rule="first")
    for label in set(ood.labels):
        names = sorted(ood.records[i].path.name for i in range(len(ood)) if ood.labels[i] == label)
        chosen = sorted(ood.records[i].path.name for i in first if ood.labels[i] == label)
        assert chosen == names[:2]
    many = select_support(ood, 100, seed=0, rule="seeded")
    assert len(many) == len(ood) - len(set(ood.labels))


def test_balanced_batches_follow_the_paper_sampler() -> None:
    g = torch.Generator().manual_seed(0)
    base, support = torch.arange(100), torch.arange(100, 140)
    batches = balanced_batches(base, support, 32, g)
    assert len(batches) == 100 // 16 + 1
    for b in batches:
        assert int((b >= 100).sum()) == 16 and len(set(b.tolist())) == len(b)
    assert [len(b) for b in batches] == [32] * 6 + [16 + 100 % 16]
    # one pass draws every base image exactly once (the official sampler: 100 draws, not 112 with wrap-around)
    assert sorted(torch.cat([b[b < 100] for b in batches]).tolist()) == list(range(100))
    few = balanced_batches(base, torch.arange(100, 110), 32, g)
    for b in few:
        assert set(range(100, 110)) <= set(b.tolist())
    assert sorted(torch.cat([b[b < 100] for b in few]).tolist()) == list(range(100))


def test_tip_adapter_retrieval_uses_the_support_cache(
    base_overrides: list[str], tmp_path: Path
) -> None:
    from vlmdistill.config import load_config
    from vlmdistill.fewshot import tip_adapter
    from vlmdistill.train import distill
    from vlmdistill.workspace import build_workspace

    cfg = load_config(None, [*base_overrides, "name=tip", "optim.epochs=1", "train.analysis=false",
                             "fewshot.shots=3"])
    ws = build_workspace(cfg)
    distill(cfg, ws)
    support = select_support(ws.dataset.ood_val, 3, 0, "seeded")
    zero = cfg.model_copy(update={"fewshot": cfg.fewshot.model_copy(update={"alpha": 0.0})})
    only_cache = cfg.model_copy(update={"fewshot": cfg.fewshot.model_copy(update={"alpha": 1.0, "text_scale": 0.0,
                                                                                   "beta": 50.0})})
    text_only = tip_adapter(zero, ws, cfg.run_dir, support)["ood"]
    cache_only = tip_adapter(only_cache, ws, cfg.run_dir, support)["ood"]
    assert text_only["n_images"] == cache_only["n_images"] == len(ws.dataset.ood_val) - len(support)
    # the generated classes are colour x shape, so nearest support images classify far better than chance
    assert cache_only["mean_per_class_recall"] > 100 / len(ws.dataset.ood_space)
