"""examples/toksearch_example.py run as a user runs it (a fresh interpreter, outside a job)."""

from __future__ import annotations

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


def test_serial_synthetic(tmp_path: Path):
    proc = run_example(["--source", "synthetic", "--count", "300", "serial"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Got 300 results using serial" in proc.stdout
    assert errors_line(proc.stdout) == 0
    assert "Cluster nodes" not in proc.stdout


def test_file_source_writes_then_reuses_the_archive(tmp_path: Path):
    archive = tmp_path / "demo.h5"
    for _ in range(2):
        proc = run_example(["--source", "file", "--archive", str(archive), "--count", "500", "multiprocessing"], tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "Got 500 results using multiprocessing" in proc.stdout
        assert errors_line(proc.stdout) == 0
    assert archive.exists()


def test_every_record_failing_exits_nonzero(tmp_path: Path):
    # TokSearch's default source with no MDSplus server configured: every fetch fails.
    proc = run_example(["--count", "5", "serial"], tmp_path, timeout=120)
    assert proc.returncode == 1
    assert "Got 5 results using serial" in proc.stdout
    assert errors_line(proc.stdout) == 5
    assert "Every record failed" in proc.stderr


@pytest.mark.cluster
@pytest.mark.parametrize("backend", ["ray", "spark"])
def test_ten_thousand_shots_on_a_local_cluster(tmp_path: Path, backend: str):
    proc = run_example(["--source", "synthetic", backend], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"Got 10000 results using {backend}" in proc.stdout
    assert errors_line(proc.stdout) == 0
    assert re.search(r"^Cluster nodes: \S+$", proc.stdout, re.M), proc.stdout
    assert "NUM PARTITIONS: 10000" not in proc.stdout  # not TokSearch's one record per partition
    assert re.search(r"^MEDIAN PARTITION SIZE: (\d+)$", proc.stdout, re.M).group(1) != "1"
