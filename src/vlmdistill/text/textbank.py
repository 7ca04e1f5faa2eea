"""Teacher text embeddings of a list of prompts, computed once and cached on disk.

The cache file is named by a digest of the teacher id and the exact prompt texts, and the file's own
metadata repeats both: another teacher or other prompts can never be served from it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open

from vlmdistill.io import atomic_save_tensors, load_tensors, sha256_strings
from vlmdistill.teachers.base import Teacher

log = logging.getLogger(__name__)


def text_cache_path(cache_dir: Path, teacher_id: str, texts: list[str]) -> tuple[Path, str]:
    digest = sha256_strings([teacher_id, *texts])
    return Path(cache_dir) / "text" / f"{digest[:32]}.safetensors", digest


def _cached(path: Path, digest: str) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("digest") != digest:
                log.warning("text cache %s was made for other prompts or another teacher; rebuilding", path)
                return None
        return load_tensors(path)["embeddings"]
    except (SafetensorError, OSError, KeyError) as err:
        log.warning("text cache %s is unreadable (%s); rebuilding", path, err)
        return None


def embed_texts(teacher: Teacher, texts: list[str], cache_dir: Path) -> torch.Tensor:
    """Unit-norm text embeddings [len(texts), D], from the cache when this teacher already made them."""
    path, digest = text_cache_path(cache_dir, teacher.id, texts)
    emb = _cached(path, digest)
    if emb is None:
        too_long = [t for t in texts if teacher.count_tokens(t) > teacher.context_length]
        if too_long:
            log.warning(
                "%d of %d prompts exceed the teacher's %d-token context and are truncated (e.g. %r)",
                len(too_long), len(texts), teacher.context_length, too_long[0][:80],
            )
        emb = F.normalize(teacher.encode_texts(texts), dim=-1).cpu()
        atomic_save_tensors(path, {"embeddings": emb}, {"digest": digest, "teacher_id": teacher.id})
    return emb
