"""One shape for every results file (a trained run, a re-evaluation, the teacher alone) and one table of
where each reported number lives in it, which ``compare``, the CLI summary and the demo all read.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from vlmdistill.config import ExperimentConfig, config_to_dict
from vlmdistill.teachers import Teacher

Kind = Literal["train", "eval", "teacher"]


@dataclass(frozen=True)
class Metric:
    label: str
    path: tuple[str, ...]
    percent: bool = True

    def format(self, value: float) -> str:
        """Percentages with one decimal, the analysis metrics (fractions, distances) with three."""
        return f"{value:.1f}" if self.percent else f"{value:.3f}"


ML_GROUPS = (("x_id", "X_id", "x_id"), ("id_on_ood", "Y_id on X_ood", "y_id_on_ood"),
             ("ood_on_ood", "Y_ood on X_ood", "y_ood_on_ood"))
"""Table 12's columns: key part, label, results.json name."""
ML_MEASURES = (("acc", "accuracy", "acc"), ("f1", "f1", "F1"), ("map", "map", "mAP"))
"""Each column's numbers: key part, results.json name, label."""
ML_KEYS = tuple(f"ml_{fs}{key}_{m}" for fs in ("", "fs_") for m, _, _ in ML_MEASURES for key, _, _ in ML_GROUPS)
"""Every multi-label key of ``METRICS``, zero-shot then few-shot, by measure then column."""

METRICS: dict[str, Metric] = {
    "id": Metric("ID", ("metrics_last_avg", "id", "mean_per_class_recall")),
    "ood": Metric("OOD 0-shot", ("metrics_last_avg", "ood", "mean_per_class_recall")),
    "ood_last": Metric("OOD 0-shot, last eval", ("metrics", "ood", "mean_per_class_recall")),
    "ood_acc1": Metric("OOD 0-shot acc1", ("metrics_last_avg", "ood", "acc1")),
    "ood_5shot_finetune": Metric("OOD few-shot ft", ("fewshot", "finetune", "ood", "mean_per_class_recall")),
    "ood_5shot_retrieval": Metric("OOD few-shot Tip", ("fewshot", "retrieval", "ood", "mean_per_class_recall")),
    "gzsl_h": Metric("GZSL H", ("metrics_last_avg", "gzsl", "harmonic")),
    **{f"ml_{fs}{key}_{m}": Metric(f"{label} {shown}{suffix}", (*where, column, name))
       for fs, where, suffix in (("", ("metrics_last_avg",), ""), ("fs_", ("fewshot", "finetune"), " few-shot"))
       for m, name, shown in ML_MEASURES for key, label, column in ML_GROUPS},
    "m_rel_train": Metric("M_rel train", ("analysis", "train", "m_rel"), percent=False),
    "m_rel_ood": Metric("M_rel OOD", ("analysis", "ood", "m_rel"), percent=False),
    "m_neigh5_ood": Metric("M_neigh@5 OOD", ("analysis", "ood", "m_neigh@5"), percent=False),
    "m_vlalign3_ood": Metric("M_vlalign@3 OOD", ("analysis", "ood", "m_vlalign@3"), percent=False),
    "mse_ood": Metric("MSE OOD", ("analysis", "ood", "mse"), percent=False),
    "angle_ood": Metric("angle OOD (deg)", ("analysis", "ood", "angle_deg")),
}
"""Every number a table may show, by key; a results file without it shows NA. The headline numbers are
the paper's: the mean over the last ``train.average_last`` evaluations (``metrics_last_avg``, App. B);
``metrics`` keeps the last evaluation beside it."""


def metric_value(results: dict[str, Any], key: str) -> Any:
    """The value of ``METRICS[key]`` in a results dict, or None where that run has no such number."""
    node: Any = results
    for part in METRICS[key].path:
        if not isinstance(node, dict) or node.get(part) is None:
            return None
        node = node[part]
    return node


def average_metrics(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean of each numeric metric over evaluations (the paper reports the last 5 outer epochs)."""
    out: dict[str, Any] = {}
    for split in ("id", "ood", "gzsl", "x_id", "y_id_on_ood", "y_ood_on_ood"):
        entries = [h[split] for h in history if h.get(split)]
        if entries:
            out[split] = {k: sum(e[k] for e in entries) / len(entries) for k in entries[0] if k in entries[-1]}
    return out


def teacher_summary(teacher: Teacher) -> dict[str, Any]:
    from vlmdistill.students import count_parameters

    return {"id": teacher.id, "description": teacher.description, "params": count_parameters(teacher.model)}


@dataclass
class RunResults:
    """What ``results.json`` (and ``eval.json``, ``teacher/results.json``) hold; None where not applicable.

    ``complete`` only when every phase asked for is done (else ``missing_phases`` names them); ``failure`` says
    why a run stopped (a divergence); ``config_changes`` what its resumes changed, from which step.

    A single evaluation (``eval``, ``teacher``) is its own average: ``metrics_last_avg`` equals ``metrics``."""

    kind: Kind
    run: str
    run_dir: str
    teacher: dict[str, Any]
    student: dict[str, Any] | None
    metrics: dict[str, Any]
    config: dict[str, Any]
    data: dict[str, Any] = field(default_factory=lambda: {"skipped_images": 0, "skipped": []})
    complete: bool = True
    missing_phases: list[str] = field(default_factory=list)
    failure: dict[str, Any] | None = None
    config_changes: list[dict[str, Any]] = field(default_factory=list)
    metrics_last_avg: dict[str, Any] = field(default_factory=dict)
    averaged_over: int = 1
    history: list[dict[str, Any]] = field(default_factory=list)
    train: dict[str, Any] | None = None
    analysis: dict[str, Any] | None = None
    fewshot: dict[str, Any] | None = None

    @classmethod
    def start(cls, kind: Kind, cfg: ExperimentConfig, run: str, run_dir: str, teacher: Teacher,
              student: dict[str, Any] | None, metrics: dict[str, Any]) -> RunResults:
        return cls(kind=kind, run=run, run_dir=run_dir, teacher=teacher_summary(teacher), student=student,
                   metrics=metrics, metrics_last_avg=metrics, config=config_to_dict(cfg))

    @classmethod
    def of_training(cls, cfg: ExperimentConfig, teacher: Teacher, student: dict[str, Any],
                    history: list[dict[str, Any]], complete: bool) -> RunResults:
        """A training job's results from its evaluations: the last one as ``metrics``, the mean of the last
        ``train.average_last`` as the headline (``metrics_last_avg``), the training phase done or not."""
        metrics = {k: v for k, v in history[-1].items() if k not in ("epoch", "step")} if history else {}
        results = cls.start("train", cfg, cfg.name, str(cfg.run_dir), teacher, student, metrics)
        results.phase("train", complete)
        results.history = history
        tail = history[-cfg.train.average_last :]
        results.metrics_last_avg = average_metrics(tail) if tail else {}
        results.averaged_over = len(tail)
        return results

    def phase(self, name: str, done: bool) -> None:
        """Mark a phase the run was asked for (``train``, ``analysis``) done or missing: a run is complete only
        when none is missing, and ``missing_phases`` says which are."""
        self.missing_phases = [p for p in self.missing_phases if p != name] + ([] if done else [name])
        self.complete = not self.missing_phases

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
