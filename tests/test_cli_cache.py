"""``vlmdistill cache``: extraction reports what it stored; ``--verify`` re-hashes what size and mtime trust."""

from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner

from vlmdistill.cli import app


def test_cache_then_verify_finds_a_shard_changed_in_place(base_overrides: list[str]) -> None:
    runner = CliRunner()
    args = ["cache", "-", *base_overrides, "train.target_views=2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "3 views (the whole image + 2 random)" in " ".join(res.output.split())
    cache_dir = Path(next(o.split("=", 1)[1] for o in base_overrides if o.startswith("cache_dir=")))
    [store] = [p for p in (cache_dir / "targets").iterdir() if (p / "manifest.json").is_file()]
    res = runner.invoke(app, [*args, "--verify"])
    assert res.exit_code == 0 and f"{store}: ok" in " ".join(res.output.split()), res.output
    shard = sorted(store.glob("*.feats.f16"))[0]
    stamp = shard.stat().st_mtime_ns
    data = bytearray(shard.read_bytes())
    data[0] ^= 0xFF
    shard.write_bytes(bytes(data))
    os.utime(shard, ns=(stamp, stamp))
    res = runner.invoke(app, [*args, "--verify"])
    assert res.exit_code == 0 and "damaged shards [0]" in " ".join(res.output.split()), res.output
