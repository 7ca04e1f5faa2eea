"""Region pooling against an explicit loop; the DualCoOp and fixed-text heads: values, shapes, gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmdistill.config import TeacherConfig
from vlmdistill.multilabel.heads import DualPromptHead, RegionCosineHead, region_pool
from vlmdistill.teachers import Teacher, load_teacher

NAMES = ["master chef can", "banana", "power drill"]


def test_region_pool_matches_loop() -> None:
    g = torch.Generator().manual_seed(0)
    local, text, tau = torch.randn(2, 4, 3, 2, generator=g), torch.randn(5, 4, generator=g), 0.07
    out = region_pool(local, text, tau)
    assert out.shape == (2, 5)
    for b in range(2):
        for k in range(5):
            cos = [torch.cosine_similarity(local[b, :, i, j], text[k], dim=0) for i in range(3) for j in range(2)]
            weights = [torch.exp(c / tau) for c in cos]
            expected = sum(w * c for w, c in zip(weights, cos, strict=True)) / sum(weights)
            assert out[b, k].item() == pytest.approx(expected.item(), abs=1e-5)


def test_region_pool_single_location_is_cosine() -> None:
    local, text = torch.tensor([[[[3.0]], [[4.0]]]]), torch.tensor([[1.0, 0.0]])
    assert region_pool(local, text, 0.07).item() == pytest.approx(0.6)


@pytest.fixture(scope="module")
def teacher(open_clip_teacher_files: tuple[Path, Path]) -> Teacher:
    cfg_path, ckpt = open_clip_teacher_files
    return load_teacher(TeacherConfig(model_config=cfg_path, checkpoint=ckpt, device="cpu"))


def test_dual_head_probabilities_and_open_vocabulary(teacher: Teacher) -> None:
    torch.manual_seed(0)
    head = DualPromptHead(teacher, in_channels=16, names=NAMES, n_ctx=8)
    features = torch.randn(2, 16, 4, 4)
    prob = head(features)
    assert prob.shape == (2, 3) and ((prob > 0) & (prob < 1)).all()
    with torch.no_grad():
        pos, neg = head.text_embeddings()
        local = head.project(features)
        expected = torch.sigmoid((region_pool(local, pos, 0.07) - region_pool(local, neg, 0.07)) / 0.07)
    assert torch.allclose(prob, expected, atol=1e-5)
    other = head.text_embeddings(["dice", "golf ball"], ["a small cube.", "a white ball."])
    assert head(features, other).shape == (2, 2)


def test_dual_head_gradients_reach_contexts_and_conv_only(teacher: Teacher) -> None:
    torch.manual_seed(0)
    head = DualPromptHead(teacher, in_channels=16, names=NAMES, descriptions=["a can.", "fruit.", "a tool."])
    assert head.positive.ctx.shape == head.negative.ctx.shape == (8, 64)
    head(torch.randn(2, 16, 4, 4)).log().sum().backward()
    for p in (head.positive.ctx, head.negative.ctx, head.project.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())
    assert {n for n, p in head.named_parameters()} == {"project.weight", "positive.ctx", "negative.ctx"}


def test_fixed_text_head() -> None:
    torch.manual_seed(0)
    text = torch.randn(3, 8)
    head = RegionCosineHead(16, text)
    with torch.no_grad():
        head.bias.fill_(-2.0)
    features = torch.randn(2, 16, 4, 4)
    prob = head(features)
    with torch.no_grad():
        expected = torch.sigmoid(region_pool(head.project(features), text, 0.07) / 0.07 - 2.0)
    assert prob.shape == (2, 3) and torch.allclose(prob, expected, atol=1e-6)
    prob.sum().backward()
    assert head.project.weight.grad.abs().sum() > 0 and head.bias.grad.item() != 0
    assert {n for n, _ in head.named_parameters()} == {"project.weight", "bias"}  # the text stays fixed
    assert head(features, torch.randn(5, 8)).shape == (2, 5)
