"""``vlmdistill export``: a run's student as a self-contained model folder, usable on another machine.

``student.safetensors`` (weights), ``classes.safetensors`` (unit-norm class text embeddings),
``config.yaml`` (what the model needs of the run's config: student, prompts, temperature, the teacher by
name; no training path), ``model.onnx`` (student + normalisation + cosine classifier head),
``prompt_context.safetensors`` (CoOp runs), ``text/`` (the teacher's text tower, ``texttower.py``; left out
with ``text_tower=False``) and, with ``open_clip=True``, an open_clip model folder in ``open_clip/``;
``manifest.json`` describes it all. No written file names a path outside the folder. The folder is built
aside and swapped in whole (``io.replace_dir``): an export that fails leaves the old folder, or none.
"""

from __future__ import annotations

import copy
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from vlmdistill.api import (
    CLASSES,
    CONFIG,
    CONTEXT,
    FORMAT,
    MANIFEST,
    ONNX,
    OPEN_CLIP_DIR,
    WEIGHTS,
    DistilledModel,
    load,
    read_classes,
)
from vlmdistill.clip_benchmark import open_clip_preprocess
from vlmdistill.config import ExperimentConfig, config_to_dict
from vlmdistill.errors import VlmdistillError
from vlmdistill.io import (
    atomic_save_tensors,
    atomic_write_json,
    atomic_write_text,
    out_of_space,
    replace_dir,
)
from vlmdistill.onnx_export import ONNX_OPSET, PARITY_TOLERANCE, export_checked
from vlmdistill.runfolder import ModelMeta, RunFolder
from vlmdistill.students import Student, count_parameters, open_clip_blocker
from vlmdistill.texttower import TEXT_DIR, portable_hf_name, save_hf_text_files, save_text_tower, text_state


class ExportError(VlmdistillError, ValueError):
    """A run that cannot be exported as asked; the message says why and what to do instead."""


class OnnxHead(nn.Module):
    """Pixels in [0, 1] -> (unit-norm embedding, logit_scale * cosine against each class)."""

    def __init__(self, student: Student, classes: torch.Tensor, logit_scale: float) -> None:
        super().__init__()
        self.student, self.logit_scale = student, logit_scale
        self.register_buffer("classes", classes.float().clone())

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        emb = F.normalize(self.student(pixels), dim=-1)
        return emb, self.logit_scale * emb @ self.classes.T


def write_onnx(model: DistilledModel, classes: torch.Tensor, path: Path) -> float:
    """``model.onnx``: student + normalisation + cosine head; returns onnxruntime's max abs difference."""
    head = OnnxHead(model.student, classes.to(model.device), model.logit_scale)
    s = model.transform.image_size
    return export_checked(head, (3, s, s), path, ["embedding", "logits"])


def _timm_pool(net: nn.Module) -> str:
    """The student's own global pooling, so open_clip's timm tower builds the same network."""
    for owner in (net, getattr(net, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str):
            return pool
        if pool is not None and hasattr(pool, "pool_type"):
            return str(pool.pool_type)
    return "avg"


def _local_open_clip(folder: Path, tmp: Path) -> str:
    """An open_clip ``local-dir:`` name for ``folder`` that builds offline: a Hugging Face text tower is named by
    hub id in the folder (portable), so this copy (links to its files) names the folder itself instead."""
    import json

    cfg = json.loads((folder / "open_clip_config.json").read_text(encoding="utf-8"))
    text = cfg["model_cfg"].get("text_cfg", {})
    if text.get("hf_model_name"):
        text["hf_model_name"] = text["hf_tokenizer_name"] = str(folder.resolve())
    for f in folder.iterdir():
        if f.name != "open_clip_config.json":
            os.symlink(f.resolve(), tmp / f.name)
    (tmp / "open_clip_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return f"local-dir:{tmp}"


def _check_open_clip(model: DistilledModel, mean: list[float], std: list[float], folder: Path) -> float:
    """Build the exported folder with plain open_clip and compare its encode_image with the student's."""
    import open_clip

    with tempfile.TemporaryDirectory() as tmp:
        oc = open_clip.create_model(_local_open_clip(folder, Path(tmp))).eval()
    s = model.transform.image_size
    pixels = torch.rand(2, 3, s, s, generator=torch.Generator().manual_seed(0))
    normed = (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        diff = float((oc.encode_image(normed) - model.student(pixels.to(model.device)).cpu()).abs().max())
    if diff > PARITY_TOLERANCE:
        raise ExportError(f"open_clip's timm tower does not reproduce student {model.cfg.student.arch} "
                          f"(max difference {diff:.2e}); use model.onnx or vlmdistill.load instead")
    return diff


def _check_open_clip_exportable(cfg: ExperimentConfig) -> None:
    """From the config alone, so a run that cannot become an open_clip model fails before any work."""
    blocker = open_clip_blocker(cfg.student)
    if blocker is not None:
        raise ExportError(f"--open-clip needs a timm student open_clip can build: {blocker}. Use model.onnx or "
                          "vlmdistill.load for this run")
    if cfg.teacher.backend != "open_clip":
        raise ExportError("--open-clip needs an open_clip teacher for the text tower; this run's teacher is a "
                          "Hugging Face CLIPModel. Use model.onnx or vlmdistill.load")


def export_open_clip(model: DistilledModel, folder: Path) -> dict[str, Any]:
    """An open_clip model folder: the student as a timm vision tower (its head is the projection), the
    teacher's text tower, and logit_scale = 1 / the run's temperature, in one checkpoint."""
    _check_open_clip_exportable(model.cfg)
    cfg, teacher, net = model.cfg, model.teacher(), model.student.net
    model_cfg = copy.deepcopy(teacher.model_cfg)
    model_cfg["vision_cfg"] = {"timm_model_name": cfg.student.arch, "timm_model_pretrained": False,
                               "timm_pool": _timm_pool(net), "timm_proj": "", "image_size": cfg.student.image_size}
    folder.mkdir(parents=True, exist_ok=True)
    text_cfg = model_cfg.get("text_cfg", {})
    if text_cfg.get("hf_model_name"):
        save_hf_text_files(teacher, folder)
        text_cfg["hf_model_name"] = text_cfg["hf_tokenizer_name"] = portable_hf_name(text_cfg)
    state = text_state(teacher.model)
    state.update({f"visual.trunk.{k}": v for k, v in net.state_dict().items()})
    state["logit_scale"] = torch.full_like(state["logit_scale"], math.log(model.logit_scale))
    spec = model.student.spec
    preprocess, view = open_clip_preprocess(cfg, list(spec.mean), list(spec.std))
    atomic_write_json(folder / "open_clip_config.json", {"model_cfg": model_cfg, "preprocess_cfg": preprocess})
    atomic_save_tensors(folder / "open_clip_model.safetensors", state)
    diff = _check_open_clip(model, preprocess["mean"], preprocess["std"], folder)
    hf_name = text_cfg.get("hf_model_name")
    return {"dir": OPEN_CLIP_DIR, "model_name": f"local-dir:<model folder>/{OPEN_CLIP_DIR}",
            "parity_max_abs_diff": diff, "learned_context_included": False, **view,
            "hf_text_tower": hf_name and {
                "hub_id": hf_name, "files": "config.json and tokenizer files in this folder",
                "note": "open_clip reads a Hugging Face text tower's architecture by hf_model_name: online, or with "
                        "that id in the Hugging Face cache, or with hf_model_name set to this folder's path"}}


def portable_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """What a model folder needs of its run's config: the student, the prompts and temperature, the teacher by
    name and the eval view; no path (training data, caches, the teacher's files) that would point outside."""
    full = config_to_dict(cfg)
    t = full["teacher"]
    text = {k: v for k, v in full["text"].items() if k not in ("descriptions", "captions")}
    data = {k: full["data"][k] for k in ("base_size", "resize", "eval_crop", "interpolation")}
    return {"name": cfg.name, "mode": cfg.mode, "seed": cfg.seed,
            "teacher": {k: t[k] for k in ("backend", "name", "pretrained", "precision")},
            "student": full["student"], "data": data, "text": text,
            "loss": {"temperature": cfg.loss.temperature, "closed_set": cfg.loss.closed_set}}


def _manifest(model: DistilledModel, run_dir: Path, names: list[str], descs: list[str | None],
              onnx_diff: float, text_tower: dict[str, Any] | None, open_clip_info: dict[str, Any] | None
              ) -> dict[str, Any]:
    cfg, spec = model.cfg, model.student.spec
    results = RunFolder(run_dir).results() or {}
    prompts = model.prompts(names, descs) if model.context is None else None
    return {
        "format": FORMAT,
        "source_run": run_dir.resolve().name,
        "student": {"arch": cfg.student.arch, "id": spec.id, "out_dim": model.student.out_dim,
                    "parameters": count_parameters(model.student), "model_kwargs": cfg.student.model_kwargs},
        "preprocessing": {"transform": model.transform.to_dict(), "mean": list(spec.mean), "std": list(spec.std),
                          "input": "RGB pixels in [0, 1], NCHW; the student (and model.onnx) apply mean/std",
                          "view": "base_size square (resize), centre eval_crop, resized to image_size with "
                                  "torchvision roi_align (aligned, adaptive sampling)"},
        "teacher": {"id": model.teacher_id, "backend": cfg.teacher.backend, "name": cfg.teacher.name,
                    "pretrained": cfg.teacher.pretrained},
        "text": {"template": cfg.text.template, "description_template": cfg.text.description_template,
                 "use_descriptions": cfg.text.use_descriptions, "learned_context": model.context is not None,
                 "logit_scale": model.logit_scale},
        "classes": [{"name": n, "description": d, **({"prompt": p} if prompts else {})}
                    for n, d, p in zip(names, descs, prompts or names, strict=True)],
        "results": {k: results[k] for k in ("metrics", "metrics_last_avg", "fewshot") if results.get(k)},
        "onnx": {"file": ONNX, "opset": ONNX_OPSET, "input": "pixels float32 [B, 3, S, S] in [0, 1]",
                 "outputs": {"embedding": "unit-norm [B, D]", "logits": "logit_scale * cosine, [B, C]"},
                 "parity_max_abs_diff": onnx_diff},
        "text_tower": text_tower,
        "open_clip": open_clip_info,
    }


def _check_destination(run_dir: Path, out: Path) -> None:
    """A new folder, or an earlier export (replaced whole); never the run or an unrelated folder."""
    if (run_dir / MANIFEST).is_file():
        raise ExportError(f"{run_dir} is already a model folder; export takes a run directory (runs/<name>)")
    if out.resolve() == run_dir.resolve() or run_dir.resolve() in out.resolve().parents:
        raise ExportError(f"--out {out} is inside the run {run_dir}: give a folder of its own")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MANIFEST).is_file())):
        raise ExportError(f"--out {out} exists and is not a model folder: give a new path (an earlier export "
                          "is replaced whole)")


def export_model(run_dir: Path, out: Path, labels: Path | None = None, descriptions: Path | None = None,
                 open_clip: bool = False, text_tower: bool = True) -> dict[str, Any]:
    """Write the model folder ``out`` from ``run_dir``; classes from ``labels`` or the run's dataset."""
    run_dir, out = Path(run_dir), Path(out)
    _check_destination(run_dir, out)
    run = RunFolder(run_dir)
    if open_clip and run.is_run():
        _check_open_clip_exportable(run.config())
    model = load(run_dir)
    names, descs = read_classes(labels, descriptions) if labels else (model.class_names, model.descriptions)
    if not names:
        raise ExportError(f"the dataset of {run_dir} ({model.cfg.data.dir}) is not there to name the classes: "
                          "give --labels FILE (one class name a line, or a label2text.txt)")
    classes = model.class_embeddings(names, descs if model.cfg.text.use_descriptions else None)
    with out_of_space("the model folder", out, lambda: f"{out} is as it was (the new folder was built aside and "
                                                       "removed); free space and run export again"), \
            replace_dir(out) as tmp:
        atomic_save_tensors(tmp / WEIGHTS, model.student.state_dict(),
                            ModelMeta.of(model.cfg, model.student, model.teacher_id).to_strings())
        atomic_save_tensors(tmp / CLASSES, {"embeddings": classes})
        atomic_write_text(tmp / CONFIG, yaml.safe_dump(portable_config(model.cfg), sort_keys=False))
        if model.context is not None:
            atomic_save_tensors(tmp / CONTEXT, {"ctx": model.context})
        onnx_diff = write_onnx(model, classes, tmp / ONNX)
        tower = _text_tower(model, names, descs, tmp / TEXT_DIR) if text_tower else None
        open_clip_info = export_open_clip(model, tmp / OPEN_CLIP_DIR) if open_clip else None
        manifest = _manifest(model, run_dir, names, descs, onnx_diff, tower, open_clip_info)
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def _text_tower(model: DistilledModel, names: list[str], descs: list[str | None], folder: Path) -> dict[str, Any]:
    """The teacher's text tower, checked on the stored classes' prompts (or bare names, for a CoOp run)."""
    texts = model.prompts(names, descs) if model.context is None else list(names)
    diff = save_text_tower(model.teacher(), folder, texts)
    return {"dir": TEXT_DIR, "backend": model.cfg.teacher.backend, "parity_max_abs_diff": diff,
            "checked_on": f"{len(texts)} class prompts"}
