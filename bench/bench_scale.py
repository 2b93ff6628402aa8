"""How start, teardown, the launcher's own cost and throughput grow with the node count (issue 12.4).

Each measurement is one real job, ``toksearch_submit --config-dir tests/conf site=tsci -N N
python bench/bench_scale.py job BACKEND`` on the SLURM test cluster (``ci/slurm/up.sh``;
``TOKSEARCH_CI_SLURM_NODES=8`` for 8 nodes). Node counts and backends alternate within each
repetition, so load drifts hit every configuration alike. In the job, on the script's node:

* ready: ``Cluster.start()`` to every node registered (the lifecycle's own timing);
* launcher after ready: all registered to ``start()`` returning, i.e. to the program's start;
* srun clients: ``srun`` processes under the script while the cluster runs (an srun's own
  helper child is not a client), and their resident memory (RSS) in all;
* throughput: the example's pipeline (``examples/toksearch_example.py``'s ``create_pipeline``
  on SyntheticSignal with a per-fetch latency that imitates a server) in records/s;
* teardown: ``stop()`` to nothing left (``Cluster.leftovers`` must be empty).

    .venv/bin/python bench/bench_scale.py [--nodes 1,2,4,8] [--backends ray,spark] [--repeat 3]
        [--shots 2000] [--latency 0.01] [--plot docs/bench_scale.png] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SITE = ["--config-dir", str(REPO / "tests" / "conf"), "site=tsci"]
METRICS = (("ready", "ready (s)", "{:.2f}"), ("after_ready", "launcher after ready (s)", "{:.3f}"),
           ("srun_clients", "srun clients", "{:.0f}"), ("srun_rss_mb", "srun RSS (MB)", "{:.0f}"),
           ("records_per_s", "example (records/s)", "{:.0f}"), ("teardown", "teardown (s)", "{:.2f}"))


def srun_clients(root) -> list:
    """srun processes under ``root`` whose parent is not an srun (srun forks a helper of its own)."""
    procs = [p for p in root.children(recursive=True) if p.name() == "srun"]
    pids = {p.pid for p in procs}
    return [p for p in procs if p.ppid() not in pids]


def job(backend: str, shots: int, latency: float) -> dict:
    """In the job: start the job's cluster, count what runs on this node, run the example, stop."""
    import psutil

    sys.path.insert(0, str(REPO / "examples"))
    from toksearch_example import create_pipeline

    from toksearch_launch import SyntheticSignal
    from toksearch_launch.cluster import job_cluster

    t0 = time.monotonic()
    cluster = job_cluster(backend)
    started = time.monotonic() - t0
    clients = srun_clients(psutil.Process())
    rss = sum(p.memory_info().rss for p in clients if p.is_running())
    pipeline = create_pipeline(range(shots), SyntheticSignal("ipmhd", latency=latency))
    t1 = time.monotonic()
    result = getattr(pipeline, f"compute_{backend}")(store=None)
    elapsed = time.monotonic() - t1
    failed = sum(1 for rec in result if rec.errors)
    if len(result) != shots or failed:
        sys.exit(f"{backend}: {len(result)} records of {shots}, {failed} with errors")
    cluster.stop()
    return {"backend": backend, "nodes": len(cluster.node_addresses), "ready": cluster.timings["ready"],
            "after_ready": started - cluster.timings["ready"], "srun_clients": len(clients),
            "srun_rss_mb": rss / 2 ** 20, "records_per_s": shots / elapsed,
            "teardown": cluster.timings.get("stop"), "left": sorted(cluster.leftovers or [])}


def run_job(backend: str, nodes: int, shots: int, latency: float) -> dict:
    argv = [sys.executable, "-m", "toksearch_launch.cli", *SITE, f"nodes={nodes}", "interactive.salloc_extra=[--exclusive]",
            sys.executable, str(Path(__file__).resolve()), "job", backend, str(shots), str(latency)]
    env = {k: v for k, v in os.environ.items() if k not in ("TOKSEARCH_CONFIG", "TOKSEARCH_RUN_DIR")}
    res = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900,
                         stdin=subprocess.DEVNULL)
    found = re.search(r"^RESULT (.*)$", res.stdout, re.M)
    if found is None:
        sys.exit(f"{backend} on {nodes} nodes failed (exit {res.returncode}):\n{res.stdout[-1500:]}\n{res.stderr[-2500:]}")
    row = json.loads(found.group(1))
    if row["left"]:
        sys.exit(f"{backend} on {nodes} nodes left processes running: {row['left']}")
    return row


def table(rows: dict) -> list[str]:
    head = "| backend | nodes | " + " | ".join(title for _, title, _ in METRICS) + " |"
    lines = [head, "|" + "---|" * (2 + len(METRICS))]
    for (backend, nodes), rs in rows.items():
        cells = [fmt.format(statistics.median(r[key] for r in rs)) for key, _, fmt in METRICS]
        lines.append(f"| {backend} | {nodes} | " + " | ".join(cells) + " |")
    return lines


def plot(rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("ready", "after_ready", "srun_clients", "records_per_s")
    fig, axes = plt.subplots(1, len(keys), figsize=(3.2 * len(keys), 2.8))
    for ax, key in zip(axes, keys):
        for backend in sorted({b for b, _ in rows}):
            pts = sorted((n, statistics.median(r[key] for r in rs)) for (b, n), rs in rows.items() if b == backend)
            ax.plot([n for n, _ in pts], [v for _, v in pts], marker="o", label=backend)
        ax.set_xticks(sorted({n for _, n in rows}))
        ax.set_xlabel("nodes")
        ax.set_title(dict((k, t) for k, t, _ in METRICS)[key], fontsize=9)
        ax.set_ylim(bottom=0)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "job":
        print("RESULT " + json.dumps(job(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))), flush=True)
        return
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="1,2,4,8")
    ap.add_argument("--backends", default="ray,spark")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--shots", type=int, default=2000)
    ap.add_argument("--latency", type=float, default=0.01, help="seconds per fetch (imitates a server)")
    ap.add_argument("--plot", default=None, help="write the growth plot (PNG) here")
    ap.add_argument("--json", default=None, help="write every measurement here")
    args = ap.parse_args()
    counts = [int(n) for n in args.nodes.split(",")]
    backends = args.backends.split(",")
    rows: dict[tuple[str, int], list[dict]] = {(b, n): [] for b in backends for n in counts}
    for _ in range(args.repeat):
        for n in counts:
            for b in backends:
                rows[(b, n)].append(run_job(b, n, args.shots, args.latency))
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f}, {args.repeat} runs each, medians; {args.shots} shots, "
          f"{args.latency * 1000:.0f} ms per fetch")
    print("\n".join(table(rows)))
    if args.json:
        Path(args.json).write_text(json.dumps([r for rs in rows.values() for r in rs], indent=1))
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
