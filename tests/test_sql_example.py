"""examples/sql_dataset_example.py as users run it: its netCDF output checked against compute_serial
in this process (same database, same signals), serially and through toksearch_submit on Ray and Spark."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, run_cli

EXAMPLE = ROOT / "examples" / "sql_dataset_example.py"
COUNT = 120


def load_example():
    spec = importlib.util.spec_from_file_location("sql_dataset_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reference(workdir: Path):
    """compute_serial in this process on the files the example wrote."""
    ex = load_example()
    import sqlite3

    conn = sqlite3.connect(str(workdir / "shots.db"))
    signals = ex.make_signals(str(workdir / "signals.h5"), ex.FIRST_SHOT, COUNT)
    results = ex.create_pipeline(conn, signals).compute_serial()
    conn.close()
    return ex.results_dataset(results)


def assert_output_matches_serial(out: Path, workdir: Path) -> None:
    import xarray as xr

    want = reference(workdir)
    with xr.open_dataset(out) as got:
        got = got.load()
    assert got["shot"].values.tolist() == want["shot"].values.tolist() and got.sizes["shot"] > 10
    for name in ("ip", "bt", "ne", "ip_flat_mean", "bt_flat_max", "ne_flat_mean"):
        np.testing.assert_array_equal(got[name].values, want[name].values, err_msg=name)
    np.testing.assert_array_equal(got["times"].values, np.arange(0.0, 5000.0, 20.0))
    assert got["ip"].attrs["units"] == "A"
    # The query's filters: no test shots (every 5th), only long flat tops, only big ip.
    shots = got["shot"].values
    assert not np.any(shots % 5 == 0) and np.all(got["ip_flat_mean"].values > 1e6)


def test_example_serial(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k not in ("TOKSEARCH_CONFIG", "TOKSEARCH_RUN_DIR")}
    proc = subprocess.run([sys.executable, str(EXAMPLE), "serial", "--count", str(COUNT), "--workdir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    n = int(re.search(r"^Got (\d+) results using serial$", proc.stdout, re.M).group(1))
    assert "Records with errors: 0" in proc.stdout
    assert_output_matches_serial(tmp_path / "results.nc", tmp_path)
    import xarray as xr

    with xr.open_dataset(tmp_path / "results.nc") as ds:
        assert ds.sizes["shot"] == n


@pytest.mark.cluster
@pytest.mark.parametrize("backend", ["ray", "spark"])
def test_example_through_toksearch_submit_on_two_local_nodes(tmp_path: Path, backend: str):
    workdir = tmp_path / "work"
    workdir.mkdir()
    out = tmp_path / f"results-{backend}.nc"
    proc = run_cli(["site=local", "nodes=2", sys.executable, str(EXAMPLE), "--count", str(COUNT),
                    "--workdir", str(workdir), "--out", str(out), "--", backend], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert re.search(rf"^Got \d+ results using {backend}$", proc.stdout, re.M), proc.stdout
    assert "Records with errors: 0" in proc.stdout
    nodes = re.search(r"^Cluster nodes: (\S+)$", proc.stdout, re.M).group(1).split(",")
    assert len(nodes) == 2, proc.stdout  # both local nodes served the run
    assert_output_matches_serial(out, workdir)


@pytest.mark.slurm
@pytest.mark.parametrize("backend", ["ray"])  # Spark's from_sql runs above (two local nodes); the SQL part is the driver's
def test_example_on_the_slurm_test_cluster(tmp_path: Path, backend: str):
    from slurm_support import TEST_SITE

    workdir = tmp_path / "work"
    workdir.mkdir()
    out = tmp_path / f"results-{backend}.nc"
    proc = run_cli([*TEST_SITE, "nodes=2", sys.executable, str(EXAMPLE), "--count", str(COUNT),
                    "--workdir", str(workdir), "--out", str(out), "--", backend], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Records with errors: 0" in proc.stdout
    nodes = re.search(r"^Cluster nodes: (\S+)$", proc.stdout, re.M).group(1).split(",")
    assert len(nodes) == 2 and all(n.startswith("10.77.0.") for n in nodes), proc.stdout
    assert_output_matches_serial(out, workdir)
