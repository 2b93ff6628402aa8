"""Wall time of `toksearch_submit --dry-run` against bare Hydra apps composing the same config.

Every command runs as a fresh process (that is what a user waits for), all of them
alternated round by round so that the machine's load hits each alike; ratios of the
medians are the result (goal: the CLI within 1.3x of the minimal ``@hydra.main`` app).
The two floors: a minimal ``@hydra.main`` app (Hydra's app machinery, what the CLI
was built on before) and a bare ``initialize_config_module`` + ``compose`` script
(Hydra's compose API, what the CLI is built on now). ``--baseline REF`` adds the CLI
as it was at git REF (e.g. the commit before a change), so before and after are
measured in one run. Also reports whether the CLI process imported ray, pyspark or numpy.

    .venv/bin/python bench/bench_cli.py [--runs 15] [--baseline REF]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent

MAIN_APP = '''
import hydra
from toksearch_launch.config import register_configs

register_configs()

@hydra.main(config_path="pkg://toksearch_launch.conf", config_name="config", version_base=None)
def main(cfg):
    print(cfg.nodes, list(cfg.interactive.salloc))

main()
'''

COMPOSE_APP = '''
import sys
import warnings
from hydra import compose, initialize_config_module
from toksearch_launch.config import register_configs

register_configs()
warnings.filterwarnings("ignore", message=r".*is not available")
with initialize_config_module("toksearch_launch.conf", version_base=None):
    cfg = compose("config", overrides=sys.argv[1:])
    print(cfg.nodes, list(cfg.interactive.salloc))
'''


def timed(argv: List[str], cwd: str, env: Optional[Dict[str, str]] = None) -> Tuple[float, float]:
    """Wall time and CPU time (user + sys) of one fresh process; on a loaded machine the CPU time
    is the steadier of the two (the wall time carries the wait for a core)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"bench_cli: {argv[1:3]} exited {proc.returncode}")
    return wall, usage.ru_utime + usage.ru_stime


def checkout_package(ref: str, into: Path) -> Path:
    """The package as it was at ``ref`` (config groups in place), importable from the returned dir."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", ref, "toksearch_launch", "conf"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    shutil.move(str(into / "conf"), str(into / "toksearch_launch" / "conf"))  # pyproject's package-dir mapping
    return into


def compile_package() -> None:
    """Bytecode for the package, as a regular pip install has it (an editable install under
    PYTHONDONTWRITEBYTECODE would compile every module in every timed run; Hydra's has bytecode)."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(Path(__file__).resolve().parents[1] / "toksearch_launch")],
                   check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--baseline", metavar="REF", help="also time the CLI as it was at this git ref")
    args = parser.parse_args()
    compile_package()
    overrides = ["nodes=3", "site=saga", "site.slurm_version=22.05.8"]
    cli_args = ["-m", "toksearch_launch.cli", "--dry-run", *overrides, "python", "x.py", "--", "ray"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "main_app.py").write_text(MAIN_APP)
        (Path(tmp) / "compose_app.py").write_text(COMPOSE_APP)
        work = Path(tmp) / "work"
        work.mkdir()
        commands = {  # name: (argv, env)
            "toksearch_submit --dry-run (site=saga, 3 nodes)": ([sys.executable, *cli_args], None),
            "minimal @hydra.main app, same config": (
                [sys.executable, str(Path(tmp) / "main_app.py"), *overrides, "hydra.run.dir=.", "hydra.output_subdir=null"],
                None),
            "bare initialize_config_module + compose, same config": (
                [sys.executable, str(Path(tmp) / "compose_app.py"), *overrides], None),
        }
        if args.baseline:
            base = checkout_package(args.baseline, Path(tmp) / "baseline")
            env = {**os.environ, "PYTHONPATH": str(base)}
            commands[f"toksearch_submit --dry-run at {args.baseline}"] = ([sys.executable, *cli_args], env)
        times: Dict[str, List[float]] = {name: [] for name in commands}
        cpu: Dict[str, List[float]] = {name: [] for name in commands}
        for argv, env in commands.values():  # warm the page cache
            timed(argv, str(work), env)
        for _ in range(args.runs):
            for name, (argv, env) in commands.items():
                wall, used = timed(argv, str(work), env)
                times[name].append(wall)
                cpu[name].append(used)
        left = sorted(p.name for p in work.iterdir())
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from toksearch_launch.cli import main; main(['-d', *sys.argv[1:]]); "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'pyspark', 'numpy'}))",
             *overrides, "python", "x.py"], cwd=str(work), capture_output=True, text=True)
    wall_m = {name: statistics.median(t) for name, t in times.items()}
    cpu_m = {name: statistics.median(t) for name, t in cpu.items()}
    names = list(commands)
    load = os.getloadavg()
    print(f"machine: {platform.node()} {platform.machine()} {platform.python_version()}, {os.cpu_count()} CPUs, "
          f"date {time.strftime('%Y-%m-%d %H:%M %Z')}, runs {args.runs}, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    print("| command | wall median (s) | wall min (s) | CPU median (s) | CPU min (s) |")
    print("|---|---|---|---|---|")
    for name in names:
        print(f"| {name} | {wall_m[name]:.3f} | {min(times[name]):.3f} | {cpu_m[name]:.3f} | {min(cpu[name]):.3f} |")
    pairs = [("CLI / @hydra.main app (goal <= 1.3x)", names[0], names[1]), ("CLI / bare compose", names[0], names[2])]
    if args.baseline:
        pairs += [(f"CLI at {args.baseline} / @hydra.main app", names[3], names[1]),
                  (f"CLI now / CLI at {args.baseline}", names[0], names[3])]
    print("| ratio of medians | wall | CPU |")
    print("|---|---|---|")
    for label, a, b in pairs:
        print(f"| {label} | {wall_m[a] / wall_m[b]:.2f}x | {cpu_m[a] / cpu_m[b]:.2f}x |")
    print(f"files left in the working directory by the dry runs: {left or 'none'}")
    print(f"heavy modules imported by the CLI: {probe.stdout.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
