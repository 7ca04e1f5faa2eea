"""The teacher's text tower inside a model folder (``text/``), so that new class names can be embedded on any
machine, from any directory, with no teacher download and no path outside the folder.

Only the text side of the teacher is kept; its image tower is swapped for a tiny placeholder so the folder
stays a model its own library loads as it is:

- an open_clip teacher: ``open_clip_config.json`` (the teacher's model config with ``PLACEHOLDER_VISION``) and
  ``open_clip_model.safetensors`` (text weights, placeholder image weights, logit scale). A Hugging Face text
  tower inside it (open_clip's ``hf_model_name``) adds its ``config.json`` and tokenizer files, and the config
  names it by hub id, never by path: ``open_text_tower`` points open_clip at the folder wherever it now is.
- a Hugging Face ``CLIPModel``: a ``save_pretrained`` folder whose ``vision_config`` is the placeholder.

``save_text_tower`` checks the saved tower against the teacher on the given texts before it returns.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import open_clip
import torch

from vlmdistill.config import TeacherConfig
from vlmdistill.errors import VlmdistillError
from vlmdistill.io import atomic_save_tensors, atomic_write_json, read_json
from vlmdistill.teachers import Teacher, load_teacher

TEXT_DIR = "text"
OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS = "open_clip_config.json", "open_clip_model.safetensors"
PLACEHOLDER_VISION = {"image_size": 16, "layers": 1, "width": 32, "head_width": 32, "patch_size": 16}
PARITY_TOLERANCE = 1e-4


class TextTowerError(VlmdistillError, RuntimeError):
    """A text tower that cannot be saved or opened; the message names the folder and the fix."""


def portable_hf_name(text_cfg: dict[str, Any]) -> str:
    """The hub id of an open_clip config's Hugging Face text tower: its ``hf_model_name`` when that is not a
    local path, else the id the local folder's ``config.json`` records (``_name_or_path``); "." when neither is
    known (then only a loader that points it at the folder, as ``open_text_tower`` does, can build it)."""
    name = str(text_cfg.get("hf_model_name", ""))
    local = Path(name)
    if name and not local.exists():
        return name
    try:
        recorded = str(read_json(local / "config.json").get("_name_or_path") or "")
    except (OSError, ValueError, AttributeError):
        recorded = ""
    return recorded if recorded and not Path(recorded).exists() else "."


def save_hf_text_files(teacher: Any, folder: Path) -> None:
    """An open_clip teacher's Hugging Face text config and tokenizer files into ``folder``."""
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        teacher.model.text.transformer.config.save_pretrained(tmp)
        teacher.tokenizer.tokenizer.save_pretrained(tmp)
        for f in Path(tmp).iterdir():
            os.replace(f, folder / f.name)


def text_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every weight of an open_clip model but its image tower's."""
    return {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}


def _save_open_clip(teacher: Any, folder: Path) -> None:
    model_cfg = copy.deepcopy(teacher.model_cfg)
    model_cfg["vision_cfg"] = dict(PLACEHOLDER_VISION)
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        save_hf_text_files(teacher, folder)
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = portable_hf_name(text_cfg)
    atomic_write_json(folder / OPEN_CLIP_CONFIG, {"model_cfg": model_cfg})
    with _registered(folder) as path:
        placeholder = open_clip.create_model(path.stem, pretrained_text=False)
    state = {k: v for k, v in placeholder.state_dict().items() if k.startswith("visual.")}
    state.update(text_state(teacher.model))
    atomic_save_tensors(folder / OPEN_CLIP_WEIGHTS, state)


def _save_hf(teacher: Any, folder: Path) -> None:
    from transformers import CLIPModel, CLIPVisionConfig

    config = copy.deepcopy(teacher.model.config)
    config.vision_config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                            num_attention_heads=2, image_size=16, patch_size=16)
    placeholder = CLIPModel(config)
    own = {k: v for k, v in teacher.model.state_dict().items() if not k.startswith(("vision_model.", "visual_"))}
    placeholder.load_state_dict(own, strict=False)
    placeholder.save_pretrained(str(folder), safe_serialization=True)
    teacher.tokenizer.save_pretrained(str(folder))


@contextmanager
def _registered(folder: Path) -> Iterator[Path]:
    """``folder``'s open_clip config, its Hugging Face names pointed at the folder itself, as a config file that
    open_clip has registered (by file name, in one global table: the name says which folder it is)."""
    model_cfg = read_json(folder / OPEN_CLIP_CONFIG)["model_cfg"]
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = str(folder.resolve())
    blob = json.dumps(model_cfg, sort_keys=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"vlmdistill-text-{hashlib.sha256(blob.encode()).hexdigest()[:16]}.json"
        path.write_text(blob, encoding="utf-8")
        open_clip.add_model_config(path)
        yield path


def save_text_tower(teacher: Teacher, folder: Path, texts: list[str]) -> float:
    """The teacher's text tower into ``folder`` (created); returns the largest difference between the saved
    tower's and the teacher's embeddings of ``texts`` (refused above ``PARITY_TOLERANCE``)."""
    folder.mkdir(parents=True, exist_ok=True)
    if hasattr(teacher, "model_cfg"):
        _save_open_clip(teacher, folder)
    else:
        _save_hf(teacher, folder)
    saved = open_text_tower(folder, "cpu")
    with torch.no_grad():
        diff = float((saved.encode_texts(texts) - teacher.encode_texts(texts).cpu()).abs().max()) if texts else 0.0
    if diff > PARITY_TOLERANCE:
        raise TextTowerError(f"the text tower saved in {folder} embeds differently from the teacher (max difference "
                             f"{diff:.2e} > {PARITY_TOLERANCE}); export with --no-text-tower to ship the class "
                             "embeddings alone")
    return diff


def open_text_tower(folder: Path, device: str = "cpu") -> Teacher:
    """The text tower ``save_text_tower`` wrote, as a teacher (its image side is a placeholder: never use it)."""
    folder = Path(folder)
    try:
        if (folder / OPEN_CLIP_CONFIG).is_file():
            with _registered(folder) as path:
                return load_teacher(TeacherConfig(backend="open_clip", model_config=path,
                                                  checkpoint=folder / OPEN_CLIP_WEIGHTS, device=device))
        return load_teacher(TeacherConfig(backend="hf", name=str(folder), device=device))
    except VlmdistillError as err:
        raise TextTowerError(f"the text tower in {folder} cannot be opened ({err}); export the model again") from err
