"""Comparison tables over runs' results.json: on screen (rich), as Markdown and as CSV."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from rich.table import Table

from vlmdistill.errors import VlmdistillError
from vlmdistill.results import METRICS, ML_KEYS, metric_value

COLUMNS = ("id", "ood", "ood_last", "ood_acc1", "ood_5shot_finetune", "gzsl_h", "m_rel_train", "m_rel_ood",
           "m_neigh5_ood", "m_vlalign3_ood", "mse_ood", *ML_KEYS)
"""The keys of ``results.METRICS`` a comparison shows (only those that at least one run has: multi-label runs
show Table 12's columns, single-label runs the others)."""


class ReportError(VlmdistillError, ValueError):
    pass


def load_results(run_dirs: list[Path]) -> list[dict[str, Any]]:
    out = []
    for d in run_dirs:
        path = Path(d) / "results.json" if Path(d).is_dir() else Path(d)
        if not path.is_file():
            raise ReportError(f"{path} does not exist; is {d} a run directory?")
        try:
            out.append(json.loads(path.read_text()))
        except json.JSONDecodeError as err:
            raise ReportError(f"{path} is not valid JSON ({err}); the run may have been interrupted") from err
    return out


_BY_LABEL = {m.label: m for m in METRICS.values()}


def _fmt(v: Any, column: str = "") -> str:
    """A value in the one format of its column's metric (percentages .1f, analysis metrics .3f)."""
    if v is None:
        return "NA"
    if isinstance(v, float):
        metric = _BY_LABEL.get(column)
        return metric.format(v) if metric else f"{v:.3f}"
    return str(v)


def comparison_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Only the columns that at least one run has."""
    cols = [key for key in COLUMNS if any(metric_value(r, key) is not None for r in results)]
    header = ["run", *[METRICS[key].label for key in cols]]
    rows = [[r.get("run", "?"), *[metric_value(r, key) for key in cols]] for r in results]
    return header, rows


def rich_table(header: list[str], rows: list[list[Any]], title: str = "") -> Table:
    table = Table(title=title or None)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[_fmt(v, h) for v, h in zip(row, header, strict=True)])
    return table


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v, h) for v, h in zip(row, header, strict=True)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(header: list[str], rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue()
