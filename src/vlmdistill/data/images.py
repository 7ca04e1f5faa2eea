"""The one place images are decoded, so every reader shares the same errors and the same geometry."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from vlmdistill.errors import VlmdistillError

ResizeMode = Literal["squash", "center_crop"]
Interpolation = Literal["bicubic", "bilinear"]
_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


TRAINING_FIX = ("replace or delete the file, or set data.skip_bad_images=true to skip such images (they are "
                "counted in results.json)")
"""The way out where a dataset is read (train, eval, cache); a reader of single images gives its own ``fix``."""


class BadImageError(VlmdistillError, RuntimeError):
    """An image that cannot be read; the message names the file and the way out."""

    def __init__(self, path: Path, reason: str, fix: str = TRAINING_FIX) -> None:
        self.path, self.reason = Path(path), reason
        super().__init__(f"cannot read image {path}: {reason}. Fix: {fix}")


def _to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any mode, scaling deep images by their true range instead of clipping them.

    ``convert("RGB")`` clips 16-bit and float pixels to 255, so: 16-bit ("I;16*", and "I", which 16-bit
    PNGs and TIFFs open as) is divided by 257 (65535 -> 255); float ("F") in [0, 1] is multiplied by 255,
    float outside [0, 1] is stretched from its own min..max. Other modes (palette, LA, CMYK, ...) are
    8-bit already and PIL converts them correctly.
    """
    if im.mode.startswith("I"):
        arr = np.asarray(im).astype(np.float64) / 257.0
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if lo < 0.0 or hi > 1.0:
            arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
        arr = np.nan_to_num(arr) * 255.0
    else:
        return im.convert("RGB")
    grey = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")


def _check_pixels(im: Image.Image) -> None:
    """PIL only warns between MAX_IMAGE_PIXELS and twice it; any image over the limit is a bad image."""
    limit = Image.MAX_IMAGE_PIXELS
    if limit is not None and im.size[0] * im.size[1] > limit:
        raise Image.DecompressionBombError(
            f"{im.size[0]}x{im.size[1]} pixels exceed the limit of {limit} pixels (a decompression bomb?)"
        )


def _fit(im: Image.Image, base_size: int, resize: ResizeMode, interpolation: Interpolation) -> Image.Image:
    if resize == "squash":
        return im.resize((base_size, base_size), _RESAMPLE[interpolation])
    w, h = im.size
    scale = base_size / min(w, h)
    nw, nh = max(base_size, round(w * scale)), max(base_size, round(h * scale))
    im = im.resize((nw, nh), _RESAMPLE[interpolation])
    left, top = (nw - base_size) // 2, (nh - base_size) // 2
    return im.crop((left, top, left + base_size, top + base_size))


def load_image(path: Path, base_size: int, resize: ResizeMode, interpolation: Interpolation = "bicubic"
               ) -> torch.Tensor:
    """Decode to RGB and bring to a ``base_size`` square uint8 tensor [3, S, S].

    ``squash`` is the paper's 256x256 resize that ignores aspect ratio; ``center_crop`` resizes the
    shorter side and crops the centre, as CLIP's own preprocessing does. ``bilinear`` is what the official
    code's ``Resize([256, 256])`` does on PIL images (paper mode); ``bicubic`` is CLIP's. Decompression bombs (headers
    claiming more than ``PIL.Image.MAX_IMAGE_PIXELS``) are bad images, like any unreadable file.
    """
    return _decode(path, path, base_size, resize, interpolation)


def decode_image(data: bytes, name: str, base_size: int, resize: ResizeMode, interpolation: Interpolation = "bicubic"
                 ) -> torch.Tensor:
    """``load_image`` for an image's bytes already read (a tar shard member); ``name`` names it in errors."""
    return _decode(BytesIO(data), Path(name), base_size, resize, interpolation)


def is_plain_jpeg(data: bytes) -> bool:
    """True for 8-bit RGB or grey JPEG bytes within the pixel limit (read from the header only): what
    ``torchvision.io.decode_jpeg`` reads as PIL does. Anything else (PNG, CMYK JPEG, unreadable bytes) is left to
    ``decode_image``, so its pixels and its ``BadImageError`` stay exactly this module's."""
    try:
        with Image.open(BytesIO(data)) as im:
            _check_pixels(im)
            return im.format == "JPEG" and im.mode in ("RGB", "L")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        return False


def fit_image(im: Image.Image, base_size: int, resize: ResizeMode, interpolation: Interpolation = "bicubic"
              ) -> torch.Tensor:
    """An opened image as every reader decodes it: 8-bit RGB (deep images scaled), ``base_size`` square,
    uint8 [3, S, S]."""
    arr = np.asarray(_fit(_to_rgb(im), base_size, resize, interpolation), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _decode(source: Path | BytesIO, path: Path, base_size: int, resize: ResizeMode, interpolation: Interpolation
            ) -> torch.Tensor:
    try:
        with Image.open(source) as im:
            _check_pixels(im)
            return fit_image(im, base_size, resize, interpolation)
    except FileNotFoundError as err:
        raise BadImageError(path, "file not found") from err
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"{err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
        raise BadImageError(path, f"{type(err).__name__}: {err}") from err
