"""A trained multi-label student as a ready model: load (a run or a model folder), export, and say which
objects a scene holds, for any object names.

A model folder of a multi-label run holds ``student.safetensors`` (student, head and the ASL score bias in one
state dict, with the student's ``ModelMeta``), ``config.yaml`` (what the model needs of the run's config: student,
cameras and channels, head, prompts, bias mode; no path), ``model.onnx`` (stacked pixels -> embedding,
P(present) and the shifted decision scores of the stored names; present where score > 0.5), ``text/`` (the
teacher's text tower, for new names) and ``manifest.json``. Scenes are stacked exactly as in training:
PickClutter h5 scenes with the run's cameras and channels, or RGB images for a 3-channel student.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from vlmdistill.config import ExperimentConfig, config_to_dict, load_config
from vlmdistill.data.multilabel_set import is_multilabel, open_multilabel
from vlmdistill.data.scenes import SceneItem, read_scene
from vlmdistill.data.views import Views, render
from vlmdistill.errors import VlmdistillError
from vlmdistill.io import (
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_text,
    read_json,
    replace_dir,
)
from vlmdistill.mltask import input_kinds, scene_layout
from vlmdistill.multilabel.h5scenes import index_scenes
from vlmdistill.multilabel.heads import DualPromptHead
from vlmdistill.multilabel.loss import AsymmetricLoss
from vlmdistill.multilabel.model import MultiLabelModel, Text, build_model, object_texts
from vlmdistill.onnx_export import ONNX_OPSET, export_checked
from vlmdistill.runfolder import ModelMeta, RunFolder, read_tensors
from vlmdistill.teachers import load_teacher
from vlmdistill.texttower import TEXT_DIR, open_text_tower, save_text_tower

FORMAT = "vlmdistill-multilabel/1"
MANIFEST, WEIGHTS, CONFIG, ONNX = "manifest.json", "student.safetensors", "config.yaml", "model.onnx"


class MultiLabelModelError(VlmdistillError, ValueError):
    """A scene, name or folder a multi-label model cannot use; the message says what to give instead."""


@dataclass(frozen=True)
class Detection:
    """One object name's verdict on one scene."""

    name: str
    probability: float
    present: bool


class MultiLabelDistilled:
    """The multi-label student with its preprocessing and text side. ``detect`` lists, per scene, every name
    with P(present) and the decision (present where P shifted by the learned bias exceeds 0.5)."""

    def __init__(self, model: MultiLabelModel, cfg: ExperimentConfig, teacher: Any, source: Path,
                 names: Sequence[str]) -> None:
        self.model = model.eval().requires_grad_(False)
        self.cfg, self.teacher, self.source, self.names = cfg, teacher, Path(source), list(names)

    @property
    def in_chans(self) -> int:
        return self.model.student.in_chans

    def scene_pixels(self, scenes: Sequence[str | Path | torch.Tensor]) -> tuple[list[str], torch.Tensor]:
        """Each input's scenes (an h5 file: every scene; an image file; a float [C, H, W] tensor in [0, 1]) as
        [B, C, S, S] eval views, with a label per scene (``file#scene`` for h5 scenes)."""
        labels, stacked = [], []
        for x in scenes:
            for label, item in _items(x):
                t = x if item is None else read_scene(item, scene_layout(self.cfg), self.cfg.data.base_size)
                stacked.append(t.float())
                labels.append(label)
        channels = {int(t.shape[0]) for t in stacked}
        if channels != {self.in_chans}:
            raise MultiLabelModelError(f"the student takes {self.in_chans} stacked channels (cameras "
                                       f"{list(self.cfg.data.cameras)} x {list(self.cfg.data.channels)}), got scenes "
                                       f"of {sorted(channels)}: give h5 scenes (or RGB images for a 3-channel student)")
        size = {tuple(t.shape[1:]) for t in stacked}
        if len(size) > 1:
            raise MultiLabelModelError(f"scene tensors differ in size {sorted(size)}: give one size")
        views = Views.center(len(stacked), self.cfg.data.eval_crop)
        return labels, render(torch.stack(stacked), views, self.cfg.student.image_size)

    @torch.no_grad()
    def text(self, names: Sequence[str], descriptions: Sequence[str] | None = None) -> Text:
        """The head's text side of any object names (through the teacher's text tower)."""
        if not names or any(not str(n).strip() for n in names):
            raise MultiLabelModelError("give at least one non-empty object name")
        if isinstance(self.model.head, DualPromptHead):
            return self.model.text_embeddings(list(names), descriptions)
        desc = dict(zip(names, descriptions, strict=True)) if descriptions else None
        return F.normalize(self.teacher.encode_texts(object_texts(self.cfg, names, desc)).float(), dim=-1)

    @torch.no_grad()
    def probabilities(self, pixels: torch.Tensor, names: Sequence[str] | None = None) -> torch.Tensor:
        """P(present) [B, K] of stacked eval pixels for ``names`` (the stored names when None)."""
        return self.model(pixels, self.text(names or self.names))[1]

    def detect(self, scenes: Sequence[str | Path | torch.Tensor], names: Sequence[str] | None = None
               ) -> list[tuple[str, list[Detection]]]:
        """Per scene, its label and every name's detection, most probable first."""
        labels, pixels = self.scene_pixels(scenes)
        names = list(names or self.names)
        prob = self.probabilities(pixels, names)
        present = self.model.present(prob)
        return [(label, sorted((Detection(n, float(p), bool(d)) for n, p, d in zip(names, ps, ds, strict=True)),
                               key=lambda det: -det.probability))
                for label, ps, ds in zip(labels, prob, present, strict=True)]


def _items(x: str | Path | torch.Tensor) -> list[tuple[str, SceneItem | None]]:
    if isinstance(x, torch.Tensor):
        if x.ndim != 3 or not x.is_floating_point():
            raise MultiLabelModelError(f"a scene tensor must be float [C, H, W] in [0, 1], got {x.dtype} "
                                       f"{list(x.shape)}")
        return [("tensor", None)]
    path = Path(x)
    if path.suffix.lower() in (".h5", ".hdf5"):
        return [(f"{path}#{r.key}", SceneItem(path, r.key, r.objects, r.key)) for r in index_scenes(path).records]
    return [(str(path), SceneItem(path, None, (), str(path)))]


def _assemble(cfg: ExperimentConfig, teacher: Any, weights: dict[str, torch.Tensor], names: Sequence[str],
              kinds: Sequence[str], source: Path) -> MultiLabelDistilled:
    """The model of ``cfg`` over its construction ``names`` with ``weights`` loaded (nothing computed)."""
    a = cfg.loss.asl
    asl = AsymmetricLoss(a.gamma_neg, a.gamma_pos, a.clip, bias_mode=a.bias_mode)
    model = build_model(cfg, teacher, kinds, names, None, asl, torch.zeros(len(names), teacher.embed_dim))
    model.load_state_dict(weights)
    return MultiLabelDistilled(model, cfg, teacher, source, [*names])


def is_multilabel_model(path: str | Path) -> bool:
    """A multi-label model folder, or a run trained on multi-label data."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return read_json(path / MANIFEST).get("format") == FORMAT
    folder = RunFolder(path)
    return folder.is_run() and is_multilabel(folder.config().data.dir)


def detections_json(rows: list[tuple[str, list[Detection]]]) -> str:
    """One JSON line per scene: the present objects (most probable first) and every name's probability."""
    import json

    return "".join(json.dumps({"scene": label, "present": [[d.name, round(d.probability, 4)] for d in dets
                                                            if d.present],
                               "probabilities": {d.name: round(d.probability, 4) for d in dets}}) + "\n"
                   for label, dets in rows)


def load_multilabel(path: str | Path) -> MultiLabelDistilled:
    """A multi-label run directory or its model folder (``export_multilabel``), on CPU."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        manifest = read_json(path / MANIFEST)
        if manifest.get("format") != FORMAT:
            raise MultiLabelModelError(f"{path / MANIFEST} is not a {FORMAT} manifest; export the run again")
        cfg = load_config(path / CONFIG)
        teacher = open_text_tower(path / TEXT_DIR)
        model = _assemble(cfg, teacher, read_tensors(path / WEIGHTS), manifest["train_names"], manifest["kinds"],
                          path)
        model.names = manifest["names"]
        return model
    folder = RunFolder(path)
    cfg = folder.config()
    ds = open_multilabel(cfg.data.dir)
    teacher = load_teacher(cfg.teacher.model_copy(update={"device": "cpu"}))
    saved = folder.student(ModelMeta.expected(cfg, teacher.id, teacher.embed_dim))
    model = _assemble(cfg, teacher, saved.weights, ds.id_objects, input_kinds(cfg, ds), path)
    model.names = list(ds.objects)
    return model


class OnnxMultiLabel(nn.Module):
    """Stacked pixels -> (unit embedding, P(present), decision scores) for fixed names' text."""

    def __init__(self, model: MultiLabelModel, text: Text) -> None:
        super().__init__()
        self.model = model
        self.dual = isinstance(text, tuple)
        for i, t in enumerate(text if self.dual else (text,)):
            self.register_buffer(f"text{i}", t.detach().float().clone())

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        text = (self.text0, self.text1) if self.dual else self.text0
        emb, prob = self.model(pixels, text)
        return F.normalize(emb, dim=-1), prob, self.model.asl.decision_scores(prob)


def write_onnx(model: MultiLabelDistilled, path: Path) -> float:
    """``model.onnx`` for the stored names; returns onnxruntime's max abs difference from PyTorch."""
    head = OnnxMultiLabel(model.model, model.text(model.names))
    s = model.cfg.student.image_size
    return export_checked(head, (model.in_chans, s, s), path, ["embedding", "probability", "score"])


def portable_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a multi-label model folder needs of the run's config, with no path in it."""
    full = config_to_dict(cfg)
    data = {k: full["data"][k] for k in ("base_size", "eval_crop", "cameras", "channels", "teacher_camera",
                                         "depth_max")}
    text = {k: v for k, v in full["text"].items() if k not in ("descriptions", "captions")}
    t = full["teacher"]
    return {"name": cfg.name, "mode": cfg.mode, "seed": cfg.seed,
            "teacher": {k: t[k] for k in ("backend", "name", "pretrained", "precision")},
            "student": full["student"], "data": data, "text": text, "multilabel": full["multilabel"],
            "loss": {"temperature": cfg.loss.temperature, "cls": {"weight": 0.0}, "asl": full["loss"]["asl"]}}


def export_multilabel(run_dir: Path, out: Path) -> dict[str, Any]:
    """Write the model folder ``out`` of the multi-label run ``run_dir`` (replaced whole)."""
    model = load_multilabel(run_dir)
    cfg = model.cfg
    kinds = input_kinds(cfg, open_multilabel(cfg.data.dir))
    with replace_dir(Path(out)) as tmp:
        meta = ModelMeta.of(cfg, model.model.student, model.teacher.id).to_strings()
        atomic_save_tensors(tmp / WEIGHTS, model.model.state_dict(), meta)
        atomic_write_text(tmp / CONFIG, yaml.safe_dump(portable_config(cfg), sort_keys=False))
        diff = write_onnx(model, tmp / ONNX)
        tower = save_text_tower(model.teacher, tmp / TEXT_DIR, object_texts(cfg, model.names, None))
        manifest = {"format": FORMAT, "source_run": Path(run_dir).resolve().name, "kinds": kinds,
                    "train_names": list(model.model.names), "names": model.names,
                    "onnx": {"file": ONNX, "opset": ONNX_OPSET, "parity_max_abs_diff": diff,
                             "input": f"pixels float32 [B, {model.in_chans}, S, S]: cameras x channels in [0, 1]",
                             "outputs": {"embedding": "unit [B, D]", "probability": "P(present) [B, K]",
                                         "score": "P shifted by the learned bias; present where > 0.5"}},
                    "text_tower": {"dir": TEXT_DIR, "parity_max_abs_diff": tower},
                    "results": {k: v for k, v in (RunFolder(run_dir).results() or {}).items()
                                if k in ("metrics", "metrics_last_avg", "fewshot")}}
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest
