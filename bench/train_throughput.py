"""Training images/s with stored teacher views vs the teacher online vs the student's compute ceiling.

    .venv/bin/python bench/train_throughput.py [--quick] [--threads N] [--device cpu|cuda]

Same student (same initial weights), data, batch size, loss and torch threads in every arm:
(a) target store: ``train.target_views=K``, a stored view replayed per image;
(b) teacher online: ``train.target_views=0``, the teacher encodes the student's view every step;
(c) ceiling: the same number of forward + backward + optimiser steps on one batch already in memory
    (no loading, no view rendering, no target lookup, no teacher).
(a) and (b) are ``DistillTask.prepare`` + ``loop.train_step`` over whole data passes as ``loop.fit`` runs
them. The arms run in interleaved rounds so machine load drifts hit all of them alike; the
one-time store extraction is timed apart. Goals: a/b >= 3x, overhead 1 - a/c <= 15 % of step time.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from _common import TEACHER_LABELS, bench_config, bench_dataset, parse_args, print_table, setup, sync, write_results

from vlmdistill.config import ExperimentConfig
from vlmdistill.data.views import render
from vlmdistill.loop import LoopShape, build_optimizer, pass_batches, train_step
from vlmdistill.students import count_parameters
from vlmdistill.targets.lookup import open_targets
from vlmdistill.task import DistillTask, StepBatch
from vlmdistill.teachers import Teacher
from vlmdistill.workspace import Workspace, build_workspace, class_text_embeddings, default_sets

GOAL_RATIO = 3.0
GOAL_OVERHEAD = 0.15


@dataclass(frozen=True)
class Sizes:
    per_class: int
    image_px: int
    student: str
    student_px: int
    batch: int
    views: int
    rounds: int
    teacher_batches: int


FULL = Sizes(per_class=72, image_px=128, student="resnet18", student_px=64, batch=64, views=4, rounds=3,
             teacher_batches=2)
QUICK = Sizes(per_class=12, image_px=64, student="resnet10t", student_px=32, batch=16, views=2, rounds=2,
              teacher_batches=2)


def make_task(cfg: ExperimentConfig, ws: Workspace) -> tuple[DistillTask, torch.optim.Optimizer]:
    """A task whose student starts from the same weights in every arm, with its optimiser (no targets yet)."""
    torch.manual_seed(cfg.seed)
    task = DistillTask(cfg, ws, default_sets(ws, class_text_embeddings(cfg, ws)[0])[0])
    optimizer, _, _ = build_optimizer(cfg, task.trainable(), LoopShape.of(cfg, task.train_set).steps_per_epoch)
    task.student.train()
    return task, optimizer


def data_pass(task: DistillTask, optimizer: torch.optim.Optimizer, epoch: int, n_batches: int | None = None
              ) -> tuple[int, float]:
    """``prepare`` + ``train_step`` over one pass of the training data, as ``fit`` runs it: (images, seconds)."""
    batches = pass_batches(task.cfg, task.train_set, epoch, 0)[:n_batches]
    n = 0
    sync(task.device)
    start = time.perf_counter()
    for i, batch in enumerate(task.train_set.source.iter_batches(batches)):
        g = torch.Generator().manual_seed(epoch * 1_000_003 + i)
        train_step(task, optimizer, task.prepare(batch, g))
        n += len(batch.index)
    sync(task.device)
    return n, time.perf_counter() - start


def resident_batch(store_arm: DistillTask, batch_size: int) -> StepBatch:
    """The first training images under their first stored view, rendered for the student once."""
    store = store_arm.targets.store
    assert store is not None
    index = torch.arange(batch_size)
    [batch] = list(store_arm.train_set.source.batches(index, batch_size))
    view_ids = torch.ones_like(index)
    pixels = render(batch.images, store.views(index, view_ids), store_arm.cfg.student.image_size)
    return StepBatch(pixels.to(store_arm.device), index, store.targets(index, view_ids).to(store_arm.device))


def ceiling_pass(task: DistillTask, optimizer: torch.optim.Optimizer, x: StepBatch, epoch: int
                 ) -> tuple[int, float]:
    """As many ``train_step``s, of the same sizes, as one data pass, on the resident batch: no data side."""
    sizes = [len(b) for b in pass_batches(task.cfg, task.train_set, epoch, 0)]
    sync(task.device)
    start = time.perf_counter()
    for n in sizes:
        train_step(task, optimizer, StepBatch(x.pixels[:n], x.index[:n], x.targets[:n]))
    sync(task.device)
    return sum(sizes), time.perf_counter() - start


def teacher_forward(teacher: Teacher, batch_size: int, n_batches: int) -> tuple[int, float]:
    """The teacher alone on pixels already on its device: (images, seconds)."""
    x = torch.rand(batch_size, 3, teacher.image_size, teacher.image_size, device=teacher.device)
    sync(teacher.device)
    start = time.perf_counter()
    for _ in range(n_batches):
        teacher.encode_images(x)
    sync(teacher.device)
    return batch_size * n_batches, time.perf_counter() - start


def spread(values: list[float], scale: float, unit: str) -> str:
    """The range of a figure over the rounds, to show how noisy the machine was."""
    return f"(rounds {scale * min(values):.2f}{unit} to {scale * max(values):.2f}{unit})"


@dataclass
class Arm:
    """One thing to time: ``run(epoch)`` is one round (images, seconds); ``warm_up()`` runs once before."""

    run: Callable[[int], tuple[int, float]]
    warm_up: Callable[[], object]


def build_arms(s: Sizes, cfg_store: ExperimentConfig, cfg_online: ExperimentConfig, ws: Workspace
               ) -> tuple[dict[str, Arm], dict[str, Any], float]:
    """The arms over one workspace, facts about them, and the seconds the store extraction took."""
    store_arm, store_opt = make_task(cfg_store, ws)
    start = time.perf_counter()
    store_arm.targets = open_targets(cfg_store, ws.teacher, ws.train, needed=True)
    extraction_s = time.perf_counter() - start
    online_arm, online_opt = make_task(cfg_online, ws)
    online_arm.targets = open_targets(cfg_online, ws.teacher, ws.train, needed=True)
    assert store_arm.targets.kind == "store" and online_arm.targets.kind == "online"
    ceiling_arm, ceiling_opt = make_task(cfg_store, ws)
    resident = resident_batch(store_arm, s.batch)
    arms = {
        "store": Arm(lambda e: data_pass(store_arm, store_opt, e), lambda: data_pass(store_arm, store_opt, 0, 2)),
        "online": Arm(lambda e: data_pass(online_arm, online_opt, e), lambda: data_pass(online_arm, online_opt, 0, 2)),
        "ceiling": Arm(lambda e: ceiling_pass(ceiling_arm, ceiling_opt, resident, e),
                       lambda: ceiling_pass(ceiling_arm, ceiling_opt, resident, 0)),
        "teacher": Arm(lambda _: teacher_forward(ws.teacher, s.batch, s.teacher_batches),
                       lambda: teacher_forward(ws.teacher, s.batch, 1)),
    }
    facts = {"train_images": len(ws.train), "store_views": store_arm.targets.store.n_views,
             "teacher_params": count_parameters(ws.teacher.model),
             "student_params": count_parameters(store_arm.student), "num_workers": cfg_store.data.num_workers}
    return arms, facts, extraction_s


def interleave(arms: dict[str, Arm], n_rounds: int) -> dict[str, list[tuple[int, float]]]:
    """Every arm warmed up, then one round of each in turn, ``n_rounds`` times."""
    for arm in arms.values():
        arm.warm_up()
    rounds: dict[str, list[tuple[int, float]]] = {name: [] for name in arms}
    for epoch in range(1, n_rounds + 1):
        for name, arm in arms.items():
            rounds[name].append(arm.run(epoch))
    return rounds


def report(args: argparse.Namespace, s: Sizes, facts: dict[str, Any], extraction_s: float,
           rounds: dict[str, list[tuple[int, float]]]) -> None:
    """Print the table and write ``bench/results/train_throughput.json``."""
    rate = {name: sum(n for n, _ in r) / sum(t for _, t in r) for name, r in rounds.items()}
    per_round = [{name: r[i][0] / r[i][1] for name, r in rounds.items()} for i in range(s.rounds)]
    ratio, overhead = rate["store"] / rate["online"], 1 - rate["store"] / rate["ceiling"]
    ratio_rounds = [r["store"] / r["online"] for r in per_round]
    overhead_rounds = [1 - r["store"] / r["ceiling"] for r in per_round]
    ratio_bound = 1 + rate["ceiling"] / rate["teacher"]
    n_views = facts["store_views"]
    extraction_rate = facts["train_images"] * n_views / extraction_s
    teacher_label = TEACHER_LABELS[args.quick]
    print_table(
        f"train_throughput ({'quick' if args.quick else 'full'}): student {s.student} @{s.student_px} px "
        f"({facts['student_params'] / 1e6:.1f} M params), batch {s.batch}, {facts['train_images']} training images, "
        f"threads={args.threads}, {args.device}\n"
        f"  teacher: {teacher_label} ({facts['teacher_params'] / 1e6:.1f} M params)",
        [
            ("arm", "images/s", ""),
            (f"(a) target store, K={s.views} stored views", f"{rate['store']:.1f}", ""),
            ("(b) teacher online", f"{rate['online']:.1f}", ""),
            ("(c) student compute ceiling (in memory)", f"{rate['ceiling']:.1f}", ""),
            ("teacher forward alone (in memory)", f"{rate['teacher']:.1f}", ""),
            ("figure", "value", "goal"),
            ("a/b: store vs online", f"{ratio:.2f}x", f">= {GOAL_RATIO:g}x   {spread(ratio_rounds, 1, 'x')}"),
            ("1 - a/c: data + view + target overhead", f"{100 * overhead:.1f} %",
             f"<= {100 * GOAL_OVERHEAD:g} %   {spread(overhead_rounds, 100, ' %')}"),
            ("a/b bound for this pair, 1 + c/teacher", f"{ratio_bound:.2f}x", ""),
            ("store extraction (not in a)", f"{extraction_s:.1f} s",
             f"{extraction_rate:.0f} image-views/s, {n_views} views incl. whole image"),
        ],
    )
    figures = {
        "images_per_s": rate,
        "store_vs_online": ratio,
        "store_overhead": overhead,
        "store_vs_online_bound": ratio_bound,
        "per_round": {"store_vs_online": ratio_rounds, "store_overhead": overhead_rounds, "images_per_s": per_round},
        "extraction_s": extraction_s,
        "extraction_image_views_per_s": extraction_rate,
        "goals": {"store_vs_online_min": GOAL_RATIO, "store_overhead_max": GOAL_OVERHEAD},
        "meets_goals": {"store_vs_online": ratio >= GOAL_RATIO, "store_overhead": overhead <= GOAL_OVERHEAD},
    }
    setup_info = {**asdict(s), **facts, "teacher": teacher_label, "threads": args.threads, "device": args.device,
                  "loss": "cls + imcst + vlalign"}
    print(f"-> {write_results('train_throughput', args, setup_info, figures)}")


def main() -> None:
    args = parse_args(__doc__)
    setup(args)
    s = QUICK if args.quick else FULL
    with bench_dataset(s.per_class, s.image_px) as (work, data_dir):
        shared = [f"data.base_size={s.image_px}", f"student.arch={s.student}", f"student.image_size={s.student_px}",
                  f"optim.batch_size={s.batch}", f"teacher.batch_size={s.batch}",
                  "loss.imcst.weight=1", "loss.vlalign.weight=1"]
        cfg_store = bench_config(work, data_dir, args, [*shared, f"train.target_views={s.views}"])
        cfg_online = bench_config(work, data_dir, args, [*shared, "train.target_views=0"])
        torch.manual_seed(0)
        arms, facts, extraction_s = build_arms(s, cfg_store, cfg_online, build_workspace(cfg_store))
        rounds = interleave(arms, s.rounds)
    report(args, s, facts, extraction_s, rounds)


if __name__ == "__main__":
    main()
