"""vlmdistill export: the model folder, ONNX parity on real images, and the student as an open_clip model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from _tiny_run import fake_run
from vlmdistill.api import ClosedSetError, load
from vlmdistill.cli import app
from vlmdistill.config import StudentConfig
from vlmdistill.export import ExportError, export_model
from vlmdistill.io import load_tensors
from vlmdistill.runfolder import read_tensors
from vlmdistill.students import create_student


def png_paths(raw_images: Path, n: int = 12) -> list[Path]:
    return sorted(raw_images.rglob("*.png"))[:n]


def test_model_folder_is_self_contained(run: Path, model_dir: Path) -> None:
    m = json.loads((model_dir / "manifest.json").read_text())
    results = json.loads((run / "results.json").read_text())
    assert m["format"] == "vlmdistill-model/1"
    assert m["student"]["arch"] == "resnet10t" and m["student"]["out_dim"] == 32
    assert m["preprocessing"]["transform"] == {"base_size": 40, "resize": "center_crop", "eval_crop": 0.875,
                                                "image_size": 32, "interpolation": "bicubic"}
    assert len(m["preprocessing"]["mean"]) == len(m["preprocessing"]["std"]) == 3
    assert m["teacher"]["id"] == results["teacher"]["id"]
    assert m["text"]["template"] == "a photo of {name}"
    assert m["results"]["metrics"] == results["metrics"]
    assert len(m["classes"]) == 8 and m["classes"][0]["prompt"] == f"a photo of {m['classes'][0]['name']}"
    emb = load_tensors(model_dir / "classes.safetensors")["embeddings"]
    assert emb.shape == (8, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(8), atol=1e-5)
    student = create_student(StudentConfig(arch="resnet10t", image_size=32), 32)
    student.load_state_dict(read_tensors(model_dir / "student.safetensors"))
    assert (model_dir / "model.onnx").is_file() and (model_dir / "config.yaml").is_file()
    assert m["onnx"]["parity_max_abs_diff"] < 1e-4 and m["open_clip"]["parity_max_abs_diff"] < 1e-4


def test_onnx_agrees_with_pytorch_on_real_images(model_dir: Path, raw_images: Path) -> None:
    import onnxruntime as ort

    model = load(model_dir)
    paths = png_paths(raw_images)
    pixels = torch.stack([model.transform(p) for p in paths])
    session = ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])
    emb, logits = session.run(None, {"pixels": pixels.numpy()})
    want = model.encode_image(paths)
    assert emb.shape == (len(paths), 32) and logits.shape == (len(paths), 8)
    assert np.abs(emb - want.numpy()).max() < 1e-4
    want_logits = model.logit_scale * want @ model.class_embeddings().T
    assert np.abs(logits - want_logits.numpy()).max() < 1e-4 * model.logit_scale
    one = session.run(None, {"pixels": pixels[:1].numpy()})[0]
    assert np.abs(one - emb[:1]).max() < 1e-5


def test_open_clip_model_is_the_student_and_the_teachers_text(model_dir: Path, raw_images: Path) -> None:
    import open_clip

    name = f"local-dir:{model_dir / 'open_clip'}"
    oc, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model = load(model_dir)
    oc.eval()
    norm = preprocess.transforms[-1]
    assert tuple(norm.mean) == pytest.approx(model.student.spec.mean)
    assert tuple(norm.std) == pytest.approx(model.student.spec.std)
    pixels = torch.stack([model.transform(p) for p in png_paths(raw_images)])
    prompts = ["a photo of red circle", "a photo of a purple triangle"]
    with torch.no_grad():
        image = oc.encode_image(norm(pixels), normalize=True)
        text = oc.encode_text(tokenizer(prompts), normalize=True)
    assert (image - model.encode_image(pixels)).abs().max() < 1e-5
    assert (text - model._text_tower().encode(prompts)).abs().max() < 1e-5
    assert float(oc.logit_scale.detach().exp()) == pytest.approx(model.logit_scale, rel=1e-5)
    # the teacher's own text tower, loaded from the run's config, gives the same embeddings
    from vlmdistill.api import _TeacherText

    teacher_text = _TeacherText(model.teacher(), None).encode(prompts)
    assert (text - teacher_text).abs().max() < 1e-5


def test_open_clip_export_needs_a_timm_student(run: Path, tmp_path: Path) -> None:
    fake = fake_run(run, tmp_path / "tv", {"student": {"arch": "tv:mobilenet_v3_small"}})
    with pytest.raises(ExportError, match="needs a timm student"):
        export_model(fake, tmp_path / "out", open_clip=True)


def test_closed_set_baseline_is_refused(run: Path, tmp_path: Path) -> None:
    fake = fake_run(run, tmp_path / "closed", {"loss": {"closed_set": True}})
    with pytest.raises(ClosedSetError, match="closed-set baseline"):
        export_model(fake, tmp_path / "out")
    res = CliRunner().invoke(app, ["export", str(fake), "--out", str(tmp_path / "out")])
    assert res.exit_code == 2 and "closed-set baseline" in res.output


def test_cli_export_with_new_labels(run: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("purple triangle\norange star\nred circle\n")
    out = tmp_path / "model"
    res = CliRunner().invoke(app, ["export", str(run), "--out", str(out), "--labels", str(labels)])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "manifest.json").read_text())
    assert [c["name"] for c in m["classes"]] == ["purple triangle", "orange star", "red circle"]
    assert m["open_clip"] is None and not (out / "open_clip").exists()
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["student"]["arch"] == "resnet10t"
    stored = load_tensors(out / "classes.safetensors")["embeddings"]
    assert torch.allclose(stored, load(run).class_embeddings(["purple triangle", "orange star", "red circle"]),
                          atol=1e-6)
