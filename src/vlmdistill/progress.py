"""The console: progress and messages on stderr, results and tables on stdout.

On a terminal, long loops show a rich progress bar. In a log file or a pipe (a cluster job, ``| tee``)
there is no bar: loops print plain lines instead, and nothing is wrapped or cut to 80 columns, so
``vlmdistill compare runs/* > table.md`` gives the whole table.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 100_000)


def interactive() -> bool:
    """Whether stderr is a terminal that can redraw a progress bar."""
    return console.is_terminal


class LogProgress:
    """The progress bar's interface for logs and pipes: one plain line per task at most every ``every``
    seconds, and one when it completes."""

    def __init__(self, enabled: bool, every: float = 60.0) -> None:
        self.enabled, self.every = enabled, every
        self.tasks: dict[int, dict[str, Any]] = {}

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        self.tasks[len(self.tasks)] = {"description": description, "total": total, "completed": completed,
                                       "info": fields.get("info", ""), "start": time.monotonic(), "last": 0.0}
        return len(self.tasks) - 1

    def update(self, task_id: int, *, advance: float = 0, completed: float | None = None, info: str | None = None,
               **_: Any) -> None:
        t = self.tasks[task_id]
        t["completed"] = completed if completed is not None else t["completed"] + advance
        t["info"] = info if info is not None else t["info"]
        now, done = time.monotonic(), t["total"] is not None and t["completed"] >= t["total"]
        if self.enabled and (done or now - t["last"] >= self.every) and not t.get("finished"):
            t["last"], t["finished"] = now, done
            total = f"/{t['total']:.0f}" if t["total"] is not None else ""
            console.print(f"{t['description']}: {t['completed']:.0f}{total} {t['info']} "
                          f"{now - t['start']:.0f}s", highlight=False)


def make_progress(enabled: bool = True, plain_lines: bool = True) -> Progress | LogProgress:
    """A progress bar on a terminal; elsewhere plain lines (``plain_lines``) or nothing."""
    if not interactive():
        return LogProgress(enabled and plain_lines)
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not enabled,
        transient=False,
    )
