"""What every job on one dataset and teacher shares: the splits as image sources, the class texts, the
teacher's own eval-view features, and the (train, eval) sets a job works on.

Built once and reused by every run of a sweep (the demo's variants), so images are decoded and the
teacher's eval features computed once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vlmdistill.config import ExperimentConfig
from vlmdistill.data.dataset import Dataset, Split, open_dataset
from vlmdistill.data.pool import check_disjoint, read_pool, recorded_pool, split_files
from vlmdistill.data.source import ImageSource
from vlmdistill.data.views import Views
from vlmdistill.device import resolve_device
from vlmdistill.progress import console
from vlmdistill.teachers import Teacher
from vlmdistill.teachers.ensemble import load_teachers
from vlmdistill.text.labels import LabelSpace
from vlmdistill.text.prompt_learner import PromptLearner, class_prompt_texts
from vlmdistill.text.textbank import embed_texts

ViewFactory = Callable[[int], Views]
"""The view of each of n images, for deterministic (evaluation) views."""


@dataclass
class Workspace:
    """A dataset's splits as image sources and the teacher that scores them."""

    dataset: Dataset
    teacher: Teacher
    train: ImageSource
    id_val: ImageSource
    ood_val: ImageSource
    teacher_features: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    pools: dict[tuple, ImageSource] = field(default_factory=dict)
    text_embeddings: dict[tuple[str, ...], torch.Tensor] = field(default_factory=dict)

    def owns(self, source: ImageSource) -> bool:
        return any(source is own for own in (self.train, self.id_val, self.ood_val))


def decode_device(cfg: ExperimentConfig) -> torch.device | None:
    """The device JPEGs are decoded on with ``data.decode=device`` (the training device); None: loader workers."""
    return resolve_device(cfg.device) if cfg.data.decode == "device" else None


def build_workspace(cfg: ExperimentConfig, teacher: Teacher | None = None) -> Workspace:
    d = cfg.data
    dataset = open_dataset(d.dir, cfg.text.descriptions, skip_missing=d.skip_bad_images)
    teacher = teacher or load_teachers(cfg.teachers)

    def source(split: Split) -> ImageSource:
        return ImageSource(split.records, d.base_size, d.resize, d.num_workers, d.skip_bad_images, d.preload,
                           interpolation=d.interpolation, decode_device=decode_device(cfg))

    return Workspace(dataset, teacher, source(dataset.train), source(dataset.id_val), source(dataset.ood_val))


def unlabeled_source(cfg: ExperimentConfig, ws: Workspace) -> ImageSource | None:
    """The run's unlabelled pool (``data.unlabeled``, else the one prepare recorded), checked against every
    split and decoded like them; None without one or with ``data.unlabeled_ratio=0``. Built once per workspace."""
    d = cfg.data
    path = d.unlabeled or recorded_pool(ws.dataset.root)
    if path is None or d.unlabeled_ratio == 0:
        return None
    key = (str(path), d.base_size, d.resize, d.interpolation, d.skip_bad_images, d.preload, d.decode)
    if key not in ws.pools:
        records, missing = read_pool(path, d.skip_bad_images)
        if missing:
            console.print(f"unlabeled pool {path}: skipped {len(missing)} missing images (first: {missing[0]})")
        check_disjoint([r.path for r in records], split_files(ws.dataset), path)
        ws.pools[key] = ImageSource(records, d.base_size, d.resize, d.num_workers, d.skip_bad_images, d.preload,
                                    interpolation=d.interpolation, decode_device=decode_device(cfg))
    return ws.pools[key]


def class_prompts(cfg: ExperimentConfig, space: LabelSpace) -> list[str]:
    """The prompt of each class of ``space`` under the configured template (and descriptions)."""
    t = cfg.text
    return space.prompts(t.template, t.description_template, t.use_descriptions)


def class_text_embeddings(cfg: ExperimentConfig, ws: Workspace) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-norm teacher text embeddings of the ID and the OOD class prompts (cached on disk, and in the
    workspace: every run of a sweep and every job of a run asks for them)."""

    def embedded(space: LabelSpace) -> torch.Tensor:
        prompts = tuple(class_prompts(cfg, space))
        if prompts not in ws.text_embeddings:
            ws.text_embeddings[prompts] = embed_texts(ws.teacher, list(prompts), cfg.cache_dir)
        return ws.text_embeddings[prompts]

    return embedded(ws.dataset.id_space), embedded(ws.dataset.ood_space)


def context_class_texts(cfg: ExperimentConfig, ws: Workspace) -> tuple[list[str], list[str]]:
    """The ID and OOD class texts a learned context is prepended to ("{name}." or "{name} . {desc}.")."""

    def texts(space: LabelSpace) -> list[str]:
        return class_prompt_texts(space.names, [c.description for c in space.classes] if use else None)

    use = cfg.text.use_descriptions
    return texts(ws.dataset.id_space), texts(ws.dataset.ood_space)


@torch.no_grad()
def run_class_embeddings(cfg: ExperimentConfig, ws: Workspace, context: torch.Tensor | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ID and OOD class embeddings a trained student is scored against, on CPU: the teacher's prompt
    embeddings, or those of the run's learned prompt context when it learned one."""
    if not cfg.text.learn_context or context is None:
        w_id, w_ood = class_text_embeddings(cfg, ws)
        return w_id.cpu(), w_ood.cpu()
    id_texts, ood_texts = context_class_texts(cfg, ws)
    learner = PromptLearner(ws.teacher, [], n_ctx=len(context)).to(ws.teacher.device)
    learner.ctx.copy_(context)
    return learner(id_texts).cpu(), learner(ood_texts).cpu()


@dataclass
class TrainSet:
    """What the loop trains on: images, their labels, and the class text embeddings the labels index.

    ``support`` marks few-shot images; when set, every batch mixes them with base images as the paper's
    FewShotSampler does.
    """

    source: ImageSource
    labels: torch.Tensor
    w: torch.Tensor
    support: torch.Tensor | None = None


@dataclass
class EvalSet:
    """ID-val scored over ID classes, OOD-val over OOD classes (support images already removed)."""

    id_source: ImageSource
    id_labels: torch.Tensor
    ood_source: ImageSource
    ood_labels: torch.Tensor


def default_sets(ws: Workspace, w_id: torch.Tensor) -> tuple[TrainSet, EvalSet]:
    """ID-train against the ID class texts; ID-val and all of OOD-val for evaluation."""
    d = ws.dataset
    train = TrainSet(ws.train, torch.tensor(d.train.labels, dtype=torch.long), w_id)
    evals = EvalSet(ws.id_val, torch.tensor(d.id_val.labels, dtype=torch.long),
                    ws.ood_val, torch.tensor(d.ood_val.labels, dtype=torch.long))
    return train, evals


def student_eval_view(cfg: ExperimentConfig) -> ViewFactory:
    """The deterministic view every student is scored on: the centre ``data.eval_crop`` of the image."""
    return lambda n: Views.center(n, cfg.data.eval_crop)


def teacher_eval_view(cfg: ExperimentConfig) -> ViewFactory:
    """The teacher's test view: the student's centre crop, or (paper) the whole squashed image."""
    if cfg.data.teacher_eval_view == "whole":
        return Views.whole
    return student_eval_view(cfg)
