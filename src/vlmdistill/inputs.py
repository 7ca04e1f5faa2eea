"""What ``vlmdistill.load``, ``DistilledModel`` and ``vlmdistill predict`` accept, checked before any work.

A wrong argument is one ``InputError`` naming the argument and the fix, never a traceback from deep inside
torch or a tokenizer, and never a silent wrong answer (a string taken as a list of one-letter classes, a
0-255 tensor taken as pixels in [0, 1]). The image rules follow what open_clip and torchvision users expect:

- PIL images and paths go through the run's eval transform (``DistilledModel.transform``).
- A **uint8** tensor [C, H, W] (or a batch [B, C, H, W]) is a decoded image, as ``torchvision.io.decode_image``
  returns it: any size, 1 (grey), 3 (RGB) or 4 (RGBA) channels. It goes through the same transform as the
  PIL image with those pixels, so it embeds exactly as its file does.
- A **float** tensor is pixels already transformed: [3, S, S] or [B, 3, S, S] at the model's ``image_size``,
  in [0, 1] (the student normalises itself). Other sizes, channel counts or ranges (0-255, or mean/std
  normalised) are refused: resizing or rescaling them silently would give other embeddings.
- A numpy array is refused: its channel order (RGB or OpenCV's BGR) cannot be told from the array.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from vlmdistill.errors import VlmdistillError

_ONE_IMAGE = (Image.Image, str, Path, torch.Tensor, np.ndarray)
"""What counts as one image (or, for a tensor, one batch) rather than a sequence of images."""

RANGE_SLACK = 1e-3
"""Float pixels may stray this far outside [0, 1] (rounding in a resize), no further."""


class InputError(VlmdistillError, ValueError):
    """An argument of load / predict / classify that cannot be used as given; the message names the fix."""


def text_list(texts: str | Sequence[str], what: str = "texts") -> list[str]:
    """A string is one text (as open_clip's tokenizer reads it); a sequence must hold strings, at least one."""
    if not isinstance(texts, str | Sequence):
        raise InputError(f"{what} is a {type(texts).__name__}: give a string or a list of strings")
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise InputError(f"{what} is empty: give at least one text, e.g. ['a photo of a cat']")
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise InputError(f"{what}[{i}] is {t!r} ({type(t).__name__}): give strings")
    return items


def class_names(names: Sequence[str], what: str = "class_names") -> list[str]:
    """Non-empty, distinct class names. A bare string is refused: iterating it would score one class a letter."""
    if isinstance(names, str):
        raise InputError(f"{what} is the string {names!r}, not a list: give a list of class names, "
                         f"e.g. [{names!r}, ...]")
    items = text_list(names, what)
    blank = [i for i, n in enumerate(items) if not n.strip()]
    if blank:
        raise InputError(f"{what}[{blank[0]}] is blank: every class needs a name")
    repeated = [n for n, c in Counter(items).items() if c > 1]
    if repeated:
        raise InputError(f"{what} names {', '.join(map(repr, repeated))} more than once: give each class once "
                         "(a repeated class would split its probability between its copies)")
    return items


def parse_class_list(text: str) -> list[str]:
    """``--classes "cat,dog"``: comma-separated names, stripped; none at all is an error."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    if not names:
        raise InputError(f"--classes {text!r} names no class: give comma-separated names, e.g. --classes \"cat,dog\"")
    return class_names(names, "--classes")


def top_k(k: Any, what: str = "top_k") -> int:
    """At least 1; more than the number of classes is allowed and returns every class."""
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise InputError(f"{what} {k!r}: give a whole number of labels per image, 1 or more")
    return int(k)


def device(name: str, what: str = "device") -> str:
    """``auto`` (the GPU when there is one), ``cpu``, ``cuda``/``cuda:N`` or ``mps``, checked to exist here."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise InputError(f"{what} {name!r} is not a device: give cpu, cuda, cuda:N, mps or auto") from err
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise InputError(f"{what} {name!r}: this machine has no usable CUDA GPU "
                             "(torch.cuda.is_available() is False); use cpu")
        if dev.index is not None and dev.index >= n:
            raise InputError(f"{what} {name!r}: this machine has {n} CUDA GPU(s), cuda:0 to cuda:{n - 1}")
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise InputError(f"{what} {name!r}: Apple's MPS is not available on this machine; use cpu")
    elif dev.type != "cpu":
        raise InputError(f"{what} {name!r}: vlmdistill runs on cpu, cuda or mps, not {dev.type}")
    return name


def _image_list(images: Any) -> list[Any]:
    """One image (a tensor may be a batch) or a sequence of them, as a list of at least one."""
    if isinstance(images, _ONE_IMAGE):
        return [images]
    if not isinstance(images, Sequence):
        raise InputError(f"images is a {type(images).__name__}: give a PIL image, a path, a tensor, or a list of them")
    if not images:
        raise InputError("images is empty: give at least one PIL image, path or tensor")
    return list(images)


def _refuse_other(item: Any, where: str) -> None:
    """Anything but a PIL image, path or tensor, with the fix for numpy arrays (the usual case)."""
    if isinstance(item, np.ndarray):
        raise InputError(
            f"{where} is a numpy array {tuple(item.shape)} {item.dtype}: give PIL.Image.fromarray(array) (the "
            "array in RGB order, uint8 H x W x 3; cv2 images are BGR: cv2.cvtColor(a, cv2.COLOR_BGR2RGB) first), "
            "or torch.from_numpy(array).permute(2, 0, 1) as a uint8 tensor"
        )
    if not isinstance(item, Image.Image | str | Path | torch.Tensor):
        raise InputError(f"{where} is a {type(item).__name__}: give a PIL image, a path or a tensor")


def _uint8_images(t: torch.Tensor, where: str) -> list[Image.Image]:
    """A uint8 [C, H, W] or [B, C, H, W] tensor as the PIL images with those pixels (grey, RGB or RGBA)."""
    batch = t.unsqueeze(0) if t.dim() == 3 else t
    if batch.dim() != 4 or batch.shape[1] not in (1, 3, 4) or min(batch.shape[2:]) < 1:
        raise InputError(f"{where} is a uint8 tensor of shape {tuple(t.shape)}: give [C, H, W] or [B, C, H, W] "
                         "with C = 1 (grey), 3 (RGB) or 4 (RGBA)")
    arrays = batch.permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in arrays]


def _float_pixels(t: torch.Tensor, size: int, where: str) -> torch.Tensor:
    """A float tensor checked to be transformed pixels: [B, 3, size, size] in [0, 1]."""
    batch = t.unsqueeze(0) if t.dim() == 3 else t
    shape = tuple(t.shape)
    if batch.dim() != 4 or batch.shape[1] != 3:
        grey = " (grey: repeat it, x.expand(3, -1, -1))" if batch.dim() == 4 and batch.shape[1] == 1 else ""
        raise InputError(f"{where} is a float tensor of shape {shape}: give RGB pixels [3, {size}, {size}] or "
                         f"[B, 3, {size}, {size}]{grey}, or a uint8 tensor, PIL image or path of any size")
    if tuple(batch.shape[2:]) != (size, size):
        raise InputError(f"{where} is a float tensor of {batch.shape[2]}x{batch.shape[3]} pixels; this model takes "
                         f"{size}x{size}: pass model.transform(image), or the uint8 tensor, PIL image or path, "
                         "which are resized the way the run was evaluated")
    if batch.numel() and not bool(torch.isfinite(batch).all()):
        raise InputError(f"{where} holds NaN or infinite values: give pixels in [0, 1]")
    lo, hi = (float(v) for v in batch.aminmax()) if batch.numel() else (0.0, 0.0)
    if lo < -RANGE_SLACK:
        raise InputError(f"{where} has float pixels down to {lo:g}: give pixels in [0, 1] before mean/std "
                         "normalisation (the student normalises itself)")
    if hi > 1 + RANGE_SLACK:
        raise InputError(f"{where} has float pixels up to {hi:g}: float tensors are pixels in [0, 1]; divide by "
                         "255, or pass the uint8 tensor as it is")
    return batch.float()


def to_pixels(images: Any, transform: Callable[[Any], torch.Tensor], size: int) -> torch.Tensor:
    """Images of any accepted kind (the module's rules) -> float [B, 3, size, size] in [0, 1]."""
    items = _image_list(images)
    out: list[torch.Tensor] = []
    for i, item in enumerate(items):
        where = "images" if isinstance(images, _ONE_IMAGE) else f"images[{i}]"
        _refuse_other(item, where)
        if not isinstance(item, torch.Tensor):
            out.append(transform(item))
        elif item.dtype == torch.uint8:
            out += [transform(im) for im in _uint8_images(item, where)]
        elif item.is_floating_point():
            out += list(_float_pixels(item, size, where))
        else:
            raise InputError(f"{where} is a {item.dtype} tensor: give uint8 (a decoded image, 0-255) or float "
                             "(transformed pixels in [0, 1])")
    if not out:
        raise InputError("images is an empty batch: give at least one image")
    return torch.stack(out)
