"""Several views of each image per step (``train.views_per_step``), each with its stored teacher target."""

from __future__ import annotations

import torch

from vlmdistill.config import load_config
from vlmdistill.data.views import render
from vlmdistill.targets.lookup import open_targets, stored_view_ids
from vlmdistill.task import DistillTask
from vlmdistill.workspace import build_workspace, class_text_embeddings, default_sets


def _task(base_overrides: list[str], views: int, stored: int) -> DistillTask:
    cfg = load_config(None, [*base_overrides, f"train.views_per_step={views}", f"train.target_views={stored}",
                             "loss.imcst.weight=1"])
    ws = build_workspace(cfg)
    task = DistillTask(cfg, ws, default_sets(ws, class_text_embeddings(cfg, ws)[0])[0])
    task.targets = open_targets(cfg, ws.teacher, task.train_set.source, needed=True)
    return task


def _view_of_each_row(task: DistillTask, index: torch.Tensor, targets: torch.Tensor) -> list[int]:
    """The stored view id whose target a row holds, found by reading the store directly (exactly one matches)."""
    feats = task.targets.store.feats.float()  # [N, 1 + K, D]
    ids = []
    for i, t in zip(index.tolist(), targets, strict=True):
        match = (feats[i] == t).all(dim=1).nonzero().flatten().tolist()
        assert len(match) == 1, (i, match)
        ids.append(match[0])
    return ids


def test_each_row_gets_the_stored_target_and_view_of_a_distinct_view(base_overrides: list[str]) -> None:
    v, k = 3, 4
    task = _task(base_overrides, v, k)
    batch = next(iter(task.train_set.source.iter_batches([torch.arange(5)])))
    step = task.prepare(batch, torch.Generator().manual_seed(7))
    assert step.pixels.shape[0] == len(step.index) == len(step.targets) == 5 * v == step.global_rows
    assert step.index.tolist() == [i for i in range(5) for _ in range(v)]  # image-major: a row's image and label
    ids = _view_of_each_row(task, step.index, step.targets)
    store = task.targets.store
    for img in range(5):
        mine = ids[img * v : (img + 1) * v]
        assert len(set(mine)) == v and 0 not in mine, mine  # K >= V: distinct stored crops, never the whole image
    # the student's pixels are the stored crop of that same view
    rows = torch.tensor(ids)
    want = render(batch.images.repeat_interleave(v, 0), store.views(step.index, rows), task.cfg.student.image_size)
    assert torch.equal(step.pixels, want)
    loss, terms = task(step)
    assert torch.isfinite(loss) and set(terms) >= {"cls", "imcst"}


def test_fewer_stored_views_than_views_per_step_uses_every_one_first() -> None:
    ids = stored_view_ids(6, 5, 3, torch.Generator().manual_seed(0))
    assert ids.shape == (6, 5)
    for row in ids.tolist():
        assert set(row[:3]) == {1, 2, 3} and row[3:] == row[:2]


def test_one_view_per_step_draws_as_before() -> None:
    """V=1 makes the draw runs always made, so existing runs and their resumes are unchanged."""
    a = stored_view_ids(9, 1, 10, torch.Generator().manual_seed(3)).flatten()
    b = torch.randint(1, 11, (9,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
