"""A target store larger than the memory a training process is allowed trains with bounded resident memory.

Builds a store of N images x V views x D dims (fp16 on disk) with a fast synthetic teacher, then trains a
student from it for a number of steps inside a cgroup-v1 memory limit smaller than the store, and prints
the store size, the limit, the peak resident memory and the cgroup's peak usage. Linux, root (cgroup v1
memory controller at /sys/fs/cgroup/memory).

    python bench/bounded_memory.py [--quick] [--limit-mb 900]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlmdistill.config import load_config
from vlmdistill.data.prepare import prepare
from vlmdistill.targets.store import ViewRecipe, open_store, store_footprint
from vlmdistill.teachers.base import Teacher
from vlmdistill.train import distill
from vlmdistill.workspace import build_workspace

CGROUP = Path("/sys/fs/cgroup/memory")


class RandomProjectionTeacher(Teacher):
    """A stand-in teacher: a fixed random projection of pooled pixels, so extraction costs almost nothing."""

    def __init__(self, embed_dim: int, image_size: int) -> None:
        super().__init__(torch.nn.Identity(), torch.device("cpu"), "fp32", 4096)
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(3 * 8 * 8, embed_dim, generator=g)
        self.id, self.description = f"random-projection-{embed_dim}", "random projection"
        self.embed_dim, self.image_size, self.context_length = embed_dim, image_size, 77
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def _encode_images(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(x, 8).flatten(1) @ self.proj

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        return torch.tensor([[len(t) % 97 + i for i in range(4)] for t in texts])

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(int(tokens.sum()))
        return torch.randn(len(tokens), self.embed_dim, generator=g)

    def count_tokens(self, text: str) -> int:
        return 4


def make_images(root: Path, n_classes: int, per_class: int, size: int) -> None:
    rng = np.random.default_rng(0)
    for c in range(n_classes):
        d = root / f"class_{c:03d}"
        d.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, 3)
        for i in range(per_class):
            pixels = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(d / f"{i:05d}.png")


def config(work: Path, args: argparse.Namespace) -> list[str]:
    return [f"data.dir={work / 'data'}", f"cache_dir={work / 'cache'}", f"output_dir={work / 'runs'}",
            "name=bounded", "data.base_size=32", "data.num_workers=0", "student.arch=resnet10t",
            "student.image_size=32", "student.model_kwargs={channels: [16, 32, 64, 128], stem_width: 16}",
            f"train.target_views={args.views}", "loss.imcst.weight=1", "optim.batch_size=256",
            f"optim.epochs={args.epochs}",
            f"train.max_steps={args.steps}", "train.progress=false", "train.analysis=false", "device=cpu"]


def build(work: Path, args: argparse.Namespace) -> dict:
    """Images, splits and the store, made outside the memory limit (extraction is not what is measured)."""
    if not (work / "data" / "prepare.json").is_file():
        make_images(work / "raw", args.classes, args.per_class, 32)
        prepare(work / "data", images=work / "raw", seed=0, id_fraction=0.9, train_fraction=0.9)
    cfg = load_config(None, config(work, args))
    ws = build_workspace(cfg, teacher=RandomProjectionTeacher(args.dim, 32))
    recipe = ViewRecipe(args.views, cfg.seed, cfg.data.crop_scale, cfg.data.hflip)
    return store_footprint(open_store(ws.teacher, ws.train, recipe, cfg.cache_dir, progress=False))


def train_inside(work: Path, args: argparse.Namespace) -> None:
    """The child: train from the existing store; report peak RSS."""
    cfg = load_config(None, config(work, args))
    ws = build_workspace(cfg, teacher=RandomProjectionTeacher(args.dim, 32))
    start = time.perf_counter()
    res = distill(cfg, ws)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    print(json.dumps({"steps": res["train"]["steps"], "seconds": time.perf_counter() - start,
                      "peak_rss_bytes": peak_rss, "rss_anon_kb": int(status["RssAnon"].split()[0]),
                      "rss_file_kb": int(status["RssFile"].split()[0])}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--work", type=Path, default=Path("runs/bench/bounded_memory"))
    parser.add_argument("--limit-mb", type=int, default=900)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.classes, args.per_class, args.views, args.dim, args.steps, args.epochs = (
        (10, 50, 8, 256, 5, 1) if args.quick else (40, 250, 32, 2048, 400, 12))
    if args.child:
        train_inside(args.work, args)
        return
    footprint = build(args.work, args)
    drop = Path("/proc/sys/vm/drop_caches")
    if os.access(drop, os.W_OK):
        os.sync()
        drop.write_text("3\n")  # the store's pages must be read (and charged) inside the limit, not found cached
    group = CGROUP / f"vlmdistill-bench-{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(args.limit_mb * 2**20))
        cmd = [sys.executable, __file__, "--child", "--work", str(args.work), *(["--quick"] if args.quick else [])]
        child = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: (group / "tasks").write_text(str(os.getpid())))
        out, _ = child.communicate()
        peak_cgroup = int((group / "memory.max_usage_in_bytes").read_text())
        oom = "oom_kill 1" in (group / "memory.oom_control").read_text() or child.returncode != 0
    finally:
        group.rmdir()
    result = json.loads(out.strip().splitlines()[-1]) if not oom else {}
    figures = {"store_disk_mb": footprint["disk_bytes"] / 2**20, "limit_mb": args.limit_mb,
               "peak_rss_mb": result.get("peak_rss_bytes", 0) / 2**20, "peak_cgroup_mb": peak_cgroup / 2**20,
               "rss_anon_mb_at_end": result.get("rss_anon_kb", 0) / 1024,
               "rss_file_mb_at_end": result.get("rss_file_kb", 0) / 1024,
               "steps": result.get("steps"), "seconds": result.get("seconds"), "oom": oom, "footprint": footprint}
    print(f"store {figures['store_disk_mb']:.0f} MiB on disk; memory limit {args.limit_mb} MiB; "
          f"trained {figures['steps']} steps in {figures['seconds'] or 0:.0f} s; cgroup peak (anonymous + page "
          f"cache charged to the run) {figures['peak_cgroup_mb']:.0f} MiB; at the end RSS anonymous "
          f"{figures['rss_anon_mb_at_end']:.0f} MiB + mapped file pages {figures['rss_file_mb_at_end']:.0f} MiB "
          f"(reclaimable); OOM: {oom}")
    (Path(__file__).parent / "results").mkdir(exist_ok=True)
    (Path(__file__).parent / "results" / "bounded_memory.json").write_text(json.dumps(figures, indent=2))
    if oom:
        sys.exit(1)


if __name__ == "__main__":
    main()
