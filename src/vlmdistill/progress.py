"""The console: progress and messages on stderr, results and tables on stdout.

On a terminal, long loops show a rich progress bar. In a log file or a pipe (a cluster job, ``| tee``)
there is no bar: loops print plain lines instead, and nothing is wrapped or cut to 80 columns, so
``vlmdistill compare runs/* > table.md`` gives the whole table.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 100_000)


def interactive() -> bool:
    """Whether stderr is a terminal that can redraw a progress bar."""
    return console.is_terminal


def make_progress(enabled: bool = True) -> Progress:
    """A progress bar, shown only on a terminal (callers print plain lines elsewhere)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        disable=not (enabled and interactive()),
        transient=False,
    )
