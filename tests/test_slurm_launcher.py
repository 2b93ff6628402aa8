"""The launcher on the real 3-node SLURM test cluster (ci/slurm): allocation, batch, multirun, exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_cli
from slurm_support import TEST_SITE, job_field, job_id_from

pytestmark = pytest.mark.slurm

PROBE = [sys.executable, "-c",
         "import os, socket; print('PROBE', socket.gethostname(), os.environ['SLURM_JOB_NODELIST'], "
         "os.environ.get('SLURM_JOB_NUM_NODES'), os.environ['TOKSEARCH_CONFIG'])"]


def test_interactive_runs_on_first_node_of_allocation(tmp_path):
    result = run_cli([*TEST_SITE, "nodes=3", *PROBE], tmp_path)
    assert result.returncode == 0, result.stderr
    line = next(ln for ln in result.stdout.splitlines() if ln.startswith("PROBE"))
    _, host, nodelist, num_nodes, config = line.split()
    assert (host, nodelist, num_nodes) == ("tsn1", "tsn[1-3]", "3")
    assert Path(config).is_file() and Path(config).parent.parent.parent.name == "toksearch_runs"
    assert "stdin is not a terminal: running the step without --pty" in result.stderr


@pytest.mark.parametrize("mode", [[], ["-b", "--wait"]], ids=["interactive", "batch-wait"])
def test_exit_code_of_the_job_comes_back(tmp_path, mode):
    result = run_cli([*TEST_SITE, *mode, "nodes=2", sys.executable, "-c", "import sys; sys.exit(7)"], tmp_path)
    assert result.returncode == 7, result.stdout + result.stderr


def test_batch_runs_the_written_script(tmp_path):
    result = run_cli([*TEST_SITE, "-b", "--wait", "nodes=3", *PROBE, "arg with space"], tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    job_id = job_id_from(result.stdout)
    [script] = list(tmp_path.rglob("job.sbatch"))
    ran = subprocess.run(["scontrol", "write", "batch_script", job_id, "-"], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr
    assert ran.stdout == script.read_text()
    assert job_field(job_id, "Command") == str(script)
    out = (script.parent / f"slurm-{job_id}.out").read_text()
    assert "PROBE tsn1 tsn[1-3] 3" in out


def test_multirun_batch_one_job_per_node_count(tmp_path):
    result = run_cli([*TEST_SITE, "-m", "-b", "--wait", "nodes=1,2,3", "bash", "-c", "echo NNODES=$SLURM_NNODES"],
                     tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    outs = sorted(tmp_path.rglob("slurm-*.out"), key=lambda p: p.parent.name)
    assert [p.parent.name for p in outs] == ["0", "1", "2"]
    assert [p.read_text().strip() for p in outs] == ["NNODES=1", "NNODES=2", "NNODES=3"]
    table = [ln.split() for ln in result.stdout.splitlines() if "COMPLETED" in ln and "nodes=" in ln]
    assert len(table) == 3 and {row[0] for row in table} == {job_id_from(ln) for ln in result.stdout.splitlines() if "submitted job" in ln}


def test_default_site_no_overrides_plain_command(tmp_path):
    """Issue 6: site=default, nothing overridden, on stock Slurm 22.05 with no GPU and no X."""
    result = run_cli(["-N", "3", *PROBE], tmp_path, env={"DISPLAY": ""})
    assert result.returncode == 0, result.stderr
    assert "PROBE tsn1 tsn[1-3] 3" in result.stdout
    assert "dropped --x11=all" in result.stderr and "drops --exclusive" in result.stderr
    result = run_cli(["-N", "3", "-b", "--wait", *PROBE], tmp_path, env={"DISPLAY": ""})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "COMPLETED, exit code 0" in result.stdout


def test_sbatch_refusal_is_one_line_exit_1(tmp_path):
    result = run_cli([*TEST_SITE, "-b", "batch.sbatch=[--no-such-sbatch-option]", "hostname"], tmp_path)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("toksearch_submit: error: sbatch refused the job:") and "no-such-sbatch-option" in last
