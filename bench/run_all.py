"""Runs every benchmark script in bench/ in sequence with the same flags: ``python bench/run_all.py [--quick]``.

A script is every ``bench/*.py`` but this one and the ``_``-prefixed helpers; each writes its figures to
``bench/results/<name>.json``. Exits non-zero when any script failed (the others still run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent


def scripts() -> list[Path]:
    return sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name and not p.name.startswith("_"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every script's smoke-check sizes")
    flags = ["--quick"] if parser.parse_args().quick else []
    failed = []
    for script in scripts():
        print(f"== {script.name} {' '.join(flags)}".rstrip(), flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(script), *flags], check=False).returncode
        print(f"== {script.name}: {'ok' if code == 0 else f'failed (exit {code})'} in "
              f"{time.perf_counter() - start:.0f} s\n", flush=True)
        if code:
            failed.append(script.name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
