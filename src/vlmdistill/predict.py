"""``vlmdistill predict``: the top-k classes of images and folders of images, by a distilled student.

An unreadable image gets a row of its own with the reason, and every other image is still predicted:
one bad file in a folder of thousands must not cost the rest. What can be checked before the work is:
an input path that does not exist, an output file of an unknown kind, the class names and ``top_k``.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from vlmdistill import inputs as checks
from vlmdistill.api import DistilledModel
from vlmdistill.data.dataset import IMAGE_EXTENSIONS
from vlmdistill.errors import VlmdistillError
from vlmdistill.io import atomic_write_text

log = logging.getLogger(__name__)

OUTPUT_KINDS = {".jsonl": "jsonl", ".csv": "csv"}


class PredictError(VlmdistillError, ValueError):
    """Nothing to predict, or an output file of an unknown kind."""


@dataclass
class Prediction:
    """One image: its top-k labels and probabilities, best first, or why it could not be read."""

    path: str
    labels: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    error: str | None = None


def output_kind(out: Path) -> str:
    """``jsonl`` or ``csv`` from the file name, checked before any image is read."""
    kind = OUTPUT_KINDS.get(Path(out).suffix.lower())
    if kind is None:
        raise PredictError(f"--out {out}: give a file ending in .jsonl or .csv")
    return kind


def _folder_images(folder: Path) -> list[Path]:
    """Files with an image extension, and links of that name that lead nowhere (broken or looping), which
    get a row saying so instead of vanishing; anything else (fifos, other extensions) is not an image."""
    found = (p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    return sorted(p for p in found if p.is_file() or (p.is_symlink() and not p.exists()))


def collect_images(inputs: Sequence[Path]) -> list[Path]:
    """Files as given and the images inside folders, each once (the first time it is met), in input order.
    An input that does not exist at all stops everything before any work: it is a typo, not a bad image."""
    missing = [str(p) for p in map(Path, inputs) if not os.path.lexists(p)]
    if missing:
        raise PredictError(f"input {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} does not exist: "
                           "check the path (nothing was predicted)")
    paths: dict[str, Path] = {}
    met = 0
    for item in map(Path, inputs):
        for p in _folder_images(item) if item.is_dir() else [item]:
            paths.setdefault(os.path.abspath(p), p)
            met += 1
    if met > len(paths):
        log.warning("%d images were given more than once (the same file or folder twice); each is predicted once",
                    met - len(paths))
    return list(paths.values())


def _reason(err: VlmdistillError) -> str:
    cause = err.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(err)


def predict(model: DistilledModel, inputs: Sequence[Path], class_names: Sequence[str] | None = None,
            top_k: int = 5, batch_size: int = 32, descriptions: Sequence[str | None] | None = None
            ) -> list[Prediction]:
    """Rows in input order; ``class_names`` None scores the model's stored classes. ``descriptions`` (one per
    class name) are used when the run was trained with them."""
    k = checks.top_k(top_k)
    names = checks.class_names(class_names) if class_names is not None else model.class_names
    paths = collect_images(inputs)
    if not paths:
        raise PredictError(f"no images in {', '.join(map(str, inputs))} "
                           f"(looked for {', '.join(sorted(IMAGE_EXTENSIONS))})")
    w = model.class_embeddings(names if class_names is not None else None, descriptions)
    k = min(k, len(names))
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
    """``jsonl``: one object a line; ``csv``: path, label_1, score_1, ..., error (one row an image).

    A file name that is not UTF-8 stays the file's own name: JSON escapes its bytes (``\\udcff``, which
    ``json.loads`` and ``open`` turn back into the same file), and the CSV is written with them as they are."""
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
    atomic_write_text(out, format_rows(rows, output_kind(out)), errors="surrogateescape")
