"""torchrun DDP on CPU (gloo): what is guaranteed, and only that (README "Training on several GPUs or nodes").

- Per-step parity at equal thread counts: 2 processes give the per-step losses of 1 process with the same
  global batch to LOSS_RTOL over the N = 6 steps of this run, and the same evaluation. Not bit for bit: the same
  sums are reduced in another order (each rank's convolutions run on half the batch; BatchNorm statistics and
  the DDP gradient average are all-reduced), and each SGD step carries the rounding of the last into the next,
  so the gap grows with the steps (1-thread and 2-thread single-process runs drift apart the same way).
- Over a full run that rounding is amplified by training, so final weights are not comparable element-wise;
  what holds is equal accuracy within seed noise (the spread of 1-process runs over seeds).
- The layout does not change a number: 2 nodes x 1 process and 1 node x 2 processes are bit-identical
  (every rank runs on the same pinned thread count, ``distributed.pinned_threads``).
- Checkpoints resume under another number of processes; a lost rank is one line from the survivor, promptly.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from vlmdistill.checkpoint import checkpoint_units
from vlmdistill.config import load_config
from vlmdistill.io import read_json
from vlmdistill.runfolder import RunFolder
from vlmdistill.train import distill

LOSS_RTOL, STEPS = 2e-4, 6


def _env() -> dict[str, str]:
    """The environment a user's torchrun gets: no OMP_NUM_THREADS of ours (torchrun sets its own, or not)."""
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}


def torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """``torchrun --standalone --nproc_per_node N -m vlmdistill ARGS`` as a user runs it."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "vlmdistill", *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def torchrun_two_nodes(args: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """2 nodes x 1 process on this machine: two torchrun agents meeting at a c10d rendezvous on 127.0.0.1."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{_free_port()}", "--rdzv_id=two-nodes", "-m", "vlmdistill", *args]
    nodes = [subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    return [subprocess.CompletedProcess(cmd, p.wait(timeout=300), p.communicate()[0], "") for p in nodes]


@contextmanager
def threads(n: int) -> Iterator[None]:
    """Run in-process training on ``n`` intra-op threads (the ranks' pinned count), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """Every logged training loss term by step, from the run's TensorBoard events (all event files)."""
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    out: dict[int, dict[str, float]] = {}
    for tag in acc.Tags()["scalars"]:
        if tag.startswith("train/") and tag != "train/lr":
            for e in acc.Scalars(tag):
                out.setdefault(e.step, {})[tag] = e.value
    return out


def assert_close_losses(a: dict[str, float], b: dict[str, float], step: int) -> None:
    assert a.keys() == b.keys(), step
    for k in a:
        assert abs(a[k] - b[k]) <= LOSS_RTOL * max(abs(a[k]), 1e-3), (step, k, a[k], b[k])


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return RunFolder(run).student().weights


@pytest.fixture(scope="module")
def common(prepared: Path, open_clip_teacher_files: tuple[Path, Path],
           tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    cfg_path, ckpt = open_clip_teacher_files
    root = tmp_path_factory.mktemp("ddp")
    return [f"data.dir={prepared}", "data.base_size=40", "data.num_workers=0", "data.preload=true",
            f"teacher.model_config={cfg_path}", f"teacher.checkpoint={ckpt}", "teacher.batch_size=16",
            "student.arch=resnet10t", "student.image_size=32", "optim.batch_size=8", "optim.epochs=2",
            "optim.lr=0.01", "train.progress=false", "train.target_views=3", f"output_dir={root / 'runs'}",
            f"cache_dir={root / 'cache'}", "device=cpu", "teacher.device=cpu", "loss.imcst.weight=1",
            "loss.mse.weight=1", "train.log_every=1", "train.analysis=false"]


def _run_dir(common: list[str], name: str) -> Path:
    return Path(next(o for o in common if o.startswith("output_dir=")).split("=", 1)[1]) / name


@pytest.fixture(scope="module")
def two(common: list[str]) -> Path:
    """1 node x 2 processes, stopped at step 4 (mid epoch 2, after the epoch-1 evaluation and checkpoint)."""
    proc = torchrun(["train", "-", *common, "name=two", "train.max_steps=4"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    return _run_dir(common, "two")


def test_two_nodes_and_two_processes_per_node_are_bit_identical(common: list[str], two: Path) -> None:
    """Item 6: torchrun pins OMP_NUM_THREADS=1 only for several processes per node; the ranks pin it themselves."""
    nodes = torchrun_two_nodes(["train", "-", *common, "name=nodes", "train.max_steps=4"])
    assert [p.returncode for p in nodes] == [0, 0], [p.stdout[-4000:] for p in nodes]
    run = _run_dir(common, "nodes")
    assert losses(run) == losses(two) and len(losses(two)) == 4
    a, b = _weights(two), _weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for r in (two, run):
        assert read_json(r / "results.json")["train"] | {"seconds": 0} == {
            "steps": 4, "seconds": 0, "targets": "store", "processes": 2, "threads": 1,
            "student_images": 28}  # global, as one process counts: an epoch of the 20 train images, then 8
    assert read_json(run / "results.json")["history"] == read_json(two / "results.json")["history"]


def test_two_processes_match_one_per_step_and_in_accuracy_over_a_full_run(common: list[str], two: Path) -> None:
    """Item 7: per-step parity over N steps at equal thread counts; a full run's accuracy within seed noise."""
    with threads(1):
        one = distill(load_config(None, [*common, "name=one"]))
        seeds = [one, *(distill(load_config(None, [*common, f"name=seed{s}", f"seed={s}"])) for s in (1, 2))]
        full = _run_dir(common, "two-full")
        shutil.copytree(two, full, ignore=shutil.ignore_patterns("run.lock"))
        resumed = distill(load_config(None, [*common, "name=two-full"]), resume=True)
    ref, got = losses(_run_dir(common, "one")), losses(full)
    assert sorted(ref) == sorted(got) == list(range(1, STEPS + 1))
    for step in ref:
        assert_close_losses(got[step], ref[step], step)
    assert read_json(two / "results.json")["history"][0] == one["history"][0]  # the same images, the same recalls

    assert resumed["complete"] is True and resumed["train"]["steps"] == STEPS
    for split in ("id", "ood"):
        values = [r["metrics_last_avg"][split]["mean_per_class_recall"] for r in seeds]
        one_image = 100 / min(r["metrics"][split].get("n_images", 1e9) for r in seeds)
        noise = max(max(values) - min(values), one_image)
        assert min(values) - noise <= resumed["metrics_last_avg"][split]["mean_per_class_recall"] <= max(values) + noise


def test_one_process_checkpoint_resumes_in_two_and_fewshot_runs_in_two(common: list[str]) -> None:
    """Per-step parity again, the other way: 4 steps in 1 process, the last 2 of 6 in 2 (equal thread counts)."""
    with threads(1):
        distill(load_config(None, [*common, "name=full"]))
        distill(load_config(None, [*common, "name=half", "train.max_steps=4"]))
    proc = torchrun(["train", "-", *common, "name=half", "--resume"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    half, ref = _run_dir(common, "half"), losses(_run_dir(common, "full"))
    assert read_json(half / "results.json")["complete"] is True
    for step, terms in losses(half).items():
        assert_close_losses(terms, ref[step], step)

    proc = torchrun(["fewshot", "-", *common, "name=half", "--shots", "2", "fewshot.epochs=1"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    out = read_json(half / "fewshot.json")
    assert out["finetune"]["ood"]["n_images"] == out["retrieval"]["ood"]["n_images"] > 0
    assert read_json(half / "fewshot-2shot-finetune" / "results.json")["complete"] is True


def _rank_pids(agent: int) -> dict[int, int]:
    """The worker processes torchrun's agent started, by their RANK."""
    kids = subprocess.run(["ps", "-o", "pid=", "--ppid", str(agent)], capture_output=True, text=True).stdout.split()
    out = {}
    for pid in map(int, kids):
        env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
        if b"RANK" in env:
            out[int(env[b"RANK"])] = pid
    return out


def test_a_lost_rank_is_one_line_naming_it_the_checkpoint_and_the_resume_command(common: list[str]) -> None:
    """Item 5: SIGKILL rank 1 after the first checkpoint; rank 0 says so in one line and exits 2 within seconds."""
    run = _run_dir(common, "lost")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vlmdistill",
           "train", "-", *common, "name=lost", "optim.epochs=100"]
    agent = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not checkpoint_units(run):
            assert agent.poll() is None, agent.communicate()[0][-4000:]
            time.sleep(0.05)
        os.kill(_rank_pids(agent.pid)[1], signal.SIGKILL)
        killed = time.monotonic()
        out = agent.communicate(timeout=60)[0]
    finally:
        agent.kill()
    assert time.monotonic() - killed < 30  # never hangs: heartbeat look 2 s, then exit
    assert agent.returncode != 0
    lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out[-6000:]
    step = int(checkpoint_units(run)[0].name.split("-")[1])
    unit = run / "checkpoints" / f"step-{step:09d}"
    assert lines[0].startswith("error: lost rank 1 of 2 processes (")
    assert f"its process or node is gone; checkpoint step {step} ({unit}) is intact; resume with: vlmdistill " \
           "train - " in lines[0]
    assert lines[0].endswith("name=lost optim.epochs=100 --resume (under torchrun, as before)")
    assert "/vlmdistill/" not in out.replace(str(run), "")  # no worker traceback (torchrun's own summary follows)


@pytest.fixture(scope="module")
def ml_common(clutter_dir: Path, open_clip_teacher_files: tuple[Path, Path],
              tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """A multi-label run (the paper's robotics head and ASL, 8-channel scenes) on built PickClutter h5 files."""
    cfg_path, ckpt = open_clip_teacher_files
    root = tmp_path_factory.mktemp("ddp-ml")
    return [f"data.dir={clutter_dir}", "data.base_size=32", "data.preload=true", f"teacher.model_config={cfg_path}",
            f"teacher.checkpoint={ckpt}", "teacher.batch_size=16", "student.arch=resnet10t", "student.image_size=32",
            "student.model_kwargs={channels: [8, 16, 32, 64], stem_width: 8}", "optim.batch_size=6",
            "optim.eval_batch_size=8", "optim.epochs=2", "optim.lr=0.01", "loss.cls.weight=0", "loss.asl.weight=1",
            "text.n_ctx=4", "train.progress=false", "train.target_views=3", "train.log_every=1",
            "train.analysis=false", "train.eval_every=2", "train.average_last=1", f"output_dir={root / 'runs'}",
            f"cache_dir={root / 'cache'}", "device=cpu", "teacher.device=cpu"]


def test_multilabel_two_processes_match_one_per_step(ml_common: list[str]) -> None:
    """A multi-label run under torchrun: the per-step losses (ASL and L_im-cst) of one process on the same global
    batches, the same evaluation columns; without L_im-cst (nothing reads the pooled embedding) it runs too, and
    few-shot finetuning runs in two processes."""
    common = [*ml_common, "loss.imcst.weight=1"]
    proc = torchrun(["train", "-", *common, "name=ml-two"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    with threads(1):
        one = distill(load_config(None, [*common, "name=ml-one"]))
    two = read_json(_run_dir(common, "ml-two") / "results.json")
    assert two["complete"] and two["train"]["processes"] == 2 and two["train"]["steps"] == one["train"]["steps"] == 6
    ref, got = losses(_run_dir(common, "ml-one")), losses(_run_dir(common, "ml-two"))
    assert sorted(ref) == sorted(got) == list(range(1, 7)) and {"train/asl", "train/imcst"} <= set(ref[1])
    for step in ref:
        assert_close_losses(got[step], ref[step], step)
    assert two["metrics"].keys() == one["metrics"].keys() == {"x_id", "y_id_on_ood", "y_ood_on_ood"}

    proc = torchrun(["train", "-", *ml_common, "name=ml-cls", "train.max_steps=2"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    proc = torchrun(["fewshot", "-", *common, "name=ml-two", "multilabel.fewshot_scenes=4", "fewshot.epochs=1"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    assert read_json(_run_dir(common, "ml-two") / "fewshot.json")["finetune"]["y_ood_on_ood"]["map"] >= 0
