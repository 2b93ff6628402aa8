"""Node loss on site=local with real Ray daemons: a worker node's processes SIGKILLed mid-run.

The same check as tests/test_node_loss_slurm.py, cheaper: ``toksearch_submit site=local
nodes=3 -b`` starts three Ray nodes on this machine (127.0.0.2-4). The victim is node 2:
its step wrapper (``--dir <root>/r2``) and every process of its daemon (``TOKSEARCH_CLUSTER_MARK=<root>/r2``
in the environment), all carrying the job's owner marker. Several nodes share
this machine's host name, so the line names the node by its address.
"""

from __future__ import annotations

import re
import signal
import sys
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, run_cli
from durability_job import assert_same_records, make_pipeline
from slurm_support import wait_for
from test_node_loss_slurm import marks_on, partitions_started_twice
from toksearch_launch import load_results
from toksearch_launch.cluster.owner import OWNER_ENV
from toksearch_launch.cluster.procs import ENV_MARK
from toksearch_launch.pipeline.store import part_files

pytestmark = pytest.mark.cluster

JOB = [sys.executable, str(ROOT / "tests" / "node_loss_job.py")]


def node_processes(owner_pid: int, node_dir_name: str) -> list[psutil.Process]:
    """The wrapper and daemon processes of one pseudo-node of the cluster owned by ``owner_pid``."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            env = proc.environ()
            cmd = proc.cmdline()
        except (psutil.Error, OSError):
            continue
        if not re.fullmatch(rf"[^:]+:{owner_pid}:[0-9.]+", env.get(OWNER_ENV, "")):
            continue
        wrapper_dir = cmd[cmd.index("--dir") + 1] if "--dir" in cmd and "toksearch_launch.cluster.node" in cmd else ""
        if env.get(ENV_MARK, "").endswith(f"/{node_dir_name}") or wrapper_dir.endswith(f"/{node_dir_name}"):
            found.append(proc)
    return found


def test_a_local_worker_node_lost_mid_run_is_named_and_the_results_are_complete(tmp_path):
    total, latency, numparts = 300, 0.2, 30
    want = make_pipeline(total, 0.0).compute_serial(store=None)
    marks = tmp_path / "marks"
    marks.mkdir()
    submitted = run_cli(["site=local", "nodes=3", "-b", *JOB, "ray", str(total), str(latency), str(numparts), str(marks)],
                        tmp_path, env={"PYTHONPATH": str(ROOT / "tests")})
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    [run_dir] = [p.parent for p in tmp_path.rglob("toksearch.yaml")]
    out = run_dir / "job-local.out"
    owner = wait_for(lambda: out.exists() and re.search(r"^PID (\d+) on (\S+)", out.read_text(), re.M), 120,
                     what="the job's PID")
    owner_pid, host = int(owner.group(1)), owner.group(2)
    store = run_dir / "results" / "compute-1"
    # every node's marks carry this machine's name: wait for three partitions' worth of records started
    wait_for(lambda: store.exists() and len(part_files(store)) >= 3 and marks_on(marks, host) > 3 * total // numparts,
             300, 0.2, "three partitions stored and more started")
    procs = wait_for(lambda: node_processes(owner_pid, "r2"), 30, what="node 2's processes")
    for proc in procs:
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    done = wait_for(lambda: "RESULT" in out.read_text() or "Traceback" in out.read_text() or
                    not psutil.pid_exists(owner_pid), 600, 0.5, "the job's end")
    text = out.read_text()
    assert done and f"RESULT {len(want)} computed={total}" in text, text
    results = load_results(run_dir)
    assert_same_records(results, want)
    assert results.stats == want.stats
    lost = [line for line in text.splitlines() if "lost node" in line]
    print("\n" + "\n".join(lost))
    [line] = lost
    said = int(re.fullmatch(r"toksearch_launch: lost node 127\.0\.0\.3 \(ray\) during compute_ray; "
                            r"(\d+) partitions? rerun on the remaining nodes", line).group(1))
    marked = partitions_started_twice(run_dir, marks)
    print(f"reruns: said {said}, marked {marked}")
    assert marked <= said and said >= 1
    assert "Raylet is terminated" not in text and "retries remaining" not in text, text
