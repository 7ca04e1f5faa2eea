"""Quality levers (issue 20): what closes the student's OOD gap to the teacher, and at what compute. On the demo
world, over seeds, each lever alone on top of today's best row (L_cls + L_im-cst + L_vlalign + descriptions),
then a candidate combination: pool size x ratio x epochs, label-free KD on pool rows, several views per image
per step, a weight average (EMA), a teacher ensemble (a second demo teacher trained from another seed: once with its
own text projection, once into the first teacher's locked text space; each also alone), and a wider student at
equal FLOPs. Each row: ID and OOD mean per-class accuracy (mean ± std over seeds), the OOD
change against the baseline paired by seed, the share of the teacher's OOD accuracy, and its training compute in
images through the student (views and pool images included) and student GFLOPs.

    python bench/quality_levers.py [--quick] [--seeds 3] [--world-seed 0] [--rows pool4x,ema,ensemble_aligned]
                                   [key=value overrides for every row]

Writes bench/results/quality_levers.json (``_quick`` with --quick, ``_world<seed>`` on another world, ``_rows-...``
for a subset).
Every figure here is read off the world's OOD split: choosing a default from it is a selection on the test
split (a leak). Validate an ordering on a second world (``--world-seed 1``: other classes, vocabulary and
images) before changing a default.

RandAugment: ``data.randaugment=consistent`` draws RandAugment(2, 9) with each stored view, so the teacher's
target is of the augmented view (as MobileCLIP stores its augmentations); ``student``, the paper's, augments
the student's pixels only, as a control.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlmdistill.demo.run import BEST_DESC, EMA, KD, PATIENT, DemoScale, Row, run_demo, setup, world_dir
from vlmdistill.demo.teacher import TeacherRecipe, train_teacher
from vlmdistill.io import atomic_write_json
from vlmdistill.runfolder import RunFolder
from vlmdistill.students import create_student

RESULTS = Path(__file__).parent / "results"
KD_POOL = (KD, "loss.kd.on=pool")
WIDE = "student.model_kwargs={channels: [48, 72, 72, 144], stem_width: 24}"  # 1.5x test_resnet's widths


def lever_rows(scale: DemoScale) -> tuple[Row, ...]:
    """Each lever alone on top of the baseline, then a candidate combination; epochs scale with the world."""
    e = scale.student_epochs
    return (
        Row("best_desc", "baseline: best row + descriptions (today's default)", BEST_DESC),
        Row("pool1x", "+ pool 1x, ratio 1", BEST_DESC, pool=("full", 1)),
        Row("pool4x", "+ pool 4x, ratio 1", BEST_DESC, pool=("full", 4)),
        Row("pool4x_r4", "+ pool 4x, ratio 4 (each pool image as often as 1x)",
            (*BEST_DESC, "data.unlabeled_ratio=4"), pool=("full", 4)),
        Row("pool4x_e4", "+ pool 4x, ratio 1, 4x epochs", (*BEST_DESC, f"optim.epochs={4 * e}"), pool=("full", 4)),
        Row("pool1x_kd", "+ pool 1x + label-free KD on pool rows", (*BEST_DESC, *KD_POOL), pool=("full", 1)),
        Row("pool4x_r4_kd", "+ pool 4x, ratio 4 + KD on pool rows", (*BEST_DESC, "data.unlabeled_ratio=4", *KD_POOL),
            pool=("full", 4)),
        Row("kd", "+ label-free KD on the labelled images", (*BEST_DESC, KD)),
        Row("epochs2x", "+ 2x epochs (a patient teacher)", (*BEST_DESC, f"optim.epochs={2 * e}")),
        Row("epochs4x", "+ 4x epochs", (*BEST_DESC, f"optim.epochs={4 * e}")),
        Row("views2", "+ 2 views per image per step", (*BEST_DESC, "train.views_per_step=2")),
        Row("views4", "+ 4 views per image per step", (*BEST_DESC, "train.views_per_step=4")),
        Row("views4_eq", "+ 4 views per step, 1/4 of the epochs (equal compute)",
            (*BEST_DESC, "train.views_per_step=4", f"optim.epochs={max(1, e // 4)}")),
        Row("randaug", "+ RandAugment(2, 9) with consistent targets (stored with each view)",
            (*BEST_DESC, "data.randaugment=consistent")),
        Row("randaug_student", "control: RandAugment(2, 9) on the student only (the paper's; targets of the "
            "un-augmented view)", (*BEST_DESC, "data.randaugment=student")),
        Row("ema", "+ EMA of the weights (decay 0.99)", (*BEST_DESC, EMA)),
        Row("wide_eq", "wider student (1.5x channels), epochs for equal FLOPs",
            (*BEST_DESC, WIDE, f"optim.epochs={max(1, round(e / 2.25))}")),
        Row("paper", "paper mode (every mode: paper switch), for the goal's ratio", (*BEST_DESC, "mode=paper")),
        Row("paper_e4", "paper mode, 4x epochs (the patient rows' compute)", (*BEST_DESC, "mode=paper"),
            epochs_factor=4),
        Row("patient", "candidate, no pool: a patient and consistent teacher (4x epochs, consistent RandAugment, "
            "KD on the labelled images, EMA)", (*BEST_DESC, *PATIENT), epochs_factor=4),
        Row("patient_pool", "candidate, pool 1x: the same, KD on labelled and pool rows",
            (*BEST_DESC, *PATIENT), pool=("full", 1), epochs_factor=4),
    )


def ensemble_override(first: tuple[Path, Path], second: tuple[Path, Path]) -> str:
    """``teacher=[...]``: the demo teacher, then the one trained from another seed (JSON is YAML)."""
    return "teacher=" + json.dumps([{"backend": "open_clip", "model_config": str(c), "checkpoint": str(k),
                                     "batch_size": 512} for c, k in (first, second)])


def demo_teachers(cache: Path, scale: DemoScale, progress: bool, groups: set[str]) -> dict[str, tuple[Path, Path]]:
    """(config, checkpoint) of the demo teacher (seed 0) and, as ``groups`` need them, of one trained the same way
    from seed 1 (its own text projection: an image space unrelated to the first's) and of one from seed 1 trained
    into the first's locked text space (``aligned``: the ensemble the mean of image targets is meant for)."""
    _, cfg0, ckpt0 = setup(cache, scale, progress)
    tag, epochs, world = scale.world.tag, scale.teacher_epochs, world_dir(cache, scale)
    recipe = TeacherRecipe(epochs=epochs, seed=1)
    teachers = {"first": (cfg0, ckpt0)}
    if groups & {"ensemble", "teacher2"}:
        teachers["seed1"] = train_teacher(world, cache / "demo" / f"teacher-{tag}-e{epochs}-seed1",
                                          scale.world.image_size, recipe, progress)
    if groups & {"ensemble_aligned", "teacher2_aligned"}:
        teachers["aligned"] = train_teacher(world, cache / "demo" / f"teacher-{tag}-e{epochs}-seed1-text0",
                                            scale.world.image_size, recipe, progress, text_from=ckpt0)
    return teachers


TEACHER_GROUPS = ("ensemble", "teacher2", "ensemble_aligned", "teacher2_aligned")


def teacher_rows(teachers: dict[str, tuple[Path, Path]]) -> dict[str, tuple[Row, ...]]:
    """Row groups that need a workspace of their own (another teacher): each ensemble and its partner alone, for
    the teachers at hand."""
    def alone(label: str, t: tuple[Path, Path]) -> tuple[Row, ...]:
        return (Row("best_desc", label, (*BEST_DESC, f"teacher.model_config={t[0]}", f"teacher.checkpoint={t[1]}")),)

    first, groups = teachers["first"], {}
    if "seed1" in teachers:
        groups["ensemble"] = (Row("best_desc", "teacher ensemble: demo teacher + seed-1 teacher (unaligned spaces)",
                                  (*BEST_DESC, ensemble_override(first, teachers["seed1"]))),)
        groups["teacher2"] = alone("control: the seed-1 teacher alone", teachers["seed1"])
    if "aligned" in teachers:
        groups["ensemble_aligned"] = (Row("best_desc", "teacher ensemble: demo teacher + seed-1 teacher in its "
                                          "text space", (*BEST_DESC, ensemble_override(first, teachers["aligned"]))),)
        groups["teacher2_aligned"] = alone("control: the aligned seed-1 teacher alone", teachers["aligned"])
    return groups


def _run_figures(out: Path, seeds: int, key: str) -> dict[str, Any]:
    """Compute of one row from its runs: images through the student (mean over seeds) and GFLOPs per image."""
    runs = [RunFolder(out / f"seed{s}" / key) for s in range(seeds)]
    images = [(r.results() or {}).get("train", {}).get("student_images") for r in runs]
    cfg = runs[0].config()
    student = create_student(cfg.student, runs[0].student().meta.out_dim).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        student(torch.zeros(1, 3, cfg.student.image_size, cfg.student.image_size))
    return {"student_images": statistics.fmean(images) if None not in images else None,
            "gflops_per_image": counter.get_total_flops() / 1e9}


def _paired(values: list[float], base: list[float]) -> dict[str, float]:
    diffs = [a - b for a, b in zip(values, base, strict=True)]
    return {"mean": statistics.fmean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0}


def figures(summaries: dict[str, tuple[Path, dict]], seeds: int, base: dict) -> dict[str, Any]:
    """Per row: accuracy stats, paired OOD/ID change against the baseline, share of the teacher, compute."""
    teacher_ood = base["rows"]["teacher"]["metrics"]["ood"]["mean"]
    base_metrics = base["rows"]["best_desc"]["metrics"]
    rows = {}
    for group, (out, summary) in summaries.items():
        for key, row in summary["rows"].items():
            if key == "teacher":
                continue
            m = row["metrics"]
            compute = _run_figures(out, seeds, key)
            rows[key if group == "main" else f"{group}:{key}"] = {
                "label": row["label"], "id": m["id"], "ood": m["ood"],
                "delta_ood": _paired(m["ood"]["values"], base_metrics["ood"]["values"]),
                "delta_id": _paired(m["id"]["values"], base_metrics["id"]["values"]),
                "ood_over_teacher": m["ood"]["mean"] / teacher_ood, "train_seconds": row["train_seconds"],
                **compute, "gflops": (compute["student_images"] or 0) * compute["gflops_per_image"]}
    return rows


def print_table(rows: dict[str, Any], teachers: dict[str, Any]) -> None:
    def cell(s: dict) -> str:
        return f"{s['mean']:.1f} ± {s['std']:.1f}"

    print("| row | ID | OOD | ΔOOD (paired) | OOD / teacher | images through student | student GFLOPs | s |")
    print("|---|---|---|---|---|---|---|---|")
    for name, t in teachers.items():
        print(f"| {name} | {cell(t['id'])} | {cell(t['ood'])} | | | | | |")
    for r in rows.values():
        print(f"| {r['label']} | {cell(r['id'])} | {cell(r['ood'])} | {r['delta_ood']['mean']:+.1f} ± "
              f"{r['delta_ood']['std']:.1f} | {r['ood_over_teacher']:.2f} | {r['student_images']:.0f} | "
              f"{r['gflops']:.1f} | {r['train_seconds']:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small world, short training (smoke check)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--world-seed", type=int, default=0, help="another world of the demo generator (other "
                        "classes, vocabulary and images) to validate an ordering on")
    parser.add_argument("--rows", help="comma-separated row keys (and/or the groups ensemble, teacher2) to run, "
                        "to split the table over machines or sessions; the baseline always runs (default: all)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/quality_levers"))
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/vlmdistill"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every row")
    args = parser.parse_args()
    scale = DemoScale.quick() if args.quick else DemoScale.full()
    scale = dataclasses.replace(scale, world=dataclasses.replace(scale.world, seed=args.world_seed))
    overrides = ["train.analysis=false", *args.overrides]
    wanted = set(args.rows.split(",")) | {"best_desc", "main"} if args.rows else None
    all_groups = {"main": lever_rows(scale)}
    asked = set(TEACHER_GROUPS) if wanted is None else wanted & set(TEACHER_GROUPS)
    if asked:  # trains the extra teachers only when asked
        all_groups |= teacher_rows(demo_teachers(args.cache_dir, scale, progress=False, groups=asked))
    groups = [(g, tuple(r for r in rows if wanted is None or g != "main" or r.key in wanted))
              for g, rows in all_groups.items() if wanted is None or g in wanted]
    summaries = {}
    for group, rows in groups:
        out = args.out / f"world{args.world_seed}" / group
        summaries[group] = (out, run_demo(out, args.cache_dir, seeds=args.seeds, overrides=overrides,
                                          progress=False, rows=rows, scale=scale))
    base = summaries["main"][1]
    rows = figures(summaries, args.seeds, base)
    teachers = {f"teacher ({group})": s["rows"]["teacher"]["metrics"] for group, (_, s) in summaries.items()}
    print_table(rows, teachers)
    suffix = ("_quick" if args.quick else "") + (f"_world{args.world_seed}" if args.world_seed else "") \
        + ("_rows-" + "-".join(sorted(set(args.rows.split(",")))) if args.rows else "")
    atomic_write_json(RESULTS / f"quality_levers{suffix}.json", {
        "quick": args.quick, "seeds": args.seeds, "world_seed": args.world_seed, "overrides": args.overrides,
        "teachers": {k: {m: v[m] for m in ("id", "ood")} for k, v in teachers.items()}, "rows": rows,
        "leak": "every figure is read off this world's OOD split; a default chosen from it "
                                      "must be validated on another world (--world-seed)",
        "machine": base["machine"], "seconds": sum(s["seconds"] for _, s in summaries.values())})


if __name__ == "__main__":
    main()
