"""On the real SLURM test cluster (ci/slurm): a Ray and a Spark cluster offer exactly what
the allocation gave each node (CPUs, memory), with no resource option in the config.

The expected values come from the job itself (``SLURM_JOB_CPUS_PER_NODE`` against the node
list, ``--mem``) and, since the job is ``--exclusive``, must also equal each node's CPUs in
``scontrol show node``: with distinct CPU counts per node (ci/slurm gives 2, 3, 4) a value
read on the wrong node fails the test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from toksearch_launch.cluster import default_local_config

pytestmark = [pytest.mark.slurm, pytest.mark.cluster]
REPO = Path(__file__).resolve().parents[1]
MEM_MB = 2000  # --mem per node: small (Slurm tracks it here, CR_Core does not enforce it)
MB = 1 << 20

JOB = r"""
import json, os, socket, sys, urllib.request
from toksearch_launch.cluster import Cluster
from toksearch_launch.cluster.placement import expand_nodelist
from toksearch_launch.cluster.resources import allocated_cpus
out = {"script_node": socket.gethostname(), "allocated": allocated_cpus(),
       "nodelist": expand_nodelist(os.environ["SLURM_JOB_NODELIST"]),
       "mem_per_node": os.environ.get("SLURM_MEM_PER_NODE")}
with Cluster("ray") as c:
    import ray
    c.connect()
    out["ray"] = {"num_cpus": c.num_cpus, "nodes": [
        {"ip": n["NodeManagerAddress"], "resources": n["Resources"]} for n in ray.nodes() if n["Alive"]]}
    ray.shutdown()
with Cluster("spark") as c:
    url = f"http://{c.plan.head_ip}:{c.plan.ports.head['master_ui']}/json/"
    state = json.load(urllib.request.urlopen(url, timeout=10))
    out["spark"] = {"num_cpus": c.num_cpus, "workers": [
        {"host": w["host"], "cores": w["cores"], "memory": w["memory"]} for w in state["workers"]]}
print("RESULT " + json.dumps(out), flush=True)
"""


def node_cpus() -> dict[str, int]:
    """CPUTot of every node, as slurmctld knows it."""
    text = subprocess.run(["scontrol", "-o", "show", "node"], capture_output=True, text=True, check=True).stdout
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"NodeName=(\S+) .*?CPUTot=(\d+)", text)}


def test_ray_and_spark_offer_each_nodes_allocation(tmp_path):
    cfg = default_local_config(
        nodes=3, site={"name": "ci", "scheduler": "slurm", "address": {"method": "dns"}},
        ray={"master": {"srun": ["--overlap"]}, "worker": {"srun": ["--overlap"]}},
        spark={"master": {"srun": ["--overlap"]}, "worker": {"srun": ["--overlap"], "start": []}},
    )
    OmegaConf.save(cfg, tmp_path / "toksearch.yaml")
    env = dict(os.environ, TOKSEARCH_CONFIG=str(tmp_path / "toksearch.yaml"), TOKSEARCH_RUN_DIR=str(tmp_path))
    res = subprocess.run(["salloc", "-N3", "--exclusive", f"--mem={MEM_MB}", "srun", "-N1", "--overlap",
                          sys.executable, "-c", JOB], cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    line = next((ln for ln in res.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(line[7:])
    cpus = out["allocated"]
    assert sorted(cpus) == sorted(out["nodelist"])
    totals = node_cpus()
    assert cpus == {h: totals[h] for h in cpus}  # --exclusive: every CPU of each node
    assert out["mem_per_node"] == str(MEM_MB)
    memory = MEM_MB * MB

    ip_of = {h: subprocess.run(["getent", "hosts", h], capture_output=True, text=True).stdout.split()[0]
             for h in cpus}
    host_of = {ip: h for h, ip in ip_of.items()}
    ray_nodes = {host_of[n["ip"]]: n["resources"] for n in out["ray"]["nodes"]}
    assert sorted(ray_nodes) == sorted(cpus)
    for host, r in ray_nodes.items():
        assert r["CPU"] == cpus[host], (host, r)
        assert "GPU" not in r or r["GPU"] == 0  # no GPU allocated
        assert abs(r["memory"] + r["object_store_memory"] - memory) <= 2 * MB, (host, r)  # heap + store = --mem
        assert abs(r["object_store_memory"] - 0.3 * memory) <= 2 * MB, (host, r)
    assert out["ray"]["num_cpus"] == sum(cpus.values())

    workers = {host_of.get(w["host"], w["host"]): w for w in out["spark"]["workers"]}
    assert sorted(workers) == sorted(cpus)
    for host, w in workers.items():
        assert w["cores"] == cpus[host], (host, w)
        assert w["memory"] == MEM_MB - 1024, (host, w)  # MB: the allocation minus the worker JVM's GiB
    assert out["spark"]["num_cpus"] == sum(cpus.values())
