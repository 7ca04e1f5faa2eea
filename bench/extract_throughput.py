"""Target-store extraction image-views/s vs the teacher's raw forward on pixels already in memory.

    .venv/bin/python bench/extract_throughput.py [--quick] [--threads N] [--device cpu|cuda]

Extraction is ``open_store`` on an empty cache: decoding, rendering every view at the teacher's size,
encoding, writing the store. Raw forward is ``Teacher.encode_images`` on one resident batch of
``teacher.batch_size`` images (the size extraction encodes at), timed before and after extraction so a
drift in machine load hits both. Also: reopening the finished store, and its footprint in bytes per
1,000 images per view, on disk and held in memory (``store_footprint``).
Goal: extraction / raw forward >= 0.8.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from _common import TEACHER_LABELS, bench_config, bench_dataset, parse_args, print_table, setup, sync, write_results

from vlmdistill.targets.store import TargetStore, ViewRecipe, open_store, store_footprint
from vlmdistill.teachers import Teacher
from vlmdistill.workspace import build_workspace

GOAL_RATIO = 0.8


@dataclass(frozen=True)
class Sizes:
    per_class: int
    image_px: int
    views: int
    images_per_batch: int
    raw_batches: int


# teacher.batch_size = images_per_batch * (views + 1): one encode call holds every view of a decoded batch.
FULL = Sizes(per_class=56, image_px=128, views=4, images_per_batch=12, raw_batches=4)
QUICK = Sizes(per_class=12, image_px=64, views=2, images_per_batch=8, raw_batches=4)


def raw_forward(teacher: Teacher, n_batches: int) -> tuple[int, float]:
    """The teacher alone on one batch of pixels already on its device: (images, seconds)."""
    x = torch.rand(teacher.batch_size, 3, teacher.image_size, teacher.image_size, device=teacher.device)
    sync(teacher.device)
    start = time.perf_counter()
    for _ in range(n_batches):
        teacher.encode_images(x)
    sync(teacher.device)
    return teacher.batch_size * n_batches, time.perf_counter() - start


def footprint(store: TargetStore) -> tuple[dict[str, Any], str]:
    """Disk and in-memory bytes of the store, as the store reports them."""
    found = dict(store_footprint(store))
    return {**found, "memory_bytes": found["ram_bytes"]}, "store_footprint"


def main() -> None:
    args = parse_args(__doc__)
    setup(args)
    s = QUICK if args.quick else FULL
    with bench_dataset(s.per_class, s.image_px) as (work, data_dir):
        cfg = bench_config(work, data_dir, args, [f"data.base_size={s.image_px}", f"train.target_views={s.views}",
                                                  f"teacher.batch_size={s.images_per_batch * (s.views + 1)}"])
        torch.manual_seed(0)
        ws = build_workspace(cfg)
        teacher, recipe = ws.teacher, ViewRecipe(s.views, cfg.seed, cfg.data.crop_scale, cfg.data.hflip)
        raw_forward(teacher, 1)
        before = raw_forward(teacher, s.raw_batches)
        start = time.perf_counter()
        store = open_store(teacher, ws.train, recipe, cfg.cache_dir, progress=False)
        extraction_s = time.perf_counter() - start
        after = raw_forward(teacher, s.raw_batches)
        start = time.perf_counter()
        open_store(teacher, ws.train, recipe, cfg.cache_dir, progress=False)
        reopen_s = time.perf_counter() - start
        foot, foot_source = footprint(store)
        n_images, n_views, dim = len(ws.train), store.n_views, teacher.embed_dim

    image_views = n_images * n_views
    extract_rate = image_views / extraction_s
    raw_rate = (before[0] + after[0]) / (before[1] + after[1])
    ratio = extract_rate / raw_rate
    per_1000 = {k: 1000 * foot[k] / image_views if foot.get(k) is not None else None
                for k in ("disk_bytes", "memory_bytes")}

    def kib(value: float | None) -> str:
        return "n/a" if value is None else f"{value / 1024:.1f} KiB"

    print_table(
        f"extract_throughput ({'quick' if args.quick else 'full'}): {n_images} images x {n_views} views "
        f"(whole image + {s.views}), teacher.batch_size={teacher.batch_size}, threads={args.threads}, {args.device}"
        f"\n  teacher: {TEACHER_LABELS[args.quick]}, embed_dim {dim}",
        [
            ("figure", "value", "goal"),
            ("extraction", f"{extract_rate:.1f}", f"image-views/s ({extraction_s:.1f} s, writing included)"),
            ("raw teacher forward", f"{raw_rate:.1f}", f"images/s (before {before[0] / before[1]:.1f}, "
             f"after {after[0] / after[1]:.1f})"),
            ("extraction / raw forward", f"{ratio:.2f}", f">= {GOAL_RATIO:g}"),
            ("reopen the finished store", f"{reopen_s:.2f} s", ""),
            ("disk per 1,000 images per view", kib(per_1000["disk_bytes"]),
             f"raw fp16 embeddings alone: {kib(1000 * 2 * dim)}"),
            ("in memory per 1,000 images per view", kib(per_1000["memory_bytes"]), f"from {foot_source}"),
        ],
    )
    figures = {
        "extraction_image_views_per_s": extract_rate,
        "raw_forward_images_per_s": raw_rate,
        "raw_forward_before_after": [before[0] / before[1], after[0] / after[1]],
        "extraction_vs_raw": ratio,
        "extraction_s": extraction_s,
        "reopen_s": reopen_s,
        "bytes_per_1000_image_views": per_1000,
        "fp16_embedding_bytes_per_1000_image_views": 1000 * 2 * dim,
        "footprint": foot,
        "footprint_source": foot_source,
        "goals": {"extraction_vs_raw_min": GOAL_RATIO},
        "meets_goals": {"extraction_vs_raw": ratio >= GOAL_RATIO},
    }
    setup_info = {**asdict(s), "teacher": TEACHER_LABELS[args.quick], "teacher_batch_size": teacher.batch_size,
                  "images": n_images, "store_views": n_views, "embed_dim": dim, "threads": args.threads,
                  "device": args.device, "num_workers": cfg.data.num_workers}
    print(f"-> {write_results('extract_throughput', args, setup_info, figures)}")


if __name__ == "__main__":
    main()
