"""CoOp: learned context replaces "a photo of"; only the context trains; both teacher backends work."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmdistill.config import TeacherConfig, load_config
from vlmdistill.teachers import load_teacher
from vlmdistill.text.prompt_learner import PromptLearner, class_prompt_texts
from vlmdistill.train import distill


def _check_learner(teacher: object) -> None:
    texts = class_prompt_texts(["red circle", "blue square"], None)
    learner = PromptLearner(teacher, texts, n_ctx=4)
    w = learner()
    assert w.shape == (2, teacher.embed_dim)
    assert torch.allclose(w.norm(dim=-1), torch.ones(2), atol=1e-5)
    w.sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.model.parameters())
    before = w.detach()
    with torch.no_grad():
        learner.ctx.add_(1.0)
    assert not torch.allclose(learner().detach(), before)
    # the splice is temporary: the teacher's own text encoding is untouched afterwards
    plain = teacher.encode_texts(["x x x x red circle."])
    with torch.no_grad():
        learner.ctx.zero_()
    assert torch.allclose(teacher.encode_texts(["x x x x red circle."]), plain)


def test_open_clip_prompt_learner(open_clip_teacher_files: tuple[Path, Path]) -> None:
    cfg_path, ckpt = open_clip_teacher_files
    _check_learner(load_teacher(TeacherConfig(model_config=cfg_path, checkpoint=ckpt, device="cpu")))


def test_hf_prompt_learner(hf_clip_dir: Path) -> None:
    _check_learner(load_teacher(TeacherConfig(backend="hf", name=str(hf_clip_dir), device="cpu")))


def test_training_learns_context_and_keeps_it(base_overrides: list[str]) -> None:
    cfg = load_config(None, [*base_overrides, "name=coop", "text.learn_context=true", "text.n_ctx=4",
                             "optim.epochs=1", "train.analysis=false"])
    from vlmdistill.runfolder import RunFolder
    from vlmdistill.task import DistillTask
    from vlmdistill.workspace import build_workspace, class_text_embeddings, default_sets, run_class_embeddings

    ws = build_workspace(cfg)
    torch.manual_seed(cfg.seed)  # as distill does before it builds the task: the same initial context
    start = DistillTask(cfg, ws, default_sets(ws, class_text_embeddings(cfg, ws)[0])[0]).prompts.ctx.detach().clone()
    res = distill(cfg, ws)
    assert res["complete"]
    saved = RunFolder(cfg.run_dir).student()
    assert saved.context.shape == start.shape == (4, start.shape[1])
    assert (saved.context - start).abs().max() > 1e-4  # training moved the context from where it started
    learned, fixed = run_class_embeddings(cfg, ws, saved.context), class_text_embeddings(cfg, ws)
    assert not torch.allclose(learned[0], fixed[0].cpu(), atol=1e-3)  # and evaluation scores with it
