"""Node loss on the real 3-node SLURM test cluster: a worker node's daemons killed mid-run.

``toksearch_submit -N 3 -b ... python tests/node_loss_job.py BACKEND ...``; once some
partitions are stored, every process of this job's cluster on a worker node is
SIGKILLed at once (found by PID: the processes in that node's network namespace
carrying the job's owner marker, ``TOKSEARCH_CLUSTER_OWNER=<host>:<script pid>:...``).
The job must complete, its results equal compute_serial value by value, and its
output name the lost node in one line whose rerun count equals the count taken
from the job's own marks (partitions with a record started twice).
"""

from __future__ import annotations

import os
import re
import signal
import sys
from collections import Counter
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, run_cli
from durability_job import assert_same_records, make_pipeline
from slurm_support import TEST_SITE, job_field, job_id_from, namespace_pids, wait_for
from toksearch_launch import load_results
from toksearch_launch.cluster.owner import OWNER_ENV
from toksearch_launch.pipeline.store import part_files, read_header

pytestmark = pytest.mark.slurm

JOB = [sys.executable, str(ROOT / "tests" / "node_loss_job.py")]
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def cluster_processes(node: str, owner_pid: int) -> list[psutil.Process]:
    """The processes of the cluster owned by ``owner_pid`` that run on ``node``."""
    found = []
    for pid in namespace_pids(node):
        try:
            proc = psutil.Process(pid)
            marker = proc.environ().get(OWNER_ENV, "")
        except (psutil.Error, OSError):
            continue
        if re.fullmatch(rf"[^:]+:{owner_pid}:[0-9.]+", marker):
            found.append(proc)
    return found


def partitions_started_twice(run_dir: Path, marks: Path) -> int:
    """Stored partitions with a record whose start was marked more than once (the job's own count)."""
    starts = Counter(int(name.split(".", 1)[0]) for name in os.listdir(marks))
    store = run_dir / "results" / "compute-1"
    return sum(1 for part in part_files(store) if any(starts[shot] > 1 for shot in read_header(part)["shots"]))


@pytest.mark.parametrize("backend", ["ray", "spark"])
def test_a_worker_node_lost_mid_run_is_named_and_the_results_are_complete(tmp_path, backend):
    total, latency, numparts = 600, 0.25, 60
    want = make_pipeline(total, 0.0).compute_serial(store=None)
    marks = tmp_path / "marks"
    marks.mkdir()
    submitted = run_cli([*TEST_SITE, "-b", "-N", "3", *JOB, backend, str(total), str(latency), str(numparts),
                         str(marks)], tmp_path, env={"PYTHONPATH": str(ROOT / "tests")})
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = job_id_from(submitted.stdout)
    run_dir = Path(re.search(r"run dir (\S+);", submitted.stdout).group(1))
    out = run_dir / f"slurm-{job_id}.out"
    owner = wait_for(lambda: out.exists() and re.search(r"^PID (\d+) on (\S+)", out.read_text(), re.M), 300,
                     what="the job's PID")
    owner_pid, head = int(owner.group(1)), owner.group(2)
    victim = next(node for node in ("tsn2", "tsn3") if node != head)
    store = run_dir / "results" / "compute-1"
    wait_for(lambda: store.exists() and len(part_files(store)) >= 6, 300, 0.2, "six partitions stored")
    procs = wait_for(lambda: cluster_processes(victim, owner_pid), 30, what=f"the cluster's processes on {victim}")
    for proc in procs:  # all at once, like a node that dies
        try:
            proc.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    print(f"\nkilled {len(procs)} processes on {victim} with {len(part_files(store))}/{numparts} partitions stored")
    state = wait_for(lambda: job_field(job_id, "JobState") if job_field(job_id, "JobState") in FINAL else "",
                     600, 1.0, f"job {job_id} to end")
    text = out.read_text()
    assert state == "COMPLETED", text
    assert f"RESULT {len(want)} computed={total}" in text, text
    results = load_results(run_dir)
    assert_same_records(results, want)
    assert results.stats == want.stats
    lost = [line for line in text.splitlines() if "lost node" in line]
    print("\n".join(lost))
    reruns = partitions_started_twice(run_dir, marks)
    noun = "partition" if reruns == 1 else "partitions"
    assert lost == [f"toksearch_launch: lost node {victim} ({backend}) during compute_{backend}; "
                    f"{reruns} {noun} rerun on the remaining nodes"], text
    assert reruns >= 1  # the node was running partitions when it died
