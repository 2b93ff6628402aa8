"""`backend.start=eager` through the real CLI: any Ray program gets the job's cluster, which is gone after."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CLI, ROOT, run_cli

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


# ------------------------------------------------------------------ SIGUSR1: the time-limit warning

DURABILITY_JOB = [str(ROOT / "tests" / "durability_job.py"), "ray", "600", "0.05", "60"]


def _cluster_root(run_dir: Path) -> str:
    """The cluster's temp dir (every daemon carries it as its marker), from the commands it logged."""
    text = (run_dir / "logs" / "ray-cluster.log").read_text()
    match = re.search(r"--temp-dir (/\S+)/r\d+ ", text)
    assert match, text
    return match.group(1)


@pytest.mark.parametrize("python_options", [[], ["-u"]], ids=["same-interpreter", "child"])
def test_sigusr1_to_the_wrapper_stops_the_pipeline_cleanly(tmp_path, python_options):
    """Slurm's B:USR1 reaches the wrapper (the batch script execs it): the pipeline stores what it has,
    says how to resume and exits 75; the wrapper lives on until then and stops its cluster."""
    import psutil

    from slurm_support import wait_for
    from toksearch_launch import load_results
    from toksearch_launch.cluster import procs
    from toksearch_launch.pipeline.store import part_files

    env = {k: v for k, v in os.environ.items() if k not in ("TOKSEARCH_CONFIG", "TOKSEARCH_RUN_DIR")}
    out_path = tmp_path / "out.txt"
    with open(out_path, "w") as out:
        cli = subprocess.Popen([*CLI, "site=local", "nodes=1", "backend=ray", "backend.start=eager",
                                sys.executable, *python_options, *DURABILITY_JOB],
                               cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        def stored_three():
            return [s for s in tmp_path.rglob("results/compute-1") if len(part_files(s)) >= 3]

        [store] = wait_for(stored_three, 200, 0.05, "three partitions stored")
        run_dir = store.parent.parent
        [wrapper] = psutil.Process(cli.pid).children()
        assert "toksearch_launch.cluster.eager" in wrapper.cmdline()
        root = _cluster_root(run_dir)
        wrapper.send_signal(signal.SIGUSR1)
        rc = cli.wait(timeout=120)
    finally:
        if cli.poll() is None:
            cli.kill()
    text = out_path.read_text()
    assert rc == 75, text[-3000:]
    assert "toksearch: stopped (SIGUSR1" in text and "resume with" in text, text[-3000:]
    stored = load_results(run_dir).info["records_stored"]
    assert 0 < stored < 600
    assert procs.members(set(), [root]) == []
    assert not os.path.exists(root)
    assert "nothing left" in (run_dir / "logs" / "ray-cluster.log").read_text()
