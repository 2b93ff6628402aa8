"""Time `toksearch_submit --dry-run nodes=N ...`: the plan plus every in-job command for N nodes.

Issue 12.5 asks for under 1 s at 1,000 nodes.  Each run is a fresh CLI process (what a
user types), alternated between node counts; we report wall time and the child's CPU time
(user + sys, steadier than wall on a shared machine), min and median.  nodes=1 is the
floor (Python + Hydra compose + printing).

    .venv/bin/python bench/bench_dry_run.py [--repeat 5] [--nodes 1,100,1000]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUBMIT = Path(sys.executable).with_name("toksearch_submit")


def one_run(nodes: int, cwd: str, site: str) -> tuple[float, float, int]:
    """(wall s, child CPU s, lines printed) of one dry run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    res = subprocess.run([str(SUBMIT), "--dry-run", f"site={site}", f"nodes={nodes}", "python", "x.py"],
                         cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if res.returncode != 0:
        sys.exit(f"dry run failed (exit {res.returncode}): {res.stderr.strip()[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, res.stdout.count("\n")


def compile_package() -> None:
    """Bytecode for the package, as a regular pip install has it (an editable install under
    PYTHONDONTWRITEBYTECODE would compile every module in every timed run; Hydra's has bytecode)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(__file__).resolve().parents[1] / "toksearch_launch")],
                   check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--nodes", default="1,100,1000")
    ap.add_argument("--site", default="default")
    args = ap.parse_args()
    compile_package()
    counts = [int(n) for n in args.nodes.split(",")]
    results: dict[int, list[tuple[float, float, int]]] = {n: [] for n in counts}
    with tempfile.TemporaryDirectory() as cwd:
        one_run(1, cwd, args.site)  # warm the file cache
        for _ in range(args.repeat):
            for n in counts:  # alternated, so a busy moment hits every count alike
                results[n].append(one_run(n, cwd, args.site))
    print(f"# {platform.node()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}, site={args.site}")
    print("| nodes | lines printed | wall min / median (s) | CPU min / median (s) |")
    print("|---|---|---|---|")
    for n in counts:
        walls = [r[0] for r in results[n]]
        cpus = [r[1] for r in results[n]]
        print(f"| {n} | {results[n][0][2]} | {min(walls):.2f} / {statistics.median(walls):.2f} | "
              f"{min(cpus):.2f} / {statistics.median(cpus):.2f} |")


if __name__ == "__main__":
    main()
