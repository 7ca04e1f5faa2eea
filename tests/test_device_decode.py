"""``data.decode=device``: loader workers read JPEG bytes and the main process decodes them on the training device.

On CPU this is the same code as on CUDA with ``device='cpu'``: its pixels match PIL's within a stated tolerance,
other formats keep PIL's exact pixels, bad images behave as with ``data.decode=cpu``, and a run trains with a
target store of its own.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vlmdistill.config import load_config
from vlmdistill.data.dataset import Record
from vlmdistill.data.images import BadImageError, load_image
from vlmdistill.data.prepare import prepare
from vlmdistill.data.source import ImageSource
from vlmdistill.targets.lookup import target_recipe
from vlmdistill.targets.store import store_key, store_path
from vlmdistill.train import distill
from vlmdistill.workspace import build_workspace

CPU = torch.device("cpu")
# Measured on these generated JPEGs: mean 0.17 uint8 levels, max 1; on real photos (data/device_decode.py) mean
# 0.07-0.15, max 7 where bicubic overshoots at hard edges.
MEAN_LEVELS, MAX_LEVELS = 0.3, 8


def photo_like(size: tuple[int, int], seed: int) -> Image.Image:
    """Smooth colour gradients, a hard-edged block and mild noise: what JPEG and resize kernels meet in photos."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    arr = np.stack([255 * xx / w, 255 * yy / h, 128 + 100 * np.sin((xx + yy) / 9.0)], axis=-1)
    arr[h // 4 : h // 2, w // 3 : 2 * w // 3] = rng.integers(0, 255, 3)
    arr += rng.normal(0, 6, arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpegs(root: Path) -> list[Record]:
    """JPEGs of several shapes (landscape, portrait, square, smaller than the base) and one greyscale."""
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate([(160, 120), (90, 140), (64, 64), (40, 30)]):
        paths.append(root / f"{i}.jpg")
        photo_like(size, i).save(paths[-1], quality=90)
    paths.append(root / "grey.jpg")
    photo_like((100, 80), 9).convert("L").save(paths[-1], quality=90)
    return [Record(p, "c", p.name) for p in paths]


def device_source(records: list[Record], base: int = 48, **kwargs: object) -> ImageSource:
    return ImageSource(records, base, kwargs.pop("resize", "center_crop"), decode_device=CPU, **kwargs)


def served(source: ImageSource) -> tuple[list[int], torch.Tensor]:
    batches = list(source.batches(torch.arange(len(source)), batch_size=len(source)))
    return [i for b in batches for i in b.index.tolist()], torch.cat([b.images for b in batches])


@pytest.mark.parametrize("resize", ["center_crop", "squash"])
@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
def test_device_decode_matches_pil_within_tolerance(tmp_path: Path, resize: str, interpolation: str) -> None:
    records = jpegs(tmp_path)
    _, images = served(device_source(records, resize=resize, interpolation=interpolation))
    pil = torch.stack([load_image(r.path, 48, resize, interpolation) for r in records])  # type: ignore[arg-type]
    diff = (images.int() - pil.int()).abs().float()
    assert images.dtype == torch.uint8 and images.shape == pil.shape
    assert diff.mean() < MEAN_LEVELS and diff.max() <= MAX_LEVELS, (diff.mean(), diff.max())


def test_preloaded_device_decode_serves_the_streamed_pixels(tmp_path: Path) -> None:
    records = jpegs(tmp_path)
    assert torch.equal(served(device_source(records, preload=True))[1], served(device_source(records))[1])


def test_non_jpeg_and_cmyk_jpeg_keep_pils_exact_pixels(tmp_path: Path) -> None:
    """PNG and CMYK JPEG bytes are decoded in the worker by ``images.decode_image``, as with ``data.decode=cpu``."""
    png, cmyk = tmp_path / "a.png", tmp_path / "b.jpg"
    photo_like((70, 50), 1).save(png)
    photo_like((70, 50), 2).convert("CMYK").save(cmyk, quality=90)
    records = [Record(p, "c", p.name) for p in (png, cmyk)]
    _, images = served(device_source(records))
    assert torch.equal(images, torch.stack([load_image(p, 48, "center_crop") for p in (png, cmyk)]))


def corrupt_jpegs(root: Path) -> list[Record]:
    """A good JPEG, one truncated after its header (it reaches decode_jpeg), garbage named .jpg, a missing file."""
    [good] = jpegs(root / "good")[:1]
    data = good.path.read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "garbage.jpg").write_bytes(b"\xff\xd8\xff" + b"x" * 200)
    names = ["truncated.jpg", "garbage.jpg", "missing.jpg"]
    return [good, *(Record(root / n, "c", n) for n in names)]


@pytest.mark.parametrize("bad", [1, 2, 3])
def test_unreadable_image_is_a_named_bad_image(tmp_path: Path, bad: int) -> None:
    records = corrupt_jpegs(tmp_path)
    source = device_source([records[0], records[bad]])
    with pytest.raises(BadImageError, match=records[bad].path.name):
        served(source)


@pytest.mark.parametrize(("preload", "num_workers"), [(False, 0), (True, 0), (False, 1)])
def test_unreadable_images_are_skipped_and_counted(tmp_path: Path, preload: bool, num_workers: int) -> None:
    source = device_source(corrupt_jpegs(tmp_path), skip_bad=True, preload=preload, num_workers=num_workers)
    index, images = served(source)
    assert index == [0] and images.shape == (1, 3, 48, 48)
    assert source.bad_keys == ["garbage.jpg", "missing.jpg", "truncated.jpg"]


@pytest.fixture(scope="module")
def jpeg_dataset(tmp_path_factory: pytest.TempPathFactory, raw_images: Path) -> Path:
    """The session's generated dataset with every image saved as a JPEG, prepared the same way."""
    root = tmp_path_factory.mktemp("jpeg")
    for png in raw_images.glob("*/*.png"):
        (root / "images" / png.parent.name).mkdir(parents=True, exist_ok=True)
        Image.open(png).convert("RGB").save(root / "images" / png.parent.name / f"{png.stem}.jpg", quality=92)
    shutil.copy(raw_images.parent / "descriptions.json", root / "descriptions.json")
    prepare(root / "ds", images=root / "images", descriptions=root / "descriptions.json", seed=0)
    return root / "ds"


def test_training_with_device_decode_uses_a_store_of_its_own(base_overrides: list[str], jpeg_dataset: Path) -> None:
    common = [*base_overrides, f"data.dir={jpeg_dataset}", "optim.epochs=1", "data.preload=false",
              "loss.imcst.weight=1", "train.analysis=false"]
    cfg_cpu = load_config(None, [*common, "name=cpu"])
    cfg_dev = load_config(None, [*common, "name=device", "data.decode=device"])
    ws_cpu, ws_dev = build_workspace(cfg_cpu), build_workspace(cfg_dev)
    assert ws_dev.train.decode_device == CPU and ws_cpu.train.decode_device is None
    recipe = target_recipe(cfg_dev)
    key_cpu, key_dev = (store_key(ws.teacher, ws.train, recipe) for ws in (ws_cpu, ws_dev))
    assert key_cpu["preprocess"] == "base=40,resize=center_crop-tv,interp=bicubic,size=32,roi_align-v1"
    assert key_dev["preprocess"] == key_cpu["preprocess"] + ",decode=torchvision-cpu"
    distill(cfg_dev, ws_dev)
    assert (store_path(cfg_dev.cache_dir, key_dev) / "manifest.json").exists()
    assert not store_path(cfg_dev.cache_dir, key_cpu).exists()
    assert (cfg_dev.run_dir / "results.json").exists()
