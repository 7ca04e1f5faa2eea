"""Student image encoders: any timm model, or a torchvision model as ``tv:<name>``.

The classifier head is replaced by a linear projection to the teacher's embedding size, as the paper
does (ResNet18 with its fc replaced by Linear 512 -> 768), so the student writes straight into the
teacher's joint space. Random initialisation is the default: the paper trains from scratch so that
no pretraining labels leak into the OOD classes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import timm
import torch
import torchvision
from torch import nn

from vlmdistill.config import StudentConfig
from vlmdistill.errors import VlmdistillError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class StudentBuildError(VlmdistillError, ValueError):
    """An unknown architecture or unavailable pretrained weights."""


@dataclass(frozen=True)
class StudentSpec:
    id: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class Student(nn.Module):
    """Backbone + projection. ``forward`` takes pixels in [0, 1] and returns the raw embedding.

    ``kinds`` names each stacked input's kind (``rgb`` or ``depth``, one entry per camera's part): RGB is
    normalised with the backbone's mean and std, depth (already scaled to [0, 1] by the reader) passes as is."""

    def __init__(self, net: nn.Module, spec: StudentSpec, out_dim: int, kinds: Sequence[str] = ("rgb",)) -> None:
        super().__init__()
        self.net = net
        self.spec = spec
        self.out_dim = out_dim
        mean = [v for k in kinds for v in (spec.mean if k == "rgb" else (0.0,))]
        std = [v for k in kinds for v in (spec.std if k == "rgb" else (1.0,))]
        self.in_chans = len(mean)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net((pixels - self.mean) / self.std)

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        """The last feature map [B, C, H, W] (timm backbones), which a multi-label head reads."""
        return self.net.forward_features((pixels - self.mean) / self.std)

    def pooled(self, feature_map: torch.Tensor) -> torch.Tensor:
        """The raw embedding from ``feature_map``: ``forward`` is ``pooled(feature_map(x))``."""
        return self.net.forward_head(feature_map)


def _replace_torchvision_head(model: nn.Module, out_dim: int) -> None:
    """Swap the last Linear layer (the ImageNet classifier) for a projection to ``out_dim``."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise StudentBuildError(f"torchvision {type(model).__name__} has no linear head to replace")
    parent_name, _, child = linears[-1].rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child) if not child.isdigit() else parent[int(child)]
    new = nn.Linear(old.in_features, out_dim)
    if child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)


def create_student(config: StudentConfig, out_dim: int, kinds: Sequence[str] = ("rgb",)) -> Student:
    """``out_dim`` is the teacher's embed_dim (or the number of classes for the closed-set baseline); ``kinds``
    the stacked inputs (several cameras' RGB-D: timm's ``in_chans``, timm backbones only)."""
    arch = config.arch
    if tuple(kinds) != ("rgb",) and arch.startswith("tv:"):
        raise StudentBuildError(f"student.arch={arch}: stacked camera channels need a timm backbone (its in_chans "
                                "and feature map), e.g. student.arch=efficientnet_b0")
    if arch.startswith("tv:"):
        name = arch[3:]
        if name not in torchvision.models.list_models():
            raise StudentBuildError(f"torchvision has no model {name!r}; see torchvision.models.list_models()")
        kwargs = dict(config.model_kwargs)
        if name.startswith("vit_"):
            kwargs.setdefault("image_size", config.image_size)
        try:
            if config.pretrained:
                net = torchvision.models.get_model(name, weights="DEFAULT", **kwargs)
                _replace_torchvision_head(net, out_dim)
            else:
                net = torchvision.models.get_model(name, weights=None, num_classes=out_dim, **kwargs)
        except Exception as err:
            raise StudentBuildError(f"could not build torchvision {name!r}: {err}") from err
        spec = StudentSpec(id=f"{arch}{'@pretrained' if config.pretrained else ''}", mean=IMAGENET_MEAN,
                           std=IMAGENET_STD)
        return Student(net, spec, out_dim)
    if not timm.is_model(arch):
        raise StudentBuildError(f"timm has no model {arch!r}; see timm.list_models() or use tv:<name>")
    kwargs = dict(config.model_kwargs)
    if tuple(kinds) != ("rgb",):
        kwargs["in_chans"] = sum(3 if k == "rgb" else 1 for k in kinds)
    if config.drop_path:
        kwargs["drop_path_rate"] = config.drop_path
    try:
        net = timm.create_model(arch, pretrained=config.pretrained, num_classes=out_dim, **kwargs)
    except Exception as err:
        raise StudentBuildError(
            f"could not build timm {arch!r} (pretrained={config.pretrained}): {err}. Pretrained weights need "
            "network access or a local Hugging Face cache"
        ) from err
    pcfg = getattr(net, "pretrained_cfg", {}) or {}
    spec = StudentSpec(
        id=f"timm:{arch}{'@pretrained' if config.pretrained else ''}",
        mean=tuple(pcfg.get("mean", IMAGENET_MEAN)),
        std=tuple(pcfg.get("std", IMAGENET_STD)),
    )
    return Student(net, spec, out_dim, kinds)


def open_clip_blocker(config: StudentConfig) -> str | None:
    """Why open_clip's timm vision tower cannot build this student, or None. That tower takes a timm model name
    and nothing else, so train says this at the start rather than export at the end."""
    if config.arch.startswith("tv:"):
        return (f"the student is torchvision {config.arch[3:]!r}, and open_clip's vision towers are timm models "
                "(train a timm student, e.g. student.arch=resnet18)")
    if config.model_kwargs:
        return (f"open_clip's timm tower builds a timm model by name only and cannot pass student.model_kwargs "
                f"{dict(config.model_kwargs)} (train a timm architecture that has those settings built in, e.g. "
                "student.arch=test_resnet or resnet10t, with no model_kwargs)")
    return None


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
