"""Views: the crop box and flip that turn a base image into what a model sees.

A view is a few numbers (box in [0, 1] image coordinates, flip, and optionally RandAugment's draws), so the
same view can be rendered for the student at its resolution and for the teacher at its own, stored next to a
teacher embedding, and replayed later. Rendering is one batched ``roi_align`` (area-averaged bilinear
crop-resize) per batch, then the view's RandAugment ops, batched per op.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.ops import roi_align
from torchvision.transforms import v2

RANDAUGMENT = v2.RandAugment(num_ops=2, magnitude=9, interpolation=v2.InterpolationMode.BILINEAR)
"""The ops, magnitude and fill of consistent RandAugment: torchvision's RandAugment(2, 9), bilinear."""
_OPS = tuple(RANDAUGMENT._AUGMENTATION_SPACE)


@dataclass
class Views:
    """boxes [B, 4] as (x0, y0, x1, y1) fractions of the base image; flips [B] bool; ``augment`` [B, 2]
    RandAugment codes (``sample_randaugment``) or None. Any leading shape [B, V, ...] for a store's views."""

    boxes: torch.Tensor
    flips: torch.Tensor
    augment: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.boxes.shape[0]

    def __getitem__(self, index: Any) -> Views:
        """The views at ``index`` (of the leading dimensions), each with its boxes, flip and RandAugment draws;
        a slice of rows is one rank's share of views drawn for a whole global batch."""
        return Views(self.boxes[index], self.flips[index], None if self.augment is None else self.augment[index])

    @classmethod
    def whole(cls, n: int) -> Views:
        return cls(torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(n, 1), torch.zeros(n, dtype=torch.bool))

    @classmethod
    def center(cls, n: int, fraction: float) -> Views:
        m = (1.0 - fraction) / 2
        return cls(torch.tensor([[m, m, 1.0 - m, 1.0 - m]]).repeat(n, 1), torch.zeros(n, dtype=torch.bool))


def sample_views(
    n: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: bool = True,
    per_batch: bool = False,
) -> Views:
    """RandomResizedCrop + horizontal flip parameters on a square image, one per image or one per batch.

    ``per_batch`` reproduces the official code, which transforms the collated batch tensor and so shares
    one crop box and one flip decision among all images of a batch.
    """
    m = 1 if per_batch else n
    trials = 10
    area = torch.empty(m, trials).uniform_(scale[0], scale[1], generator=generator)
    log_r = torch.empty(m, trials).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    w = torch.sqrt(area * torch.exp(log_r))
    h = torch.sqrt(area / torch.exp(log_r))
    ok = (w <= 1) & (h <= 1)
    first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((m,), -1))
    rows = torch.arange(m)
    w = torch.where(first >= 0, w[rows, first.clamp(min=0)], torch.ones(m))
    h = torch.where(first >= 0, h[rows, first.clamp(min=0)], torch.ones(m))
    x0 = torch.rand(m, generator=generator) * (1 - w)
    y0 = torch.rand(m, generator=generator) * (1 - h)
    flips = torch.rand(m, generator=generator) < 0.5 if hflip else torch.zeros(m, dtype=torch.bool)
    boxes = torch.stack([x0, y0, x0 + w, y0 + h], dim=1)
    if per_batch:
        boxes, flips = boxes.expand(n, 4).clone(), flips.expand(n).clone()
    return Views(boxes, flips)


def render(images: torch.Tensor, views: Views, size: int) -> torch.Tensor:
    """uint8 [B, 3, S, S] + views -> float pixels in [0, 1] of shape [B, 3, size, size]. Float images (stacked
    camera channels already in [0, 1], any number of them) are cropped the same way, every channel together."""
    b, _, hgt, wid = images.shape
    scale = torch.tensor([wid, hgt, wid, hgt], dtype=torch.float32)
    boxes = views.boxes.to(torch.float32) * scale
    rois = torch.cat([torch.arange(b, dtype=torch.float32).unsqueeze(1), boxes], dim=1).to(images.device)
    out = roi_align(images.float(), rois, output_size=(size, size), sampling_ratio=-1, aligned=True)
    out = out if images.is_floating_point() else out / 255.0
    flips = views.flips.to(images.device).view(b, 1, 1, 1)
    out = torch.where(flips, out.flip(-1), out)
    return out if views.augment is None else apply_randaugment(out, views.augment)


def sample_randaugment(n: int, generator: torch.Generator) -> torch.Tensor:
    """RandAugment(2, 9) draws for ``n`` views as codes [n, 2]: op index * 2 + 1 where a signed op's magnitude
    is negated. Stored with a view, they give the teacher's target and the student's pixels the same ops."""
    ops = torch.randint(len(_OPS), (n, RANDAUGMENT.num_ops), generator=generator)
    negated = torch.rand(n, RANDAUGMENT.num_ops, generator=generator) < 0.5
    return (ops * 2 + negated).to(torch.int16)


def apply_randaugment(pixels: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Float pixels [B, C, S, S] in [0, 1] through each row's RandAugment ops, in order, with torchvision's own
    implementation of each op; rows that share an op and sign go through it together. Translations are a
    fraction of the size and the rest angles or factors, so a view gets the same ops at any resolution."""
    out, codes = pixels.clone(), codes.to(pixels.device)
    size = pixels.shape[-1]
    for slot in range(codes.shape[1]):
        for code in codes[:, slot].unique().tolist():
            rows = (codes[:, slot] == code).nonzero().flatten()
            name = _OPS[code // 2]
            magnitudes, signed = RANDAUGMENT._AUGMENTATION_SPACE[name]
            steps = magnitudes(RANDAUGMENT.num_magnitude_bins, size, size)
            m = 0.0 if steps is None else float(steps[RANDAUGMENT.magnitude]) * (-1 if signed and code % 2 else 1)
            out[rows] = RANDAUGMENT._apply_image_or_video_transform(
                out[rows], name, m, interpolation=RANDAUGMENT.interpolation, fill=RANDAUGMENT._fill).clamp(0, 1)
    return out


def randaugment(images: torch.Tensor, generator: torch.Generator, per_batch: bool, offset: int = 0) -> torch.Tensor:
    """RandAugment(2, 9) on uint8 images, seeded from ``generator`` so a run stays reproducible.

    Per image, image i of the global batch draws from its own seed (one seed from ``generator``, plus i): a
    rank holding rows ``offset...`` of a global batch augments them as one process would."""
    op = v2.RandAugment(num_ops=2, magnitude=9)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if per_batch:
            return op(images)
        out = []
        for i, img in enumerate(images):
            torch.manual_seed(seed + offset + i)
            out.append(op(img))
        return torch.stack(out)
