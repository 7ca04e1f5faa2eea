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
    assert m["format"] == "vlmdistill-model/2"
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
    assert m["text_tower"]["parity_max_abs_diff"] < 1e-4 and (model_dir / "text" / "open_clip_config.json").is_file()
    assert m["source_run"] == run.name
    for f in model_dir.rglob("*"):  # no written file names a path outside the folder
        if f.suffix in (".json", ".yaml", ".txt"):
            text = f.read_text()
            assert str(run.parent) not in text and "/tmp" not in text and "site-packages" not in text, f


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


def test_open_clip_model_is_the_student_and_the_teachers_text(run: Path, model_dir: Path, raw_images: Path) -> None:
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

    teacher_text = _TeacherText(load(run).teacher(), None).encode(prompts)
    assert (text - teacher_text).abs().max() < 1e-5


def test_open_clip_export_needs_a_timm_student(run: Path, tmp_path: Path) -> None:
    fake = fake_run(run, tmp_path / "tv", {"student": {"arch": "tv:mobilenet_v3_small"}})
    with pytest.raises(ExportError, match="needs a timm student"):
        export_model(fake, tmp_path / "out", open_clip=True)


def test_open_clip_export_refuses_model_kwargs_before_any_work(run: Path, tmp_path: Path) -> None:
    """open_clip's timm tower names a model and passes no kwargs: say so (and what to train instead) up front."""
    fake = fake_run(run, tmp_path / "kw", {"student": {"model_kwargs": {"stem_width": 16}}})
    with pytest.raises(ExportError, match=r"cannot pass student\.model_kwargs.*student\.arch=test_resnet"):
        export_model(fake, tmp_path / "out", open_clip=True)
    assert not (tmp_path / "out").exists()


def test_train_says_at_the_start_when_its_student_cannot_become_open_clip(run: Path, capsys) -> None:
    from vlmdistill.runfolder import RunFolder
    from vlmdistill.train import _note_open_clip

    cfg = RunFolder(run).config()
    _note_open_clip(cfg, resume=False)
    assert "--open-clip" not in capsys.readouterr().err
    kwargs = cfg.model_copy(update={"student": cfg.student.model_copy(update={"model_kwargs": {"stem_width": 16}})})
    _note_open_clip(kwargs, resume=False)
    assert "not --open-clip: open_clip's timm tower" in capsys.readouterr().err.replace("\n", " ")


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


def _classify_elsewhere(folder: Path, cwd: Path, names: list[str], images: list[Path]) -> list[list[float]]:
    """``vlmdistill.load(folder).scores`` in a fresh process run from ``cwd`` (the HF hub unreachable)."""
    import os
    import subprocess
    import sys

    code = ("import json, sys, vlmdistill; m = vlmdistill.load(sys.argv[1]); "
            "print(json.dumps(m.scores(sys.argv[3:], json.loads(sys.argv[2])).tolist()))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(folder), json.dumps(names), *map(str, images)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


def test_moved_model_folder_classifies_new_names_without_its_teacher(
    run: Path, tmp_path: Path, raw_images: Path, open_clip_teacher_files: tuple[Path, Path]
) -> None:
    """Issue 17: export, move the folder, rename the teacher's files away, run from another directory: new class
    names score exactly as before the move."""
    import shutil

    names, images = ["purple triangle", "orange star", "red circle"], png_paths(raw_images, 4)
    folder = tmp_path / "made-here" / "model"
    export_model(run, folder)
    before = load(folder).scores(images, names)
    moved = tmp_path / "elsewhere" / "model"
    moved.parent.mkdir()
    shutil.move(str(folder), str(moved))
    teacher_dir = open_clip_teacher_files[0].parent
    hidden = teacher_dir.with_name(teacher_dir.name + "-renamed")
    teacher_dir.rename(hidden)
    try:
        cwd = tmp_path / "cwd"
        cwd.mkdir()
        after = torch.tensor(_classify_elsewhere(moved, cwd, names, images))
    finally:
        hidden.rename(teacher_dir)
    assert torch.allclose(after, before, atol=1e-6)


def test_plain_open_clip_loads_a_moved_export_from_another_directory(
    run: Path, model_dir: Path, tmp_path: Path, raw_images: Path
) -> None:
    """The --open-clip folder in a fresh process that imports only open_clip, from another directory, after the
    folder moved: the same image and text embeddings as vlmdistill.load before the move."""
    import shutil
    import subprocess
    import sys

    model = load(model_dir)
    prompts = ["a photo of purple triangle", "a photo of red circle"]
    pixels = torch.stack([model.transform(p) for p in png_paths(raw_images, 3)])
    want_image, want_text = model.encode_image(pixels), model.encode_text(prompts)
    moved = tmp_path / "moved"
    shutil.copytree(model_dir / "open_clip", moved)
    torch.save(pixels, tmp_path / "pixels.pt")
    code = ("import json, sys, torch, open_clip; "
            "m, _, pre = open_clip.create_model_and_transforms('local-dir:' + sys.argv[1]); m.eval(); "
            "tok = open_clip.get_tokenizer('local-dir:' + sys.argv[1]); norm = pre.transforms[-1]; "
            "x = torch.load(sys.argv[2]); "
            "i = m.encode_image(norm(x), normalize=True); t = m.encode_text(tok(json.loads(sys.argv[3])), "
            "normalize=True); print(json.dumps([i.tolist(), t.tolist()]))")
    with torch.no_grad():
        proc = subprocess.run([sys.executable, "-c", code, str(moved), str(tmp_path / "pixels.pt"),
                               json.dumps(prompts)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    image, text = (torch.tensor(v) for v in json.loads(proc.stdout.splitlines()[-1]))
    assert (image - want_image).abs().max() < 1e-5 and (text - want_text).abs().max() < 1e-5


def test_no_text_tower_folder_scores_stored_classes_and_says_how_to_get_new_ones(
    run: Path, tmp_path: Path, raw_images: Path
) -> None:
    from vlmdistill.texttower import TextTowerError

    folder = tmp_path / "bare"
    manifest = export_model(run, folder, text_tower=False)
    assert manifest["text_tower"] is None and not (folder / "text").exists()
    model = load(folder)
    images = png_paths(raw_images, 2)
    assert torch.allclose(model.scores(images), load(run).scores(images, model.class_names), atol=1e-5)
    with pytest.raises(TextTowerError, match=r"without the teacher's text tower.*without --no-text-tower"):
        model.classify(images, ["a cat", "a dog"])


def test_a_failed_export_leaves_the_earlier_folder_whole(run: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmdistill.export as export_mod

    folder = tmp_path / "model"
    export_model(run, folder, text_tower=False)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def broken(*args: object, **kwargs: object) -> float:
        raise OSError("disk went away")

    monkeypatch.setattr(export_mod, "write_onnx", broken)
    with pytest.raises(OSError, match="disk went away"):
        export_model(run, folder)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".model")]
    with pytest.raises(ExportError, match="not a model folder"):
        export_model(run, run.parent)


@pytest.fixture(scope="module")
def hf_text_run(tmp_path_factory: pytest.TempPathFactory, prepared: Path) -> tuple[Path, Path]:
    """A tiny run whose open_clip teacher has a Hugging Face text tower, named by a local folder (as the demo
    teacher's MiniLM is): a 1-layer BERT with MiniLM's own tokenizer files. Returns (run, text tower folder)."""
    import shutil

    import open_clip
    from transformers import BertConfig

    from _tiny_run import tiny_run
    from vlmdistill.demo.teacher import text_model_dir

    root = tmp_path_factory.mktemp("hf-text")
    hf = root / "bert-text"
    hf.mkdir()
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(Path(text_model_dir()) / name, hf / name)
    BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(hf)
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 32,
                                           "patch_size": 8},
           "text_cfg": {"hf_model_name": str(hf), "hf_tokenizer_name": str(hf), "hf_proj_type": "linear",
                        "hf_pooler_type": "mean_pooler", "hf_model_pretrained": False, "context_length": 32}}
    teacher = root / "teacher"
    teacher.mkdir()
    cfg_path = teacher / "tiny-hf-text.json"
    cfg_path.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    torch.save(open_clip.create_model("tiny-hf-text", pretrained_text=False).state_dict(), teacher / "tiny-hf-text.pt")
    return tiny_run(root, prepared, (cfg_path, teacher / "tiny-hf-text.pt"), name="hf-text"), hf


def test_hugging_face_text_tower_skips_padding_columns_exactly(hf_text_run: tuple[Path, Path]) -> None:
    """A Hugging Face text tower masks its padding: the teacher encodes short prompts without the padding
    columns (its cost), and the embeddings are those of the full-length tokens."""
    from vlmdistill.runfolder import RunFolder
    from vlmdistill.teachers import load_teacher

    teacher = load_teacher(RunFolder(hf_text_run[0]).config().teacher)
    tokens = teacher.tokenize(["a red circle", "a photo of a small purple triangle on grey"])
    assert tokens.shape[1] == 32 and teacher._unpadded(tokens).shape[1] < 16
    with torch.no_grad():
        full = teacher.model.encode_text(tokens)
        assert torch.allclose(teacher.encode_tokens(tokens), full, atol=1e-6)


def test_moved_folder_with_a_hugging_face_text_tower_needs_neither_its_source_nor_the_teacher(
    hf_text_run: tuple[Path, Path], tmp_path: Path, raw_images: Path
) -> None:
    import shutil

    run, hf = hf_text_run
    names, images = ["purple triangle", "red circle"], png_paths(raw_images, 3)
    folder = tmp_path / "model"
    manifest = export_model(run, folder, open_clip=True)
    cfg = json.loads((folder / "open_clip" / "open_clip_config.json").read_text())["model_cfg"]["text_cfg"]
    assert cfg["hf_model_name"] == manifest["open_clip"]["hf_text_tower"]["hub_id"]
    assert str(hf) not in json.dumps(cfg) and (folder / "text" / "config.json").is_file()
    before = load(folder).scores(images, names)
    moved = tmp_path / "moved"
    shutil.move(str(folder), str(moved))
    hidden = [p.rename(p.with_name(p.name + "-renamed")) for p in (hf, hf.parent / "teacher")]
    try:
        after = torch.tensor(_classify_elsewhere(moved, tmp_path, names, images))
    finally:
        for p in hidden:
            p.rename(p.with_name(p.name.removesuffix("-renamed")))
    assert torch.allclose(after, before, atol=1e-6)
