"""Every file the toolkit writes goes through here, so a crash never leaves a half-written file behind.

Whole files are written beside their target and renamed over it (``atomic_*``); a folder built in
several steps is built aside and swapped in whole (``replace_dir``); an append-only log gets whole
lines only (``append_line``, with ``end_last_line`` to repair what a killed writer left).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from vlmdistill.errors import VlmdistillError


class DiskFullError(VlmdistillError):
    """No space (or quota) left while writing: says what, where, how much is free there, and (``then``, filled
    in by the job that knows) what is intact and what to do."""

    def __init__(self, what: str, where: Path, then: str = "") -> None:
        self.what, self.where, self.then, self.free = what, Path(where), then, free_space(where)
        super().__init__(what, str(where), then)

    def __str__(self) -> str:
        return (f"no space left on device writing {self.what} to {self.where} ({self.free} free)"
                + (f": {self.then}" if self.then else ""))


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def disk_full(err: BaseException) -> bool:
    """Whether ``err`` is a write that ran out of space: an ``OSError`` ENOSPC / EDQUOT, or safetensors'
    Rust I/O error, which carries only the OS error code in its text."""
    if isinstance(err, OSError):
        return err.errno in _NO_SPACE
    text = str(err)
    return any(f"os error {code})" in text or f"code: {code}," in text for code in _NO_SPACE)


def free_space(path: Path) -> str:
    """Free space on the disk holding ``path`` (or its nearest existing parent), e.g. ``12.0 MiB``."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.1f} MiB"
    except OSError:
        return "unknown"


@contextmanager
def out_of_space(what: str, where: Path, then: Callable[[], str] = lambda: "") -> Iterator[None]:
    """Turn running out of disk space in the block into one ``DiskFullError`` line. ``then()`` says what is
    intact and what to do; it is called after the failed write was cleaned up. An inner ``out_of_space`` names
    the write more precisely and keeps its own; an outer one adds its ``then`` where the inner had none."""
    try:
        yield
    except DiskFullError as err:
        err.then = err.then or then()
        raise
    except Exception as err:
        if not disk_full(err):
            raise
        raise DiskFullError(what, where, then()) from None


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic(path: Path, write: Any) -> None:
    """Write to a temp file beside ``path``, then rename: readers see the old file or the new, never half.
    The temp file's private mode is widened to what a plain ``open`` would give."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with out_of_space(path.name, path.parent):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            write(Path(tmp))
            os.chmod(tmp, 0o666 & ~_UMASK)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: Path, text: str, errors: str = "strict") -> None:
    """UTF-8; ``errors="surrogateescape"`` writes file names that are not UTF-8 back as their own bytes."""
    _atomic(path, lambda tmp: tmp.write_bytes(text.encode("utf-8", errors)))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_save_image(path: Path, image: Any, **save_kwargs: Any) -> None:
    """A PIL image, in the format its file name says (the temp file's suffix must not decide it)."""
    from PIL import Image

    image_format = Image.registered_extensions()[Path(path).suffix.lower()]
    _atomic(path, lambda tmp: image.save(tmp, format=image_format, **save_kwargs))


def atomic_save_figure(path: Path, figure: Any, **savefig_kwargs: Any) -> None:
    """A matplotlib figure, in the format its file name says."""
    _atomic(path, lambda tmp: figure.savefig(tmp, format=Path(path).suffix.lstrip(".").lower(), **savefig_kwargs))


def append_line(path: Path, line: str) -> None:
    """Append one line and flush it, so a killed process loses at most the line it was writing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as handle:
        handle.write(line.rstrip("\n").encode("utf-8") + b"\n")
        handle.flush()
        os.fsync(handle.fileno())


def end_last_line(path: Path, complete: Callable[[bytes], bool]) -> None:
    """Make a line log end in a newline: a last line a killed writer cut short is dropped unless
    ``complete`` says it is whole (then only its newline was lost), so appends start on their own line."""
    path = Path(path)
    if not path.exists():
        return
    with path.open("rb+") as handle:
        data = handle.read()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            if complete(data[cut:]):
                handle.write(b"\n")
            else:
                handle.truncate(cut)


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's entries to disk (a rename is durable only once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replace_dir(path: Path) -> Iterator[Path]:
    """Yield a fresh folder beside ``path``; when the block ends without error it replaces ``path``.

    On error the new folder is removed and ``path`` keeps its old contents. Between the two renames that
    swap them ``path`` is briefly absent, never half-written. Every file in the new folder is fsync'ed
    before the swap, and the parent after it, so a power cut cannot leave a renamed folder of empty files.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".new"))
    try:
        yield new
        for entry in new.rglob("*"):
            fsync_path(entry)
        fsync_path(new)
        os.chmod(new, 0o777 & ~_UMASK)
        old = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.old"
        had_old = path.exists() or path.is_symlink()
        if had_old:
            os.rename(path, old)
        try:
            os.rename(new, path)
        except BaseException:
            if had_old:
                os.rename(old, path)
            raise
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        raise
    fsync_path(path.parent)
    if had_old and old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    elif had_old:
        old.unlink()


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors rather than pickle: loading a checkpoint must never execute code."""
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    _atomic(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def sha256_strings(parts: Iterable[str]) -> str:
    """A stable digest of an ordered list of strings (used for every cache key).

    File names that are not UTF-8 (Linux names are bytes) are hashed as their own bytes."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogateescape")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
