"""JPEG decoding on the training device (``data.decode=device``): loader workers only read bytes.

On one GPU a small student trains thousands of images/s, more than PIL decoding on a few cores gives. So the
workers read each file's bytes (``read_encoded``) and the main process decodes a whole batch of JPEGs with
``torchvision.io.decode_jpeg(..., device=<training device>)`` (nvJPEG on CUDA, libjpeg-turbo on CPU: the same
code path, testable without a GPU) and brings each to the ``base_size`` square there (``decode_batch``).

Only what ``decode_jpeg`` reads as PIL does goes to the device: 8-bit RGB or grey JPEGs within the pixel limit
(``images.is_plain_jpeg``). Anything else (PNG, CMYK JPEG, deep TIFF) is decoded in the worker by
``images.decode_image``, exactly as with ``data.decode=cpu``, and so are the errors of unreadable headers.

Pixels differ slightly from PIL's: the JPEG decode itself is bit-identical on CPU (libjpeg-turbo in both; nvJPEG
on CUDA was not measured, no GPU was at hand), the resize is ``torch.nn.functional.interpolate(antialias=True)``
instead of PIL's ``Image.resize``. Measured on CPU on five real photos (512x600 to 720x477) at base 64, 224 and
256, both resize modes: mean absolute difference 0.07-0.15 uint8 levels, 99th percentile 1 level, maximum 1
(bilinear) and 3-7 (bicubic, at hard edges); tests/test_device_decode.py asserts it on generated JPEGs. The
target store key names the decode path, so stores from the two paths are never mixed.

torchvision 0.29 deprecates its decoders in favour of TorchCodec; the warning is silenced here, the one place
that calls them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from vlmdistill.data.compact import Record, record_key_path
from vlmdistill.data.images import (
    BadImageError,
    Interpolation,
    ResizeMode,
    center_crop_box,
    decode_image,
    is_plain_jpeg,
)
from vlmdistill.data.stream import read_member


def read_encoded(record: Record, base_size: int, resize: ResizeMode, interpolation: Interpolation) -> torch.Tensor:
    """Worker side: a plain JPEG's bytes as uint8 [n] for the device, any other image decoded here to
    uint8 [3, S, S] as ``data.decode=cpu`` does. A missing file or short shard is a ``BadImageError``."""
    name = Path(record_key_path(record))
    try:
        data = read_member(record) if record.shard is not None else record.path.read_bytes()
    except FileNotFoundError as err:
        raise BadImageError(name, "file not found") from err
    except OSError as err:
        raise BadImageError(name, f"{type(err).__name__}: {err}") from err
    if is_plain_jpeg(data):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return decode_image(data, str(name), base_size, resize, interpolation)


def collate_encoded(items: list[tuple[torch.Tensor, int, bool]]) -> tuple[list[torch.Tensor], torch.Tensor,
                                                                              torch.Tensor]:
    """A loader batch of ``read_encoded`` items: (bytes or images, as a list), index, ok."""
    return [x for x, _, _ in items], torch.tensor([i for _, i, _ in items]), torch.tensor([ok for _, _, ok in items])


def _jpegs(raw: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | RuntimeError]:
    """Each JPEG decoded to uint8 [3, H, W] on ``device`` (one batched call), or the error that stopped it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")
        try:
            return decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad image fails the batch: decode one by one to find it
            out: list[torch.Tensor | RuntimeError] = []
            for data in raw:
                try:
                    out.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as err:
                    out.append(err)
            return out


def fit(image: torch.Tensor, base_size: int, resize: ResizeMode, interpolation: Interpolation) -> torch.Tensor:
    """uint8 [3, H, W] -> uint8 [3, S, S] on its device, with ``images._fit``'s geometry (squash, or
    ``images.center_crop_box``) and an antialiased ``interpolate`` for PIL's resize."""
    h, w = image.shape[-2:]
    if resize == "squash":
        nw, nh, left, top = base_size, base_size, 0, 0
    else:
        nw, nh, left, top = center_crop_box(int(w), int(h), base_size)
    x = F.interpolate(image.unsqueeze(0).float(), size=(nh, nw), mode=interpolation, antialias=True,
                      align_corners=False)
    x = x[0, :, top : top + base_size, left : left + base_size]
    return x.round_().clamp_(0, 255).to(torch.uint8)


def decode_batch(raw: Sequence[torch.Tensor], names: Sequence[Path], base_size: int, resize: ResizeMode,
                 interpolation: Interpolation, device: torch.device, skip_bad: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Main-process side of a loader batch: JPEG bytes (1-d) decoded on ``device`` and fitted, images the
    workers decoded (3-d) moved there. Returns (uint8 [B, 3, S, S] on ``device``, ok [B] on CPU).

    JPEG data that does not decode is a ``BadImageError`` naming the image, or with ``skip_bad`` a zero image
    whose ``ok`` is False: the same contract as an image the workers cannot read."""
    out = torch.zeros(len(raw), 3, base_size, base_size, dtype=torch.uint8, device=device)
    ok = torch.ones(len(raw), dtype=torch.bool)
    jpeg = [i for i, x in enumerate(raw) if x.dim() == 1]
    for i, x in enumerate(raw):
        if x.dim() == 3:
            out[i] = x.to(device, non_blocking=True)
    decoded = _jpegs([raw[i] for i in jpeg], device) if jpeg else []
    for i, image in zip(jpeg, decoded, strict=True):
        if isinstance(image, RuntimeError):
            if not skip_bad:
                raise BadImageError(names[i], f"RuntimeError: {image}") from image
            ok[i] = False
        else:
            out[i] = fit(image, base_size, resize, interpolation)
    return out, ok
