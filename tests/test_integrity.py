"""Run integrity (issue 18 items 1-4): a diverged model is never recorded as a result, a resume cannot
silently change the experiment, a run is complete only with every phase done, and a full disk is one line.

Items 1 and 3 run the real CLI in real processes (``_child``); a full disk is a patched writer raising ENOSPC.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from _child import Child
from vlmdistill.checkpoint import checkpoint_units
from vlmdistill.config import ConfigError, load_config
from vlmdistill.io import DiskFullError, disk_full, read_json
from vlmdistill.runfolder import RunFolder
from vlmdistill.train import _check_reuse


@pytest.fixture(scope="module")
def opts(prepared: Path, open_clip_teacher_files: tuple[Path, Path],
         tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cfg_path, ckpt = open_clip_teacher_files
    root = tmp_path_factory.mktemp("integrity")
    return [f"data.dir={prepared}", "data.base_size=40", "data.num_workers=0", "data.preload=true",
            f"teacher.model_config={cfg_path}", f"teacher.checkpoint={ckpt}", "teacher.batch_size=16",
            "student.arch=resnet10t", "student.image_size=32", "optim.batch_size=8", "optim.lr=0.01",
            "optim.epochs=2", "train.progress=false", "train.target_views=0", "train.analysis=false",
            "loss.imcst.weight=1", f"output_dir={root / 'runs'}", f"cache_dir={root / 'cache'}", "device=cpu",
            "teacher.device=cpu"]


def _run_dir(opts: list[str], name: str) -> Path:
    return Path(next(o for o in opts if o.startswith("output_dir=")).split("=", 1)[1]) / name


def _error_line(log: Path) -> str:
    """The CLI's error, which must be a single line of its own."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("error:")]
    assert len(lines) == 1, log.read_text()
    return lines[0]


@pytest.fixture(scope="module")
def stopped(opts: list[str]) -> Path:
    """A run stopped by train.max_steps=3 at the end of its first epoch (checkpoint step 3), in process."""
    from vlmdistill.train import distill

    distill(load_config(None, [*opts, "name=stopped", "train.max_steps=3"]))
    return _run_dir(opts, "stopped")


def _copy(stopped: Path, name: str) -> Path:
    shutil.copytree(stopped, stopped.parent / name, ignore=shutil.ignore_patterns("run.lock"))
    return stopped.parent / name


# ---- 1. a diverged model is never recorded as a success ---------------------------------------------------

@pytest.mark.parametrize(("override", "says"), [
    ("optim.lr=inf", "optim.lr: Input should be a finite number, got 'inf'"),
    ("optim.lr=1e308", "optim.lr must be <= 100.0, got '1e308'"),
    ("loss.mse.weight=.nan", "loss.mse.weight: Input should be a finite number, got nan"),
    ("optim.epochs=true", "optim.epochs: Input should be a valid integer, got True"),
    ("optim.epochs=2.0", "optim.epochs: Input should be a valid integer, got 2.0"),
    ("optim.epochs=1000000000000000000000", "optim.epochs must be <= 10000, got 1000000000000000000000"),
    ("train.max_steps=1e21", "train.max_steps: Input should be a valid integer, got '1e21'"),
])
def test_nonfinite_and_absurd_numbers_are_refused(override: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert says in str(err.value)
    assert load_config(None, ["optim.lr=1e-3", "optim.grad_clip=2"]).optim.lr == 0.001  # YAML's dotless floats


def test_inf_lr_is_refused_by_the_cli_before_anything_runs(opts: list[str], tmp_path: Path) -> None:
    code, out = Child(["train", "-", *opts, "name=inf", "optim.lr=inf"], tmp_path / "inf.log").run()
    assert code == 2 and "optim.lr: Input should be a finite number, got 'inf'" in out
    assert not _run_dir(opts, "inf").exists()


def test_divergence_stops_at_its_step_keeps_the_last_good_checkpoint_and_is_recorded(
        opts: list[str], stopped: Path, tmp_path: Path) -> None:
    """A resume that makes the loss overflow (temperature 1e-30, allowed explicitly) diverges in epoch 2:
    the process exits 2 with one line naming the step and checkpoint step 3, which stays the current one."""
    run = _copy(stopped, "diverged")
    log = tmp_path / "div.log"
    args = ["train", "-", *opts, "name=diverged", "loss.temperature=1e-30", "train.log_every=1"]
    code, out = Child([*args, "--resume", "--allow-config-change"], log).run()
    assert code == 2, out
    line = _error_line(log)
    step = int(line.split("training diverged at step ")[1].split(":")[0])
    assert 3 < step <= 6 and ("loss term" in line or "are not finite" in line)
    assert f"checkpoint step 3 ({run / 'checkpoints' / 'step-000000003'}) is intact" in line
    results = read_json(run / "results.json")
    assert results["complete"] is False and results["missing_phases"] == ["train"]
    assert results["failure"]["kind"] == "diverged" and results["failure"]["step"] == step
    assert [u.name for u in checkpoint_units(run)] == ["step-000000003"]  # nothing of the broken weights kept
    assert all(bool(t.isfinite().all()) for t in RunFolder(run).student().weights.values()
               if t.is_floating_point())
    change = results["config_changes"][-1]
    assert change["step"] == 3 and change["changes"]["loss.temperature"] == [0.07, 1e-30]
    assert change["trajectory"] == ["loss.temperature"]  # forced with --allow-config-change, and recorded


def test_nonfinite_weights_are_never_saved(tmp_path: Path) -> None:
    """The weight check in front of every checkpoint (and evaluation) names the tensor; nothing is written."""
    from types import SimpleNamespace

    from vlmdistill.checkpoint import LoopState
    from vlmdistill.integrity import Diverged
    from vlmdistill.loop import save

    student = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    with torch.no_grad():
        student[1].running_var[1] = float("nan")
    task = SimpleNamespace(student=student, prompts=None, ema=None, cfg=SimpleNamespace(run_dir=tmp_path))
    with pytest.raises(Diverged, match=r"^training diverged at step 7: 1 of 2 values of 1\.running_var are not "
                                       "finite; nothing of it was evaluated or saved, no checkpoint was saved yet"):
        save(task, None, None, LoopState(step=7))  # type: ignore[arg-type]
    assert not (tmp_path / "checkpoints").exists()


# ---- 2. --resume cannot silently change the experiment ----------------------------------------------------

def test_resume_refuses_changes_of_the_trajectory_and_records_allowed_ones(opts: list[str], stopped: Path) -> None:
    from vlmdistill.cli import app

    run = _copy(stopped, "changed")
    before = (run / "config.yaml").read_text()
    common = ["train", "-", *opts, "name=changed"]
    res = CliRunner().invoke(app, [*common, "seed=5", "optim.lr=0.5", "loss.cls.weight=0", "--resume"])
    assert res.exit_code == 2, res.output
    said = " ".join(res.output.split())
    assert "--resume would change the experiment" in said
    assert "loss.cls.weight 1.0 -> 0.0, optim.lr 0.01 -> 0.5, seed 0 -> 5" in said
    assert "--allow-config-change" in said and "train.max_steps" not in said  # where it stops is free
    assert (run / "config.yaml").read_text() == before and not (run / "results.json").read_text().count('"seed": 5')

    res = CliRunner().invoke(app, [*common, "train.log_every=1", "data.num_workers=0", "--resume"])
    assert res.exit_code == 0, res.output
    results = read_json(run / "results.json")
    assert results["complete"] is True and results["config"]["seed"] == 0
    assert results["config_changes"] == [{"step": 3, "trajectory": [], "changes": {
        "name": ["stopped", "changed"], "train.log_every": [10, 1], "train.max_steps": [3, None]}}]


# ---- 3. complete only when every phase asked for is done ---------------------------------------------------

def test_a_kill_during_analysis_leaves_a_run_that_says_so_and_resume_completes(opts: list[str],
                                                                                tmp_path: Path) -> None:
    args = ["train", "-", *opts, "name=analysed", "train.analysis=true", "optim.epochs=1"]
    killed = Child(args, tmp_path / "killed.log", fault="kill_in_analysis")
    assert killed.wait() == -9, killed.output()
    run = _run_dir(opts, "analysed")
    results = read_json(run / "results.json")
    assert results["complete"] is False and results["missing_phases"] == ["analysis"]
    assert results["train"]["steps"] == 3 and results["analysis"] is None
    trained = RunFolder(run).student().weights

    code, out = Child(args, tmp_path / "plain.log").run()
    assert code == 2 and "holds an unfinished run (missing: analysis); --resume continues it" in out

    code, out = Child([*args, "--resume"], tmp_path / "resume.log").run()
    assert code == 0, out
    results = read_json(run / "results.json")
    assert results["complete"] is True and results["missing_phases"] == [] and results["analysis"]["ood"]
    assert results["train"]["steps"] == 3
    assert all(torch.equal(trained[k], v) for k, v in RunFolder(run).student().weights.items())


def test_a_results_file_from_before_phases_lacking_its_analysis_is_unfinished(tmp_path: Path) -> None:
    """Runs killed during analysis before this change say complete with no analysis: still refused as unfinished."""
    record = {"complete": True, "analysis": None, "config": {"train": {"analysis": True}, "loss": {}}}
    (tmp_path / "results.json").write_text(json.dumps(record))
    with pytest.raises(Exception, match=r"unfinished run \(missing: analysis\); --resume continues it"):
        _check_reuse(tmp_path, resume=False, overwrite=False)
    record["config"]["train"]["analysis"] = False
    (tmp_path / "results.json").write_text(json.dumps(record))
    with pytest.raises(Exception, match="is complete"):
        _check_reuse(tmp_path, resume=False, overwrite=False)


# ---- 4. a full disk is one line ----------------------------------------------------------------------------

def _enospc(*args: object, **kwargs: object) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_while_checkpointing_names_the_write_the_intact_checkpoint_and_resume(
        opts: list[str], stopped: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from vlmdistill.cli import app

    run = _copy(stopped, "full")
    monkeypatch.setattr("vlmdistill.io.save_file", _enospc)
    res = CliRunner().invoke(app, ["train", "-", *opts, "name=full", "--resume"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, res.output
    assert lines[0].startswith(f"error: no space left on device writing weights.safetensors to "
                               f"{run / 'checkpoints'}/.step-000000006."), lines[0]
    assert " MiB free): checkpoint step 3 (" in lines[0] and "is intact; free space there; resume with: " in lines[0]
    assert lines[0].endswith("name=full --resume")
    assert [u.name for u in checkpoint_units(run)] == ["step-000000003"]
    assert not list((run / "checkpoints").glob(".step-*"))  # the half-written unit was removed


def test_full_disk_in_the_target_store_export_and_prepare_is_one_line(
        opts: list[str], run: Path, raw_images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import vlmdistill.io as io
    from vlmdistill.data.prepare import prepare
    from vlmdistill.export import export_model
    from vlmdistill.targets.lookup import open_targets
    from vlmdistill.workspace import build_workspace

    cfg = load_config(None, [*opts, "train.target_views=2", f"cache_dir={tmp_path / 'cache'}"])
    ws = build_workspace(cfg)
    monkeypatch.setattr("vlmdistill.targets.extract.atomic_write_bytes",
                        lambda path, data: io._atomic(path, _enospc))
    with pytest.raises(DiskFullError) as err:
        open_targets(cfg, ws.teacher, ws.train, True)
    assert str(err.value).startswith("no space left on device writing 00000.feats.f16 to ")
    assert str(err.value).endswith("the 0 of 1 shards written are kept; free space, then run it again "
                                   "(extraction resumes at the missing shards)")

    monkeypatch.setattr("vlmdistill.export.write_onnx", _enospc)
    with pytest.raises(DiskFullError, match=r"writing the model folder to .*/model \(.* MiB free\): .*/model is "
                                            r"as it was \(the new folder was built aside and removed\); free space "
                                            "and run export again"):
        export_model(run, tmp_path / "model")

    out = tmp_path / "ds"
    prepare(out, images=raw_images, seed=0)
    kept = sorted(p.name for p in out.iterdir())
    monkeypatch.setattr("vlmdistill.data.prepare.atomic_write_text", lambda path, *a, **k: io._atomic(path, _enospc))
    with pytest.raises(DiskFullError, match=r"writing train_data.txt to .*: .*/ds is as it was \(the new one was "
                                            r"built aside and removed\); free space and run prepare again"):
        prepare(out, images=raw_images, seed=0)
    assert sorted(p.name for p in out.iterdir()) == kept


def test_disk_full_is_recognised_in_safetensors_errors() -> None:
    """safetensors raises its own error type with only the OS error code in its text (this text is what
    ``save_file`` raised on a full 64 KiB tmpfs)."""
    from safetensors import SafetensorError

    assert disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert not disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not disk_full(SafetensorError("Error while deserializing header: HeaderTooLarge"))
