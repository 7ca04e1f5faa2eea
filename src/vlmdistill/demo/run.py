"""``vlmdistill demo``: the whole method offline, the paper's main variants side by side.

World -> prepared dataset -> teacher (cached) -> one student per variant, distilled from the ID
classes only -> zero-shot ID / OOD / generalized accuracy, 5-shot adaptation of the best variant, the
analysis metrics, a report with plots, and a check of the paper's qualitative findings.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import yaml

from vlmdistill.config import validate_config
from vlmdistill.data.prepare import prepare
from vlmdistill.demo.report import (
    plot_embeddings,
    plot_ood_by_variant,
    plot_training_curves,
    write_report,
)
from vlmdistill.demo.teacher import TeacherRecipe, train_teacher
from vlmdistill.demo.unlabeled import PoolKind, ensure_pool
from vlmdistill.demo.world import WorldParams, ensure_world
from vlmdistill.evaluate import evaluate_teacher, restore_student, student_features, teacher_features
from vlmdistill.fewshot import run_fewshot
from vlmdistill.io import atomic_write_json
from vlmdistill.progress import console
from vlmdistill.results import METRICS, metric_value
from vlmdistill.runfolder import RunFolder
from vlmdistill.train import distill
from vlmdistill.workspace import Workspace, build_workspace

BEST = ["loss.imcst.weight=1", "loss.vlalign.weight=1"]
BEST_DESC = (*BEST, "text.use_descriptions=true")
KD = "loss.kd.weight=1"
EMA = "train.ema_decay=0.99"  # a horizon of ~100 steps: a third of the full demo's 300 steps
PATIENT = ("data.randaugment=consistent", KD, EMA)
"""With 4x the epochs, "a good teacher is patient and consistent" (Beyer et al., CVPR 2022): the teacher's target of
the very augmented view, its whole distribution over the class texts (KD), and a weight average (README, "Closing
the gap to the teacher")."""


@dataclass(frozen=True)
class Row:
    """One variant; ``pool`` (kind, multiple of the train set's size) trains with that unlabelled pool;
    ``epochs_factor`` trains that many times the scale's epochs."""

    key: str
    label: str
    overrides: tuple[str, ...]
    fewshot: bool = False
    pool: tuple[PoolKind, int] | None = None
    epochs_factor: int = 1


POOL_ROWS = (
    Row("best_desc_pool_id", "+ unlabelled pool, ID classes only (control, 4x)", BEST_DESC, pool=("id_only", 4)),
    Row("best_desc_pool1x", "+ unlabelled pool of the domain (1x)", BEST_DESC, pool=("full", 1)),
    Row("best_desc_pool4x", "+ unlabelled pool of the domain (4x)", BEST_DESC, pool=("full", 4)),
)


ROWS = (
    Row("closed_set", "Closed-set (linear head on ID)", ("loss.closed_set=true",)),
    Row("cls", "L_cls", ()),
    Row("cls_mse", "L_cls + L_mse", ("loss.mse.weight=1",)),
    Row("cls_imcst", "L_cls + L_im-cst", ("loss.imcst.weight=1",)),
    Row("best", "L_cls + L_im-cst + L_vlalign (Tab.1 best)", tuple(BEST)),
    Row("best_desc", "+ descriptions (Tab.5)", (*BEST, "text.use_descriptions=true"), fewshot=True),
    Row("best_desc_paper", "+ descriptions, paper mode", (*BEST, "text.use_descriptions=true", "mode=paper")),
    Row("best_desc_patient", "+ descriptions, a patient and consistent teacher (4x epochs, consistent RandAugment, "
        "KD, EMA)", (*BEST_DESC, *PATIENT), epochs_factor=4),
)
"""The default demo's rows; ``vlmdistill demo --pools`` adds ``POOL_ROWS`` (kept out by default so that
``make demo`` stays under 10 minutes on 2 cores)."""


@dataclass(frozen=True)
class DemoScale:
    """World and training lengths; ``quick`` is what the tests run."""

    world: WorldParams
    teacher_epochs: int
    student_epochs: int
    fewshot_epochs: int

    @classmethod
    def full(cls) -> DemoScale:
        return cls(WorldParams.full(), 30, 30, 10)

    @classmethod
    def quick(cls) -> DemoScale:
        return cls(WorldParams.quick(), 12, 4, 2)


def base_config(out: Path, cache: Path, scale: DemoScale) -> dict[str, Any]:
    """The packaged demo.yaml with this scale's training lengths and the demo's output folders."""
    raw = yaml.safe_load(resources.files("vlmdistill.demo").joinpath("demo.yaml").read_text())
    raw.update(output_dir=str(out), cache_dir=str(cache))
    raw["optim"]["epochs"] = scale.student_epochs
    raw["fewshot"]["epochs"] = scale.fewshot_epochs
    raw["train"]["eval_every"] = min(raw["train"]["eval_every"], scale.student_epochs)
    return raw


def world_dir(cache: Path, scale: DemoScale) -> Path:
    return cache / "demo" / f"world-{scale.world.tag}"


def setup(cache: Path, scale: DemoScale, progress: bool) -> tuple[Path, Path, Path]:
    """World, prepared dataset and trained teacher, each reused when already made with these parameters."""
    tag = scale.world.tag
    world = world_dir(cache, scale)
    t0 = time.perf_counter()
    ensure_world(world, scale.world)
    data = cache / "demo" / f"data-{tag}"
    if not (data / "prepare.json").is_file():
        prepare(data, lists=world, images=world / "images")
    console.print(f"world {world} ready ({time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    cfg_path, ckpt = train_teacher(world, cache / "demo" / f"teacher-{tag}-e{scale.teacher_epochs}",
                                   scale.world.image_size, TeacherRecipe(epochs=scale.teacher_epochs), progress)
    console.print(f"teacher {ckpt} ready ({time.perf_counter() - t0:.1f}s)")
    return data, cfg_path, ckpt


def run_demo(out: Path, cache: Path, quick: bool = False, seeds: int = 1, overrides: list[str] | None = None,
             progress: bool = True, rows: tuple[Row, ...] = ROWS, scale: DemoScale | None = None) -> dict[str, Any]:
    """Every row for every seed; one workspace (decoded images, teacher) serves them all. ``scale`` (default:
    the quick or full one) lets a benchmark run on another world of the generator."""
    start = time.perf_counter()
    scale = scale or (DemoScale.quick() if quick else DemoScale.full())
    data, cfg_path, ckpt = setup(cache, scale, progress)
    pools = {row.pool: f"data.unlabeled={ensure_pool(world_dir(cache, scale), scale.world, *row.pool)}"
             for row in rows if row.pool is not None}
    timing = {"setup": time.perf_counter() - start}
    raw = base_config(out, cache, scale)
    shared = [f"data.dir={data}", f"teacher.model_config={cfg_path}", f"teacher.checkpoint={ckpt}",
              f"train.progress={str(progress).lower()}"]
    per_seed: dict[str, list[dict[str, Any]]] = {}
    ws: Workspace | None = None
    for seed in range(seeds):
        for row in rows:
            pool = [pools[row.pool]] if row.pool is not None else []
            epochs = [f"optim.epochs={scale.student_epochs * row.epochs_factor}"] if row.epochs_factor != 1 else []
            cfg = validate_config(raw, [*shared, f"seed={seed}", f"name=seed{seed}/{row.key}", *row.overrides, *pool,
                                        *epochs, *(overrides or [])], f"demo row {row.key}")
            # The world's images are square, so the paper row's squash equals our centre crop: one
            # workspace of decoded images serves every row.
            ws = ws or build_workspace(cfg)
            if seed == 0 and "teacher" not in per_seed:
                per_seed["teacher"] = [evaluate_teacher(cfg, ws, out / "teacher")]
            console.print(f"[bold]seed {seed}[/] {row.label}")
            res = distill(cfg, ws, overwrite=True)  # a demo rerun replaces its own rows
            if row.fewshot:
                res["fewshot"] = run_fewshot(cfg, ws, cfg.run_dir)
            per_seed.setdefault(row.key, []).append(res)
        if seed == 0 and {"cls", "best_desc"} <= set(per_seed):
            _plots(out, ws, per_seed)
        timing[f"seed{seed}"] = time.perf_counter() - start - sum(timing.values())
    labels = {"teacher": "Teacher zero-shot", **{r.key: r.label for r in rows}}
    summary = summarise(per_seed, labels, scale, time.perf_counter() - start, seeds)
    summary["timing_s"] = {k: round(v, 1) for k, v in timing.items()}
    summary["latency_ms"], params = _latency(ws, cfg)
    summary["params"] = {"teacher": summary["rows"][rows[0].key]["params"]["teacher"], **params}
    atomic_write_json(out / "results.json", summary)
    plot_ood_by_variant(summary, out / "ood_by_variant.png")
    write_report(summary, out)
    return summary


def _plots(out: Path, ws: Workspace, per_seed: dict[str, list[dict[str, Any]]]) -> None:
    """Training curves of every row, and teacher-vs-student OOD embeddings for L_cls and the best row."""
    histories = {key: runs[0]["history"] for key, runs in per_seed.items() if runs and runs[0].get("history")}
    plot_training_curves(histories, out / "training_curves.png")
    students = {}
    for key in ("cls", "best_desc"):
        cfg = RunFolder(Path(per_seed[key][0]["run_dir"])).config()
        student, _ = restore_student(cfg, ws, cfg.run_dir)
        students[key], _ = student_features(student, cfg, ws.ood_val)
    teacher, _ = teacher_features(cfg, ws, ws.ood_val)
    labels = torch.tensor(ws.dataset.ood_val.labels)
    plot_embeddings(teacher, students, labels, out / "embeddings_2d.png")


def _latency(ws: Workspace, cfg: Any) -> tuple[dict[str, float], dict[str, int]]:
    """Median per-image CPU latency (batch 1) of the student and of the teacher's image tower, and their
    parameter counts. The student is the open-vocabulary one (head = projection to the teacher's space),
    counted as ``export`` counts it; the closed-set baseline's head has one output per class instead."""
    from vlmdistill.students import count_parameters, create_student

    student = create_student(cfg.student, ws.teacher.embed_dim).eval()
    x = torch.rand(1, 3, cfg.student.image_size, cfg.student.image_size)
    tx = torch.rand(1, 3, ws.teacher.image_size, ws.teacher.image_size)
    visual = ws.teacher.model.visual.cpu()

    def median_ms(fn: Any) -> float:
        with torch.no_grad():
            for _ in range(5):
                fn()
            times = []
            for _ in range(30):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000)
        return statistics.median(times)

    latency = {"student": median_ms(lambda: student(x)), "teacher": median_ms(lambda: visual(tx))}
    return latency, {"student": count_parameters(student), "teacher_image": count_parameters(visual)}


def summarise(per_seed: dict[str, list[dict[str, Any]]], labels: dict[str, str], scale: DemoScale, seconds: float,
              seeds: int) -> dict:
    rows = {}
    labels |= {key: key for key in per_seed if key not in labels}
    for key, runs in per_seed.items():
        stats = {}
        for name in METRICS:
            values = [v for v in (metric_value(r, name) for r in runs) if v is not None]
            if values:
                stats[name] = {"mean": statistics.fmean(values),
                               "std": statistics.stdev(values) if len(values) > 1 else 0.0, "n": len(values),
                               "values": values}
        train_s = [r["train"]["seconds"] for r in runs if r.get("train")]
        finetune = ((runs[0].get("fewshot") or {}).get("finetune") or {})
        rows[key] = {"label": labels[key], "metrics": stats,
                     "averaged_over": runs[0].get("averaged_over", 1),
                     "fewshot_averaged_over": finetune.get("averaged_over"),
                     "train_seconds": statistics.fmean(train_s) if train_s else None,
                     "runs": [r.get("run") for r in runs], "params": {
                         "teacher": runs[0]["teacher"]["params"],
                         "student": (runs[0].get("student") or {}).get("params")}}
    return {"scale": dataclasses.asdict(scale), "seeds": seeds, "seconds": round(seconds, 1), "rows": rows,
            "machine": _machine()}


def _machine() -> str:
    import os
    import platform

    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
