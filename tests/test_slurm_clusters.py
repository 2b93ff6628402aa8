"""TokSearch's example and the in-job clusters on the real 3-node SLURM test cluster.

The example fetches `\\ipmhd` of efit01 from a real mdsip server (tests/mdsip_server.py)
listening on the test bridge (10.77.0.254), found through `efit01_path` as TokSearch
users configure it; every node reaches it over its own network namespace.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, run_cli
from slurm_support import NODES, TEST_SITE, job_field, job_id_from, job_processes, wait_for

pytestmark = pytest.mark.slurm

EXAMPLE = [sys.executable, str(ROOT / "examples" / "toksearch_example.py")]
NODE_ADDRESSES = "10.77.0.1,10.77.0.2,10.77.0.3"
BRIDGE = "10.77.0.254"


@pytest.fixture(scope="module")
def mds_env():
    """An mdsip server with the example's 10,000 shots, reachable from every node."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "tests" / "mdsip_server.py"), "--host", BRIDGE,
                             "--port", "0", "--trees", "example"], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # the server prints LISTENING once it accepts connections
    assert line.startswith("LISTENING"), line
    address = line.split()[1]
    yield {"efit01_path": f"{address}::"}
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def serial_records(mds_env, tmp_path_factory) -> list:
    """compute_serial's records of the example (same mdsip server), run outside SLURM: the reference."""
    out = tmp_path_factory.mktemp("serial") / "serial.json"
    env = {**os.environ, **mds_env}
    env.pop("TOKSEARCH_CONFIG", None)
    subprocess.run([*EXAMPLE, "--output", str(out), "serial"], env=env, check=True, capture_output=True,
                   timeout=600)
    records = json.loads(out.read_text())
    assert len(records) == 10000 and not any(errors for _, _, errors in records)
    return records


def assert_nothing_left(timeout: float = 15.0) -> None:
    """No process of any job remains on any node (seen in the nodes' namespaces, not via SLURM)."""
    def clean():
        return not job_processes()
    try:
        wait_for(clean, timeout, what="job processes to end on every node")
    except AssertionError:
        raise AssertionError(f"processes left on nodes: {job_processes()}") from None


def example_lines(stdout: str) -> dict:
    lines = {}
    for ln in stdout.splitlines():
        if ln.startswith(("Got ", "Records with errors:", "Cluster nodes:")):
            key, _, value = ln.partition(":") if not ln.startswith("Got ") else ("Got", "", ln)
            lines[key] = value.strip()
    return lines


def sorted_addresses(value: str) -> str:
    return ",".join(sorted(value.split(","), key=lambda a: tuple(int(x) for x in a.split("."))))


DAEMON_LOGS = {
    "ray": ["ray-head-tsn1.log", "ray-worker-tsn2.log", "ray-worker-tsn3.log"],
    "spark": ["spark-master-tsn1.log", "spark-worker-tsn1.log", "spark-worker-tsn2.log", "spark-worker-tsn3.log"],
    "dask": ["dask-scheduler-tsn1.log", "dask-worker-tsn1.log", "dask-worker-tsn2.log", "dask-worker-tsn3.log"],
}


@pytest.mark.parametrize("backend", ["ray", "spark", "dask"])
def test_interactive_example_on_three_nodes(tmp_path, mds_env, serial_records, backend):
    start = time.monotonic()
    records = tmp_path / "records.json"
    result = run_cli([*TEST_SITE, "nodes=3", *EXAMPLE, "--output", str(records), "--", backend], tmp_path,
                     env=mds_env, timeout=400)
    elapsed = time.monotonic() - start
    assert result.returncode == 0, result.stdout + result.stderr
    lines = example_lines(result.stdout)
    assert lines["Got"] == f"Got 10000 results using {backend}"
    assert lines["Records with errors"] == "0"
    assert sorted_addresses(lines["Cluster nodes"]) == NODE_ADDRESSES
    assert json.loads(records.read_text()) == serial_records  # same values as compute_serial
    logs = {p.name for p in tmp_path.rglob("logs/*.log")}
    daemons = DAEMON_LOGS[backend]
    assert set(daemons) <= logs, logs  # one log per daemon, named by node
    assert_nothing_left()
    print(f"{backend}: interactive 3-node example {elapsed:.1f}s")


def test_batch_example_waits_and_writes_output(tmp_path, mds_env, serial_records):
    records = tmp_path / "records.json"
    result = run_cli([*TEST_SITE, "mode=batch", "nodes=3", "--wait", *EXAMPLE, "--output", str(records),
                      "--", "ray"], tmp_path, env=mds_env, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_id_from(result.stdout)
    [out] = list(tmp_path.rglob(f"slurm-{job_id}.out"))
    assert "Got 10000 results using ray" in out.read_text()
    assert json.loads(records.read_text()) == serial_records
    ran = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], capture_output=True, text=True).stdout
    assert ran == (out.parent / "job.sbatch").read_text()
    assert_nothing_left()


def test_multirun_each_job_has_its_own_cluster_size(tmp_path, mds_env):
    probe = ["bash", "-c", 'echo "NNODES=$SLURM_NNODES"; exec "$@"', "probe", *EXAMPLE, "--count", "300", "ray"]
    result = run_cli([*TEST_SITE, "-m", "mode=batch", "nodes=1,2,3", "--wait", *probe], tmp_path,
                     env=mds_env, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    outs = sorted(tmp_path.rglob("slurm-*.out"), key=lambda p: p.parent.name)
    assert len(outs) == 3
    for n, out in enumerate(outs, start=1):
        text = out.read_text()
        assert f"NNODES={n}" in text, text
        assert "Got 300 results using ray" in text, text
        nodes = re.search(r"Cluster nodes: (\S+)", text).group(1).split(",")
        assert len(nodes) == n, text


@pytest.mark.parametrize("backend", ["ray", "spark", "dask"])
def test_scancel_leaves_nothing_running(tmp_path, backend):
    result = run_cli([*TEST_SITE, "-b", "nodes=3", sys.executable, str(ROOT / "tests" / "cluster_job.py"), backend],
                     tmp_path)
    assert result.returncode == 0, result.stderr
    job_id = job_id_from(result.stdout)
    out = Path(re.search(r"output (\S+)", result.stdout).group(1))
    ready = wait_for(lambda: out.exists() and re.search(r"^READY (\S+) (\S+)", out.read_text(), re.M), 150,
                     what=f"the {backend} cluster of job {job_id} to be ready")
    temp_dir, addresses = ready.group(1), ready.group(2)
    assert sorted_addresses(addresses) == NODE_ADDRESSES
    before = job_processes()
    assert set(before) == set(NODES), before  # the cluster runs on every node
    start = time.monotonic()
    subprocess.run(["scancel", job_id], check=True)
    assert_nothing_left(timeout=15)
    gone = time.monotonic() - start
    wait_for(lambda: job_field(job_id, "JobState") == "CANCELLED", 15, what=f"job {job_id} CANCELLED")
    wait_for(lambda: not Path(temp_dir).exists(), 15, what=f"{temp_dir} removed")
    print(f"{backend}: scancel to nothing left on any node {gone:.1f}s")


def test_two_jobs_sharing_nodes_both_finish(tmp_path, mds_env):
    shared = [*TEST_SITE, "nodes=3", "site.exclusive=false", "interactive.salloc=[--partition=shared,--time=0:30:00]"]
    env = {**os.environ, **mds_env}
    env.pop("TOKSEARCH_CONFIG", None)
    procs = []
    for k, backend in enumerate(["ray", "ray"]):
        cwd = tmp_path / f"job{k}"
        cwd.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-m", "toksearch_launch.cli", *shared, *EXAMPLE, "--count", "2000",
                                       "--", backend], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=500) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stdout + stderr
        assert "Got 2000 results using ray" in stdout
        assert sorted_addresses(example_lines(stdout)["Cluster nodes"]) == NODE_ADDRESSES
    assert_nothing_left()


def test_worker_that_fails_to_start_fails_the_job_fast(tmp_path):
    start = time.monotonic()
    result = run_cli([*TEST_SITE, "nodes=3", "ray.worker.start=[--no-such-ray-option]",
                      sys.executable, str(ROOT / "tests" / "cluster_job.py"), "ray", "1"], tmp_path, timeout=200)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert "tsn2" in text or "tsn3" in text
    assert "no-such-ray-option" in text  # the command and the tail of its log
    assert elapsed < 120, f"took {elapsed:.1f}s: the worker's exit, not the 120 s ready deadline, must end the start"
    assert_nothing_left()


def test_default_site_example_no_overrides(tmp_path, mds_env):
    """Issue 6: `toksearch_submit -N 3 python examples/toksearch_example.py -- ray`, nothing else."""
    env = {**mds_env, "DISPLAY": ""}
    result = run_cli(["-N", "3", *EXAMPLE, "--", "ray"], tmp_path, env=env, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Got 10000 results using ray" in result.stdout
    result = run_cli(["-N", "3", "mode=batch", "--wait", *EXAMPLE, "--", "ray"], tmp_path, env=env, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    [out] = list(tmp_path.rglob(f"slurm-{job_id_from(result.stdout)}.out"))
    assert "Got 10000 results using ray" in out.read_text()
    assert_nothing_left()
