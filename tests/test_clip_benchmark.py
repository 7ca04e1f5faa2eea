"""CLIP_benchmark on our exports: the split it reads, the pixels open_clip's preprocess gives, and its score."""

from __future__ import annotations

import json
import sys
import tarfile
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from _tiny_run import tiny_run
from vlmdistill.api import Transform, load
from vlmdistill.cli import app
from vlmdistill.clip_benchmark import ClipBenchmarkError, open_clip_preprocess, write_clip_benchmark
from vlmdistill.config import ExperimentConfig, validate_config
from vlmdistill.data.dataset import open_dataset
from vlmdistill.data.prepare import prepare
from vlmdistill.export import export_model
from vlmdistill.workspace import class_prompts

# (width, height, mode, format): odd sizes and aspect ratios, up- and downscaled, in the modes our decoder converts
ODD_IMAGES = [(53, 37, "RGB", "PNG"), (37, 53, "RGB", "JPEG"), (101, 99, "L", "PNG"), (31, 31, "RGBA", "PNG"),
              (15, 64, "P", "PNG"), (64, 15, "RGB", "JPEG"), (41, 40, "RGB", "PNG"), (299, 211, "L", "JPEG")]


def tar_members(folder: Path) -> dict[str, bytes]:
    """Every member of every shard of ``folder/test``, by name."""
    out = {}
    for shard in sorted((folder / "test").glob("*.tar")):
        with tarfile.open(shard) as tar:
            out |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    return out


@pytest.fixture(scope="module")
def odd_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4 classes of 5 images each in ``ODD_IMAGES``'s sizes, modes and formats, prepared (2 of them OOD)."""
    root = tmp_path_factory.mktemp("odd")
    rng = np.random.default_rng(0)
    for c in ("ant", "bee", "cat", "dog"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(5):
            w, h, mode, fmt = ODD_IMAGES[(i + 3 * len(c) + ord(c[0])) % len(ODD_IMAGES)]
            im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(mode)
            im.save(root / "images" / c / f"{c}{i}.{fmt.lower().replace('jpeg', 'jpg')}", format=fmt)
    prepare(root / "ds", images=root / "images", seed=0)
    return root / "ds"


def view_config(data_dir: Path, *overrides: str) -> ExperimentConfig:
    return validate_config({}, [f"data.dir={data_dir}", "data.num_workers=0", *overrides], "test")


@pytest.mark.parametrize(("resize", "interpolation", "size"), [("center_crop", "bicubic", 32),
                                                                ("squash", "bilinear", 24)])
def test_expressible_view_is_open_clips_preprocess_to_the_pixel(odd_dataset: Path, tmp_path: Path, resize: str,
                                                                  interpolation: str, size: int) -> None:
    from open_clip.transform import PreprocessCfg, image_transform_v2
    from torchvision.transforms import Compose

    cfg = view_config(odd_dataset, f"data.resize={resize}", f"data.interpolation={interpolation}",
                      f"data.base_size={size}", "data.eval_crop=1", f"student.image_size={size}")
    preprocess, view = open_clip_preprocess(cfg, [0.5] * 3, [0.25] * 3)
    assert view == {"matches_vlmdistill_eval": True}
    normalised = image_transform_v2(PreprocessCfg(**preprocess), is_train=False)
    to_pixels = Compose(normalised.transforms[:-1])  # all but Normalize: [0, 1] pixels, as our Transform gives
    write_clip_benchmark(cfg, tmp_path / "odd")
    members = tar_members(tmp_path / "odd")
    ours = Transform.from_config(cfg)
    records = open_dataset(odd_dataset).ood_val.records
    assert len(records) == 10 and len(members) == 20
    for i, record in enumerate(records):
        theirs = to_pixels(Image.open(BytesIO(members[f"s{i:07d}.png"])))
        assert torch.equal(ours(record.path), theirs), record.path


def test_each_view_open_clip_cannot_express_is_named_with_the_fix() -> None:
    cfg = view_config(Path("data"), "data.resize=squash", "data.interpolation=bilinear", "data.base_size=64",
                      "data.eval_crop=0.875", "student.image_size=56", "data.decode=device")
    preprocess, view = open_clip_preprocess(cfg, [0.5] * 3, [0.25] * 3)
    assert preprocess == {"size": [56, 56], "mean": [0.5] * 3, "std": [0.25] * 3, "interpolation": "bilinear",
                          "resize_mode": "squash"}
    assert view["matches_vlmdistill_eval"] is False
    assert all(part in view["reason"] for part in ("centre 0.875", "64 px", "on the device"))
    assert "data.base_size=56 data.eval_crop=1 data.decode=cpu" in view["fix"]


def test_split_has_clip_benchmarks_layout_and_evals_classes_and_prompts(prepared: Path, tmp_path: Path) -> None:
    cfg = view_config(prepared, "text.use_descriptions=true")
    out = tmp_path / "tiny_ood"
    info = write_clip_benchmark(cfg, out, "ood", shard_size=10)
    split = open_dataset(prepared).ood_val
    names = split.space.names
    assert info["images"] == len(split) == 24 and info["shards"] == 4 and info["name"] == "wds/tiny_ood"
    assert (out / "test" / "nshards.txt").read_text() == "4\n"  # 24 images: 4 shards of 6, one per reader worker
    assert sorted(p.name for p in (out / "test").glob("*.tar")) == ["0.tar", "1.tar", "2.tar", "3.tar"]
    assert (out / "classnames.txt").read_text().splitlines() == names
    assert (out / "zeroshot_classification_templates.txt").read_text() == "a photo of {c}\n"
    prompts = json.loads((out / "class_prompts.json").read_text())
    assert prompts == {"tiny_ood": {n: [p] for n, p in zip(names, class_prompts(cfg, split.space), strict=True)}}
    assert prompts["tiny_ood"][names[0]][0].startswith(f"a photo of {names[0]} . a ")
    members = tar_members(out)
    for i, record in enumerate(split.records):
        assert int(members[f"s{i:07d}.cls"]) == split.labels[i]
        png = Image.open(BytesIO(members[f"s{i:07d}.png"]))
        assert png.format == "PNG" and png.mode == "RGB"
        assert np.array_equal(np.asarray(png), np.asarray(Image.open(record.path).convert("RGB")))
    id_info = write_clip_benchmark(cfg, out, "id_val", shard_size=1000)  # an earlier output is replaced whole
    assert id_info["images"] == len(open_dataset(prepared).id_val) == 4 and id_info["shards"] == 4
    assert len(tar_members(out)) == 8
    assert (out / "classnames.txt").read_text().splitlines() == open_dataset(prepared).id_space.names


def test_jpeg_source_is_stored_as_its_decoded_pixels(odd_dataset: Path, tmp_path: Path) -> None:
    cfg = view_config(odd_dataset)
    write_clip_benchmark(cfg, tmp_path / "odd")
    members = tar_members(tmp_path / "odd")
    records = open_dataset(odd_dataset).ood_val.records
    jpegs = [i for i, r in enumerate(records) if r.path.suffix == ".jpg"]
    assert jpegs
    for i in jpegs:
        stored = np.asarray(Image.open(BytesIO(members[f"s{i:07d}.png"])))
        assert np.array_equal(stored, np.asarray(Image.open(records[i].path).convert("RGB")))
    assert not (tmp_path / "odd" / "class_prompts.json").exists()  # without descriptions the template says it all


def test_a_dataset_in_tar_shards_gives_the_same_split(odd_dataset: Path, tmp_path: Path) -> None:
    sharded = tmp_path / "sharded"
    prepare(sharded, images=odd_dataset.parent / "images", seed=0, shards=True, shard_size=3)
    write_clip_benchmark(view_config(odd_dataset), tmp_path / "loose")
    write_clip_benchmark(view_config(sharded), tmp_path / "from_shards")
    assert tar_members(tmp_path / "from_shards") == tar_members(tmp_path / "loose")


def test_refusals_name_the_fix(prepared: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ClipBenchmarkError, match="not empty"):
        write_clip_benchmark(view_config(prepared), foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"
    with pytest.raises(ClipBenchmarkError, match=r"text\.learn_context=false"):
        write_clip_benchmark(view_config(prepared, "text.learn_context=true"), tmp_path / "coop")
    with pytest.raises(ClipBenchmarkError, match="cannot be written as a CLIP_benchmark template"):
        write_clip_benchmark(view_config(prepared, "text.template=' a photo of {name}'"), tmp_path / "braces")
    res = CliRunner().invoke(app, ["clip-benchmark", "-", f"data.dir={prepared}", "--out", str(tmp_path / "x"),
                                   "--split", "train"])
    assert res.exit_code == 2 and "split must be ood or id_val" in res.output


def _accuracy(output: torch.Tensor, target: torch.Tensor, topk: tuple[int, ...] = (1,)) -> list[float]:
    """CLIP_benchmark 1.6.2's ``accuracy`` with ``.item()``: its own calls ``float()`` on a 1-element array, which
    current numpy refuses (TypeError: only 0-dimensional arrays can be converted to Python scalars)."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    return [correct[:k].reshape(-1).float().sum().item() / len(target) for k in topk]


def clip_benchmark_recall(monkeypatch: pytest.MonkeyPatch, model: Path, data: Path, out: Path) -> float:
    """``clip_benchmark eval`` (its CLI's own code path, in this process, fp32) on the dataset ``data``: mean
    per-class recall in percent."""
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification

    monkeypatch.setattr(zeroshot_classification, "accuracy", _accuracy)
    prompts = ["--custom_template_file", str(data / "class_prompts.json")] if (data / "class_prompts.json").exists() \
        else []
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", "eval", "--model", f"local-dir:{model / 'open_clip'}",
                                      "--dataset", f"wds/{data.name}", "--dataset_root", str(data), *prompts,
                                      "--no_amp", "--num_workers", "0", "--quiet", "--output", str(out)])
    cli.main()
    return json.loads(out.read_text())["metrics"]["mean_per_class_recall"] * 100


@pytest.fixture(scope="module")
def matching_run(tmp_path_factory: pytest.TempPathFactory, prepared: Path,
                 open_clip_teacher_files: tuple[Path, Path]) -> Path:
    """A tiny run whose eval view open_clip expresses (base 32 = image size, whole image), with descriptions."""
    return tiny_run(tmp_path_factory.mktemp("cb-run"), prepared, open_clip_teacher_files, name="tiny-cb",
                    extra=("data.base_size=32", "data.eval_crop=1", "text.use_descriptions=true"))


def clip_benchmark_logits(model: Path, data: Path) -> torch.Tensor:
    """CLIP_benchmark's zero-shot logits (100 x cosine) of every image of ``data``, in order: its dataset reader,
    classifier and loop on the open_clip export, as plain open_clip loads it (fp32)."""
    import open_clip
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier

    name = f"local-dir:{model / 'open_clip'}"
    oc, _, preprocess = open_clip.create_model_and_transforms(name)
    ds = build_dataset(f"wds/{data.name}", root=str(data), transform=preprocess, split="test",
                       custom_template_file=str(data / "class_prompts.json"))
    classifier = zero_shot_classifier(oc.eval(), open_clip.get_tokenizer(name), ds.classes, ds.templates, "cpu",
                                      amp=False)
    loader = torch.utils.data.DataLoader(ds.batched(64), batch_size=None)
    return run_classification(oc, classifier, loader, "cpu", amp=False)[0]


@pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle")
def test_clip_benchmark_scores_the_export_as_vlmdistill_eval(matching_run: Path, prepared: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    model = tmp_path / "model"
    manifest = export_model(matching_run, model, open_clip=True)
    assert manifest["open_clip"]["matches_vlmdistill_eval"] is True
    config, data = str(matching_run / "config.yaml"), tmp_path / "tiny_ood"
    runner = CliRunner()
    res = runner.invoke(app, ["clip-benchmark", config, "--out", str(data)])
    assert res.exit_code == 0, res.output
    assert "--custom_template_file" in res.output and "--dataset wds/tiny_ood" in res.output
    res = runner.invoke(app, ["eval", config, "--run", str(matching_run)])
    assert res.exit_code == 0, res.output
    ours = json.loads((matching_run / "eval.json").read_text())["metrics"]["ood"]["mean_per_class_recall"]
    theirs = clip_benchmark_recall(monkeypatch, model, data, tmp_path / "cb.json")
    assert theirs == pytest.approx(ours, abs=0.1)
    # image by image: the same pixels, prompts and weights give the same logits (a tiny run's recall is near
    # chance, so equal recalls alone would not show it)
    split = open_dataset(prepared).ood_val
    student = load(matching_run)
    ours_logits = 100 * student.encode_image([r.path for r in split.records]) @ student.class_embeddings(
        split.space.names, [c.description for c in split.space.classes]).T
    assert (clip_benchmark_logits(model, data) - ours_logits).abs().max() < 1e-3


def test_export_of_a_view_open_clip_cannot_express_warns(run: Path, tmp_path: Path) -> None:
    res = CliRunner().invoke(app, ["export", str(run), "--out", str(tmp_path / "m"), "--open-clip"])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.output.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "centre 0.875" in warnings[0]
    assert "data.base_size=32 data.eval_crop=1" in warnings[0]
    oc = json.loads((tmp_path / "m" / "manifest.json").read_text())["open_clip"]
    assert oc["matches_vlmdistill_eval"] is False and "40 px" in oc["reason"]
    preprocess = json.loads((tmp_path / "m" / "open_clip" / "open_clip_config.json").read_text())["preprocess_cfg"]
    assert preprocess["size"] == [32, 32] and preprocess["resize_mode"] == "shortest"
    assert preprocess["interpolation"] == "bicubic"
