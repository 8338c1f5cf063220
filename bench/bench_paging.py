"""Paired benchmark of the list endpoints (getlist, comments/getinfo) against a baseline revision.

    .venv/bin/python bench/bench_paging.py [--base main] [--rounds 5] [--only getlist,comments] [--quick]

Each round runs bench/bench.py (wrk -t1 -c64, server pinned to CPU 0 and wrk to CPU 1) once against im_backend.py
of --base (extracted with `git show` into a temporary directory) and once against this checkout, alternating
which goes first; it prints, per scenario, the median of the per-round ratios (this checkout / base) and their
range. It measures what `next_cursor` on every list page costs (getlist also reads `created_at`).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import subprocess
import sys
import tempfile

BENCH = pathlib.Path(__file__).resolve().parent
ROOT = BENCH.parent


def run(app_dir: pathlib.Path, only: str, output: pathlib.Path, quick: bool) -> dict[str, float]:
    command = [sys.executable, str(BENCH / "bench.py"), "--only", only, "--rows", "1000", "--app-dir", str(app_dir),
               "--output", str(output)] + (["--quick"] if quick else ["--duration", "5", "--warmup", "1"])
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, timeout=600)
    return {r["scenario"]: r["rps"] for r in json.loads(output.read_text())["results"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="main", help="git revision to compare with (default main)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", default="getlist,comments")
    parser.add_argument("--quick", action="store_true", help="3 s runs instead of 5 s")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="im-bench-paging-") as tmp:
        base = pathlib.Path(tmp) / "base"
        base.mkdir()
        source = subprocess.run(["git", "show", f"{args.base}:im_backend.py"], cwd=ROOT, check=True,
                                capture_output=True).stdout
        (base / "im_backend.py").write_bytes(source)
        ratios: dict[str, list[float]] = {}
        for round_no in range(args.rounds):
            order = [("base", base), ("head", ROOT)]
            if round_no % 2:
                order.reverse()
            rps = {name: run(directory, args.only, pathlib.Path(tmp) / f"{name}.json", args.quick)
                   for name, directory in order}
            for scenario, value in rps["head"].items():
                ratios.setdefault(scenario, []).append(value / rps["base"][scenario])
            print(f"round {round_no + 1}: " + ", ".join(f"{s} {rps['head'][s]:.0f}/{rps['base'][s]:.0f} req/s"
                                                       for s in rps["head"]), flush=True)
    print(f"\nthis checkout / {args.base}, median of {args.rounds} paired rounds (min-max):")
    for scenario, values in ratios.items():
        print(f"  {scenario:10} {statistics.median(values):.3f}  ({min(values):.3f}-{max(values):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
