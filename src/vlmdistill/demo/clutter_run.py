"""``vlmdistill demo --clutter``: the paper's robotics experiment (§8, Table 12) on the demo's cluttered scenes.

The objects are the quick demo world's classes (its ID classes are the ID objects, its OOD classes the OOD
objects), so the world's teacher, which has seen all of them, is the teacher; it sees the hand camera's RGB.
The student takes base + hand RGB-D (8 channels). Rows: the multi-label head + ASL alone (the L_cls of Table
12), + L_im-cst, + L_im-cst with object descriptions; each zero-shot and after few-shot finetuning on 50 OOD
scenes; every row for each seed, reported as mean ± std. The teacher's own zero-shot mAP on the hand camera
(``mltrain.evaluate_multilabel_teacher``) is the reference: L_im-cst can pass on only what it knows.
``findings`` says whether L_im-cst raises the OOD columns over L_cls, as the paper found.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

from vlmdistill.config import validate_config
from vlmdistill.data.multilabel_set import MANIFEST, prepare_multilabel
from vlmdistill.demo.clutter import ClutterParams, clutter_classes, generate_clutter
from vlmdistill.demo.run import DemoScale, Row, base_config, setup
from vlmdistill.io import atomic_write_json, atomic_write_text
from vlmdistill.mlfewshot import run_multilabel_fewshot
from vlmdistill.mltrain import evaluate_multilabel_teacher
from vlmdistill.progress import console
from vlmdistill.results import METRICS, ML_GROUPS, ML_KEYS, metric_value
from vlmdistill.train import distill

CLUTTER_ROWS = (
    Row("ml_cls", "L_cls (head + ASL)", ()),
    Row("ml_imcst", "+ L_im-cst", ("loss.imcst.weight=1",)),
    Row("ml_imcst_desc", "+ L_im-cst + descriptions", ("loss.imcst.weight=1", "text.use_descriptions=true")),
)
SCENES = {"train": 1200, "val_on_train": 60, "val": 160}  # val: 50 few-shot support scenes + 110 scored
IMAGE_SIZE = 48
MULTILABEL = ["loss.cls.weight=0", "loss.asl.weight=1", f"data.base_size={IMAGE_SIZE}",
              f"student.image_size={IMAGE_SIZE}", "data.teacher_camera=hand", "optim.epochs=30",
              "optim.batch_size=64", "train.target_views=4", "train.eval_every=10", "train.average_last=1",
              "train.analysis=false", "fewshot.epochs=2",
              # AdamW bounds the ASL bias's step (its gradient sums over every entry); SGD 0.05 saturated it
              "optim.name=adamw", "optim.lr=0.001", "fewshot.lr=0.001"]
TEACHER_COLUMNS = {key: column for key, _, column in ML_GROUPS}  # key part -> results.json column
GROUPS = tuple(TEACHER_COLUMNS)
TABLE_METRICS = {"acc": "accuracy", "f1": "F1", "map": "mAP"}  # key part -> the table's heading


def clutter_data(cache: Path, scale: DemoScale) -> tuple[Path, Path]:
    """The scenes (generated once) as a prepared multi-label dataset, and the objects' descriptions file."""
    w = scale.world
    params = ClutterParams(n_id=w.n_id, n_ood=w.n_ood, image_size=IMAGE_SIZE, seed=w.seed)
    root = cache / "demo" / f"clutter-{w.tag}-{IMAGE_SIZE}-{'-'.join(map(str, SCENES.values()))}"
    classes = clutter_classes(params)
    data, desc = root / "data", root / "descriptions.json"
    if not (data / MANIFEST).is_file():
        files = generate_clutter(root / "h5", params, SCENES)
        prepare_multilabel(data, h5=list(files.items()), id_objects=[c.name for c in classes if c.is_id])
        atomic_write_json(desc, {c.name: c.description for c in classes})
    return data, desc


def run_clutter_demo(out: Path, cache: Path, seeds: int = 3, overrides: list[str] | None = None,
                     progress: bool = True) -> dict[str, Any]:
    """Every row for every seed, zero-shot and few-shot; writes ``clutter.md`` and ``clutter.json``."""
    start = time.perf_counter()
    scale = DemoScale.quick()
    _, cfg_path, ckpt = setup(cache, scale, progress)
    data, desc = clutter_data(cache, scale)
    raw = base_config(out, cache, scale)
    shared = [f"data.dir={data}", f"text.descriptions={desc}", f"teacher.model_config={cfg_path}",
              f"teacher.checkpoint={ckpt}", f"train.progress={str(progress).lower()}", *MULTILABEL]
    per_row: dict[str, list[dict[str, Any]]] = {}
    reference = validate_config(raw, [*shared, "name=clutter/teacher", *(overrides or [])], "clutter demo teacher")
    teacher = evaluate_multilabel_teacher(reference, reference.run_dir)["metrics"]
    summary: dict[str, Any] = {}
    for seed in range(seeds):
        for row in CLUTTER_ROWS:
            cfg = validate_config(raw, [*shared, f"seed={seed}", f"name=clutter/seed{seed}/{row.key}",
                                        *row.overrides, *(overrides or [])], f"clutter demo row {row.key}")
            console.print(f"[bold]seed {seed}[/] {row.label}")
            res = distill(cfg, overwrite=True)
            res["fewshot"] = run_multilabel_fewshot(cfg, cfg.run_dir)
            per_row.setdefault(row.key, []).append(res)
        summary = _write(out, per_row, teacher, seed + 1, time.perf_counter() - start)  # a stop keeps each seed
    return summary


def _write(out: Path, per_row: dict[str, list[dict[str, Any]]], teacher: dict[str, Any], seeds: int,
           seconds: float) -> dict[str, Any]:
    summary = {"seeds": seeds, "seconds": round(seconds, 1), "scenes": SCENES, "image_size": IMAGE_SIZE,
               "teacher": teacher, "rows": _stats(per_row)}
    atomic_write_json(out / "clutter.json", summary)
    verdicts = [f"- {claim}: {'holds' if ok else 'does not hold'} ({detail})"
                for claim, ok, detail in findings(summary)]
    atomic_write_text(out / "clutter.md", clutter_table(summary) + "\n" + "\n".join(verdicts) + "\n")
    return summary


def _stats(per_row: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    labels = {r.key: r.label for r in CLUTTER_ROWS}
    rows = {}
    for key, runs in per_row.items():
        stats = {}
        for name in ML_KEYS:
            values = [v for v in (metric_value(r, name) for r in runs) if v is not None]
            if values:
                stats[name] = {"mean": statistics.fmean(values),
                               "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        rows[key] = {"label": labels[key], "metrics": stats,
                     "train_seconds": statistics.fmean(r["train"]["seconds"] for r in runs)}
    return rows


def clutter_table(summary: dict[str, Any]) -> str:
    """Table 12's layout, one table per metric (accuracy, F1, mAP): zero-shot / few-shot per column, mean ± std
    over the seeds; the mAP table starts with the teacher's own zero-shot (it has no threshold for the others)."""
    def cell(row: dict[str, Any], zero: str, few: str) -> str:
        parts = []
        for key in (zero, few):
            m = row["metrics"].get(key)
            parts.append(f"{m['mean']:.1f}±{m['std']:.1f}" if m else "NA")
        return " / ".join(parts)

    lines = []
    for metric, shown in TABLE_METRICS.items():
        lines += [f"| {shown} (zero-shot / few-shot) | X_id | Y_id on X_ood | Y_ood on X_ood |", "|---|---|---|---|"]
        if metric == "map" and summary.get("teacher"):
            cells = [f"{summary['teacher'][TEACHER_COLUMNS[g]]['map']:.1f} / NA" for g in GROUPS]
            lines.append("| teacher (hand camera) | " + " | ".join(cells) + " |")
        for row in summary["rows"].values():
            cells = [cell(row, f"ml_{g}_{metric}", f"ml_fs_{g}_{metric}") for g in GROUPS]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def findings(summary: dict[str, Any]) -> list[tuple[str, bool, str]]:
    """The paper's finding, per OOD column and metric, zero-shot and few-shot: L_im-cst's mean above L_cls's.
    The detail gives both means ± std and says when the difference is within one seed std of either row."""
    rows = summary["rows"]
    out = []
    for fs in ("", "fs_"):
        for metric in TABLE_METRICS:
            for group in ("id_on_ood", "ood_on_ood"):
                key = f"ml_{fs}{group}_{metric}"
                base, imcst = rows["ml_cls"]["metrics"].get(key), rows.get("ml_imcst", {}).get("metrics", {}).get(key)
                if base and imcst:
                    noise = abs(imcst["mean"] - base["mean"]) <= max(base["std"], imcst["std"])
                    out.append((f"L_im-cst raises {METRICS[key].label}", imcst["mean"] > base["mean"],
                                f"{base['mean']:.1f}±{base['std']:.1f} -> {imcst['mean']:.1f}±{imcst['std']:.1f}"
                                + (", within noise" if noise else "")))
    return out
