"""Multi-label image lists as CSV: ``path,labels[,split]``, labels separated by ``;``.

For users whose scenes are plain images rather than PickClutter h5 files. The header row is optional (a
first row reading ``path,labels`` or ``path,labels,split`` is taken as one). Paths are relative to the CSV's
folder unless absolute. Every problem names the file and line: an empty label, a missing image (or, with
``skip_missing``, the image is left out and listed in ``missing`` so the caller can count it), an unknown
split name, a row of the wrong width.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vlmdistill.errors import VlmdistillError

SPLITS = ("train", "val_on_train", "val")
LABEL_SEP = ";"
_HEADER = ("path", "labels", "split")


class MultiLabelCsvError(VlmdistillError, ValueError):
    """A CSV line that cannot be used; the message names the file, the line and the fix."""

    def __init__(self, path: Path, line: int, reason: str) -> None:
        self.path, self.line = Path(path), line
        where = f"{path}, line {line}" if line else str(path)
        super().__init__(f"{where}: {reason}. Fix: correct the file")


@dataclass(frozen=True)
class LabelledImage:
    """One image and the names of the objects it holds (in file order, duplicates dropped)."""

    path: Path
    labels: tuple[str, ...]
    split: str | None
    line: int


@dataclass(frozen=True)
class MultiLabelCsv:
    records: tuple[LabelledImage, ...]
    vocabulary: tuple[str, ...]
    missing: tuple[Path, ...]


def _is_header(row: list[str]) -> bool:
    cells = tuple(c.strip().lower() for c in row)
    return cells in (_HEADER[:2], _HEADER)


def _parse_row(path: Path, line: int, row: list[str], splits: Sequence[str]) -> LabelledImage:
    if len(row) not in (2, 3):
        raise MultiLabelCsvError(path, line, f"expected path,labels[,split], got {len(row)} fields")
    image = row[0].strip()
    if not image:
        raise MultiLabelCsvError(path, line, "empty image path")
    labels = [label.strip() for label in row[1].split(LABEL_SEP)]
    if not all(labels):
        raise MultiLabelCsvError(path, line, f"empty label in {row[1]!r} (labels are separated by '{LABEL_SEP}')")
    split = row[2].strip() if len(row) == 3 else None
    if split is not None and split not in splits:
        raise MultiLabelCsvError(path, line, f"unknown split {split!r}; expected one of {', '.join(splits)}")
    return LabelledImage(path.parent / image, tuple(dict.fromkeys(labels)), split, line)


def read_multilabel_csv(path: Path | str, splits: Sequence[str] = SPLITS, skip_missing: bool = False
                        ) -> MultiLabelCsv:
    """The file's images with their labels, and the sorted vocabulary of every label of the kept images."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as err:
        raise MultiLabelCsvError(path, 0, f"cannot read the file ({err})") from err
    reader = csv.reader(io.StringIO(text, newline=""))
    records, missing = [], []
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue
        if not records and not missing and _is_header(row):
            continue
        record = _parse_row(path, reader.line_num, row, splits)
        if record.path.is_file():
            records.append(record)
        elif skip_missing:
            missing.append(record.path)
        else:
            raise MultiLabelCsvError(path, reader.line_num, f"image {record.path} not found (or pass skip_missing=True "
                                                            "to leave such images out; they are listed in `missing`)")
    if not records and not missing:
        raise MultiLabelCsvError(path, 0, "no rows of path,labels[,split]")
    vocabulary = tuple(sorted({label for r in records for label in r.labels}))
    return MultiLabelCsv(tuple(records), vocabulary, tuple(missing))
