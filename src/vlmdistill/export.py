"""``vlmdistill export``: a run's student as a self-contained model folder.

``student.safetensors`` (weights), ``classes.safetensors`` (unit-norm class text embeddings),
``config.yaml`` (the run's resolved config, naming its teacher), ``model.onnx`` (student + normalisation
+ cosine classifier head), ``prompt_context.safetensors`` (CoOp runs) and, with ``open_clip=True``, an
open_clip model folder in ``open_clip/``. ``manifest.json`` is written last, so a folder with a manifest
is a complete one.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
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
from vlmdistill.config import ExperimentConfig
from vlmdistill.errors import VlmdistillError
from vlmdistill.io import atomic_save_tensors, atomic_write_bytes, atomic_write_json, atomic_write_text
from vlmdistill.runfolder import ModelMeta, RunFolder
from vlmdistill.students import Student, count_parameters

ONNX_OPSET = 17
PARITY_TOLERANCE = 1e-4


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
    """Export to ``path`` (through ``io``'s atomic writer) and return onnxruntime's max abs difference from
    PyTorch."""
    import onnxruntime as ort

    head = OnnxHead(model.student, classes.to(model.device), model.logit_scale).cpu().eval()
    s = model.transform.image_size
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(head, (torch.rand(1, 3, s, s),), buffer, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["pixels"], output_names=["embedding", "logits"],
                          dynamic_axes={"pixels": {0: "batch"}, "embedding": {0: "batch"}, "logits": {0: "batch"}})
    atomic_write_bytes(path, buffer.getvalue())
    pixels = torch.rand(4, 3, s, s, generator=torch.Generator().manual_seed(0))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"pixels": pixels.numpy()})
    with torch.no_grad():
        want = head(pixels)
    diff = max(float((torch.from_numpy(g) - w).abs().max()) for g, w in zip(got, want, strict=True))
    if diff > PARITY_TOLERANCE:
        raise ExportError(f"{path}: onnxruntime differs from PyTorch by {diff:.2e} (> {PARITY_TOLERANCE}); "
                          "use the safetensors weights with vlmdistill.load instead")
    return diff


def _timm_pool(net: nn.Module) -> str:
    """The student's own global pooling, so open_clip's timm tower builds the same network."""
    for owner in (net, getattr(net, "head", None)):
        pool = getattr(owner, "global_pool", None)
        if isinstance(pool, str):
            return pool
        if pool is not None and hasattr(pool, "pool_type"):
            return str(pool.pool_type)
    return "avg"


def _check_open_clip(model: DistilledModel, mean: list[float], std: list[float], folder: Path) -> float:
    """Build the exported folder with plain open_clip and compare its encode_image with the student's."""
    import open_clip

    oc = open_clip.create_model(f"local-dir:{folder}").eval()
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
    if cfg.student.arch.startswith("tv:"):
        raise ExportError(
            f"--open-clip needs a timm student: open_clip's vision towers are timm models, and this run's student "
            f"is torchvision {cfg.student.arch[3:]!r}. Use model.onnx or vlmdistill.load, or train a timm student "
            "(e.g. student.arch=resnet18)"
        )
    if cfg.teacher.backend != "open_clip":
        raise ExportError("--open-clip needs an open_clip teacher for the text tower; this run's teacher is a "
                          "Hugging Face CLIPModel. Use model.onnx or vlmdistill.load")
    if cfg.student.model_kwargs:
        raise ExportError(f"--open-clip: open_clip's timm tower cannot pass student.model_kwargs "
                          f"{cfg.student.model_kwargs}; use model.onnx or vlmdistill.load")


def _save_hf_tokenizer(teacher: Any, folder: Path) -> None:
    """An HF text tower's tokenizer files beside the config, where open_clip's local-dir loading looks."""
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=".tokenizer."))
    try:
        teacher.tokenizer.tokenizer.save_pretrained(str(tmp))
        for f in tmp.iterdir():
            os.replace(f, folder / f.name)
    finally:
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()


def export_open_clip(model: DistilledModel, folder: Path) -> dict[str, Any]:
    """An open_clip model folder: the student as a timm vision tower (its head is the projection), the
    teacher's text tower, and logit_scale = 1 / the run's temperature, in one checkpoint."""
    import open_clip

    _check_open_clip_exportable(model.cfg)
    cfg, teacher, net = model.cfg, model.teacher(), model.student.net
    name = Path(cfg.teacher.model_config_path).stem if cfg.teacher.model_config_path else cfg.teacher.name
    model_cfg = dict(open_clip.get_model_config(name))
    model_cfg["vision_cfg"] = {"timm_model_name": cfg.student.arch, "timm_model_pretrained": False,
                               "timm_pool": _timm_pool(net), "timm_proj": "", "image_size": cfg.student.image_size}
    state = {k: v for k, v in teacher.model.state_dict().items() if not k.startswith("visual.")}
    state.update({f"visual.trunk.{k}": v for k, v in net.state_dict().items()})
    state["logit_scale"] = torch.full_like(state["logit_scale"], math.log(model.logit_scale))
    spec = model.student.spec
    preprocess, view = open_clip_preprocess(cfg, list(spec.mean), list(spec.std))
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_json(folder / "open_clip_config.json", {"model_cfg": model_cfg, "preprocess_cfg": preprocess})
    atomic_save_tensors(folder / "open_clip_model.safetensors", state)
    if model_cfg.get("text_cfg", {}).get("hf_tokenizer_name"):
        _save_hf_tokenizer(teacher, folder)
    diff = _check_open_clip(model, preprocess["mean"], preprocess["std"], folder)
    return {"dir": OPEN_CLIP_DIR, "model_name": f"local-dir:<model folder>/{OPEN_CLIP_DIR}",
            "parity_max_abs_diff": diff, "learned_context_included": False, **view}


def _manifest(model: DistilledModel, run_dir: Path, names: list[str], descs: list[str | None],
              onnx_diff: float, open_clip_info: dict[str, Any] | None) -> dict[str, Any]:
    cfg, spec = model.cfg, model.student.spec
    results = RunFolder(run_dir).results() or {}
    prompts = model.prompts(names, descs) if model.context is None else None
    return {
        "format": FORMAT,
        "source_run": str(run_dir.resolve()),
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
        "open_clip": open_clip_info,
    }


def export_model(run_dir: Path, out: Path, labels: Path | None = None, descriptions: Path | None = None,
                 open_clip: bool = False) -> dict[str, Any]:
    """Write the model folder ``out`` from ``run_dir``; classes from ``labels`` or the run's dataset."""
    run_dir, out = Path(run_dir), Path(out)
    if (run_dir / MANIFEST).is_file():
        raise ExportError(f"{run_dir} is already a model folder; export takes a run directory (runs/<name>)")
    if not open_clip and (out / OPEN_CLIP_DIR).exists():
        raise ExportError(f"{out / OPEN_CLIP_DIR} is left from an earlier export and would no longer match: "
                          "remove it, or export with --open-clip")
    run = RunFolder(run_dir)
    if open_clip and run.is_run():
        _check_open_clip_exportable(run.config())
    model = load(run_dir)
    names, descs = read_classes(labels, descriptions) if labels else (model.class_names, model.descriptions)
    if not names:
        raise ExportError(f"the dataset of {run_dir} ({model.cfg.data.dir}) is not there to name the classes: "
                          "give --labels FILE (one class name a line, or a label2text.txt)")
    classes = model.class_embeddings(names, descs)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    meta = ModelMeta.of(model.cfg, model.student, model.teacher_id).to_strings()
    atomic_save_tensors(out / WEIGHTS, model.student.state_dict(), meta)
    atomic_save_tensors(out / CLASSES, {"embeddings": classes})
    atomic_write_text(out / CONFIG, run.config_path.read_text(encoding="utf-8"))
    if model.context is not None:
        atomic_save_tensors(out / CONTEXT, {"ctx": model.context})
    onnx_diff = write_onnx(model, classes, out / ONNX)
    open_clip_info = export_open_clip(model, out / OPEN_CLIP_DIR) if open_clip else None
    manifest = _manifest(model, run_dir, names, descs, onnx_diff, open_clip_info)
    atomic_write_json(out / MANIFEST, manifest)
    return manifest
