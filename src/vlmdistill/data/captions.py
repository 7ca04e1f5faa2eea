"""Per-image captions for L_cap: a JSONL (``{"path", "caption"}``) or CSV (``path,caption``) file.

Paths may name the prepared link (``train/<class>/<file>``), the original image, or just a unique
file name; every training image needs one caption.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from vlmdistill.data.dataset import Record
from vlmdistill.text.labels import LabelFileError


def read_captions(path: Path) -> dict[str, str]:
    """Caption by path key, as written in the file; a malformed line or empty caption is a user error."""
    path = Path(path)
    if not path.is_file():
        raise LabelFileError(f"caption file {path} does not exist")
    out: dict[str, str] = {}
    if path.suffix.lower() == ".jsonl":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                out[str(row["path"])] = str(row["caption"]).strip()
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise LabelFileError(f"{path}:{n}: expected {{\"path\": ..., \"caption\": ...}} ({err})") from err
    else:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"path", "caption"} <= set(reader.fieldnames):
                raise LabelFileError(f"{path} needs a header with columns 'path,caption'")
            out = {row["path"]: (row["caption"] or "").strip() for row in reader}
    empty = [p for p, c in out.items() if not c]
    if empty:
        raise LabelFileError(f"{path}: empty captions for {empty[:3]}")
    return out


def captions_for(records: list[Record], captions: dict[str, str], source: Path) -> list[str]:
    """One caption per record, matched by key, by resolved path, or by unique file name."""
    by_resolved = {str(Path(p).resolve()): c for p, c in captions.items() if Path(p).is_absolute()}
    by_name: dict[str, list[str]] = {}
    for p, c in captions.items():
        by_name.setdefault(Path(p).name, []).append(c)
    out, missing = [], []
    for r in records:
        cap = captions.get(r.key) or by_resolved.get(str(r.path.resolve()))
        if cap is None and len(by_name.get(r.path.name, [])) == 1:
            cap = by_name[r.path.name][0]
        if cap is None:
            missing.append(r.key)
        out.append(cap or "")
    if missing:
        raise LabelFileError(
            f"{len(missing)} training images have no caption in {source} (first: {missing[0]}); "
            "add a line for each, keyed by its path"
        )
    return out
