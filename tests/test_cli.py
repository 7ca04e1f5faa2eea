"""The command line as users meet it: help texts, a prepare -> train -> eval -> compare round trip, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from vlmdistill.cli import app

VERBS = ("prepare", "train", "eval", "fewshot", "cache", "compare", "describe", "demo", "text-stats")


def test_help_lists_every_verb() -> None:
    out = CliRunner().invoke(app, ["--help"])
    assert out.exit_code == 0
    for verb in VERBS:
        assert verb in out.output


@pytest.mark.parametrize("verb", VERBS)
def test_each_verb_explains_its_options(verb: str) -> None:
    out = CliRunner().invoke(app, [verb, "--help"])
    assert out.exit_code == 0
    assert "Usage" in out.output and len(out.output) > 200


def test_prepare_train_eval_compare(
    raw_images: Path, open_clip_teacher_files: tuple[Path, Path], tmp_path: Path, base_overrides: list[str]
) -> None:
    runner = CliRunner()
    data = tmp_path / "data"
    res = runner.invoke(app, ["prepare", str(data), "--images", str(raw_images), "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert (data / "train_data.txt").is_file() and (data / "label2text.txt").is_file()
    cfg = tmp_path / "exp.yaml"
    overrides = [o for o in base_overrides if not o.startswith("data.dir=")]
    cfg.write_text(yaml.safe_dump({"name": "cli", "data": {"dir": str(data)}}))
    res = runner.invoke(app, ["train", str(cfg), *overrides, "optim.epochs=1", "loss.mse.weight=1"])
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "cli"
    trained = json.loads((run / "results.json").read_text())
    res = runner.invoke(app, ["eval", str(cfg), *overrides, "optim.epochs=1", "loss.mse.weight=1"])
    assert res.exit_code == 0, res.output
    again = json.loads((run / "eval.json").read_text())
    assert again["metrics"]["ood"] == trained["metrics"]["ood"]
    res = runner.invoke(app, ["eval", str(cfg), *overrides, "--teacher-only"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "teacher" / "results.json").read_text())["kind"] == "teacher"
    table = tmp_path / "cmp.md"
    res = runner.invoke(app, ["compare", str(run), str(run / "teacher"), "--out", str(table)])
    assert res.exit_code == 0, res.output
    assert "OOD 0-shot" in table.read_text()


def test_user_errors_are_one_line_with_exit_code_2(tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(app, ["train", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "missing.yaml" in res.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lrr: 0.1}\n")
    res = runner.invoke(app, ["train", str(bad)])
    assert res.exit_code == 2 and "lrr" in res.output
    res = runner.invoke(app, ["train", str(bad), "optim.lr"])
    assert res.exit_code == 2 and "key=value" in res.output
    res = runner.invoke(app, ["prepare", str(tmp_path / "o"), "--images", str(tmp_path / "nothing")])
    assert res.exit_code == 2 and "nothing" in res.output


def test_text_stats_reports_both_recipes(base_overrides: list[str], tmp_path: Path) -> None:
    out = tmp_path / "text"
    res = CliRunner().invoke(app, ["text-stats", "-", *base_overrides, "--out", str(out)])
    assert res.exit_code == 0, res.output
    stats = json.loads((out / "text_stats.json").read_text())
    assert set(stats["ood"]) == {"plain", "descriptions"}
    for recipe in stats["ood"].values():
        assert -1.0 <= recipe["mean_pairwise_cosine"] <= 1.0
    assert (out / "text_spectrum_ood.png").stat().st_size > 1000


def test_cache_verb_builds_the_store(base_overrides: list[str]) -> None:
    res = CliRunner().invoke(app, ["cache", "-", *base_overrides, "train.target_views=2"])
    assert res.exit_code == 0, res.output
    assert "3 views" in res.output and "MiB on disk" in res.output


def test_skipped_images_are_counted_on_the_console_and_in_every_results_file(
    tmp_path: Path, base_overrides: list[str]
) -> None:
    """Issue 13 item 12: train, eval and fewshot each say how many unreadable images they skipped and where
    they are listed; then (item 9) a damaged checkpoint makes eval a one-line error with exit code 2."""
    from conftest import make_class_folders
    from vlmdistill.checkpoint import WEIGHTS, current_unit
    from vlmdistill.data.prepare import prepare

    raw = tmp_path / "raw"
    make_class_folders(raw, per_class=5)
    broken = sorted((raw / "red_circle").iterdir())[0]
    broken.write_bytes(b"not an image")
    prepare(tmp_path / "data", images=raw, seed=0)
    opts = [o for o in base_overrides if not o.startswith("data.dir=")]
    args = ["-", *opts, f"data.dir={tmp_path / 'data'}", "data.skip_bad_images=true", "name=skips",
            "optim.epochs=1", "train.target_views=0", "train.analysis=false", "loss.imcst.weight=1"]
    runner, run = CliRunner(), tmp_path / "runs" / "skips"
    for verb, extra, written in (("train", [], "results.json"), ("eval", [], "eval.json"),
                                 ("fewshot", ["--method", "retrieval", "--shots", "1"], "fewshot.json")):
        res = runner.invoke(app, [verb, *args, *extra])
        assert res.exit_code == 0, res.output
        assert f"skipped 1 unreadable images (listed in {run / written})" in " ".join(res.output.split())
        data = json.loads((run / written).read_text())["data"]
        assert data["skipped_images"] == 1 and broken.name in data["skipped"][0]
    weights = current_unit(run) / WEIGHTS
    blob = bytearray(weights.read_bytes())
    blob[-2] ^= 0x01
    weights.write_bytes(bytes(blob))
    res = runner.invoke(app, ["eval", *args])
    assert res.exit_code == 2 and "damaged" in res.output and str(weights) in " ".join(res.output.split())
    assert "Traceback" not in res.output
