"""Where paper mode follows the official code, checked on hand-computed cases (paper_spec §4-§5)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmdistill.config import PAPER_MODE, load_config
from vlmdistill.data.images import load_image
from vlmdistill.fewshot import merge_key_views, tip_adapter_logits
from vlmdistill.metrics import closed_set_metrics
from vlmdistill.report import comparison_rows, markdown_table
from vlmdistill.results import METRICS, average_metrics, metric_value

E = math.exp


def _toy_cache() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query, two classes, one support image per class with two views each (unit vectors)."""
    q = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    views = torch.tensor([[[1.0, 0.0], [0.0, 1.0]],  # view 0 of image A (class 0), image B (class 1)
                          [[0.6, 0.8], [0.8, 0.6]]], dtype=torch.float64)  # view 1
    return q, w, views, torch.tensor([0, 1])


def test_paper_mode_cache_keeps_every_view_as_a_key_and_sums_over_them() -> None:
    q, w, views, labels = _toy_cache()
    keys, key_labels = merge_key_views(views, labels, "separate")
    assert keys.shape == (4, 2) and key_labels.tolist() == [0, 1, 0, 1]
    logits = tip_adapter_logits(q, w, keys, key_labels, alpha=1.0, beta=1.0, text_scale=1.0)
    # text: cos(q, w) = [1, 0]; cache: class 0 sums exp(-(1 - 1)) + exp(-(1 - .6)), class 1 exp(-1) + exp(-(1 - .8))
    expected = [1 + 1 + E(-0.4), 0 + E(-1) + E(-0.2)]
    assert logits[0].tolist() == pytest.approx(expected, rel=1e-12)


def test_default_cache_averages_the_views_of_an_image_into_one_key() -> None:
    q, w, views, labels = _toy_cache()
    keys, key_labels = merge_key_views(views, labels, "mean")
    assert keys.shape == (2, 2) and key_labels.tolist() == [0, 1]
    logits = tip_adapter_logits(q, w, keys, key_labels, alpha=1.0, beta=1.0, text_scale=1.0)
    cos_a, cos_b = 1.6 / math.hypot(1.6, 0.8), 0.8 / math.hypot(0.8, 1.6)  # mean of the views, renormalised
    assert logits[0].tolist() == pytest.approx([1 + E(-(1 - cos_a)), E(-(1 - cos_b))], rel=1e-12)


def test_with_ten_views_the_paper_cache_term_outweighs_the_averaged_one() -> None:
    """The official code's balance: 10 separate keys put ~10x more cache mass against a text scale of 1."""
    g = torch.Generator().manual_seed(0)
    views = torch.nn.functional.normalize(torch.randn(10, 4, 8, generator=g, dtype=torch.float64), dim=-1)
    labels = torch.arange(4)
    q = views[0, :1]
    w = torch.zeros(4, 8, dtype=torch.float64)
    sep = tip_adapter_logits(q, w, *merge_key_views(views, labels, "separate"), 1.0, 5.5, 1.0)
    avg = tip_adapter_logits(q, w, *merge_key_views(views, labels, "mean"), 1.0, 5.5, 1.0)
    assert sep.sum() > 5 * avg.sum()


def test_paper_mode_sets_each_official_switch() -> None:
    ours, paper = load_config(None, []), load_config(None, ["mode=paper"])
    for section, values in PAPER_MODE.items():
        for key, value in values.items():
            got = getattr(getattr(paper, section), key)
            assert (list(got) if isinstance(got, tuple) else got) == value, f"{section}.{key}"
    assert (paper.fewshot.key_merge, paper.fewshot.key_view_kind, paper.fewshot.key_views) == ("separate",
                                                                                                 "randaugment", 10)
    assert (ours.fewshot.key_merge, ours.loss.closed_set_id_logits, ours.data.interpolation) == ("mean", "id",
                                                                                                  "bicubic")
    assert paper.train.analysis_max_images is None and paper.data.interpolation == "bilinear"
    explicit = load_config(None, ["mode=paper", "fewshot.key_merge=mean"])
    assert explicit.fewshot.key_merge == "mean"


def test_closed_set_paper_mode_scores_id_over_all_logits() -> None:
    # image 0 (ID class 0): its largest logit is an OOD slot, so it is right over ID logits, wrong over all
    id_logits = torch.tensor([[2.0, 0.0, 3.0], [0.0, 2.0, 1.0]])
    labels = torch.tensor([0, 1])
    ood = torch.zeros(0, 3)
    ours = closed_set_metrics(id_logits, labels, ood, torch.zeros(0, dtype=torch.long), 2, False)
    paper = closed_set_metrics(id_logits, labels, ood, torch.zeros(0, dtype=torch.long), 2, False, id_over_all=True)
    assert ours["id"]["acc1"] == 100.0 and paper["id"]["acc1"] == 50.0


def test_bilinear_squash_is_pils_bilinear_resize(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (37, 53, 3), dtype=np.uint8))
    img.save(tmp_path / "x.png")
    for name, resample in (("bilinear", Image.Resampling.BILINEAR), ("bicubic", Image.Resampling.BICUBIC)):
        got = load_image(tmp_path / "x.png", 16, "squash", name).permute(1, 2, 0).numpy()
        assert np.array_equal(got, np.asarray(img.resize((16, 16), resample))), name
    assert not torch.equal(load_image(tmp_path / "x.png", 16, "squash", "bilinear"),
                           load_image(tmp_path / "x.png", 16, "squash", "bicubic"))


def _history(oods: list[float]) -> list[dict]:
    return [{"epoch": i + 1, "step": i, "ood": {"mean_per_class_recall": v, "acc1": v},
             "id": {"mean_per_class_recall": 50.0 + v, "acc1": 0.0}, "gzsl": {"harmonic": v / 2}}
            for i, v in enumerate(oods)]


def test_headline_is_the_mean_of_the_last_evaluations_and_the_last_value_stays_beside_it() -> None:
    history = _history([10.0, 20.0, 30.0, 40.0])
    results = {"run": "r", "metrics": history[-1], "metrics_last_avg": average_metrics(history[-3:])}
    assert metric_value(results, "ood") == pytest.approx(30.0)
    assert metric_value(results, "ood_last") == 40.0
    assert metric_value(results, "id") == pytest.approx(80.0)
    header, rows = comparison_rows([results])
    assert header[:4] == ["run", METRICS["id"].label, METRICS["ood"].label, METRICS["ood_last"].label]
    assert "| r | 80.0 | 30.0 | 40.0 |" in markdown_table(header, rows)


def test_every_percentage_has_one_format_and_analysis_metrics_another() -> None:
    assert METRICS["gzsl_h"].format(9.056) == "9.1" and METRICS["gzsl_h"].format(13.94) == "13.9"
    assert METRICS["m_rel_ood"].format(0.1424) == "0.142" and METRICS["mse_ood"].format(12.3456) == "12.346"


def test_training_evaluates_every_epoch_the_headline_averages(base_overrides: list[str]) -> None:
    from vlmdistill.train import distill

    cfg = load_config(None, [*base_overrides, "name=tail", "optim.epochs=3", "train.eval_every=5",
                             "train.average_last=2", "train.analysis=false"])
    res = distill(cfg)
    assert [h["epoch"] for h in res["history"]] == [2, 3]
    assert res["averaged_over"] == 2
    mean = (res["history"][0]["ood"]["mean_per_class_recall"] + res["history"][1]["ood"]["mean_per_class_recall"]) / 2
    assert res["metrics_last_avg"]["ood"]["mean_per_class_recall"] == pytest.approx(mean)
    assert res["metrics"]["ood"] == res["history"][-1]["ood"]
