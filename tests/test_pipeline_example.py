"""examples/toksearch_example.py run as a user runs it (a fresh interpreter, outside a job)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "toksearch_example.py"


def run_example(args, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in ("TOKSEARCH_CONFIG", "TOKSEARCH_RUN_DIR") and not k.endswith("_path")}
    return subprocess.run([sys.executable, str(EXAMPLE), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def errors_line(out: str) -> int:
    match = re.search(r"^Records with errors: (\d+)$", out, re.M)
    assert match, out
    return int(match.group(1))


def example_values(args, tmp_path: Path, name: str) -> list:
    """Run the example with --output; its records as [shot, max_ipmhd, error names]."""
    out = tmp_path / f"{name}.json"
    proc = run_example([*args, "--output", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def serial_10k(tmp_path_factory) -> list:
    """compute_serial's records for the example's 10,000 synthetic shots: the reference."""
    return example_values(["--source", "synthetic", "serial"], tmp_path_factory.mktemp("serial"), "serial")


def test_serial_synthetic(tmp_path: Path):
    proc = run_example(["--source", "synthetic", "--count", "300", "serial"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Got 300 results using serial" in proc.stdout
    assert errors_line(proc.stdout) == 0
    assert "Cluster nodes" not in proc.stdout


def test_file_source_writes_then_reuses_the_archive(tmp_path: Path):
    archive = tmp_path / "demo.h5"
    out = tmp_path / "multiprocessing.json"
    for _ in range(2):
        proc = run_example(["--source", "file", "--archive", str(archive), "--count", "500", "multiprocessing",
                            "--output", str(out)], tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "Got 500 results using multiprocessing" in proc.stdout
        assert errors_line(proc.stdout) == 0
    assert archive.exists()
    serial = example_values(["--source", "file", "--archive", str(archive), "--count", "500", "serial"],
                            tmp_path, "serial")
    assert json.loads(out.read_text()) == serial


def test_every_record_failing_exits_nonzero(tmp_path: Path):
    # TokSearch's default source with no MDSplus server configured: every fetch fails.
    proc = run_example(["--count", "5", "serial"], tmp_path, timeout=120)
    assert proc.returncode == 1
    assert "Got 5 results using serial" in proc.stdout
    assert errors_line(proc.stdout) == 5
    assert "Every record failed" in proc.stderr


@pytest.mark.cluster
@pytest.mark.parametrize("backend", ["ray", "spark", "dask"])
def test_ten_thousand_shots_on_a_local_cluster(tmp_path: Path, backend: str, serial_10k: list):
    out = tmp_path / "records.json"
    proc = run_example(["--source", "synthetic", backend, "--output", str(out)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert json.loads(out.read_text()) == serial_10k  # same records, same values, same order
    assert f"Got 10000 results using {backend}" in proc.stdout
    assert errors_line(proc.stdout) == 0
    assert re.search(r"^Cluster nodes: \S+$", proc.stdout, re.M), proc.stdout
    assert "NUM PARTITIONS: 10000" not in proc.stdout  # not TokSearch's one record per partition
    assert re.search(r"^MEDIAN PARTITION SIZE: (\d+)$", proc.stdout, re.M).group(1) != "1"
