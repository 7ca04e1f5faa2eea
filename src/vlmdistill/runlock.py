"""One writer per run folder: ``<run>/run.lock``, held with ``flock`` for as long as a job writes the run.

The kernel drops an ``flock`` when its process dies, however it dies, so a killed run never leaves a
stale lock behind; the file itself stays (deleting it would race with the next taker) and only tells a
refused second writer who holds it. Taking the same run's lock again in the same process is allowed
(nested jobs), counted, and released with the outermost. Under torchrun DDP only rank 0 takes it: the
other ranks of the same job write nothing into the run folder.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from vlmdistill import distributed
from vlmdistill.errors import RunError

LOCK_FILE = "run.lock"
_HELD: dict[str, list[int]] = {}  # resolved lock path -> [fd, depth] of the locks this process holds


class RunLockedError(RunError):
    """Another live process is writing this run folder."""


def _holder(path: Path) -> dict[str, object]:
    """What the holder wrote into the lock file; it may not have written it yet, so look a few times."""
    for _ in range(20):
        try:
            info = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(info, dict) and "pid" in info:
                return info
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {"pid": "unknown", "started": "unknown"}


@contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold ``<run_dir>/run.lock`` for the block, or refuse at once with the holder's PID."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    key = str(path.resolve())
    if not distributed.is_main():
        yield path
        return
    if key in _HELD:
        _HELD[key][1] += 1
        try:
            yield path
        finally:
            _HELD[key][1] -= 1
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        info = _holder(path)
        raise RunLockedError(
            f"run {run_dir} is being written by PID {info.get('pid')} on {info.get('host', 'this host')} "
            f"(started {info.get('started')}); wait for it or use another name") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n")
        _HELD[key] = [fd, 1]
        yield path
    finally:
        _HELD.pop(key, None)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
