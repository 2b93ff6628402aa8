"""`backend.start=eager` through the real CLI: any Ray program gets the job's cluster, which is gone after."""

from __future__ import annotations

import sys

import pytest

from conftest import run_cli

pytestmark = pytest.mark.cluster

RAY_PROGRAM = (
    "import os, ray; ray.init(); "
    "alive = sorted(n['NodeManagerAddress'] for n in ray.nodes() if n['Alive']); "
    "print('RAY_ADDRESS', os.environ['RAY_ADDRESS']); print('NODES', ','.join(alive))"
)


def test_eager_ray_cluster_serves_a_plain_ray_program(tmp_path):
    result = run_cli(["site=local", "nodes=2", "backend.start=eager", sys.executable, "-c", RAY_PROGRAM],
                     tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "NODES 127.0.0.2,127.0.0.3" in result.stdout
    assert "RAY_ADDRESS 127.0.0.2:" in result.stdout
    [log] = list(tmp_path.rglob("logs/ray-cluster.log"))
    assert "nothing left" in log.read_text()


def test_eager_passes_the_exit_code_through(tmp_path):
    result = run_cli(["site=local", "backend.start=eager", sys.executable, "-c", "import sys; sys.exit(9)"],
                     tmp_path, timeout=300)
    assert result.returncode == 9, result.stdout + result.stderr
