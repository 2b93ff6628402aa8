"""Dask on this machine: compute_dask against serial, and the job's Dask cluster (site=local,
2 nodes) started through the same lifecycle: ports, mutual TLS, values, nothing left."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import psutil
import pytest

from conftest import ROOT, run_cli
from test_pipeline import FIXED_CASES, assert_same_results, case_closure, case_example
from toksearch_launch.cluster import Cluster, default_local_config, procs

distributed = pytest.importorskip("distributed")

pytestmark = pytest.mark.cluster

TESTS = str(Path(__file__).resolve().parent)
EXAMPLE = [sys.executable, str(ROOT / "examples" / "toksearch_example.py")]


def test_starts_and_closes_its_own_local_cluster():
    rs = case_example(range(50)).compute_dask(verbose=False)
    assert len(rs) == 50 and rs.nodes == ["127.0.0.1"] and rs.info["backend"] == "dask"
    with pytest.raises(ValueError):
        distributed.default_client()  # nothing left behind in this process


@pytest.fixture(scope="module")
def local_client():
    from toksearch_launch.pipeline.dask_backend import local_client

    client = local_client(2)
    yield client
    cluster = client.cluster
    client.close()
    cluster.close()


@pytest.mark.parametrize("name", sorted(FIXED_CASES))
def test_dask_matches_serial(local_client, name):
    shots = list(range(165920, 166020))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = FIXED_CASES[name](shots).compute_serial()
        for kwargs in ({"numparts": 3, "batch_size": 40}, {"numparts": 100}, {}):
            got = FIXED_CASES[name](shots).compute_dask(client=local_client, verbose=False, **kwargs)
            assert_same_results(got, want)


def test_closures_reach_the_workers(local_client):
    assert_same_results(case_closure().compute_dask(client=local_client, verbose=False),
                        case_closure().compute_serial())


def _listening(pids: set[int]) -> set[tuple[str, int]]:
    out = set()
    for pid in pids:
        try:
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN:
                    out.add((conn.laddr.ip, conn.laddr.port))
        except psutil.Error:
            continue
    return out


def test_job_cluster_two_nodes_tls_ports_values_and_teardown(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", TESTS)  # the workers import the test module that defines the steps
    cluster = Cluster("dask", default_local_config(nodes=2), run_dir=tmp_path)
    with cluster as c:
        plan = c.plan
        assert c.address == f"tls://127.0.0.2:{plan.ports.head['scheduler']}"
        assert c.node_addresses == ["127.0.0.2", "127.0.0.3"] and c.num_cpus >= 2
        assert oct(os.stat(plan.secret_file).st_mode & 0o777) == "0o600"
        assert oct(os.stat(plan.root).st_mode & 0o777) == "0o700"
        # every listening port of every daemon process is inside the block, on a node address
        members = procs.members(set(c.started_pids), c.roots)
        block = set(range(plan.ports.base, plan.ports.base + plan.ports.size))
        listening = _listening(set(members))
        assert listening and {port for _, port in listening} <= block, listening
        assert {ip for ip, _ in listening} <= {"127.0.0.2", "127.0.0.3"}, listening
        # a client without the job's key is refused
        from distributed.security import Security

        other = Security.temporary()
        with pytest.raises(Exception, match="TLS|certificate|SSL|closed"):
            distributed.Client(c.address, security=other, timeout="5s", set_as_default=False)
        # the same records as serial, computed on both nodes
        client = c.connect()
        assert c.connect() is client  # one client per cluster
        got = case_example(range(500)).compute_dask(client=client, verbose=False)
        assert_same_results(got, case_example(range(500)).compute_serial())
        assert got.nodes == ["127.0.0.2", "127.0.0.3"]
    assert not cluster.leftovers
    assert procs.members(set(cluster.started_pids), cluster.roots) == []
    assert not Path(plan.root).exists()
    log = (tmp_path / "logs" / "dask-cluster.log").read_text()
    assert "nothing left" in log and "BEGIN PRIVATE KEY" not in log


def _roots_in(log: str) -> set[str]:
    return set(re.findall(r"(/tmp/tsl-[0-9a-f]{6})/", log))


def test_example_through_the_cli_on_site_local(tmp_path):
    out = tmp_path / "dask.json"
    result = run_cli(["site=local", "nodes=2", *EXAMPLE, "--source", "synthetic", "--count", "2000",
                      "--output", str(out), "--", "dask"], tmp_path, timeout=400)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Got 2000 results using dask" in result.stdout
    assert "Cluster nodes: 127.0.0.2,127.0.0.3" in result.stdout
    serial = tmp_path / "serial.json"
    subprocess.run([*EXAMPLE, "--source", "synthetic", "--count", "2000", "--output", str(serial), "serial"],
                   check=True, capture_output=True, cwd=tmp_path)
    assert json.loads(out.read_text()) == json.loads(serial.read_text())
    [log] = list(tmp_path.rglob("logs/dask-cluster.log"))
    text = log.read_text()
    assert "stopped 3 daemons" in text and "nothing left" in text
    roots = _roots_in(text)
    assert roots and procs.members(set(), roots) == []  # no process carries the cluster's marker
    assert not any(Path(r).exists() for r in roots)


DASK_PROGRAM = (
    "import os; from distributed import Client; c = Client(); "
    "print('ADDRESS', os.environ['DASK_SCHEDULER_ADDRESS']); "
    "print('HOSTS', ','.join(sorted({w['host'] for w in c.scheduler_info(n_workers=-1)['workers'].values()}))); "
    "print('SUM', c.submit(sum, [1, 2, 3]).result()); c.close()"
)


def test_eager_dask_cluster_serves_a_plain_client(tmp_path):
    result = run_cli(["site=local", "nodes=2", "backend=dask", "backend.start=eager",
                      sys.executable, "-c", DASK_PROGRAM], tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"^ADDRESS tls://127\.0\.0\.2:\d+$", result.stdout, re.M), result.stdout
    assert "HOSTS 127.0.0.2,127.0.0.3" in result.stdout and "SUM 6" in result.stdout
    [log] = list(tmp_path.rglob("logs/dask-cluster.log"))
    assert "nothing left" in log.read_text()
    assert procs.members(set(), _roots_in(log.read_text())) == []
