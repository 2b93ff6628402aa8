"""Time from the ``compute_*()`` call to its first result: ``backend.start=background`` against
``lazy``, side by side in one run (site=local).

Each run is one job process as ``toksearch_submit`` would start it: lazy runs the
script itself (its ``compute_*()`` starts the cluster), background runs it under
the in-job wrapper (``python -m toksearch_launch.cluster.eager --start background``),
which starts the cluster as the job begins.  The script does ``--before`` seconds
of its own work first (a stand-in for reading its shot list), then calls
``compute_<backend>()`` on a tiny pipeline (8 shots, one trivial map), so the time
to its result is the time to the first result.  The modes alternate within each
repetition (lazy first on odd runs, background first on even ones) so drift on a
shared machine hits both alike.

    .venv/bin/python bench/bench_background.py [--backends ray,spark] [--repeat 3] [--before 0,5]

Prints a markdown table (medians, min-max) and each run's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from toksearch_launch.cluster import default_local_config  # noqa: E402

SCRIPT = r"""
import json, sys, time
t_begin = time.monotonic()
from toksearch_launch import Pipeline
backend, before = sys.argv[1], float(sys.argv[2])
time.sleep(before)  # the script's own work before it computes
pipe = Pipeline(list(range(8)))
@pipe.map
def double(rec):
    rec["x"] = rec["shot"] * 2
t0 = time.monotonic()
records = getattr(pipe, "compute_" + backend)()
first = time.monotonic() - t0
assert sorted(r["x"] for r in records) == [2 * s for s in range(8)]
print("RESULT " + json.dumps({"first_result": first, "script": time.monotonic() - t_begin}), flush=True)
"""


def one_run(backend: str, mode: str, before: float, nodes: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-bg-{mode}-"))
    cfg = run_dir / "toksearch.yaml"
    OmegaConf.save(default_local_config(nodes=nodes), cfg)
    env = dict(os.environ, TOKSEARCH_CONFIG=str(cfg), TOKSEARCH_RUN_DIR=str(run_dir))
    argv = [sys.executable, "-c", SCRIPT, backend, str(before)]
    if mode == "background":
        argv = [sys.executable, "-m", "toksearch_launch.cluster.eager", "--backend", backend,
                "--start", "background", "--", *argv]
    t = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    job = time.monotonic() - t
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        error = next((ln for ln in proc.stderr.splitlines() if "Error:" in ln), proc.stderr[-300:])
        raise RunFailed(f"{backend} {mode} run failed ({proc.returncode}): {error.strip()}")
    return {**json.loads(line[7:]), "job": job}


class RunFailed(RuntimeError):
    """One run's job failed (e.g. a daemon timed out on an overloaded machine)."""


def run_with_one_retry(backend: str, mode: str, before: float, nodes: int) -> dict:
    """A failed run is said and run once more (the table counts only runs that finished)."""
    try:
        return one_run(backend, mode, before, nodes)
    except RunFailed as exc:
        print(f"  {exc}; running it again", flush=True)
        return one_run(backend, mode, before, nodes)


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", default="ray,spark")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--before", default="0,5", help="seconds of the script's own work before compute_*()")
    ap.add_argument("--nodes", type=int, default=2)
    args = ap.parse_args()
    befores = [float(b) for b in args.before.split(",")]
    load = os.getloadavg()
    print(f"{platform.node()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
          f"load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} at start; site=local, {args.nodes} nodes, "
          f"{args.repeat} runs each, modes alternated", flush=True)
    rows = []
    for backend in args.backends.split(","):
        for before in befores:
            got: dict[str, list[dict]] = {"lazy": [], "background": []}
            for i in range(args.repeat):
                order = ("lazy", "background") if i % 2 == 0 else ("background", "lazy")
                for mode in order:
                    r = run_with_one_retry(backend, mode, before, args.nodes)
                    got[mode].append(r)
                    print(f"  {backend} before={before:g}s {mode:10s} run {i + 1}: first result "
                          f"{r['first_result']:.2f} s, job {r['job']:.2f} s", flush=True)
            lazy = statistics.median(r["first_result"] for r in got["lazy"])
            bg = statistics.median(r["first_result"] for r in got["background"])
            rows.append((backend, before, spread([r["first_result"] for r in got["lazy"]]),
                         spread([r["first_result"] for r in got["background"]]), lazy / bg if bg else float("inf"),
                         spread([r["job"] for r in got["lazy"]]), spread([r["job"] for r in got["background"]])))
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}\n")
    print("| backend | work before compute_*() | call to first result, lazy (s) | background (s) | lazy / background "
          "| whole job, lazy (s) | background (s) |")
    print("|---|---|---|---|---|---|---|")
    for backend, before, lazy, bg, ratio, job_lazy, job_bg in rows:
        print(f"| {backend} | {before:g} s | {lazy} | {bg} | {ratio:.1f}x | {job_lazy} | {job_bg} |")


if __name__ == "__main__":
    main()
