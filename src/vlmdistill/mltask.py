"""One multi-label distillation task (the paper's robotics experiment, §8): what ``loop.fit`` trains.

The same step as ``task.DistillTask``, on scenes instead of images:

    batch (stacked scenes, index) -> views (+ the teacher camera's targets of those views) -> pixels
    pixels -> student feature map -> pooled s, and the head's P(present) over the training names
    targets -> t;  scene objects -> multi-hot y -> Objective (asl on P, mse / imcst on s vs t)

Every channel of a scene is cropped with the same view, and the teacher's target is its embedding of that
view of ``data.teacher_camera``'s RGB. ``model`` (student + head + ASL bias) is what checkpoints hold: the loop
reads it as ``task.student``.

Under torchrun each rank takes its slice of the global batch, draws views for the whole batch as one process
does (the target lookup's ``n_global`` / ``offset``) and gathers every rank's rows before the loss, so the loss
is the one-process loss of the global batch; the model is wrapped in DDP for the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vlmdistill import distributed
from vlmdistill.config import ConfigError, ExperimentConfig
from vlmdistill.data.multilabel_set import MultiLabelSet
from vlmdistill.data.scenes import CameraRgbSource, SceneLayout, SceneSource
from vlmdistill.data.source import Batch
from vlmdistill.data.views import randaugment, render
from vlmdistill.device import resolve_device
from vlmdistill.losses import LossInputs, Objective
from vlmdistill.multilabel.labels import multi_hot
from vlmdistill.multilabel.model import MultiLabelModel, Text, build_model, head_text
from vlmdistill.runfolder import ModelMeta
from vlmdistill.targets.lookup import open_targets
from vlmdistill.task import StepBatch
from vlmdistill.teachers.base import Teacher


@dataclass
class SceneTrainSet:
    """Scenes, their multi-hot targets over ``names``; ``support`` marks few-shot scenes (balanced batches)."""

    source: SceneSource
    labels: torch.Tensor
    names: tuple[str, ...]
    support: torch.Tensor | None = None


def scene_layout(cfg: ExperimentConfig) -> SceneLayout:
    return SceneLayout(tuple(cfg.data.cameras), tuple(cfg.data.channels), cfg.data.depth_max)


def scene_source(cfg: ExperimentConfig, ds: MultiLabelSet, split: str) -> SceneSource:
    d = cfg.data
    return SceneSource(ds.splits[split], d.base_size, scene_layout(cfg), d.skip_bad_images, d.preload)


def input_kinds(cfg: ExperimentConfig, ds: MultiLabelSet) -> list[str]:
    """The stacked inputs' kinds: cameras x channels for h5 scenes, one RGB for plain images."""
    if all(item.scene is None for s in ds.splits.values() for item in s):
        return ["rgb"]
    return [k for _ in cfg.data.cameras for k in cfg.data.channels]


def check_multilabel_config(cfg: ExperimentConfig) -> None:
    """What a multi-label run needs of its config beyond ``check_loss_config``."""
    if cfg.loss.asl.weight == 0:
        raise ConfigError(f"{cfg.data.dir} holds multi-label scenes: set loss.asl.weight (the multi-label head's "
                          "loss, e.g. 1) and loss.cls.weight=0")
    if cfg.loss.closed_set:
        raise ConfigError("loss.closed_set has no multi-label form: set loss.closed_set=false")


class MultiLabelTask(nn.Module):
    """The model, the Objective and the teacher camera's target lookup of one multi-label run."""

    def __init__(self, cfg: ExperimentConfig, teacher: Teacher, ds: MultiLabelSet, train_set: SceneTrainSet,
                 descriptions: dict[str, str] | None = None) -> None:
        super().__init__()
        check_multilabel_config(cfg)
        kinds = input_kinds(cfg, ds)
        if cfg.data.randaugment != "off" and kinds != ["rgb"]:
            channels = sum(3 if k == "rgb" else 1 for k in kinds)
            raise ConfigError(f"data.randaugment works on one RGB image, but {cfg.data.dir} stacks {channels} "
                              f"channels ({'+'.join(kinds)} over data.cameras x data.channels): set "
                              "data.randaugment=off, or data.cameras=[<one camera>] data.channels=[rgb]")
        self.cfg, self.train_set, self.teacher_id = cfg, train_set, teacher.id
        self.device = resolve_device(cfg.device)
        self.objective = Objective(cfg.loss)
        asl = self.objective.terms["asl"].loss
        self.student: MultiLabelModel = build_model(cfg, teacher, kinds, ds.id_objects, descriptions,
                                                    asl).to(self.device)
        self.prompts = None  # the learned contexts live in the head, inside ``student``
        if cfg.train.ema_decay is not None:
            raise ConfigError("train.ema_decay: weight averaging is built for single-label runs only so far; drop "
                              "it for a multi-label dataset")
        self.ema = None
        self.closed_set = False
        self.pool = None
        self.teacher, self.descriptions = teacher, descriptions
        self.teacher_rgb: CameraRgbSource = train_set.source.camera_rgb(cfg.data.teacher_camera)
        self.targets = open_targets(cfg, teacher, self.teacher_rgb, self.objective.needs_teacher)
        if not self.objective.needs_teacher:  # no term reads the pooled embedding: what only it uses stays as built
            for p in _embedding_only_parameters(self.student, cfg.student.image_size):
                p.requires_grad_(False)  # (it got no gradient anyway; DDP needs one for every trainable parameter)
        object.__setattr__(self, "_ddp", None)

    def trainable(self) -> list[nn.Parameter]:
        """Student, head (1x1 conv, contexts or bias) and the loss's score bias; never the frozen teacher."""
        return [p for p in self.student.parameters() if p.requires_grad]

    def distribute(self) -> None:
        """Under DDP: BatchNorm over the global batch (unless ``train.sync_batchnorm=false``), then the model
        wrapped in ``DistributedDataParallel`` for training steps (checkpoints and evaluation keep the bare one).
        The score bias and few-shot prompt texts enter the loss outside ``forward``; DDP reduces their gradients
        all the same, as every trainable parameter gets one each step."""
        if not distributed.active() or self._ddp is not None:
            return
        self.student, ddp = distributed.data_parallel(self.student, self.device, self.cfg.train.sync_batchnorm)
        object.__setattr__(self, "_ddp", ddp)

    def prepare(self, batch: Batch, g: torch.Generator) -> StepBatch:
        """One view per scene (all channels cropped together) and the teacher camera's targets of it; under DDP
        the views of this rank's slice of the global batch, drawn as one process draws them."""
        rgb = batch.images
        if self.targets.kind == "online":  # the teacher renders its camera's RGB of the same views
            rgb = next(iter(self.teacher_rgb.iter_batches([batch.index]))).images
        counts, n_global, offset = distributed.batch_layout(len(batch.index))
        views, targets = self.targets(batch.index, rgb, g, n_global, offset)
        images = batch.images
        if self.cfg.data.randaugment == "student":  # the paper's: the teacher's target does not see these ops
            images = randaugment((images * 255).round().to(torch.uint8), g,
                                 per_batch=self.cfg.data.augment_per == "batch", offset=offset)
        pixels = render(images, views, self.cfg.student.image_size).to(self.device)
        return StepBatch(pixels, batch.index, targets, counts=counts)

    def train_text(self) -> Text | None:
        """The head's text for the training names: None for the construction names (the head's own), else
        recomputed each step (few-shot training on ID and OOD names; differentiable in the contexts)."""
        if self.train_set.names == self.student.names:
            return None
        return head_text(self.student, self.cfg, self.teacher, self.train_set.names, self.descriptions)

    def forward(self, step: StepBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        s_raw, prob = (self._ddp or self.student)(step.pixels, self.train_text())
        t_raw = step.targets.to(self.device) if step.targets is not None else None
        y = self.train_set.labels[step.index].to(self.device)
        if step.counts is not None:  # every rank's rows, in one process's order; gradients flow to their owners
            s_raw, prob = (distributed.gather_with_grad(x, step.counts) for x in (s_raw, prob))
            y = distributed.all_gather_tensors(y, step.counts)
            t_raw = distributed.all_gather_tensors(t_raw, step.counts) if t_raw is not None else None
        inputs = LossInputs(s=F.normalize(s_raw, dim=-1), y=y, t=F.normalize(t_raw, dim=-1) if t_raw is not None
                            else None, s_raw=s_raw, t_raw=t_raw, p=prob)
        return self.objective(inputs)

    def model_meta(self) -> ModelMeta:
        return ModelMeta.of(self.cfg, self.student.student, self.teacher_id)


def _embedding_only_parameters(model: MultiLabelModel, size: int) -> list[nn.Parameter]:
    """The student's parameters that the feature map (what the head reads) does not depend on: the pooled
    embedding's projection, whatever the backbone's ``forward_head`` holds. Found by differentiating the feature
    map of one blank input in eval mode (no BatchNorm statistics move)."""
    net, was_training = model.student.net, model.training
    params = [p for p in net.parameters() if p.requires_grad]
    model.eval()
    try:
        x = torch.zeros(1, model.student.in_chans, size, size, device=params[0].device)
        grads = torch.autograd.grad(model.student.feature_map(x).sum(), params, allow_unused=True)
    finally:
        model.train(was_training)
    return [p for p, g in zip(params, grads, strict=True) if g is None]


def train_set_of(cfg: ExperimentConfig, ds: MultiLabelSet, split: str = "train") -> SceneTrainSet:
    """A split's scenes against the ID object names (training scenes hold only ID objects)."""
    source = scene_source(cfg, ds, split)
    labels = multi_hot([item.objects for item in source.records], ds.id_objects)
    return SceneTrainSet(source, labels, ds.id_objects)

