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
GEOMETRY: dict[str, str] = {"squash": "squash", "center_crop": "center_crop-tv"}
"""Each resize mode's name in cache keys: ``center_crop`` now rounds as torchvision does (``center_crop_box``), so
teacher targets stored from the earlier rounding are not reused."""


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


def center_crop_box(width: int, height: int, base_size: int) -> tuple[int, int, int, int]:
    """``center_crop``'s geometry: (resized width, height, crop left, top). It is torchvision's ``Resize(S)`` then
    ``CenterCrop(S)`` to the pixel (long side ``int(S * long / short)``, offsets rounded half to even), so the
    eval transform of an open_clip export (``clip_benchmark.open_clip_preprocess``) sees the pixels we do."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(base_size * long / short)
    nw, nh = (base_size, new_long) if width <= height else (new_long, base_size)
    return nw, nh, round((nw - base_size) / 2.0), round((nh - base_size) / 2.0)


def _fit(im: Image.Image, base_size: int, resize: ResizeMode, interpolation: Interpolation) -> Image.Image:
    if resize == "squash":
        return im.resize((base_size, base_size), _RESAMPLE[interpolation])
    nw, nh, left, top = center_crop_box(*im.size, base_size)
    im = im.resize((nw, nh), _RESAMPLE[interpolation])
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
    return _tensor(_fit(_to_rgb(im), base_size, resize, interpolation))


def _tensor(im: Image.Image) -> torch.Tensor:
    arr = np.asarray(im, dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _rgb(source: Path | BytesIO, path: Path) -> Image.Image:
    """8-bit RGB of a file or bytes (``_to_rgb``), with this module's errors naming ``path``."""
    try:
        with Image.open(source) as im:
            _check_pixels(im)
            return _to_rgb(im)
    except FileNotFoundError as err:
        raise BadImageError(path, "file not found") from err
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"{err}") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombWarning) as err:
        raise BadImageError(path, f"{type(err).__name__}: {err}") from err


def decode_rgb(data: bytes, name: str) -> Image.Image:
    """The source pixels every reader starts from, before any resize: the image's bytes decoded to 8-bit RGB
    (deep images scaled); ``name`` names it in errors. For writers that hand images to other tools."""
    return _rgb(BytesIO(data), Path(name))


def _decode(source: Path | BytesIO, path: Path, base_size: int, resize: ResizeMode, interpolation: Interpolation
            ) -> torch.Tensor:
    return _tensor(_fit(_rgb(source, path), base_size, resize, interpolation))
