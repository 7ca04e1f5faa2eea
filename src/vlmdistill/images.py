"""The one place images are decoded, so every reader shares the same errors and the same geometry."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from vlmdistill.errors import VlmdistillError

ResizeMode = Literal["squash", "center_crop"]


class BadImageError(VlmdistillError, RuntimeError):
    """An image that cannot be read; the message names the file and the way out."""

    def __init__(self, path: Path, reason: str) -> None:
        self.path = Path(path)
        super().__init__(
            f"cannot read image {path}: {reason}. Fix: replace or delete the file, "
            "or set data.skip_bad_images=true to skip such images (they are counted in results.json)"
        )


def load_image(path: Path, base_size: int, resize: ResizeMode) -> torch.Tensor:
    """Decode to RGB and bring to a ``base_size`` square uint8 tensor [3, S, S].

    ``squash`` is the paper's 256x256 resize that ignores aspect ratio; ``center_crop`` resizes the
    shorter side and crops the centre, as CLIP's own preprocessing does.
    """
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if resize == "squash":
                im = im.resize((base_size, base_size), Image.Resampling.BICUBIC)
            else:
                w, h = im.size
                scale = base_size / min(w, h)
                nw, nh = max(base_size, round(w * scale)), max(base_size, round(h * scale))
                im = im.resize((nw, nh), Image.Resampling.BICUBIC)
                left, top = (nw - base_size) // 2, (nh - base_size) // 2
                im = im.crop((left, top, left + base_size, top + base_size))
            arr = np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError as err:
        raise BadImageError(path, "file not found") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise BadImageError(path, f"{type(err).__name__}: {err}") from err
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()
