"""Shared test helpers: compose the real config groups, run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import List, Sequence

import pytest

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
CLI = [sys.executable, "-m", "toksearch_launch.cli"]


def compose(overrides: Sequence[str] = ()):
    """The composed tree for these overrides, exactly as toksearch_submit composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from toksearch_launch.config import register_configs

    register_configs()
    with initialize_config_module("toksearch_launch.conf", version_base=None):
        return hydra_compose("config", overrides=list(overrides))


def run_cli(args: Sequence[str], cwd: Path, env: dict | None = None, timeout: float = 120,
            stdin=subprocess.DEVNULL) -> subprocess.CompletedProcess:
    """Run toksearch_submit as a user would (a fresh process), capturing its output."""
    full_env = dict(os.environ)
    full_env.pop("TOKSEARCH_CONFIG", None)
    full_env.pop("TOKSEARCH_RUN_DIR", None)
    if env:
        full_env.update(env)
    return subprocess.run([*CLI, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout, stdin=stdin)


@pytest.fixture
def standin_path(tmp_path: Path) -> dict:
    """PATH with stand-in salloc/sbatch/srun that record their argv in a file."""
    record = tmp_path / "record.jsonl"
    return {
        "PATH": f"{TESTS / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "STANDIN_RECORD": str(record),
    }


def read_record(env: dict) -> List[list]:
    import json

    path = Path(env["STANDIN_RECORD"])
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def pytest_runtest_setup(item):
    """Tests marked `slurm` need the ci/slurm cluster: skip without it, or fail when CI requires it."""
    if item.get_closest_marker("slurm") is None:
        return
    from slurm_support import cluster_problem

    problem = cluster_problem()
    if problem:
        if os.environ.get("TOKSEARCH_REQUIRE_SLURM") == "1":
            pytest.fail(f"SLURM test cluster required but not usable: {problem}")
        pytest.skip(problem)


@pytest.fixture(autouse=True)
def _release_port_blocks():
    """Plans made by unit tests reserve port blocks (and their flocks) in this process, as a
    Cluster's plan does until the cluster stops; release what a test left, so that a later
    test's fixed block is never refused by an earlier test's plan."""
    from toksearch_launch.cluster import ports

    before = set(ports._reserved)
    yield
    for base in set(ports._reserved) - before:
        ports.release_block(base)
