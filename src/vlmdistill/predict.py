"""``vlmdistill predict``: the top-k classes of images and folders of images, by a distilled student.

An unreadable image gets a row of its own with the reason, and every other image is still predicted:
one bad file in a folder of thousands must not cost the rest.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vlmdistill.api import DistilledModel
from vlmdistill.data.dataset import IMAGE_EXTENSIONS
from vlmdistill.errors import VlmdistillError
from vlmdistill.io import atomic_write_text


class PredictError(VlmdistillError, ValueError):
    """Nothing to predict, or an output file of an unknown kind."""


@dataclass
class Prediction:
    """One image: its top-k labels and probabilities, best first, or why it could not be read."""

    path: str
    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    error: str | None = None


def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """Files as given (a missing one is reported later, not skipped) and the images inside folders."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            paths.append(item)
    return paths


def _reason(err: VlmdistillError) -> str:
    cause = err.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(err)


def predict(model: DistilledModel, inputs: Sequence[Path], class_names: Sequence[str] | None = None,
            top_k: int = 5, batch_size: int = 32) -> list[Prediction]:
    """Rows in input order; ``class_names`` None scores the model's stored classes."""
    paths = collect_images(inputs)
    if not paths:
        raise PredictError(f"no images in {', '.join(map(str, inputs))} "
                           f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    names = list(class_names) if class_names is not None else model.class_names
    w = model.class_embeddings(class_names)
    k = min(top_k, len(names))
    rows: list[Prediction] = []
    for start in range(0, len(paths), batch_size):
        chunk = [Prediction(str(p)) for p in paths[start:start + batch_size]]
        pixels, good = [], []
        for row in chunk:
            try:
                pixels.append(model.transform(row.path))
                good.append(row)
            except VlmdistillError as err:
                row.error = _reason(err)
        if good:
            probs = model.probabilities(model.encode_image(torch.stack(pixels)), w)
            top = probs.topk(k, dim=1)
            for row, ps, ix in zip(good, top.values.tolist(), top.indices.tolist(), strict=True):
                row.labels, row.scores = [names[i] for i in ix], [round(p, 6) for p in ps]
        rows += chunk
    return rows


def format_rows(rows: Sequence[Prediction], kind: str) -> str:
    """``jsonl``: one object a line; ``csv``: path, label_1, score_1, ..., error (one row an image)."""
    if kind == "jsonl":
        return "".join(json.dumps({k: v for k, v in asdict(r).items() if v is not None or k == "error"}) + "\n"
                       for r in rows)
    k = max((len(r.labels) for r in rows), default=0)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", *[f"{c}_{i}" for i in range(1, k + 1) for c in ("label", "score")], "error"])
    for r in rows:
        cells = [v for pair in zip(r.labels, r.scores, strict=True) for v in pair]
        writer.writerow([r.path, *cells, *[""] * (2 * k - len(cells)), r.error or ""])
    return buf.getvalue()


def write_predictions(rows: Sequence[Prediction], out: Path) -> None:
    kind = {".jsonl": "jsonl", ".csv": "csv"}.get(Path(out).suffix.lower())
    if kind is None:
        raise PredictError(f"--out {out}: give a .jsonl or .csv file")
    atomic_write_text(out, format_rows(rows, kind))
