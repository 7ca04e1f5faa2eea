"""The resumable answer cache of ``vlmdistill describe``: an append-only JSONL file, one answer a line."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlmdistill.io import append_line, end_last_line

log = logging.getLogger(__name__)


class AnswerCache:
    """Append-only JSONL of answers keyed by (name, prompt_id, model), tolerant of a run killed mid-write."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self, prompt_id: str, model: str) -> dict[str, str]:
        if not self.path.exists():
            return {}
        found: dict[str, str] = {}
        for number, line in enumerate(self.path.read_bytes().splitlines(), 1):
            record = _parse_record(line)
            if record is None:
                if line.strip():
                    log.warning("ignoring unreadable line %d of %s (left by a killed run?)", number, self.path)
                continue
            if record["prompt_id"] == prompt_id and record["model"] == model:
                found[record["name"]] = record["description"]
        return found

    def repair(self) -> None:
        """Drop a partial last line (or end a whole one), so new records start on their own line."""
        end_last_line(self.path, lambda line: _parse_record(line) is not None)

    def add(self, record: dict[str, str]) -> None:
        append_line(self.path, json.dumps(record, ensure_ascii=False))


def _parse_record(line: bytes) -> dict[str, str] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    keys = ("name", "prompt_id", "model", "description")
    if not isinstance(record, dict) or not all(isinstance(record.get(key), str) for key in keys):
        return None
    return record
