"""Time from start to all nodes ready, Ray and Spark (site=local), side by side with:

* floor: a minimal script that starts the same daemons with the same options
  (the argv and env our plan produces), in the same order, and polls the same
  readiness signal in-process (Ray: the GCS node table, workers started once the
  head is in it; Spark: master RPC port, then workers, then /json/);
* fixed sleeps: TokSearch's / hand-written sbatch style -- head, sleep 10,
  workers, sleep 10 -- then a check whether the nodes really were all up.

    .venv/bin/python bench/bench_cluster_start.py [--nodes 2] [--repeat 3] [--sleep 10]

Prints a markdown table. Variants alternate within each repetition so drift on a
shared machine hits them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from tempfile import mkdtemp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toksearch_launch.cluster import Cluster, default_local_config  # noqa: E402
from toksearch_launch.cluster import get_backend, procs  # noqa: E402
from toksearch_launch.cluster.dirs import make_root, write_private  # noqa: E402
from toksearch_launch.cluster.launcher import daemons_of  # noqa: E402
from toksearch_launch.cluster.plan import make_plan  # noqa: E402
from toksearch_launch.cluster.ports import release_block  # noqa: E402


def ours(backend: str, cfg, run_dir: Path) -> tuple[float, float]:
    t = time.monotonic()
    c = Cluster(backend, cfg, run_dir=run_dir).start()
    ready = time.monotonic() - t
    t = time.monotonic()
    c.stop()
    assert not c.leftovers
    return ready, time.monotonic() - t


def _bare_plan(backend: str, cfg, run_dir: Path):
    plan = make_plan(backend, cfg, [f"local{k}" for k in range(1, cfg.nodes + 1)], run_dir)
    make_root(plan.root)
    for i in range(plan.n_nodes):
        os.makedirs(plan.node_dir(i), exist_ok=True)
    os.makedirs(plan.master_dir, exist_ok=True)
    if backend == "ray":
        write_private(plan.secret_file, plan.secret)
    return plan, daemons_of(plan)


def _ray_ready(addr: str, n: int, deadline: float, on_head=None) -> None:
    """GCS port, then the GCS node table until n nodes are alive (on_head: once the head is)."""
    host, port = addr.rsplit(":", 1)
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    from ray._raylet import GcsClient

    client = None
    while time.monotonic() < deadline:
        try:
            client = client or GcsClient(address=addr)
            alive = [i for i in client.get_all_node_info(timeout=2).values() if i.state == 0]
            if on_head is not None and any(i.is_head_node for i in alive):
                on_head()
                on_head = None
            if len(alive) >= n:
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise TimeoutError("ray not ready")


def _spark_ready(plan, n: int, deadline: float, wait_rpc_then=None) -> None:
    h = plan.ports.head
    while time.monotonic() < deadline:
        try:
            socket.create_connection((plan.head_ip, h["master"]), timeout=0.3).close()
            break
        except OSError:
            time.sleep(0.05)
    if wait_rpc_then:
        wait_rpc_then()
    url = f"http://{plan.head_ip}:{h['master_ui']}/json/"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                s = json.load(r)
            if s.get("status") == "ALIVE" and sum(w["state"] == "ALIVE" for w in s["workers"]) >= n:
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise TimeoutError("spark not ready")


def floor(backend: str, cfg, run_dir: Path) -> tuple[float, float]:
    """Same daemons, same options, same signal; none of our planning, probing subprocess or checks."""
    plan, daemons = _bare_plan(backend, cfg, run_dir)
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": plan.secret_file} if backend == "ray" else {})
    os.environ.update({k: v for k, v in env.items() if k.startswith("RAY_AUTH")})
    try:
        t = time.monotonic()
        deadline = t + 120
        if backend == "ray":  # same order as ours: workers once the head is registered
            daemons[0].spawn(env)
            _ray_ready(f"{plan.head_ip}:{plan.ports.head['gcs']}", plan.n_nodes, deadline,
                       on_head=lambda: [d.spawn(env) for d in daemons[1:]])
        else:
            daemons[0].spawn(env)
            _spark_ready(plan, plan.n_nodes, deadline, wait_rpc_then=lambda: [d.spawn(env) for d in daemons[1:]])
        ready = time.monotonic() - t
    finally:
        t = time.monotonic()
        left = procs.terminate(daemons, markers=[plan.root], head_last=get_backend(backend).head_last)
        stop = time.monotonic() - t
        import shutil

        shutil.rmtree(plan.root, ignore_errors=True)
        release_block(plan.ports.base)
    assert not left
    return ready, stop


def fixed_sleep(backend: str, cfg, run_dir: Path, pause: float) -> tuple[float, bool]:
    """Head, sleep, workers, sleep: 'ready' when the sleeps end. Returns (time, really all up then)."""
    plan, daemons = _bare_plan(backend, cfg, run_dir)
    env = dict(os.environ)
    if backend == "ray":
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=plan.secret_file)
    try:
        t = time.monotonic()
        daemons[0].spawn(env)
        time.sleep(pause)
        for d in daemons[1:]:
            d.spawn(env)
        time.sleep(pause)
        ready = time.monotonic() - t
        try:  # were they? one quick look, no waiting
            if backend == "ray":
                _ray_ready(f"{plan.head_ip}:{plan.ports.head['gcs']}", plan.n_nodes, time.monotonic() + 0.5)
            else:
                _spark_ready(plan, plan.n_nodes, time.monotonic() + 0.5)
            up = True
        except TimeoutError:
            up = False
    finally:
        procs.terminate(daemons, markers=[plan.root], head_last=get_backend(backend).head_last)
        import shutil

        shutil.rmtree(plan.root, ignore_errors=True)
        release_block(plan.ports.base)
    return ready, up


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--sleep", type=float, default=10.0, help="each fixed sleep of the TokSearch-style start")
    ap.add_argument("--backends", default="ray,spark")
    args = ap.parse_args()
    cfg = default_local_config(nodes=args.nodes)
    run_dir = Path(mkdtemp(prefix="toksearch-bench-"))
    rows = []
    for backend in args.backends.split(","):
        res: dict[str, list[float]] = {"floor": [], "ours": []}
        stops: dict[str, list[float]] = {"floor": [], "ours": []}
        for rep in range(args.repeat):
            order = ("floor", "ours") if rep % 2 == 0 else ("ours", "floor")
            for variant in order:
                fn = floor if variant == "floor" else ours
                ready, stop = fn(backend, cfg, run_dir / f"{backend}-{variant}-{rep}")
                res[variant].append(ready)
                stops[variant].append(stop)
                print(f"# {backend} {variant} rep {rep}: ready {ready:.2f} s, stop {stop:.2f} s", file=sys.stderr)
        fixed, up = fixed_sleep(backend, cfg, run_dir / f"{backend}-fixed", args.sleep)
        print(f"# {backend} fixed sleeps: {fixed:.2f} s, all nodes up then: {up}", file=sys.stderr)
        f_med = statistics.median(res["floor"])
        o_med = statistics.median(res["ours"])
        rows.append((backend, "floor (same daemons, same signal)", f_med, min(res["floor"]),
                     statistics.median(stops["floor"]), 1.0, ""))
        rows.append((backend, "toksearch_launch Cluster.start()", o_med, min(res["ours"]),
                     statistics.median(stops["ours"]), o_med / f_med, ""))
        rows.append((backend, f"fixed sleeps (head, {args.sleep:g} s, workers, {args.sleep:g} s)", fixed, fixed,
                     float("nan"), fixed / f_med, "" if up else "not all nodes up when the sleeps ended"))
    print(f"# daemon logs: {run_dir}", file=sys.stderr)
    print(f"\nCluster start to all {args.nodes} nodes ready, site=local, {os.cpu_count()} CPUs, "
          f"median of {args.repeat} (fixed sleeps: 1 run)\n")
    print("| backend | start | ready median (s) | ready min (s) | stop median (s) | x floor | note |")
    print("|---|---|---:|---:|---:|---:|---|")
    for b, v, med, mn, stop, ratio, note in rows:
        stop_s = "-" if stop != stop else f"{stop:.2f}"
        print(f"| {b} | {v} | {med:.2f} | {mn:.2f} | {stop_s} | {ratio:.2f} | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
