"""Teachers load through the code users run: open_clip (config JSON + checkpoint, tags) and HF CLIPModel."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vlmdistill.config import TeacherConfig
from vlmdistill.teachers import TeacherLoadError, load_teacher


def test_open_clip_checkpoint_roundtrip(open_clip_teacher_files: tuple[Path, Path]) -> None:
    cfg_path, ckpt = open_clip_teacher_files
    t = load_teacher(TeacherConfig(model_config=cfg_path, checkpoint=ckpt, device="cpu"))
    assert (t.embed_dim, t.image_size, t.context_length) == (32, 32, 77)
    x = torch.rand(3, 3, 32, 32)
    a = t.encode_images(x)
    assert a.shape == (3, 32) and torch.isfinite(a).all()
    assert t.encode_texts(["a photo of a cat", "a photo of a dog"]).shape == (2, 32)
    again = load_teacher(TeacherConfig(model_config=cfg_path, checkpoint=ckpt, device="cpu"))
    assert again.id == t.id
    assert torch.allclose(again.encode_images(x), a)
    assert not any(p.requires_grad for p in t.model.parameters())
    assert t.count_tokens("a photo of a cat") == 7


def test_teacher_id_changes_with_weights(open_clip_teacher_files: tuple[Path, Path], tmp_path: Path) -> None:
    cfg_path, ckpt = open_clip_teacher_files
    state = torch.load(ckpt, weights_only=True)
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in state.items()}
    other = tmp_path / "other.pt"
    torch.save(state, other)
    a = load_teacher(TeacherConfig(model_config=cfg_path, checkpoint=ckpt, device="cpu"))
    b = load_teacher(TeacherConfig(model_config=cfg_path, checkpoint=other, device="cpu"))
    assert a.id != b.id


def test_pretrained_tag_offline_gives_clear_error() -> None:
    with pytest.raises(TeacherLoadError, match=r"teacher\.checkpoint"):
        load_teacher(TeacherConfig(name="ViT-B-32", pretrained="openai", device="cpu"))


def test_missing_weights_and_unknown_model_are_explained(tmp_path: Path) -> None:
    with pytest.raises(TeacherLoadError, match="no weights"):
        load_teacher(TeacherConfig(name="ViT-B-32", pretrained=None, device="cpu"))
    with pytest.raises(TeacherLoadError, match="no model"):
        load_teacher(TeacherConfig(name="not-a-model", pretrained="x", device="cpu"))
    with pytest.raises(TeacherLoadError, match="does not exist"):
        load_teacher(TeacherConfig(name="ViT-B-32", checkpoint=tmp_path / "nope.pt", device="cpu"))


def test_hf_clip_local_directory(hf_clip_dir: Path) -> None:
    from transformers import CLIPModel, CLIPTokenizer

    d = hf_clip_dir
    t = load_teacher(TeacherConfig(backend="hf", name=str(d), device="cpu"))
    assert (t.embed_dim, t.image_size, t.context_length) == (16, 32, 77)
    texts = ["a photo of a cat", "a photo of a red striped star"]
    got = t.encode_texts(texts)
    ref_model = CLIPModel.from_pretrained(d).eval()
    tok = CLIPTokenizer.from_pretrained(d)
    with torch.no_grad():
        out = ref_model.get_text_features(**tok(texts, padding=True, return_tensors="pt"))
    ref = out if torch.is_tensor(out) else out.pooler_output
    assert torch.allclose(got, ref, atol=1e-5)
    assert t.encode_images(torch.rand(2, 3, 32, 32)).shape == (2, 16)
    assert t.id.startswith("hf:")


def test_random_teachers_are_told_apart(open_clip_teacher_files: tuple[Path, Path]) -> None:
    cfg_path, _ = open_clip_teacher_files
    torch.manual_seed(1)
    a = load_teacher(TeacherConfig(model_config=cfg_path, pretrained="random", device="cpu"))
    torch.manual_seed(2)
    b = load_teacher(TeacherConfig(model_config=cfg_path, pretrained="random", device="cpu"))
    torch.manual_seed(1)
    again = load_teacher(TeacherConfig(model_config=cfg_path, pretrained="random", device="cpu"))
    assert a.id != b.id and a.id == again.id
