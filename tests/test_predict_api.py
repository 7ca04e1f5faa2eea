"""vlmdistill.load and predict: run dir and model folder agree, load() reproduces the run's own evaluation,
new class names go through a text tower (or fail clearly), and bad images do not stop a folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import vlmdistill
from vlmdistill.api import TextTowerError, load
from vlmdistill.cli import app
from vlmdistill.config import load_config
from vlmdistill.data.dataset import open_dataset
from vlmdistill.predict import predict


@pytest.fixture
def folder(raw_images: Path, tmp_path: Path) -> Path:
    """Four good PNGs (two in a subfolder), one corrupt file and one that is not an image at all."""
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    pngs = sorted(raw_images.rglob("*.png"))
    for i, p in enumerate(pngs[:4]):
        shutil.copy(p, (d / "sub" if i % 2 else d) / f"{i}_{p.name}")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (d / "notes.txt").write_text("ignored: not an image extension")
    return d


def test_package_exports_load(model_dir: Path) -> None:
    model = vlmdistill.load(model_dir)
    assert type(model).__name__ == "DistilledModel" and len(model.class_names) == 8


def test_run_dir_and_model_dir_give_the_same_model(run: Path, model_dir: Path, raw_images: Path) -> None:
    a, b = load(run), load(model_dir)
    paths = sorted(raw_images.rglob("*.png"))[:6]
    assert torch.allclose(a.encode_image(paths), b.encode_image(paths), atol=1e-6)
    assert a.class_names == b.class_names
    assert torch.allclose(a.class_embeddings(), b.class_embeddings(), atol=1e-6)
    assert a.classify(paths, top_k=3) == b.classify(paths, top_k=3)
    assert a.transform == b.transform


def test_transform_of_a_pil_image_equals_that_of_its_file(model_dir: Path, raw_images: Path) -> None:
    model = load(model_dir)
    path = sorted(raw_images.rglob("*.png"))[0]
    with Image.open(path) as im:
        pil = model.transform(im)
    assert pil.shape == (3, 32, 32) and torch.equal(pil, model.transform(path))
    assert torch.equal(model.encode_image(Image.open(path)), model.encode_image(pil))


def test_load_reproduces_the_runs_ood_score(run: Path) -> None:
    """The loaded model's transform + classify over the OOD classes gives the number train reported."""
    cfg = load_config(run / "config.yaml")
    d = open_dataset(cfg.data.dir)
    model = load(run)
    names = d.ood_space.names
    probs = model.scores([r.path for r in d.ood_val.records], names)
    pred, target = probs.argmax(1), torch.tensor(d.ood_val.labels)
    recall = float(torch.stack([(pred[target == c] == c).float().mean() for c in target.unique()]).mean() * 100)
    reported = json.loads((run / "results.json").read_text())["metrics"]["ood"]["mean_per_class_recall"]
    assert recall == pytest.approx(reported, abs=1e-4)


def test_new_class_names_without_a_text_tower_fail_clearly(model_dir: Path, tmp_path: Path, raw_images: Path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(model_dir, bare, ignore=shutil.ignore_patterns("open_clip", "text"))
    model = load(bare)
    paths = sorted(raw_images.rglob("*.png"))[:2]
    assert len(model.classify(paths, top_k=2)[0]) == 2  # the stored classes need no text tower
    with pytest.raises(TextTowerError, match="only its 8 stored classes"):
        model.classify(paths, ["a cat", "a dog"])
    res = CliRunner().invoke(app, ["predict", str(bare), str(paths[0]), "--classes", "cat,dog"])
    assert res.exit_code == 2 and "text tower" in res.output


def test_open_clip_text_tower_matches_the_teacher(run: Path, model_dir: Path) -> None:
    names = ["purple triangle", "red circle"]
    from_folder = load(model_dir).class_embeddings(names)
    from_teacher = load(run).class_embeddings(names)
    assert torch.allclose(from_folder, from_teacher, atol=1e-5)


def test_predict_reports_bad_files_and_predicts_the_rest(model_dir: Path, folder: Path) -> None:
    (folder / "gone.png").symlink_to(folder / "missing.png")
    rows = predict(load(model_dir), [folder], ["red circle", "blue square", "cat"], top_k=2)
    by_name = {Path(r.path).name: r for r in rows}
    assert len(rows) == 6 and "notes.txt" not in by_name
    assert by_name["broken.png"].error and by_name["gone.png"].error
    good = [r for r in rows if r.error is None]
    assert len(good) == 4
    for r in good:
        assert len(r.labels) == 2 and set(r.labels) <= {"red circle", "blue square", "cat"}
        assert r.scores[0] >= r.scores[1] and 0 < sum(r.scores) <= 1 + 1e-6


def test_cli_predict_jsonl_and_csv(model_dir: Path, folder: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["predict", str(model_dir), str(folder), "--top-k", "3"])
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in res.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 5 and sum(1 for x in lines if x["error"]) == 1
    assert all(len(x["labels"]) == 3 for x in lines if not x["error"])
    assert "broken.png" in res.stderr and "4 images predicted, 1 unreadable" in res.stderr
    labels = tmp_path / "labels.txt"
    labels.write_text("red circle\nblue square\n")
    out = tmp_path / "preds.csv"
    res = runner.invoke(app, ["predict", str(model_dir), str(folder), "--labels", str(labels), "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = out.read_text().splitlines()
    assert rows[0] == "path,label_1,score_1,label_2,score_2,error" and len(rows) == 6
    assert sum(1 for r in rows[1:] if r.endswith(",")) == 4


def test_transform_decodes_a_pil_image_as_the_toolkit_does(tmp_path: Path) -> None:
    """The run's interpolation (bilinear in paper mode) and the 16-bit scaling apply to PIL images too."""
    import numpy as np

    from vlmdistill.api import Transform
    from vlmdistill.data.images import load_image

    deep = Image.fromarray(np.full((20, 30), 32768, dtype=np.uint16))
    deep.save(tmp_path / "deep.png")
    colour = Image.fromarray(np.random.default_rng(0).integers(0, 255, (21, 33, 3), dtype=np.uint8))
    colour.save(tmp_path / "colour.png")
    t = Transform(base_size=16, resize="squash", eval_crop=1.0, image_size=16, interpolation="bilinear")
    for name, im in (("deep.png", Image.open(tmp_path / "deep.png")), ("colour.png", colour)):
        assert torch.equal(t.base(im), load_image(tmp_path / name, 16, "squash", "bilinear")), name
    assert int(t.base(Image.open(tmp_path / "deep.png")).float().mean()) == 128
