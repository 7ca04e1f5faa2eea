"""A multi-label run end to end on built PickClutter-layout h5 files: config refusals, the loss term, training,
evaluation columns, and a resume that ends bit-identical to an uninterrupted run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import vlmdistill
from vlmdistill.cli import app
from vlmdistill.config import ConfigError, ExperimentConfig, load_config
from vlmdistill.data.multilabel_set import MultiLabelSet, open_multilabel
from vlmdistill.data.scenes import SceneLayout, read_scene
from vlmdistill.data.views import Views, render
from vlmdistill.io import read_json
from vlmdistill.losses import LossInputs, Objective
from vlmdistill.mlapi import MultiLabelDistilled, export_multilabel
from vlmdistill.mlfewshot import run_multilabel_fewshot
from vlmdistill.mltask import MultiLabelTask, train_set_of
from vlmdistill.multilabel.loss import AsymmetricLoss
from vlmdistill.multilabel.metrics import mean_average_precision
from vlmdistill.report import comparison_rows
from vlmdistill.runfolder import RunFolder
from vlmdistill.teachers import load_teacher
from vlmdistill.train import distill


@pytest.fixture
def ml_overrides(base_overrides: list[str], clutter_dir: Path) -> list[str]:
    keep = [o for o in base_overrides if not o.startswith(("data.dir=", "data.base_size=", "optim.batch_size="))]
    return [*keep, f"data.dir={clutter_dir}", "data.base_size=32", "optim.batch_size=6", "optim.eval_batch_size=8",
            "loss.cls.weight=0", "loss.asl.weight=1", "text.n_ctx=4", "train.analysis=false",
            "student.model_kwargs={channels: [8, 16, 32, 64], stem_width: 8}", "train.eval_every=2",
            "train.average_last=1"]


def test_single_label_terms_refused_beside_asl(ml_overrides: list[str]) -> None:
    with pytest.raises(ConfigError, match=r"loss.vlalign needs labels, texts of single-label data.*vlalign.weight=0"):
        load_config(None, [*ml_overrides, "loss.vlalign.weight=1"])
    with pytest.raises(ConfigError, match=r"loss.cls needs labels, texts"):
        load_config(None, [o for o in ml_overrides if o != "loss.cls.weight=0"])


def test_asl_on_single_label_data_is_refused(base_overrides: list[str]) -> None:
    cfg = load_config(None, [*base_overrides, "loss.cls.weight=0", "loss.asl.weight=1"])
    with pytest.raises(ConfigError, match=r"single-label dataset: set loss\.asl\.weight=0"):
        distill(cfg)


def test_asl_term_is_the_asymmetric_loss(ml_overrides: list[str]) -> None:
    cfg = load_config(None, [*ml_overrides, "loss.imcst.weight=1"])
    objective = Objective(cfg.loss)
    assert set(objective.terms) == {"asl", "imcst"} and objective.needs == {"multi_hot", "teacher"}
    g = torch.Generator().manual_seed(0)
    p, y = torch.rand(4, 5, generator=g), (torch.rand(4, 5, generator=g) > 0.5).float()
    s, t = torch.nn.functional.normalize(torch.randn(4, 8, generator=g), dim=-1), torch.eye(4, 8)
    total, named = objective(LossInputs(s=s, y=y, t=t, p=p))
    assert named["asl"].item() == pytest.approx(AsymmetricLoss()(p, y).item())
    assert total.item() == pytest.approx(named["asl"].item() + named["imcst"].item())


def test_data_without_asl_is_refused(ml_overrides: list[str]) -> None:
    cfg = load_config(None, [*[o for o in ml_overrides if o not in ("loss.asl.weight=1", "loss.cls.weight=0")],
                             "loss.mse.weight=1", "loss.cls.weight=0", "name=noasl"])
    with pytest.raises(ConfigError, match=r"holds multi-label scenes: set loss\.asl\.weight"):
        distill(cfg)


def test_run_trains_evaluates_and_resumes_bit_identically(ml_overrides: list[str], clutter_dir: Path) -> None:
    common = [*ml_overrides, "loss.imcst.weight=1", "optim.epochs=2"]
    full = load_config(None, [*common, "name=full"])
    res = distill(full)
    ds = open_multilabel(clutter_dir)
    steps = res["train"]["steps"]
    assert res["complete"] and steps == 2 * 3 and res["train"]["targets"] == "store"
    for column in ("x_id", "y_id_on_ood", "y_ood_on_ood"):
        assert set(res["metrics"][column]) == {"accuracy", "precision", "recall", "f1", "map"}
        assert 0 <= res["metrics"][column]["accuracy"] <= 100
    weights = RunFolder(full.run_dir).student().weights
    assert weights["student.net.conv1.0.weight"].shape[1] == 8  # base + hand RGB-D
    assert {"asl.bias", "head.positive.ctx", "head.negative.ctx", "head.project.weight"} <= weights.keys()
    assert len(ds.id_objects) == 14 and len(ds.ood_objects) > 0
    stopped = load_config(None, [*common, "name=resumed", f"train.max_steps={steps // 2 + 1}"])
    assert distill(stopped)["complete"] is False
    resumed = distill(load_config(None, [*common, "name=resumed"]), resume=True)
    assert resumed["complete"] and resumed["train"]["steps"] == steps
    again = RunFolder(resumed["run_dir"]).student().weights
    assert weights.keys() == again.keys()
    for k in weights:
        assert torch.equal(weights[k], again[k]), k
    assert resumed["metrics"] == res["metrics"]
    _check_eval(full, res)
    _check_fewshot(full, ds)
    _check_load_export_predict(full, clutter_dir.parent / "h5" / "val.h5", clutter_dir.parent / "model")


def _check_eval(full: ExperimentConfig, trained: dict) -> None:
    """`vlmdistill eval` re-scores the saved student: the training's last evaluation, to the digit."""
    res = CliRunner().invoke(app, ["eval", str(full.run_dir / "config.yaml")])
    assert res.exit_code == 0, res.output
    scored = read_json(full.run_dir / "eval.json")
    assert scored["kind"] == "eval" and scored["metrics"] == trained["metrics"]
    res = CliRunner().invoke(app, ["eval", str(full.run_dir / "config.yaml"), "--teacher-only"])
    assert res.exit_code == 0, res.output
    teacher = read_json(full.run_dir / "teacher" / "results.json")
    assert teacher["kind"] == "teacher" and teacher["metrics"] == _teacher_map(full)
    assert "Y_ood on X_ood mAP" in res.output and "X_id acc" not in res.output


def _teacher_map(cfg: ExperimentConfig) -> dict:
    """The teacher's mAP per column computed here from scratch: the hand camera's RGB (the configured teacher
    camera), centre view as the student is scored, against the template prompts of every name."""
    ds, teacher = open_multilabel(cfg.data.dir), load_teacher(cfg.teacher)
    names = list(ds.objects)
    prompts = [cfg.text.template.format(name=n) for n in names]
    text = torch.nn.functional.normalize(teacher.encode_texts(prompts), dim=-1)
    out = {}
    for split, groups in (("val_on_train", {"x_id": ds.id_objects}),
                          ("val", {"y_id_on_ood": ds.id_objects, "y_ood_on_ood": ds.ood_objects})):
        layout = SceneLayout(("hand",), ("rgb",), None)
        items = ds.splits[split]
        pixels = torch.stack([read_scene(item, layout, cfg.data.base_size) for item in items])
        pixels = render(pixels, Views.center(len(items), cfg.data.eval_crop), teacher.image_size)
        scores = torch.nn.functional.normalize(teacher.encode_images(pixels), dim=-1) @ text.T
        for key, group in groups.items():
            cols = [names.index(n) for n in group]
            target = torch.tensor([[n in item.objects for n in group] for item in items], dtype=torch.float)
            out[key] = {"map": mean_average_precision(scores[:, cols], target)}
    return out


def _check_load_export_predict(full: ExperimentConfig, val_h5: Path, out: Path) -> None:
    """load() of the run and of its model folder agree; model.onnx agrees with PyTorch; predict lists scenes."""
    import onnxruntime as ort

    run_model = vlmdistill.load(full.run_dir)
    assert isinstance(run_model, MultiLabelDistilled)
    names = ["red hollow circle", "a thing never seen"]
    labels, pixels = run_model.scene_pixels([val_h5])
    assert len(labels) == 8 and pixels.shape == (8, 8, 32, 32) and labels[0].endswith("val.h5#scene_00000")
    detected = run_model.detect([val_h5], names)
    prob = run_model.probabilities(pixels, names)
    first = {d.name: d for d in detected[0][1]}
    assert first[names[1]].probability == pytest.approx(float(prob[0, 1]))
    assert first[names[0]].present == bool(run_model.model.present(prob)[0, 0])
    manifest = export_multilabel(full.run_dir, out)
    assert manifest["onnx"]["parity_max_abs_diff"] <= 1e-4 and manifest["names"] == run_model.names
    folder_model = vlmdistill.load(out)
    assert torch.allclose(folder_model.probabilities(pixels, names), prob, atol=1e-5)
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    onnx_prob = torch.from_numpy(session.run(["probability"], {"pixels": pixels.numpy()})[0])
    assert torch.allclose(onnx_prob, run_model.probabilities(pixels), atol=1e-4)
    res = CliRunner().invoke(app, ["predict", str(out), str(val_h5), "--classes", ",".join(names)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == 8 and set(rows[0]["probabilities"]) == set(names)
    assert rows[0]["probabilities"][names[1]] == round(first[names[1]].probability, 4)


def _check_fewshot(full: ExperimentConfig, ds: MultiLabelSet) -> None:
    """K OOD scenes join training (targets over every name); the rest are scored; compare shows the columns."""
    cfg = full.model_copy(update={"multilabel": full.multilabel.model_copy(update={"fewshot_scenes": 3,
                                                                                    "fewshot_batch_size": 6}),
                                  "fewshot": full.fewshot.model_copy(update={"epochs": 1})})
    out = run_multilabel_fewshot(cfg, full.run_dir)
    ft = read_json(full.run_dir / "fewshot-3scenes" / "results.json")
    assert ft["train"]["steps"] == 6  # batches of 6: the 3 support scenes + 3 of the 16 training scenes
    assert ft["config"]["optim"]["schedule"] == "onecycle" and ft["config"]["optim"]["batch_size"] == 6
    assert out["finetune"]["y_ood_on_ood"] == ft["metrics_last_avg"]["y_ood_on_ood"]
    header, rows = comparison_rows([read_json(full.run_dir / "results.json")])
    assert {"X_id acc", "Y_ood on X_ood F1", "Y_ood on X_ood F1 few-shot"} <= set(header)
    at = header.index("Y_ood on X_ood F1 few-shot")
    assert rows[0][at] == out["finetune"]["y_ood_on_ood"]["f1"]


def test_region_cosine_baseline_trains_without_prompt_learning(ml_overrides: list[str], clutter_dir: Path) -> None:
    cfg = load_config(None, [*ml_overrides, "multilabel.head=region_cosine", "loss.mse.weight=1", "optim.epochs=1",
                             "train.eval_every=1", "name=region"])
    res = distill(cfg)
    assert res["complete"] and set(res["metrics"]) == {"x_id", "y_id_on_ood", "y_ood_on_ood"}
    weights = RunFolder(cfg.run_dir).student().weights
    assert "head.bias" in weights and weights["head.text"].shape == (14, 32)
    assert not any("ctx" in k for k in weights)
    model = vlmdistill.load(cfg.run_dir)
    _, pixels = model.scene_pixels([clutter_dir.parent / "h5" / "val.h5"])
    ids = list(open_multilabel(clutter_dir).id_objects)
    # the stored text is the teacher's prompts of the ID names: scoring those names again gives the same P
    assert torch.allclose(model.probabilities(pixels, ids), model.model(pixels)[1], atol=1e-5)


def test_a_column_without_scenes_is_empty_not_an_error() -> None:
    from vlmdistill.mlevaluate import column_metrics
    from vlmdistill.results import average_metrics

    assert column_metrics(None, torch.zeros(0, 0), torch.zeros(0, 3), range(3)) == {}  # type: ignore[arg-type]
    assert average_metrics([{"x_id": {}, "y_ood_on_ood": {"f1": 10.0}}, {"x_id": {}, "y_ood_on_ood": {"f1": 20.0}}]) \
        == {"y_ood_on_ood": {"f1": 15.0}}


def test_divergence_is_recorded_as_a_failure_not_a_result(ml_overrides: list[str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A multi-label run whose loss turns NaN writes results.json as the single-label job does: never complete,
    the failure named with its step."""
    from vlmdistill.integrity import Diverged

    finite = AsymmetricLoss.forward
    monkeypatch.setattr(AsymmetricLoss, "forward", lambda self, p, y: finite(self, p, y) * float("nan"))
    cfg = load_config(None, [*ml_overrides, "name=ml_diverged"])
    with pytest.raises(Diverged, match=r"training diverged at step \d+: loss term asl is nan") as err:
        distill(cfg)
    results = read_json(cfg.run_dir / "results.json")
    assert results["complete"] is False and results["missing_phases"] == ["train"]
    assert results["failure"] == {"kind": "diverged", "step": err.value.step, "what": "loss term asl is nan",
                                  "checkpoint": "no checkpoint was saved yet"}
    assert results["train"]["steps"] == err.value.step and results["train"]["seconds"] is None


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(ml_overrides: list[str], tmp_path: Path) -> None:
    """A real process SIGKILLed once its first checkpoint is written resumes to the uninterrupted run's weights,
    bit for bit (both in forked processes, one thread each)."""
    import os
    import signal
    import time

    from _child import Child
    from vlmdistill.checkpoint import checkpoint_units

    common = ["train", "-", *ml_overrides, "loss.imcst.weight=1", "optim.epochs=3"]
    full = Child([*common, "name=ml_full"], tmp_path / "full.log")
    killed = Child([*common, "name=ml_killed"], tmp_path / "killed.log")
    run = load_config(None, [*ml_overrides, "name=ml_killed"]).run_dir
    end = time.monotonic() + 120
    while not checkpoint_units(run):
        assert killed.proc.is_alive() and time.monotonic() < end, killed.output()
        time.sleep(0.002)
    os.kill(killed.pid, signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL, killed.output()
    assert not RunFolder(run).is_complete()
    resumed = Child([*common, "name=ml_killed", "--resume"], tmp_path / "resumed.log")
    assert resumed.wait() == 0, resumed.output()
    assert full.wait() == 0, full.output()
    a, b = (RunFolder(load_config(None, [*ml_overrides, f"name={n}"]).run_dir).student().weights
            for n in ("ml_full", "ml_killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_json(run / "results.json")["complete"] is True


@pytest.fixture(scope="module")
def tags_dir(clutter_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The clutter scenes' base-camera RGB as plain photos tagged in a CSV (path,labels,split), prepared."""
    from PIL import Image

    root = tmp_path_factory.mktemp("tags")
    ds = open_multilabel(clutter_dir)
    rows = ["path,labels,split"]
    for split, items in ds.splits.items():
        for i, item in enumerate(items):
            path = root / f"{split}_{i}.png"
            pixels = read_scene(item, SceneLayout(("base",), ("rgb",), None), 32)
            Image.fromarray((pixels * 255).round().byte().permute(1, 2, 0).numpy()).save(path)
            rows.append(f"{path},{';'.join(item.objects)},{split}")
    (root / "tags.csv").write_text("\n".join(rows) + "\n")
    res = CliRunner().invoke(app, ["prepare", str(root / "ds"), "--multilabel-csv", str(root / "tags.csv")])
    assert res.exit_code == 0, res.output
    return root


@pytest.fixture
def tags_overrides(ml_overrides: list[str], tags_dir: Path) -> list[str]:
    return [*[o for o in ml_overrides if not o.startswith("data.dir=")], f"data.dir={tags_dir / 'ds'}",
            "loss.imcst.weight=1", "optim.epochs=1"]


def test_tagged_photos_from_a_csv_train_evaluate_export_and_predict(tags_overrides: list[str], tags_dir: Path,
                                                                     tmp_path: Path) -> None:
    """The non-robotics user: plain RGB photos tagged in a CSV. A 3-channel student trains with L_im-cst on the
    photos themselves (the teacher sees them), is re-scored, has a teacher reference, exports and predicts any
    names on a photo."""
    cfg = load_config(None, [*tags_overrides, "name=tags"])
    res = distill(cfg)
    assert res["complete"] and res["train"]["targets"] == "store"
    assert RunFolder(cfg.run_dir).student().weights["student.net.conv1.0.weight"].shape[1] == 3
    for args in (["eval", str(cfg.run_dir / "config.yaml")], ["eval", str(cfg.run_dir / "config.yaml"),
                                                              "--teacher-only"]):
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 0, out.output
    assert read_json(cfg.run_dir / "eval.json")["metrics"] == res["metrics"]
    assert set(read_json(cfg.run_dir / "teacher" / "results.json")["metrics"]) == {"x_id", "y_id_on_ood",
                                                                                      "y_ood_on_ood"}
    manifest = export_multilabel(cfg.run_dir, tmp_path / "model")
    assert manifest["onnx"]["parity_max_abs_diff"] <= 1e-4
    photo = tags_dir / "val_0.png"
    out = CliRunner().invoke(app, ["predict", str(tmp_path / "model"), str(photo), "--classes", "a red thing,dice"])
    assert out.exit_code == 0, out.output
    (row,) = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert row["scene"].endswith("val_0.png") and set(row["probabilities"]) == {"a red thing", "dice"}


def test_randaugment_on_photos_and_refused_on_stacked_scenes(ml_overrides: list[str],
                                                              tags_overrides: list[str]) -> None:
    """One RGB image per row takes RandAugment: ``student`` changes the student's pixels only, ``consistent``
    gives the student and the teacher's stored target the same ops. Stacked RGB-D scenes are refused, named."""
    with pytest.raises(ConfigError, match=r"stacks 8 channels \(rgb\+depth\+rgb\+depth.*data.randaugment=off"):
        distill(load_config(None, [*ml_overrides, "data.randaugment=student", "name=ra8"]))
    tasks = {}
    for mode in ("off", "student", "consistent"):
        cfg = load_config(None, [*tags_overrides, f"data.randaugment={mode}", f"name=ra-{mode}"])
        ds = open_multilabel(cfg.data.dir)
        tasks[mode] = task = MultiLabelTask(cfg, load_teacher(cfg.teacher), ds, train_set_of(cfg, ds))
        assert distill(cfg)["complete"]
    batch = next(tasks["off"].train_set.source.batches(torch.arange(6), 6))
    step = {mode: task.prepare(batch, torch.Generator().manual_seed(0)) for mode, task in tasks.items()}
    assert not torch.equal(step["student"].pixels, step["off"].pixels)
    assert torch.equal(step["student"].targets, step["off"].targets)  # the paper's: the teacher does not see it

    task = tasks["consistent"]
    rgb = next(iter(task.teacher_rgb.iter_batches([batch.index]))).images
    views, targets = task.targets(batch.index, rgb, torch.Generator().manual_seed(0))
    assert views.augment is not None
    assert torch.equal(step["consistent"].pixels, render(batch.images, views, 32))
    seen = task.teacher.encode_images(render(rgb, views, task.teacher.image_size))
    unseen = task.teacher.encode_images(render(rgb, Views(views.boxes, views.flips), task.teacher.image_size))
    assert torch.allclose(targets, seen, atol=2e-3 * seen.abs().max())  # the store keeps fp16
    assert not torch.allclose(targets, unseen, atol=2e-3 * seen.abs().max())
