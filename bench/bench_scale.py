"""How start, teardown and the launcher's own cost grow with the node count (issue 12.4).

A start: for Ray and Spark at each node count (alternated within each repetition), one
SLURM job (``salloc -N N --exclusive srun -N1 --overlap python bench/bench_scale.py job
BACKEND``) starts the job's cluster and measures, on the script's node:

* ready: from ``Cluster.start()`` to every node registered (the lifecycle's own timing);
* launcher after ready: from all registered to ``start()`` returning (the program's start);
* srun clients: ``srun`` processes under the job process while the cluster runs, and
  their resident memory (RSS) in all;
* teardown: ``stop()`` to nothing left (``Cluster.leftovers`` empty is checked).

Not yet measured (see docs/benchmarks.md): the example's throughput, and the plot.

    .venv/bin/python bench/bench_scale.py [--nodes 1,2,3] [--backends ray,spark] [--repeat 3]
    .venv/bin/python bench/bench_scale.py job ray      # inside a job (or site=local alone)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def job(backend: str) -> dict:
    """In the job: start, count what runs on this node, stop."""
    import psutil

    from toksearch_launch.cluster import Cluster

    t0 = time.monotonic()
    c = Cluster(backend).start()
    started = time.monotonic() - t0
    me = psutil.Process()
    sruns = [p for p in me.children(recursive=True) if p.name() == "srun"]
    rss = sum(p.memory_info().rss for p in sruns if p.is_running())
    c.stop()
    return {"backend": backend, "nodes": len(c.node_addresses), "ready": c.timings["ready"],
            "after_ready": started - c.timings["ready"], "srun_clients": len(sruns),
            "srun_rss_mb": rss / 2 ** 20, "teardown": c.timings.get("stop"), "left": sorted(c.leftovers or [])}


def job_config(path: Path, nodes: int) -> Path:
    from omegaconf import OmegaConf

    from toksearch_launch.cluster import default_local_config

    cfg = default_local_config(
        nodes=nodes, site={"name": "bench", "scheduler": "slurm", "address": {"method": "dns"}},
        ray={"master": {"srun": ["--overlap"]}, "worker": {"srun": ["--overlap"]}},
        spark={"master": {"srun": ["--overlap"]}, "worker": {"srun": ["--overlap"], "start": []}},
    )
    OmegaConf.save(cfg, path)
    return path


def run_job(backend: str, nodes: int, tmp: Path) -> dict:
    run_dir = tmp / f"{backend}-{nodes}-{time.monotonic_ns()}"
    run_dir.mkdir()
    env = dict(os.environ, TOKSEARCH_CONFIG=str(job_config(run_dir / "toksearch.yaml", nodes)),
               TOKSEARCH_RUN_DIR=str(run_dir))
    res = subprocess.run(["salloc", f"-N{nodes}", "--exclusive", "srun", "-N1", "--overlap", sys.executable,
                          str(Path(__file__).resolve()), "job", backend],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        sys.exit(f"{backend} on {nodes} nodes failed (exit {res.returncode}); logs in {run_dir}/logs\n"
                 f"{res.stderr[-2000:]}")
    return json.loads(line[7:])


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "job":
        print("RESULT " + json.dumps(job(sys.argv[2])), flush=True)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="1,2,3")
    ap.add_argument("--backends", default="ray,spark")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    backends = args.backends.split(",")
    rows: dict[tuple[str, int], list[dict]] = {(b, n): [] for b in backends for n in counts}
    with tempfile.TemporaryDirectory(dir=REPO / ".") as tmp:  # on the shared filesystem
        for _ in range(args.repeat):
            for n in counts:
                for b in backends:
                    rows[(b, n)].append(run_job(b, n, Path(tmp)))
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load {os.getloadavg()[0]:.2f}, "
          f"{args.repeat} runs, medians")
    print("| backend | nodes | ready (s) | launcher after ready (s) | srun clients | srun RSS (MB) | teardown (s) |")
    print("|---|---|---|---|---|---|---|")
    med = lambda rs, k: statistics.median(r[k] for r in rs)  # noqa: E731
    for (b, n), rs in rows.items():
        assert all(not r["left"] for r in rs), rs
        print(f"| {b} | {n} | {med(rs, 'ready'):.2f} | {med(rs, 'after_ready'):.3f} | "
              f"{med(rs, 'srun_clients'):.0f} | {med(rs, 'srun_rss_mb'):.0f} | {med(rs, 'teardown'):.2f} |")


if __name__ == "__main__":
    main()
