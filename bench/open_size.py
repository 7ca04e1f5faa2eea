"""Opening a dataset of 10^4, 10^5 and 10^6 entries: seconds and peak resident memory.

Generates a tar-shard dataset index (``shards/train.keys`` in list-file format, ``train.members.npy``,
``index.json``; the shards are placeholders, as opening reads only the index and stats each shard) of N
train entries over 1000 classes, then opens it with ``open_dataset`` in a fresh subprocess and reports
the seconds to open, the peak RSS (VmHWM), the RSS of the imports alone, and what the entries would cost
as a plain list of ``Record``s (the layout before compact records), made in another subprocess.

    python bench/open_size.py [--quick]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from _common import parse_args, print_table, write_results

from vlmdistill.data.shards import MEMBER_DTYPE

PER_SHARD = 1000
PROBE = """
import json, time
from pathlib import Path
from vlmdistill.data.dataset import open_dataset
from vlmdistill.data.compact import Record

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

base = hwm()
start = time.perf_counter()
ds = open_dataset(Path({root!r}))
seconds = time.perf_counter() - start
assert len(ds.train) == {n}
if {as_list}:
    kept = [Record(r.path, r.class_dir, r.key, r.shard, r.offset, r.size) for r in ds.train.records]
print(json.dumps({{"seconds": seconds, "base_mb": base, "peak_mb": hwm()}}))
"""


def make_index(root: Path, n: int) -> int:
    """A shard dataset index of ``n`` train entries (and 10 OOD ones); returns the bytes of the train key list."""
    folder = root / "shards"
    folder.mkdir(parents=True)
    splits = {}
    for split, count in (("train", n), ("val", 10)):
        shards = max(1, -(-count // PER_SHARD))
        for s in range(shards):
            (folder / f"{split}-{s:06d}.tar").write_bytes(b"")
        i = np.arange(count)
        tag = "" if split == "train" else "_ood"
        keys = "".join(f"{split}/class_{c:04d}{tag}/image_{k:08d}.jpg\n" for c, k in zip(i % 1000, i, strict=True))
        (folder / f"{split}.keys").write_text(keys)
        members = np.zeros(count, dtype=MEMBER_DTYPE)
        members["shard"], members["offset"], members["size"] = i // PER_SHARD, (i % PER_SHARD) * 4096, 4096
        np.save(folder / f"{split}.members.npy", members)
        splits[split] = {"members": count,
                         "shards": [{"name": f"{split}-{s:06d}.tar", "bytes": 0} for s in range(shards)]}
    (folder / "index.json").write_text(json.dumps({"format": 1, "shard_size": PER_SHARD, "splits": splits}))
    (root / "prepare.json").write_text(json.dumps({"format": "shards"}))
    return (folder / "train.keys").stat().st_size


def probe(root: Path, n: int, as_list: bool) -> dict[str, float]:
    code = PROBE.format(root=str(root), n=n, as_list=as_list)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    args = parse_args(__doc__)
    sizes = [10**3, 10**4] if args.quick else [10**4, 10**5, 10**6]
    figures, rows = {}, []
    for n in sizes:
        with tempfile.TemporaryDirectory(prefix="vlmdistill-open-") as tmp:
            list_bytes = make_index(Path(tmp), n)
            opened, as_list = probe(Path(tmp), n, False), probe(Path(tmp), n, True)
        grow, grow_list = opened["peak_mb"] - opened["base_mb"], as_list["peak_mb"] - as_list["base_mb"]
        figures[str(n)] = {"seconds": round(opened["seconds"], 3), "peak_rss_mb": round(opened["peak_mb"], 1),
                           "imports_rss_mb": round(opened["base_mb"], 1), "open_growth_mb": round(grow, 1),
                           "list_of_records_growth_mb": round(grow_list, 1),
                           "key_list_mb": round(list_bytes / 2**20, 1)}
        rows += [(f"{n:>9,} entries: seconds to open", f"{opened['seconds']:.2f}", ""),
                 (f"{n:>9,} entries: peak RSS MB", f"{opened['peak_mb']:.0f}", "goal < 1024 at 10^6"),
                 (f"{n:>9,} entries: RSS growth MB (imports {opened['base_mb']:.0f})", f"{grow:.0f}",
                  f"key list {list_bytes / 2**20:.0f} MB; plus a list of Records: {grow_list:.0f} MB")]
    print_table("open_dataset on a tar-shard index (fresh subprocess per size)", rows)
    path = write_results("open_size", args, {"sizes": sizes, "classes": 1000, "per_shard": PER_SHARD}, figures)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
