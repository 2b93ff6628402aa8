"""The srun path on the real 3-node SLURM test cluster of ci/slurm (up.sh): daemons as
job steps through the node wrapper, every address rule, teardown on stop and on scancel.

Skipped unless the test cluster's nodes are up. All nodes share this machine's PID
namespace and file system, so the checks can look at every node's processes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
from omegaconf import OmegaConf

from slurm_support import NODES
from toksearch_launch.cluster import default_local_config, procs

pytestmark = [pytest.mark.slurm, pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


def job_config(path: Path, method: str) -> Path:
    address = {"method": method}
    if method == "suffix":
        address["suffix"] = "-ib"
    if method == "interface":
        address["interface"] = "eth0"
    cfg = default_local_config(
        nodes=3,
        site={"name": "ci", "scheduler": "slurm", "address": address},
        ray={"master": {"srun": ["--overlap"]}, "worker": {"srun": ["--overlap"]}},
        spark={"master": {"srun": ["--overlap"]}, "worker": {"srun": ["--overlap"], "start": ["-c", "1", "-m", "1G"]}},
    )
    OmegaConf.save(cfg, path)
    return path


BOTH = r"""
import json, os, socket, sys
from toksearch_launch.cluster import Cluster
out = {"script_node": socket.gethostname()}
if "ray" in sys.argv[1]:
    with Cluster("ray") as c:
        import ray
        c.connect()
        @ray.remote(num_cpus=1)
        def where():
            import socket
            return socket.gethostname(), ray.util.get_node_ip_address()
        out["ray"] = {"addresses": c.node_addresses, "cpus": c.num_cpus, "ready": c.timings["ready"],
                      "seen": ray.get([where.options(resources={"node:" + ip: 0.01}).remote() for ip in c.node_addresses]),
                      "roots": c.roots, "pids": c.started_pids, "logs": [str(d.log_path) for d in c.daemons]}
    ray.shutdown()
if "spark" in sys.argv[1]:
    with Cluster("spark") as c:
        sc = c.connect().sparkContext
        def where(_):
            import os, socket, time
            time.sleep(0.3)
            return socket.gethostname(), os.environ.get("SPARK_LOCAL_IP")
        out["spark"] = {"addresses": c.node_addresses, "ready": c.timings["ready"],
                        "seen": sorted(set(sc.parallelize(range(12), 12).map(where).collect())),
                        "roots": c.roots, "pids": c.started_pids, "logs": [str(d.log_path) for d in c.daemons]}
print("RESULT " + json.dumps(out), flush=True)
"""


# dns with Spark runs end to end in test_slurm_clusters (the default site); here each rule once per engine
@pytest.mark.parametrize("method,backends", [("dns", "ray"), ("suffix", "spark"), ("interface", "ray,spark")])
def test_clusters_across_the_allocation(tmp_path, method, backends):
    env = dict(os.environ, TOKSEARCH_CONFIG=str(job_config(tmp_path / "toksearch.yaml", method)),
               TOKSEARCH_RUN_DIR=str(tmp_path))
    res = subprocess.run(["salloc", "-N3", "srun", "-N1", "--overlap", PY, "-c", BOTH, backends], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=400)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(line[7:])
    head = out["script_node"]
    ips = {n: f"10.77.0.{n[-1]}" for n in NODES}
    for part in backends.split(","):
        assert out[part]["addresses"][0] == ips[head]  # the head runs on the script's node
        assert sorted(out[part]["addresses"]) == sorted(ips.values())
        assert sorted(map(tuple, out[part]["seen"])) == sorted(ips.items())  # work ran on every node
        assert procs.members(set(out[part]["pids"]), out[part]["roots"]) == []
        assert not any(os.path.exists(r) for r in out[part]["roots"])
        for log in out[part]["logs"]:  # each node's wrapper stopped its daemon and found nothing left
            text = Path(log).read_text()
            assert re.search(r"toksearch-node: stopped on tsn\d; nothing left", text), text[-2000:]


JOB = r"""
import json, time
from toksearch_launch.cluster import job_cluster
c = job_cluster("ray")
print("READY " + json.dumps({"roots": c.roots, "pids": c.started_pids,
      "logs": [str(d.log_path) for d in c.daemons]}), flush=True)
time.sleep(300)
"""


def test_scancel_of_the_job_leaves_nothing(tmp_path):
    env = dict(os.environ, TOKSEARCH_CONFIG=str(job_config(tmp_path / "toksearch.yaml", "dns")),
               TOKSEARCH_RUN_DIR=str(tmp_path))
    p = subprocess.Popen(["salloc", "-N3", "srun", "-N1", "--overlap", PY, "-c", JOB], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: [lines.append(ln) for ln in p.stdout], daemon=True).start()
    try:
        deadline = time.monotonic() + 150
        while not any(ln.startswith("READY ") for ln in lines) and time.monotonic() < deadline and p.poll() is None:
            time.sleep(0.2)
        info = json.loads(next(ln for ln in lines if ln.startswith("READY "))[6:])
        job = re.search(r"Granted job allocation (\d+)", "".join(lines)).group(1)
        marked = procs.members(set(), info["roots"])
        assert len(marked) > 10  # daemons on all three nodes carry the job's mark
        t = time.monotonic()
        subprocess.run(["scancel", job], check=True, timeout=10)
        p.wait(timeout=60)
        deadline = time.monotonic() + 15
        while procs.members(set(), info["roots"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        elapsed = time.monotonic() - t
    finally:
        if p.poll() is None:
            p.kill()
    assert procs.members(set(), info["roots"]) == []
    assert elapsed < 15
    assert not any(os.path.exists(r) for r in info["roots"])
    stopped = [Path(log).read_text() for log in info["logs"]]
    assert all("nothing left" in text for text in stopped), [t[-800:] for t in stopped]
    assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
               for pid in info["pids"])
