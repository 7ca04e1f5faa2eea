"""Cached text and image targets are keyed by teacher and inputs: never silently reused across them."""

from __future__ import annotations

from pathlib import Path

import torch

from vlmdistill.config import TeacherConfig
from vlmdistill.data.dataset import open_dataset
from vlmdistill.data.source import ImageSource
from vlmdistill.targets.store import ViewRecipe, open_store, store_path
from vlmdistill.teachers import load_teacher
from vlmdistill.text.textbank import embed_texts


class CountingTeacher:
    """Wraps a teacher and counts encoder calls, to see whether a cache was used."""

    def __init__(self, inner: object) -> None:
        self.inner, self.image_calls, self.text_calls = inner, 0, 0

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def encode_images(self, x: torch.Tensor) -> torch.Tensor:
        self.image_calls += 1
        return self.inner.encode_images(x)

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        self.text_calls += 1
        return self.inner.encode_texts(texts)


def _teachers(files: tuple[Path, Path], tmp_path: Path) -> tuple[CountingTeacher, CountingTeacher]:
    cfg_path, ckpt = files
    state = torch.load(ckpt, weights_only=True)
    other = tmp_path / "other.pt"
    torch.save({k: v * 1.1 if v.is_floating_point() else v for k, v in state.items()}, other)
    a = load_teacher(TeacherConfig(model_config=cfg_path, checkpoint=ckpt, device="cpu"))
    b = load_teacher(TeacherConfig(model_config=cfg_path, checkpoint=other, device="cpu"))
    return CountingTeacher(a), CountingTeacher(b)


def test_text_cache_hits_and_misses(open_clip_teacher_files: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = _teachers(open_clip_teacher_files, tmp_path)
    texts = ["a photo of red circle", "a photo of blue square"]
    first = embed_texts(a, texts, tmp_path)
    again = embed_texts(a, texts, tmp_path)
    assert a.text_calls == 1 and torch.equal(first, again)
    assert torch.allclose(first.norm(dim=-1), torch.ones(2))
    embed_texts(a, [*texts, "a photo of green circle"], tmp_path)
    assert a.text_calls == 2
    other = embed_texts(b, texts, tmp_path)
    assert b.text_calls == 1 and not torch.allclose(other, first)


def _source(prepared: Path) -> ImageSource:
    ds = open_dataset(prepared)
    return ImageSource(ds.train.records, 40, "center_crop")


def test_target_store_reused_and_keyed(
    open_clip_teacher_files: tuple[Path, Path], prepared: Path, tmp_path: Path
) -> None:
    a, b = _teachers(open_clip_teacher_files, tmp_path)
    source = _source(prepared)
    recipe = ViewRecipe(2, 0, (0.3, 1.0), True)
    s1 = open_store(a, source, recipe, tmp_path, progress=False)
    calls = a.image_calls
    assert s1.feats.shape[:2] == (len(source), 3) and bool(s1.valid.all())
    s2 = open_store(a, source, recipe, tmp_path, progress=False)
    assert a.image_calls == calls and torch.equal(s1.feats, s2.feats)
    s3 = open_store(b, source, recipe, tmp_path, progress=False)
    assert b.image_calls > 0 and not torch.allclose(s3.feats.float(), s1.feats.float())
    fewer = ImageSource(source.records[:-1], 40, "center_crop")
    s4 = open_store(a, fewer, recipe, tmp_path, progress=False)
    assert a.image_calls > calls and len(s4.valid) == len(source) - 1
    other_views = open_store(a, source, ViewRecipe(3, 0, (0.3, 1.0), True), tmp_path, progress=False)
    assert other_views.n_views == 4


def test_stored_views_match_the_teacher_on_that_view(
    open_clip_teacher_files: tuple[Path, Path], prepared: Path, tmp_path: Path
) -> None:
    from vlmdistill.data.views import render

    a, _ = _teachers(open_clip_teacher_files, tmp_path)
    source = _source(prepared)
    store = open_store(a, source, ViewRecipe(3, 1, (0.3, 1.0), True), tmp_path, progress=False)
    batch = next(source.batches(torch.arange(4), 4))
    view_ids = torch.tensor([1, 2, 3, 0])
    direct = a.inner.encode_images(render(batch.images, store.views(batch.index, view_ids), a.image_size))
    assert torch.allclose(store.targets(batch.index, view_ids), direct, atol=2e-2, rtol=1e-2)


def test_corrupt_store_is_rebuilt(open_clip_teacher_files: tuple[Path, Path], prepared: Path, tmp_path: Path) -> None:
    a, _ = _teachers(open_clip_teacher_files, tmp_path)
    source = _source(prepared)
    recipe = ViewRecipe(1, 0, (0.3, 1.0), True)
    good = open_store(a, source, recipe, tmp_path, progress=False)
    expected = good.feats
    shard = store_path(tmp_path, good.key) / "00000.feats.f16"
    shard.write_bytes(shard.read_bytes()[:100])
    calls = a.image_calls
    rebuilt = open_store(a, source, recipe, tmp_path, progress=False)
    assert a.image_calls > calls and torch.equal(rebuilt.feats, expected)
