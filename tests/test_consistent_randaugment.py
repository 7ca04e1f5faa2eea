"""Consistent RandAugment (``data.randaugment=consistent``): the ops are drawn with each stored view, so the
teacher's target is of the very augmented view the student trains on (MobileCLIP's stored augmentations)."""

from __future__ import annotations

import pytest
import torch
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from vlmdistill.config import ConfigError, load_config
from vlmdistill.data.views import RANDAUGMENT, Views, apply_randaugment, render, sample_randaugment
from vlmdistill.targets.lookup import open_targets, target_recipe
from vlmdistill.targets.store import store_key
from vlmdistill.task import DistillTask
from vlmdistill.workspace import build_workspace, class_text_embeddings, default_sets

OPS = list(RANDAUGMENT._AUGMENTATION_SPACE)


def _code(name: str, negated: bool = False) -> int:
    return OPS.index(name) * 2 + int(negated)


def test_codes_are_randaugment_2_9_worked_examples() -> None:
    """Magnitude bin 9 of 31: rotate 9 degrees, brightness factor 1 -/+ 0.27, translate 150/331 x 0.3 of the
    size in whole pixels; applied in order, identity leaves pixels as they are."""
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 32, 32, generator=g)
    codes = torch.tensor([[_code("Rotate"), _code("Brightness", negated=True)],
                          [_code("Identity"), _code("Rotate", negated=True)]])
    out = apply_randaugment(img, codes)
    bilinear = InterpolationMode.BILINEAR
    first = F.adjust_brightness(F.rotate(img[0], 9.0, interpolation=bilinear), 1 - 0.27).clamp(0, 1)
    assert torch.allclose(out[0], first, atol=1e-6)
    assert torch.allclose(out[1], F.rotate(img[1], -9.0, interpolation=bilinear), atol=1e-6)
    shifted = apply_randaugment(img[:1], torch.tensor([[_code("TranslateX"), _code("Identity")]]))
    assert torch.equal(shifted[0, :, :, 4:], img[0, :, :, :-4])  # int(150 / 331 * 32 * 0.3) = 4 px
    assert torch.equal(apply_randaugment(img, torch.zeros(2, 2, dtype=torch.int16)), img)


def test_draws_cover_every_op_and_sign_from_the_seed() -> None:
    a = sample_randaugment(4000, torch.Generator().manual_seed(1))
    assert torch.equal(a, sample_randaugment(4000, torch.Generator().manual_seed(1)))
    assert a.shape == (4000, 2) and set(a.flatten().tolist()) == set(range(2 * len(OPS)))


def test_key_names_randaugment_and_plain_stores_keep_their_key(base_overrides: list[str]) -> None:
    plain = load_config(None, base_overrides)
    consistent = load_config(None, [*base_overrides, "data.randaugment=consistent"])
    assert not target_recipe(plain).randaugment and target_recipe(consistent).randaugment
    ws = build_workspace(plain)
    source = default_sets(ws, class_text_embeddings(plain, ws)[0])[0].source
    key, aug_key = store_key(ws.teacher, source, target_recipe(plain)), store_key(ws.teacher, source,
                                                                              target_recipe(consistent))
    assert "randaugment" not in key["views"] and aug_key["views"] == key["views"] + ",randaugment=2x9"


def test_config_reads_the_paper_presets_true_and_refuses_consistent_with_whole_targets(
        base_overrides: list[str]) -> None:
    assert load_config(None, [*base_overrides, "data.randaugment=true"]).data.randaugment == "student"
    assert load_config(None, base_overrides).data.randaugment == "off"
    with pytest.raises(ConfigError, match=r"train\.teacher_view=whole scores the whole un-augmented image"):
        load_config(None, [*base_overrides, "data.randaugment=consistent", "train.teacher_view=whole"])


def test_each_stored_target_is_the_teachers_embedding_of_the_augmented_view_the_student_sees(
        base_overrides: list[str]) -> None:
    cfg = load_config(None, [*base_overrides, "data.randaugment=consistent", "train.target_views=3",
                             "loss.imcst.weight=1"])
    ws = build_workspace(cfg)
    task = DistillTask(cfg, ws, default_sets(ws, class_text_embeddings(cfg, ws)[0])[0])
    task.targets = open_targets(cfg, ws.teacher, task.train_set.source, needed=True)
    store = task.targets.store
    assert store.augment is not None and store.augment.shape == (len(store.valid), 4, 2)
    assert not store.augment[:, 0].any() and store.augment[:, 1:].any()  # the whole image is never augmented
    batch = next(iter(task.train_set.source.iter_batches([torch.arange(6)])))
    step = task.prepare(batch, torch.Generator().manual_seed(5))
    feats = store.feats.float()
    ids = torch.tensor([int((feats[i] == t).all(1).nonzero()) for i, t in zip(step.index.tolist(), step.targets,
                                                                            strict=True)])
    views = store.views(step.index, ids)
    assert views.augment is not None and views.augment.any()
    # the student's pixels: the stored crop with the stored ops, at the student's size ...
    assert torch.equal(step.pixels, render(batch.images, views, cfg.student.image_size))
    assert not torch.equal(step.pixels, render(batch.images, Views(views.boxes, views.flips), cfg.student.image_size))
    # ... and the target: the teacher's embedding of that view with those ops, at the teacher's size
    with torch.no_grad():
        again = ws.teacher.encode_images(render(batch.images, views, ws.teacher.image_size)).float()
    assert torch.allclose(step.targets, again, atol=2e-3 * again.abs().max())  # the store keeps fp16
