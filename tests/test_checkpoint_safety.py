"""No lost runs, no silent wrong results (issue 13 items 1, 2, 3, 6, 9): real processes killed, signalled
and racing; checkpoint files damaged byte by byte.

Training processes are forked from a forkserver that has imported the toolkit once, so each costs a
fork rather than a fresh interpreter; each runs the real CLI (``vlmdistill train ...``) with its exit code.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from _child import Child
from vlmdistill.checkpoint import (
    MANIFEST,
    STATE_J,
    WEIGHTS,
    CheckpointError,
    LoopState,
    checkpoint_units,
    current_unit,
    load_checkpoint,
    read_tensor_file,
    save_checkpoint,
    verify_file,
)
from vlmdistill.runfolder import RunFolder


def _wait_for(cond: object, child: Child, timeout: float = 60, poll: float = 0.002) -> bool:
    """Poll ``cond()`` until true; False if the child exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():  # type: ignore[operator]
            return True
        if not child.proc.is_alive():
            return False
        time.sleep(poll)
    raise AssertionError(f"timed out: {child.output()}")


@pytest.fixture(scope="module")
def opts(prepared: Path, open_clip_teacher_files: tuple[Path, Path],
         tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cfg_path, ckpt = open_clip_teacher_files
    root = tmp_path_factory.mktemp("safety")
    return [f"data.dir={prepared}", "data.base_size=40", "data.num_workers=0", "data.preload=true",
            f"teacher.model_config={cfg_path}", f"teacher.checkpoint={ckpt}", "teacher.batch_size=16",
            "student.arch=resnet10t", "student.image_size=32", "optim.batch_size=8", "optim.lr=0.01",
            "train.progress=false", "train.target_views=0", "train.analysis=false", "loss.imcst.weight=1",
            f"output_dir={root / 'runs'}", f"cache_dir={root / 'cache'}", "device=cpu", "teacher.device=cpu"]


def _run_dir(opts: list[str], name: str) -> Path:
    return Path(next(o for o in opts if o.startswith("output_dir=")).split("=", 1)[1]) / name


def _whole_step(run: Path) -> int | None:
    """The current checkpoint's step after checking it is one whole unit: every digest matches, the
    manifest, the folder name and the loop state agree; at most the current and the previous unit exist."""
    units = checkpoint_units(run)
    if not units:
        return None
    assert len(units) <= 2, units
    unit = units[0]
    manifest = json.loads((unit / MANIFEST).read_text())
    for name in manifest["files"]:
        verify_file(unit / name)
    step = json.loads((unit / STATE_J).read_text())["loop"]["step"]
    assert step == manifest["step"] == int(unit.name.split("-")[1])
    assert RunFolder(run).student().weights
    return step


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return RunFolder(run).student().weights


def test_sigkill_at_any_moment_leaves_one_whole_checkpoint(opts: list[str], tmp_path: Path) -> None:
    """Item 1: SIGKILL while checkpoints are being written (and at random moments), then resume."""
    name, run = "killed", _run_dir(opts, "killed")
    args = ["train", "-", *opts, f"name={name}", "optim.epochs=5"]
    rng, before, hit_mid_save, root = random.Random(0), None, False, run / "checkpoints"
    for i in range(3):
        child = Child([*args, *(["--resume"] if i else [])], tmp_path / f"kill{i}.log")
        if i % 2 == 0:  # the moment a checkpoint folder is being built
            alive = _wait_for(lambda: any(root.glob(".step-*.new")), child)
        else:  # a random moment after the next checkpoint
            alive = _wait_for(lambda seen=before: (_step_or_none(run) or -1) > (seen or -1), child)
            time.sleep(rng.uniform(0, 0.3))
        assert alive, f"the run ended before kill {i}: {child.output()}"
        os.kill(child.pid, signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL, child.output()
        hit_mid_save |= any(root.glob(".step-*.new"))
        after = _whole_step(run)
        assert (after is None and before is None) or (after or 0) >= (before or 0)
        before = after
    assert hit_mid_save, "no kill landed while a checkpoint was being written"
    final = Child([*args, "--resume"], tmp_path / "final.log")
    assert final.wait() == 0, final.output()
    assert json.loads((run / "results.json").read_text())["complete"] is True
    assert _whole_step(run) == json.loads((run / "results.json").read_text())["train"]["steps"]
    assert not list((run / "checkpoints").glob(".step-*")), "leftovers of killed saves were not cleaned"


def _step_or_none(run: Path) -> int | None:
    units = checkpoint_units(run)
    return int(units[0].name.split("-")[1]) if units else None


def test_sigint_and_sigterm_save_and_resume_equals_uninterrupted(opts: list[str], tmp_path: Path) -> None:
    """Item 6: a real SIGINT / SIGTERM mid-run saves at the current step, exits 130 / 143 and says how to
    resume; the resumed runs end with the uninterrupted run's weights, bit for bit."""
    common = [*opts, "optim.epochs=4"]
    full = Child(["train", "-", *common, "name=full"], tmp_path / "full.log")
    stopped = {sig: Child(["train", "-", *common, f"name=sig{int(sig)}"], tmp_path / f"sig{int(sig)}.log")
               for sig in (signal.SIGINT, signal.SIGTERM)}
    waiting, end = dict(stopped), time.monotonic() + 120
    while waiting and time.monotonic() < end:  # each signal as soon as its run has a first checkpoint
        for sig, child in list(waiting.items()):
            assert child.proc.is_alive(), child.output()
            if checkpoint_units(_run_dir(opts, f"sig{int(sig)}")):
                os.kill(child.pid, sig)
                del waiting[sig]
        time.sleep(0.002)
    for sig, child in stopped.items():
        assert child.wait() == 128 + sig, child.output()
        out = child.output()
        assert "interrupted at step" in out and "resume with: vlmdistill train -" in out and "--resume" in out
        step = int(out.split("interrupted at step ")[1].split()[0])
        assert _whole_step(_run_dir(opts, f"sig{int(sig)}")) == step
    resumed = [Child(["train", "-", *common, f"name=sig{int(sig)}", "--resume"], tmp_path / f"re{int(sig)}.log")
               for sig in stopped]
    for child in resumed:
        assert child.wait() == 0, child.output()
    assert full.wait() == 0, full.output()
    a = _weights(_run_dir(opts, "full"))
    for sig in stopped:
        b = _weights(_run_dir(opts, f"sig{int(sig)}"))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (sig, k)


def test_second_writer_is_refused_and_finished_run_is_kept(opts: list[str], tmp_path: Path) -> None:
    """Item 3: two `train` of one name at once: one runs, the other exits 2 naming its PID; a finished run
    is not replaced without --overwrite; --overwrite starts again; an unfinished one asks for --resume."""
    args = ["train", "-", *opts, "name=twice", "optim.epochs=2"]
    a, b = Child(args, tmp_path / "a.log"), Child(args, tmp_path / "b.log")
    codes = {a.wait(), b.wait()}
    assert codes == {0, 2}, (a.output(), b.output())
    winner, loser = (a, b) if a.proc.exitcode == 0 else (b, a)
    assert f"is being written by PID {winner.pid}" in loser.output() and "another name" in loser.output()
    run = _run_dir(opts, "twice")
    assert json.loads((run / "results.json").read_text())["complete"] is True
    kept = _weights(run)
    again = Child(args, tmp_path / "again.log")
    assert again.wait() == 2 and "is complete" in again.output() and "--overwrite" in again.output()
    assert all(torch.equal(kept[k], v) for k, v in _weights(run).items())
    over = Child([*args, "train.max_steps=1", "--overwrite"], tmp_path / "over.log")
    assert over.wait() == 0, over.output()
    assert json.loads((run / "results.json").read_text())["complete"] is False
    assert [u.name for u in checkpoint_units(run)] == ["step-000000001"]
    unfinished = Child(args, tmp_path / "unfinished.log")
    assert unfinished.wait() == 2 and "--resume continues it" in unfinished.output()


# ---- damaged files (items 2 and 9), on a checkpoint of a tiny model ------------------------------------

def _save(run: Path, model: torch.nn.Module, step: int) -> Path:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return save_checkpoint(run, model, opt, sched, LoopState(step=step), {"student_arch": "linear"})


def _restore(run: Path) -> tuple[int, torch.nn.Module]:
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return load_checkpoint(run, model, opt, sched).step, model


def _flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_one_flipped_weight_byte_is_refused_and_resume_falls_back(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    _save(tmp_path, model, 3)
    first = {k: v.clone() for k, v in model.state_dict().items()}
    _save(tmp_path, model, 6)
    weights = current_unit(tmp_path) / WEIGHTS
    assert weights.parent.name == "step-000000006"
    _flip_byte(weights, weights.stat().st_size - 3)  # a tensor data byte: the file still parses
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(weights))}.*damaged.*--resume"):
        read_tensor_file(weights)
    step, restored = _restore(tmp_path)
    assert step == 3
    assert all(torch.equal(first[k], v) for k, v in restored.state_dict().items())


@pytest.mark.parametrize("damage", ["weights_header", "state_json_truncated", "manifest_truncated"])
def test_damaged_checkpoint_files_are_one_line_errors(tmp_path: Path, damage: str) -> None:
    _save(tmp_path, torch.nn.Linear(4, 2), 3)
    unit = current_unit(tmp_path)
    if damage == "weights_header":
        _flip_byte(unit / "weights.safetensors", 9)
    elif damage == "state_json_truncated":
        (unit / STATE_J).write_text((unit / STATE_J).read_text()[:40])
    else:
        (unit / MANIFEST).write_text((unit / MANIFEST).read_text()[:30])
    with pytest.raises(CheckpointError) as err:
        _restore(tmp_path)
    assert "\n" not in str(err.value) and "no usable checkpoint" in str(err.value)
