"""Views: rendering crop boxes and flips, and sampling RandomResizedCrop parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from vlmdistill.data.views import Views, render, sample_views


def images(b: int = 2, size: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, 3, size, size), generator=g, dtype=torch.uint8)


def test_whole_view_at_base_size_is_the_identity() -> None:
    x = images()
    out = render(x, Views.whole(2), 16)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.float32
    torch.testing.assert_close(out, x.float() / 255, atol=1e-6, rtol=0)


def test_left_half_at_full_size_is_a_2x_horizontal_bilinear_upsample() -> None:
    x = images(b=1)
    out = render(x, Views(torch.tensor([[0.0, 0.0, 0.5, 1.0]]), torch.tensor([False])), 16)
    # Independent reference: upsample the whole image 2x horizontally (half-pixel centres, edges
    # clamped) and keep the left 16 columns, i.e. the left half of the image.
    ref = F.interpolate(x.float(), size=(16, 32), mode="bilinear", align_corners=False)[..., :16] / 255
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # Each source column i of the half appears twice (up to interpolation) at output 2i, 2i+1.
    assert out.shape == (1, 3, 16, 16)


def test_crop_inside_a_constant_region_keeps_its_colour() -> None:
    x = torch.zeros(1, 3, 32, 32, dtype=torch.uint8)
    x[:, 0, :, :16] = 200  # left half red-ish
    x[:, 2, :, 16:] = 150  # right half blue-ish
    inside_left = Views(torch.tensor([[0.05, 0.1, 0.4, 0.9]]), torch.tensor([False]))
    out = render(x, inside_left, 24)
    torch.testing.assert_close(out[0, 0], torch.full((24, 24), 200 / 255), atol=1e-6, rtol=0)
    assert out[0, 1:].abs().max() == 0
    inside_right = Views(torch.tensor([[0.6, 0.0, 0.95, 0.5]]), torch.tensor([True]))
    out = render(x, inside_right, 8)
    torch.testing.assert_close(out[0, 2], torch.full((8, 8), 150 / 255), atol=1e-6, rtol=0)


def test_flip_mirrors_horizontally() -> None:
    x = images()
    flipped = render(x, Views(Views.whole(2).boxes, torch.tensor([True, False])), 16)
    torch.testing.assert_close(flipped[0], x[0].float().flip(-1) / 255, atol=1e-6, rtol=0)
    torch.testing.assert_close(flipped[1], x[1].float() / 255, atol=1e-6, rtol=0)  # only where asked
    # a flipped crop is the mirror of the unflipped crop of the same box
    box = torch.tensor([[0.1, 0.2, 0.7, 0.9]])
    plain = render(x[:1], Views(box, torch.tensor([False])), 12)
    mirror = render(x[:1], Views(box, torch.tensor([True])), 12)
    torch.testing.assert_close(mirror, plain.flip(-1), atol=0, rtol=0)


def test_center_view_crops_the_middle() -> None:
    x = torch.zeros(1, 3, 16, 16, dtype=torch.uint8)
    x[:, :, 4:12, 4:12] = 255
    out = render(x, Views.center(1, 0.5), 8)
    torch.testing.assert_close(out, torch.ones(1, 3, 8, 8), atol=1e-6, rtol=0)


@pytest.mark.parametrize("scale", [(0.08, 1.0), (0.2, 0.5), (0.9, 1.0)])
def test_sampled_boxes_lie_in_the_image_with_area_and_ratio_in_range(scale: tuple[float, float]) -> None:
    g = torch.Generator().manual_seed(1)
    v = sample_views(500, g, scale=scale)
    b = v.boxes
    assert b.shape == (500, 4) and v.flips.shape == (500,) and v.flips.dtype == torch.bool
    assert (b >= 0).all() and (b <= 1 + 1e-6).all()
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    assert (w > 0).all() and (h > 0).all()
    area, ratio = w * h, w / h
    fallback = (w > 1 - 1e-6) & (h > 1 - 1e-6)  # no trial fitted: the whole image
    accepted = ~fallback
    assert accepted.float().mean() > 0.8  # even at (0.9, 1) most of the 10 trials fit
    assert (area[accepted] >= scale[0] - 1e-5).all() and (area[accepted] <= scale[1] + 1e-5).all()
    assert (ratio[accepted] >= 3 / 4 - 1e-5).all() and (ratio[accepted] <= 4 / 3 + 1e-5).all()
    # crops are placed anywhere the box fits, not pinned to a corner
    assert b[accepted, 0].std() > 0 and b[accepted, 1].std() > 0
    # flips are a fair coin
    assert 0.4 < v.flips.float().mean().item() < 0.6


def test_sampled_areas_cover_the_scale_range() -> None:
    v = sample_views(2000, torch.Generator().manual_seed(0), scale=(0.08, 1.0))
    area = (v.boxes[:, 2] - v.boxes[:, 0]) * (v.boxes[:, 3] - v.boxes[:, 1])
    assert area.min() < 0.1 and area.max() > 0.9
    assert math.isclose(area.median().item(), 0.54, abs_tol=0.06)  # uniform area on [0.08, 1]


def test_no_hflip_means_no_flips() -> None:
    v = sample_views(64, torch.Generator().manual_seed(0), hflip=False)
    assert not v.flips.any()


def test_per_batch_shares_one_box_and_flip() -> None:
    for seed in range(6):
        v = sample_views(5, torch.Generator().manual_seed(seed), per_batch=True)
        assert v.boxes.shape == (5, 4)
        assert torch.equal(v.boxes, v.boxes[:1].expand(5, 4))
        assert torch.equal(v.flips, v.flips[:1].expand(5))
    per_image = sample_views(5, torch.Generator().manual_seed(0))
    assert not torch.equal(per_image.boxes, per_image.boxes[:1].expand(5, 4))


def test_same_generator_seed_gives_the_same_views() -> None:
    a = sample_views(8, torch.Generator().manual_seed(7), scale=(0.3, 1.0))
    b = sample_views(8, torch.Generator().manual_seed(7), scale=(0.3, 1.0))
    c = sample_views(8, torch.Generator().manual_seed(8), scale=(0.3, 1.0))
    assert torch.equal(a.boxes, b.boxes) and torch.equal(a.flips, b.flips)
    assert not torch.equal(a.boxes, c.boxes)
    # the generator is the only source of randomness: the global RNG does not matter
    torch.manual_seed(123)
    d = sample_views(8, torch.Generator().manual_seed(7), scale=(0.3, 1.0))
    assert torch.equal(a.boxes, d.boxes)
