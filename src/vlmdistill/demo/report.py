"""The demo's report: a table of every variant (mean ± std over seeds), the paper's findings checked
against our numbers, and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from rich.table import Table

from vlmdistill.io import atomic_save_figure, atomic_write_text
from vlmdistill.results import METRICS

COLUMNS = ("id", "ood", "ood_5shot_finetune", "ood_5shot_retrieval", "gzsl_h", "m_rel_train", "m_rel_ood",
           "m_neigh5_ood", "m_vlalign3_ood", "mse_ood")
"""Keys of ``results.METRICS``; the demo's few-shot is always 5-shot, so those two columns say so."""
_LABELS = {"ood_5shot_finetune": "OOD 5-shot ft", "ood_5shot_retrieval": "OOD 5-shot Tip"}


def _label(key: str) -> str:
    return _LABELS.get(key, METRICS[key].label)


def _cell(key: str, stats: dict[str, Any] | None, seeds: int) -> str:
    """Mean (± std over seeds), in the one format of its metric (``results.Metric.format``)."""
    if not stats:
        return "NA"
    fmt = METRICS[key].format
    return fmt(stats["mean"]) + (f" ± {fmt(stats['std'])}" if seeds > 1 else "")


def table_rows(summary: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    header = ["variant", *[_label(k) for k in COLUMNS]]
    rows = []
    for row in summary["rows"].values():
        rows.append([row["label"], *[_cell(k, row["metrics"].get(k), summary["seeds"]) for k in COLUMNS]])
    return header, rows


SCREEN_COLUMNS = ("id", "ood", "ood_5shot_finetune", "ood_5shot_retrieval", "gzsl_h", "m_rel_ood")


def rich_summary(summary: dict[str, Any]) -> Table:
    """The headline columns only (report.md has them all), so the table fits a terminal."""
    table = Table(title=f"demo world, {summary['seeds']} seed(s), mean per-class accuracy %")
    table.add_column("variant", overflow="fold")
    for key in SCREEN_COLUMNS:
        table.add_column(_label(key), justify="right")
    for row in summary["rows"].values():
        table.add_row(row["label"], *[_cell(k, row["metrics"].get(k), summary["seeds"]) for k in SCREEN_COLUMNS])
    return table


def _mean(summary: dict[str, Any], row: str, metric: str) -> float | None:
    stats = summary["rows"].get(row, {}).get("metrics", {}).get(metric)
    return stats["mean"] if stats else None


def findings(summary: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """The paper's qualitative claims, each with whether our numbers show it and the numbers."""
    m = lambda r, k: _mean(summary, r, k)  # noqa: E731
    out: list[tuple[str, bool | None, str]] = []
    distilled = [r for r in ("cls_mse", "cls_imcst", "best", "best_desc") if m(r, "ood") is not None]
    if m("cls", "ood") is not None and distilled:
        others = {r: m(r, "ood") for r in distilled}
        worst = all(m("cls", "ood") < v for v in others.values())
        detail = ", ".join(f"{r} {v:.1f}" for r, v in others.items())
        out.append(("L_cls alone is worst on OOD", worst, f"L_cls {m('cls', 'ood'):.1f} vs {detail}"))
    if None not in (m("cls", "ood"), m("cls_imcst", "ood"), m("cls", "m_rel_ood"), m("cls_imcst", "m_rel_ood")):
        ok = m("cls_imcst", "ood") > m("cls", "ood") and m("cls_imcst", "m_rel_ood") > m("cls", "m_rel_ood")
        out.append(("L_im-cst raises OOD accuracy and M_rel", ok,
                    f"OOD {m('cls', 'ood'):.1f} -> {m('cls_imcst', 'ood'):.1f}, M_rel OOD "
                    f"{m('cls', 'm_rel_ood'):.3f} -> {m('cls_imcst', 'm_rel_ood'):.3f}"))
    if None not in (m("best", "ood"), m("best_desc", "ood")):
        out.append(("Descriptions raise OOD accuracy", m("best_desc", "ood") > m("best", "ood"),
                    f"{m('best', 'ood'):.1f} -> {m('best_desc', 'ood'):.1f}"))
    if None not in (m("best_desc", "ood"), m("best_desc", "ood_5shot_finetune")):
        out.append(("5-shot beats 0-shot", m("best_desc", "ood_5shot_finetune") > m("best_desc", "ood"),
                    f"0-shot {m('best_desc', 'ood'):.1f}, 5-shot finetune {m('best_desc', 'ood_5shot_finetune'):.1f}"
                    f", retrieval {m('best_desc', 'ood_5shot_retrieval') or float('nan'):.1f}"))
    return out


def plot_ood_by_variant(summary: dict[str, Any], path: Path) -> None:
    rows = list(summary["rows"].values())
    fig = Figure(figsize=(9, 4.5))
    ax = fig.subplots()
    x = range(len(rows))
    zero = [r["metrics"].get("ood", {}).get("mean", 0.0) for r in rows]
    err = [r["metrics"].get("ood", {}).get("std", 0.0) for r in rows]
    few = [r["metrics"].get("ood_5shot_finetune", {}).get("mean", 0.0) for r in rows]
    ax.bar([i - 0.2 for i in x], zero, 0.4, yerr=err, label="OOD 0-shot")
    ax.bar([i + 0.2 for i in x], few, 0.4, label="OOD 5-shot (finetune)")
    ax.set_xticks(list(x), [r["label"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("mean per-class accuracy (%)")
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=120)


PoolPoint = tuple[float, float, float]
"""(pool size as a multiple of the labelled train set, OOD mean, OOD std)."""


def plot_ood_by_pool(full: list[PoolPoint], control: PoolPoint | None, teacher: float | None, path: Path) -> None:
    """OOD 0-shot accuracy against unlabelled pool size, the ID-only control beside it, the teacher above."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.errorbar([p[0] for p in full], [p[1] for p in full], yerr=[p[2] for p in full], marker="o", capsize=3,
                label="pool of the domain (all classes)")
    if control is not None:
        ax.errorbar([control[0]], [control[1]], yerr=[control[2]], marker="s", capsize=3, linestyle="none",
                    label="control pool (ID classes only)")
    if teacher is not None:
        ax.axhline(teacher, color="grey", linestyle="--", label="teacher")
    ax.set_xticks(sorted({p[0] for p in full} | ({control[0]} if control else set())))
    ax.set_xlabel("unlabelled pool size (x the labelled train set)")
    ax.set_ylabel("OOD 0-shot mean per-class accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=120)


def plot_training_curves(histories: dict[str, list[dict[str, Any]]], path: Path) -> None:
    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    for label, history in histories.items():
        pts = [(h["epoch"], h["ood"]["mean_per_class_recall"]) for h in history if h.get("ood")]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("OOD 0-shot mean per-class accuracy (%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=120)


def plot_embeddings(teacher: torch.Tensor, students: dict[str, torch.Tensor], labels: torch.Tensor,
                    path: Path, n_classes: int = 8) -> None:
    """Teacher (x) and student (o) embeddings of OOD images of a few classes, in one shared 2-D PCA."""
    keep = labels < n_classes
    t = torch.nn.functional.normalize(teacher[keep], dim=-1)
    fig = Figure(figsize=(5 * len(students), 4.5))
    axes = fig.subplots(1, len(students), squeeze=False)[0]
    for ax, (name, s) in zip(axes, students.items(), strict=True):
        s = torch.nn.functional.normalize(s[keep], dim=-1)
        both = torch.cat([t, s])
        centre = both.mean(0)
        _, _, v = torch.pca_lowrank(both - centre, q=2, center=False)
        pt, ps = (t - centre) @ v, (s - centre) @ v
        cmap = plt.get_cmap("tab10")
        for c in range(n_classes):
            m = labels[keep] == c
            ax.scatter(pt[m, 0], pt[m, 1], marker="x", color=cmap(c), s=18)
            ax.scatter(ps[m, 0], ps[m, 1], marker="o", color=cmap(c), s=10, alpha=0.6)
        ax.set_title(f"{name}: teacher x, student o", fontsize=9)
    fig.tight_layout()
    atomic_save_figure(path, fig, dpi=120)


def _counts(summary: dict[str, Any], key: str) -> str:
    """The distinct evaluation counts of the distilled rows ("5", or "4 or 5" if rows differ)."""
    counts = sorted({r[key] for k, r in summary["rows"].items() if k != "teacher" and r.get(key)})
    return " or ".join(map(str, counts)) or "1"


def averaging_note(summary: dict[str, Any]) -> str:
    """What each number of the table is: which evaluations it averages, and over how many seeds."""
    seeds = summary["seeds"]
    over = f" then mean ± std over the {seeds} seeds" if seeds > 1 else ""
    few = _counts(summary, "fewshot_averaged_over")
    return (f"Each ID, OOD 0-shot and GZSL H number is the mean of the last {_counts(summary, 'averaged_over')} "
            f"evaluations of its run (train.average_last, as the paper reports),{over}; OOD 5-shot ft is the mean "
            f"of the last {few} evaluations of the fine-tuning; OOD 5-shot Tip, the M_* and MSE columns and the "
            "teacher's row are one evaluation of the final model.")


def write_report(summary: dict[str, Any], out: Path) -> None:
    header, rows = table_rows(summary)
    lines = [
        "# vlmdistill demo report",
        "",
        f"Machine: {summary['machine']}. Seeds: {summary['seeds']}. Wall time: {summary['seconds']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in summary.get('timing_s', {}).items())}).",
        f"World: {summary['scale']}.",
        "",
        f"Teacher: {summary['params']['teacher']:,} parameters ({summary['params']['teacher_image']:,} in its image "
        f"tower), {summary['latency_ms']['teacher']:.2f} ms per image. Student: {summary['params']['student']:,} "
        f"parameters, {summary['latency_ms']['student']:.2f} ms per image (CPU, batch 1). Parameters are the "
        "learnable weights, as `vlmdistill export` counts them: the student's backbone and its projection to the "
        "teacher's space (the closed-set baseline's head, one output per class, is not this size).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *["| " + " | ".join(r) + " |" for r in rows],
        "",
        "ID: ID-val over ID classes. OOD 0-shot: OOD-val over OOD classes, classes never seen by the student. "
        "5-shot: after adaptation with 5 images per OOD class (finetune / Tip-Adapter retrieval), scored on the "
        "remaining OOD images. GZSL H: harmonic mean of ID and OOD recall when scored over all classes together. "
        "M_* are the paper's §6 metrics (M_vlalign and MSE: lower is better).",
        "",
        averaging_note(summary),
        "",
        "## The paper's findings, checked",
        "",
    ]
    for claim, ok, detail in findings(summary):
        verdict = "reproduced" if ok else "NOT reproduced"
        lines.append(f"- {claim}: **{verdict}** ({detail})")
    lines += ["", "## Plots", "", "![OOD accuracy by variant](ood_by_variant.png)", "",
              "![Training curves](training_curves.png)", "", "![Embeddings](embeddings_2d.png)", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))
