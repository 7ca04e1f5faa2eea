"""Quality: does an unlabelled image pool close the student's OOD gap to the teacher? On the demo world, over
seeds: the best variant (+ descriptions) with no pool, with the ID-only control pool, and with pools of the
domain at 1x and 4x the labelled train set (OOD 0-shot and ID mean per-class accuracy, mean ± std, last-5
mean, and training seconds per row).

    python bench/unlabeled_pool.py [--quick] [--seeds 3] [extra key=value overrides for every row]

Writes bench/results/unlabeled_pool.json and unlabeled_pool.png (OOD accuracy against pool size).
Target (issue 12): the 4x pool closes at least half of the no-pool student's OOD gap to the teacher, with
ID accuracy no more than 2 points lower.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from vlmdistill.demo.report import plot_ood_by_pool
from vlmdistill.demo.run import BEST_DESC, POOL_ROWS, Row, run_demo
from vlmdistill.io import atomic_write_json

ROWS = (Row("best_desc", "no pool", BEST_DESC), *POOL_ROWS)
RESULTS = Path(__file__).parent / "results"


def _cell(stats: dict) -> str:
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def _table(summary: dict) -> dict:
    """Print the README table; return the figures (with the share of the OOD gap each row closes)."""
    rows, teacher = summary["rows"], summary["rows"]["teacher"]["metrics"]
    base = rows["best_desc"]["metrics"]
    gap = teacher["ood"]["mean"] - base["ood"]["mean"]
    print("| row | ID | OOD 0-shot | OOD gap closed | training s |")
    print("|---|---|---|---|---|")
    print(f"| teacher | {_cell(teacher['id'])} | {_cell(teacher['ood'])} | | |")
    figures = {}
    for row in ROWS:
        stats = rows[row.key]["metrics"]
        closed = (stats["ood"]["mean"] - base["ood"]["mean"]) / gap if gap else 0.0
        seconds = rows[row.key]["train_seconds"]
        figures[row.key] = {"label": row.label, "pool": row.pool, "gap_closed": closed, "train_seconds": seconds,
                            **{m: stats[m] for m in ("id", "ood") if m in stats}}
        print(f"| {row.label} | {_cell(stats['id'])} | {_cell(stats['ood'])} | {100 * closed:.0f} % | {seconds:.0f} |")
    figures["teacher"] = {m: teacher[m] for m in ("id", "ood")}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small world, short training (smoke check)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/unlabeled_pool"))
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache/vlmdistill"))
    parser.add_argument("overrides", nargs="*", help="key=value overrides for every row")
    args = parser.parse_args()
    summary = run_demo(args.out, args.cache_dir, quick=args.quick, seeds=args.seeds, overrides=args.overrides,
                       progress=False, rows=ROWS)
    figures = _table(summary)
    point = {key: (figures[key]["ood"]["mean"], figures[key]["ood"]["std"]) for key in figures if key != "teacher"}
    suffix = "_quick" if args.quick else ""
    plot_ood_by_pool([(0, *point["best_desc"]), (1, *point["best_desc_pool1x"]), (4, *point["best_desc_pool4x"])],
                     (4, *point["best_desc_pool_id"]), figures["teacher"]["ood"]["mean"],
                     RESULTS / f"unlabeled_pool{suffix}.png")
    atomic_write_json(RESULTS / f"unlabeled_pool{suffix}.json",
                      {"quick": args.quick, "seeds": args.seeds, "overrides": args.overrides, "figures": figures,
                       "machine": summary["machine"], "seconds": summary["seconds"]})


if __name__ == "__main__":
    main()
