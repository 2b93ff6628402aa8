"""Wall time of `toksearch_submit --dry-run` against a minimal Hydra app composing the same config.

Both run as fresh processes (that is what a user waits for), alternated so that the
machine's load hits both alike; the ratio of the medians is the result (goal <= 1.3x).
Also reports whether the CLI process imported ray, pyspark or numpy.

    .venv/bin/python bench/bench_cli.py [--runs 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MINIMAL_APP = '''
import hydra
from toksearch_launch.config import register_configs

register_configs()

@hydra.main(config_path="pkg://toksearch_launch.conf", config_name="config", version_base=None)
def main(cfg):
    print(cfg.nodes, list(cfg.interactive.salloc))

main()
'''


def timed(argv, cwd) -> float:
    start = time.perf_counter()
    subprocess.run(argv, cwd=cwd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        app = Path(tmp) / "minimal_app.py"
        app.write_text(MINIMAL_APP)
        overrides = ["nodes=3", "site=saga", "site.slurm_version=22.05.8"]
        ours = [sys.executable, "-m", "toksearch_launch.cli", "--dry-run", *overrides, "python", "x.py", "--", "ray"]
        floor = [sys.executable, str(app), *overrides, "hydra.run.dir=.", "hydra.output_subdir=null"]
        timed(ours, tmp), timed(floor, tmp)  # warm the page cache
        t_ours, t_floor = [], []
        for _ in range(args.runs):
            t_ours.append(timed(ours, tmp))
            t_floor.append(timed(floor, tmp))
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from toksearch_launch.cli import main; main(['-d', *sys.argv[1:]]); "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'pyspark', 'numpy'}))",
             *overrides, "python", "x.py"], cwd=tmp, capture_output=True, text=True)
    m_ours, m_floor = statistics.median(t_ours), statistics.median(t_floor)
    print(f"machine: {platform.node()} {platform.machine()} {platform.python_version()}, date {time.strftime('%Y-%m-%d')}, runs {args.runs}")
    print("| command | median (s) | min (s) |")
    print("|---|---|---|")
    print(f"| toksearch_submit --dry-run (site=saga, 3 nodes) | {m_ours:.3f} | {min(t_ours):.3f} |")
    print(f"| minimal Hydra app, same config | {m_floor:.3f} | {min(t_floor):.3f} |")
    print(f"| ratio | {m_ours / m_floor:.2f}x | goal <= 1.3x |")
    print(f"heavy modules imported by the CLI: {probe.stdout.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
