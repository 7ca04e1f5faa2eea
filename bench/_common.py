"""Shared pieces of the performance benchmarks: generated image folders, random-weight open_clip teachers,
configs, timing and result files. Everything is offline: no weights or data are downloaded.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from vlmdistill.config import ExperimentConfig, load_config
from vlmdistill.data.prepare import prepare

RESULTS = Path(__file__).parent / "results"

COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 220), "yellow": (230, 210, 40),
           "purple": (150, 50, 200)}
SHAPES = ("circle", "square")

# --quick: ViT-B-32's layout (patch 32 at 224 px, i.e. 7x7 tokens) scaled down to 96 px, 3x3 tokens, 4 layers.
TINY_VIT = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 96, "layers": 4, "width": 256, "head_width": 64, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2, "layers": 2},
}


def parse_args(doc: str) -> argparse.Namespace:
    """The flags every benchmark takes (``run_all.py`` passes ``--quick`` to each)."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke check in under a minute")
    parser.add_argument("--threads", type=int, help="torch threads, the same for every arm (default: 1 with "
                        "--quick, which stays quick on a busy machine, else torch's default)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda: the teacher and the student both run there")
    args = parser.parse_args()
    if args.threads is None:
        args.threads = 1 if args.quick else torch.get_num_threads()
    return args


def setup(args: argparse.Namespace) -> None:
    """Same torch threads everywhere, and silence open_clip's warning that a random teacher has no weights."""
    torch.set_num_threads(args.threads)
    logging.getLogger().addFilter(lambda r: "No pretrained weights loaded" not in r.getMessage())


def make_images(root: Path, per_class: int, size: int, seed: int = 0) -> None:
    """10 classes '<colour>_<shape>' of ``per_class`` PNGs: a filled shape on a noisy dark background."""
    rng = np.random.default_rng(seed)
    for colour, fill in COLOURS.items():
        for shape in SHAPES:
            folder = root / f"{colour}_{shape}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = Image.fromarray(rng.integers(0, 60, (size, size, 3), dtype=np.uint8))
                r = int(rng.integers(size // 6, size // 3))
                cx, cy = (int(v) for v in rng.integers(r, size - r, 2))
                draw = ImageDraw.Draw(img)
                (draw.ellipse if shape == "circle" else draw.rectangle)((cx - r, cy - r, cx + r, cy + r), fill=fill)
                img.save(folder / f"{i:04d}.png")


@contextmanager
def bench_dataset(per_class: int, size: int) -> Iterator[tuple[Path, Path]]:
    """A fresh temp folder (so no cache is reused) holding generated class folders split by
    ``vlmdistill prepare``: 8 ID classes with 90 % of their images in ID-train, 2 OOD classes.
    Yields (work folder, prepared dataset)."""
    with tempfile.TemporaryDirectory(prefix="vlmdistill-bench-") as tmp:
        work = Path(tmp)
        make_images(work / "images", per_class, size)
        prepare(work / "data", images=work / "images", seed=0, id_fraction=0.8, train_fraction=0.9)
        yield work, work / "data"


TEACHER_LABELS = {
    False: "open_clip ViT-B-32 (its own model config, random weights), 224 px",
    True: "ViT-B-32 layout scaled down (4 layers, width 256, patch 32, random weights), 96 px",
}


def teacher_overrides(work: Path, quick: bool) -> list[str]:
    """Config overrides for the random-weight open_clip teacher that ``TEACHER_LABELS[quick]`` describes."""
    if not quick:
        return ["teacher.name=ViT-B-32", "teacher.pretrained=random"]
    path = work / "bench-tiny-vit.json"
    path.write_text(json.dumps(TINY_VIT))
    return [f"teacher.model_config={path}", "teacher.pretrained=random"]


def bench_config(work: Path, data_dir: Path, args: argparse.Namespace, overrides: list[str]) -> ExperimentConfig:
    """A config over the generated data, with its cache and runs inside ``work`` (so nothing is reused)."""
    return load_config(None, [
        f"data.dir={data_dir}",
        f"cache_dir={work / 'cache'}",
        f"output_dir={work / 'runs'}",
        f"device={args.device}",
        f"teacher.device={args.device}",
        "train.progress=false",
        *teacher_overrides(work, args.quick),
        *overrides,
    ])


def sync(device: torch.device) -> None:
    """Wait for queued device work, so wall-clock timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def machine(args: argparse.Namespace) -> str:
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    gpu = f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""
    return f"{cpu}{gpu}, torch {torch.__version__}, threads={torch.get_num_threads()}, device {args.device}"


def print_table(title: str, rows: list[tuple[str, str, str]]) -> None:
    """Rows of (figure, value, goal) under a title."""
    width = max(len(r[0]) for r in rows)
    print(title)
    for name, value, goal in rows:
        print(f"  {name:<{width}}  {value:>12}  {goal}".rstrip())


def write_results(name: str, args: argparse.Namespace, setup: dict[str, Any], figures: dict[str, Any]) -> Path:
    """``bench/results/<name>.json``: the figures, what produced them, and on what."""
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"quick": args.quick, "setup": setup, "figures": figures, "machine": machine(args)},
                               indent=2) + "\n")
    return path
