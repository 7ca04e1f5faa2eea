"""Quality: OOD zero-shot accuracy with view-consistent teacher targets (ours) vs whole-image targets (the
paper's), on the demo world, same everything else, several seeds. Prints mean ± std and the difference.

    python bench/view_targets.py [--quick] [--seeds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from vlmdistill.demo.run import BEST, Row, run_demo

ROWS = (
    Row("same_view", "view-consistent targets (ours)", (*BEST, "text.use_descriptions=true")),
    Row("whole_image", "whole-image targets (paper)",
        (*BEST, "text.use_descriptions=true", "train.teacher_view=whole")),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small world, short training (smoke check)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/view_targets"))
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/vlmdistill"))
    args = parser.parse_args()
    summary = run_demo(args.out, args.cache_dir, quick=args.quick, seeds=args.seeds, progress=False, rows=ROWS)
    figures = {}
    for key in ("same_view", "whole_image"):
        stats = summary["rows"][key]["metrics"]
        figures[key] = {m: stats[m] for m in ("ood", "id", "gzsl_h", "m_rel_ood") if m in stats}
        ood = stats["ood"]
        label = summary["rows"][key]["label"]
        print(f"{label:<36} OOD 0-shot {ood['mean']:.2f} ± "
              f"{ood['std']:.2f}  ID {stats['id']['mean']:.2f}  M_rel OOD {stats['m_rel_ood']['mean']:.3f}")
    ours, paper = (summary["rows"][k]["metrics"]["ood"]["values"] for k in ("same_view", "whole_image"))
    diffs = [a - b for a, b in zip(ours, paper, strict=True)]
    figures["ood_difference"] = {"mean": statistics.fmean(diffs), "per_seed": diffs}
    print(f"OOD difference (ours - paper): {statistics.fmean(diffs):+.2f} points, per seed {diffs}")
    out = Path(__file__).parent / "results" / "view_targets.json"
    out.write_text(json.dumps({"quick": args.quick, "seeds": args.seeds, "figures": figures,
                               "machine": summary["machine"]}, indent=2))


if __name__ == "__main__":
    main()
