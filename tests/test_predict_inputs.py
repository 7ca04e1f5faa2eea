"""Issue 17, point 5: every wrong input to ``load()``, ``DistilledModel`` and ``vlmdistill predict`` is one
line naming the input and the fix, or a documented behaviour, never a traceback or a silent wrong answer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from vlmdistill.api import DistilledModel, ModelLoadError, load
from vlmdistill.cli import app
from vlmdistill.data.images import BadImageError
from vlmdistill.inputs import InputError
from vlmdistill.predict import PredictError, predict

NEW = ["purple triangle", "orange star"]
"""Class names no run in the tests was trained on."""


@pytest.fixture(scope="module")
def model(model_dir: Path) -> DistilledModel:
    return load(model_dir)


@pytest.fixture(scope="module")
def image(raw_images: Path) -> Path:
    return sorted(raw_images.rglob("*.png"))[0]


@pytest.fixture
def pngs(raw_images: Path, tmp_path: Path) -> Path:
    """A folder of three good PNGs."""
    d = tmp_path / "pngs"
    d.mkdir()
    for p in sorted(raw_images.rglob("*.png"))[:3]:
        shutil.copy(p, d / p.name)
    return d


def cli(*args: str) -> tuple[int, str]:
    """Exit code and everything printed; a traceback (any exception but SystemExit) fails the test."""
    res = CliRunner().invoke(app, ["predict", *args])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    return res.exit_code, res.output


def one_line_error(args: list[str], *needles: str) -> None:
    code, output = cli(*args)
    error = [ln for ln in output.splitlines() if ln.startswith("error:")]
    assert code == 2 and len(error) == 1, output
    for needle in needles:
        assert needle in " ".join(output.split()), output


# --- tracebacks that are now one line ---------------------------------------------------------------


def test_top_k_below_one(model_dir: Path, pngs: Path, model: DistilledModel, image: Path) -> None:
    one_line_error([str(model_dir), str(pngs), "--top-k", "-1"], "--top-k -1", "1 or more")
    with pytest.raises(InputError, match="top_k 0"):
        model.classify(image, top_k=0)


def test_classes_naming_no_class(model_dir: Path, pngs: Path) -> None:
    one_line_error([str(model_dir), str(pngs), "--classes", ","], "--classes ','", 'e.g. --classes "cat,dog"')


def test_labels_file_not_utf8(model_dir: Path, pngs: Path, tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_bytes("caf\u00e9 au lait\nred circle\n".encode("latin-1"))
    one_line_error([str(model_dir), str(pngs), "--labels", str(labels)], f"{labels}:1", "save the file as UTF-8")


@pytest.mark.parametrize(("device", "needle"), [("tpu", "not a device"), ("cuda", "no usable CUDA GPU"),
                                                 ("cuda:3", "no usable CUDA GPU")])
def test_unusable_device(model_dir: Path, pngs: Path, monkeypatch: pytest.MonkeyPatch, device: str,
                         needle: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    one_line_error([str(model_dir), str(pngs), "--device", device], f"--device '{device}'", needle)
    with pytest.raises(InputError, match=needle):
        load(model_dir, device=device)


def test_non_utf8_file_name_is_written_as_its_own_bytes(model_dir: Path, pngs: Path, tmp_path: Path) -> None:
    """The CSV holds the name's bytes as on disk; JSONL escapes them, and both lead back to the same file."""
    odd = os.fsdecode(b"caf\xe9.png")
    shutil.copy(next(pngs.iterdir()), pngs / odd)
    out = tmp_path / "preds.csv"
    code, output = cli(str(model_dir), str(pngs), "--out", str(out))
    assert code == 0, output
    lines = out.read_bytes().splitlines()
    assert len(lines) == 5 and any(os.fsencode(pngs) + b"/caf\xe9.png," in ln for ln in lines)
    rows = [json.loads(x) for x in cli(str(model_dir), str(pngs))[1].splitlines() if x.startswith("{")]
    assert [r for r in rows if Path(r["path"]).name == odd and r["labels"] and Path(r["path"]).is_file()]


def test_empty_inputs(model: DistilledModel, image: Path) -> None:
    with pytest.raises(InputError, match="images is empty"):
        model.encode_image([])
    with pytest.raises(InputError, match="texts is empty"):
        model.encode_text([])
    with pytest.raises(InputError, match="texts is a NoneType"):
        model.encode_text(None)
    with pytest.raises(InputError, match="class_names is empty"):
        model.classify(image, [])


def test_numpy_array_is_refused_with_the_fix(model: DistilledModel, image: Path) -> None:
    arr = np.asarray(Image.open(image).convert("RGB"))
    with pytest.raises(InputError, match=r"numpy array \(40, 40, 3\) uint8: give PIL.Image.fromarray"):
        model.encode_image(arr)
    with pytest.raises(InputError, match=r"images\[1\] is a numpy array"):
        model.encode_image([image, arr])


# --- silent wrong answers that are now errors or documented behaviour --------------------------------


def test_symlink_loop_and_broken_link_get_a_row(model_dir: Path, pngs: Path) -> None:
    (pngs / "loop.png").symlink_to(pngs / "loop.png")
    (pngs / "gone.png").symlink_to(pngs / "nowhere.png")
    rows = {Path(r.path).name: r for r in predict(load(model_dir), [pngs], NEW, top_k=1)}
    assert len(rows) == 5 and len([r for r in rows.values() if r.labels]) == 3
    assert "symbolic links" in rows["loop.png"].error and rows["gone.png"].error


def test_a_string_of_class_names_is_refused(model: DistilledModel, image: Path) -> None:
    with pytest.raises(InputError, match="is the string 'red cross', not a list"):
        model.classify(image, "red cross")


def test_uint8_tensors_are_decoded_images(model: DistilledModel, image: Path, tmp_path: Path) -> None:
    """A uint8 tensor (as torchvision.io.decode_image gives) embeds exactly as its file, 1 channel as grey."""
    rgb = torch.from_numpy(np.asarray(Image.open(image).convert("RGB")).copy()).permute(2, 0, 1)
    assert torch.allclose(model.encode_image(rgb), model.encode_image(image), atol=1e-6)
    assert torch.allclose(model.encode_image(rgb.unsqueeze(0)), model.encode_image(image), atol=1e-6)
    Image.open(image).convert("L").save(tmp_path / "grey.png")
    grey = torch.from_numpy(np.asarray(Image.open(tmp_path / "grey.png")).copy()).unsqueeze(0)
    assert torch.allclose(model.encode_image(grey), model.encode_image(tmp_path / "grey.png"), atol=1e-6)


def test_float_tensors_must_be_transformed_pixels(model: DistilledModel, image: Path) -> None:
    pixels = model.transform(image)
    assert torch.equal(model.encode_image(pixels), model.encode_image(image))
    with pytest.raises(InputError, match=r"pixels up to 2[0-9][0-9]: .*divide by 255"):
        model.encode_image(pixels * 255)
    with pytest.raises(InputError, match=r"down to -.*before mean/std normalisation"):
        model.encode_image((pixels - 0.5) / 0.25)
    with pytest.raises(InputError, match="64x64 pixels; this model takes 32x32"):
        model.encode_image(torch.rand(3, 64, 64))
    with pytest.raises(InputError, match=r"shape \(1, 32, 32\).*grey: repeat it"):
        model.encode_image(pixels[:1])
    with pytest.raises(InputError, match=r"torch\.int64 tensor"):
        model.encode_image(pixels.long())


def test_missing_input_path_stops_before_any_work(model_dir: Path, pngs: Path, tmp_path: Path) -> None:
    gone = tmp_path / "typo.jpg"
    one_line_error([str(model_dir), str(pngs), str(gone)], f"input {gone} does not exist", "nothing was predicted")
    with pytest.raises(PredictError, match="does not exist"):
        predict(load(model_dir), [gone], NEW)


def test_the_same_image_given_twice_is_predicted_once(model_dir: Path, pngs: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    first = next(iter(sorted(pngs.iterdir())))
    code, output = cli(str(model_dir), str(pngs), f"{pngs}/", str(first), "--classes", ",".join(NEW))
    rows = [json.loads(x) for x in output.splitlines() if x.startswith("{")]
    assert code == 0 and len(rows) == 3 and len({r["path"] for r in rows}) == 3, output
    assert "4 images were given more than once" in caplog.text


def test_duplicate_class_names_are_refused(model_dir: Path, pngs: Path, tmp_path: Path, model: DistilledModel,
                                           image: Path) -> None:
    one_line_error([str(model_dir), str(pngs), "--classes", "cat,dog,cat"], "'cat' more than once")
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\ndog\n")
    one_line_error([str(model_dir), str(pngs), "--labels", str(labels)], f"--labels {labels} names 'dog'")
    with pytest.raises(InputError, match="'cat' more than once"):
        model.classify(image, ["cat", "cat"])


def test_unknown_output_kind_is_refused_before_predicting(model_dir: Path, pngs: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmdistill.predict

    def never(*_: object, **__: object) -> None:
        raise AssertionError("predict ran before --out was checked")

    monkeypatch.setattr(vlmdistill.predict, "predict", never)
    one_line_error([str(model_dir), str(pngs), "--out", str(tmp_path / "preds.txt")], "give a file ending in .jsonl")


# --- misleading messages --------------------------------------------------------------------------------


def test_loading_a_file_says_it_is_a_file(model_dir: Path) -> None:
    with pytest.raises(ModelLoadError, match="is a file, not a model folder"):
        load(model_dir / "manifest.json")


def test_bad_image_fix_speaks_to_an_api_user(model: DistilledModel, tmp_path: Path) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BadImageError, match="Fix: replace the file or leave it out") as err:
        model.encode_image(broken)
    assert "skip_bad_images" not in str(err.value)


def test_predict_descriptions_option(model_dir: Path, tmp_path: Path, pngs: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    """A run trained with descriptions prompts --classes with --descriptions, and says how when they are missing."""
    folder = tmp_path / "desc-model"
    shutil.copytree(model_dir, folder)
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    cfg["text"]["use_descriptions"] = True
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    descs = ["a purple three-cornered shape", "an orange five-pointed star"]
    (tmp_path / "desc.txt").write_text("\n".join(descs) + "\n")
    args = [str(folder), str(pngs), "--classes", ",".join(NEW), "--top-k", "2"]
    code, output = cli(*args, "--descriptions", str(tmp_path / "desc.txt"))
    assert code == 0 and "trained with class descriptions" not in caplog.text, output
    got = [json.loads(x) for x in output.splitlines() if x.startswith("{")]
    m = load(folder)
    texts = [cfg["text"]["description_template"].format(name=n, description=d) for n, d in zip(NEW, descs, strict=True)]
    probs = (m.logit_scale * m.encode_image(sorted(pngs.iterdir())) @ m.encode_text(texts).T).softmax(-1)
    assert [r["scores"] for r in got] == [[round(p, 6) for p in sorted(ps.tolist(), reverse=True)] for ps in probs]
    cli(*args)
    assert "predict --descriptions FILE" in caplog.text
    cli(str(model_dir), *args[1:], "--descriptions", str(tmp_path / "desc.txt"))
    assert "trained without class descriptions, so the descriptions given are not used" in caplog.text
