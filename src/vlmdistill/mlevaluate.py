"""Scoring a multi-label student under the paper's Table 12 protocol, plus mAP.

Three columns: ``x_id`` (ID names on the ID validation scenes), ``y_id_on_ood`` and ``y_ood_on_ood`` (the ID
names and the OOD names on the OOD scenes, scored together against every name, then read per group). Each
holds ``accuracy`` and ``f1`` (Table 12 a, b; macro precision and recall, ``multilabel.metrics``), their
``precision`` and ``recall``, and ``map``. Names enter only through text, so the OOD names are scored zero-shot.

``score_teacher`` is the reference a student is measured against: the teacher's own zero-shot on the camera
it sees, mAP only (a teacher has no presence threshold, so accuracy and F1 are undefined for it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from vlmdistill.config import ExperimentConfig
from vlmdistill.data.scenes import SceneSource
from vlmdistill.data.views import Views, render
from vlmdistill.evaluate import embed_images
from vlmdistill.multilabel.labels import multi_hot
from vlmdistill.multilabel.metrics import mean_average_precision, presence_metrics
from vlmdistill.multilabel.model import MultiLabelModel, Text, head_text, object_texts
from vlmdistill.teachers.base import Teacher
from vlmdistill.text.textbank import embed_texts
from vlmdistill.workspace import student_eval_view

COLUMNS = ("x_id", "y_id_on_ood", "y_ood_on_ood")


@torch.no_grad()
def scene_probabilities(model: MultiLabelModel, source: SceneSource, text: Text, size: int, eval_crop: float,
                        batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """P(present) [N, K] (on CPU) of the scenes that could be read, centre view, and their indices."""
    device = next(model.parameters()).device
    probs, index = [], []
    for batch in source.batches(torch.arange(len(source)), batch_size):
        pixels = render(batch.images, Views.center(len(batch.index), eval_crop), size).to(device)
        probs.append(model(pixels, text)[1].float().cpu())
        index.append(batch.index)
    if not probs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long)
    return torch.cat(probs), torch.cat(index)


def column_metrics(model: MultiLabelModel, prob: torch.Tensor, target: torch.Tensor,
                   classes: Sequence[int]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 and mAP (percent) of one group of names; empty without scenes (a split
    with none, or every one unreadable and skipped), so averages leave it out."""
    if not len(target):
        return {}
    with torch.no_grad():
        pred = model.present(prob.to(model.asl.bias.device)).cpu()
    return {**presence_metrics(pred, target, classes), "map": mean_average_precision(prob, target, classes)}


def score_scenes(model: MultiLabelModel, cfg: ExperimentConfig, teacher: Teacher, x_id: SceneSource,
                 x_ood: SceneSource, id_names: Sequence[str], ood_names: Sequence[str],
                 descriptions: dict[str, str] | None = None) -> dict[str, Any]:
    """The three columns of Table 12 (and mAP) for ``model`` as it is now (its train/eval mode is restored)."""
    was_training = model.training
    model.eval()
    size, crop, bs = cfg.student.image_size, cfg.data.eval_crop, cfg.optim.eval_batch_size
    names = [*id_names, *ood_names]
    out: dict[str, Any] = {}
    with torch.no_grad():
        prob, index = scene_probabilities(model, x_id, head_text(model, cfg, teacher, id_names, descriptions),
                                          size, crop, bs)
        target = multi_hot([x_id.records[i].objects for i in index.tolist()], id_names)
        out["x_id"] = column_metrics(model, prob, target, range(len(id_names)))
        prob, index = scene_probabilities(model, x_ood, head_text(model, cfg, teacher, names, descriptions),
                                          size, crop, bs)
        target = multi_hot([x_ood.records[i].objects for i in index.tolist()], names)
        out["y_id_on_ood"] = column_metrics(model, prob, target, range(len(id_names)))
        out["y_ood_on_ood"] = column_metrics(model, prob, target, range(len(id_names), len(names)))
    model.train(was_training)
    return out


@torch.no_grad()
def score_teacher(cfg: ExperimentConfig, teacher: Teacher, x_id: SceneSource, x_ood: SceneSource,
                  id_names: Sequence[str], ood_names: Sequence[str],
                  descriptions: dict[str, str] | None = None) -> dict[str, Any]:
    """The teacher's zero-shot mAP per column: cosine of its ``data.teacher_camera`` RGB embedding (centre view)
    to the names' fixed prompts (``object_texts``: the template, or descriptions when the run uses them).
    It sees one camera, so objects outside that view count against it as they would against any model."""
    names = [*id_names, *ood_names]
    text = F.normalize(embed_texts(teacher, object_texts(cfg, names, descriptions), cfg.cache_dir), dim=-1)
    n_id = len(id_names)
    out: dict[str, Any] = {}
    for source, groups in ((x_id, {"x_id": range(n_id)}),
                           (x_ood, {"y_id_on_ood": range(n_id), "y_ood_on_ood": range(n_id, len(names))})):
        feats, index = embed_images(teacher.encode_images, source.camera_rgb(cfg.data.teacher_camera),
                                    teacher.image_size, student_eval_view(cfg), cfg.optim.eval_batch_size)
        if not len(index):
            continue
        scored = F.normalize(feats, dim=-1) @ text.T.cpu()
        target = multi_hot([source.records[i].objects for i in index.tolist()], names)
        for key, classes in groups.items():
            out[key] = {"map": mean_average_precision(scored, target, classes)}
    return out
