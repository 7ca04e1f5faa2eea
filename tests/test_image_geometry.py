"""The base image is torchvision's Resize(S) + CenterCrop(S) to the pixel, so open_clip's eval transform of an
export sees what vlmdistill eval sees (tests/test_clip_benchmark.py checks the whole view)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import CenterCrop, InterpolationMode, Resize

from vlmdistill.data.images import fit_image

SIZES = [(53, 37), (37, 53), (101, 99), (15, 64), (64, 15), (41, 40), (7, 9), (299, 211), (640, 427), (40, 40)]


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("base_size", [17, 32, 56])
def test_center_crop_is_torchvisions_resize_then_center_crop(interpolation: str, base_size: int) -> None:
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    rng = np.random.default_rng(base_size)
    for w, h in SIZES:
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        want = np.array(CenterCrop(base_size)(Resize(base_size, interpolation=mode)(im)))
        got = fit_image(im, base_size, "center_crop", interpolation)
        assert torch.equal(got, torch.from_numpy(want).permute(2, 0, 1)), (w, h)


def test_squash_is_torchvisions_resize_to_a_square() -> None:
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    want = np.array(Resize((24, 24), interpolation=InterpolationMode.BILINEAR)(im))
    assert torch.equal(fit_image(im, 24, "squash", "bilinear"), torch.from_numpy(want).permute(2, 0, 1))
