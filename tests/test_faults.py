"""Launcher faults (issue 11), each reproduced as a user meets it, on site=local and on the SLURM test cluster.

Every test asserts the outcome: the exit code, the one line the user reads, the
files left and the processes left (found by PID or session, never by name). The
time from the fault to a clean state is recorded, not asserted: set
``TOKSEARCH_FAULT_TIMES=<file>`` to collect it (docs/reliability.md quotes it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import read_record, run_cli

EXIT_BY_NODES = [sys.executable, "-c",
                 "import sys; from toksearch_launch.config import load_job_config as c; "
                 "n = c().nodes; print('RAN', n); sys.exit({1: 3, 2: 0, 3: 4}[n])"]


@contextmanager
def time_to_clean(fault: str):
    """Record how long the fault took from start to a clean state (for docs/reliability.md)."""
    start = time.monotonic()
    yield
    path = os.environ.get("TOKSEARCH_FAULT_TIMES")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"fault": fault, "seconds": round(time.monotonic() - start, 2)}) + "\n")


def table_rows(stdout: str) -> list[list[str]]:
    """The multirun table's rows, header excluded: [job, state, exit, ...]."""
    lines = stdout.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["job", "state", "exit"])
    return [ln.split() for ln in lines[start + 1:] if ln.strip()]


def local_pids(stdout: str) -> list[int]:
    return [int(p) for p in re.findall(r"submitted job local-(\d+)", stdout)]


def alive(pid: int) -> bool:
    """Running (not a zombie) by PID."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def slurm_job_processes(job_ids: list[str]) -> dict[str, list[str]]:
    """Processes of these jobs on each test node (other helpers' jobs share the nodes): found by the
    job id in their environment or in slurmstepd's name, never by program name."""
    from slurm_support import NODES, namespace_pids

    left: dict[str, list[str]] = {}
    for node in NODES:
        for pid in sorted(namespace_pids(node)):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            job = next((e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"SLURM_JOB_ID=")), None)
            if job in job_ids or any(f"[{j}." in cmd for j in job_ids):
                left.setdefault(node, []).append(f"{pid} {cmd.strip()}")
    return left


def submitted_ids(stdout: str) -> list[str]:
    return re.findall(r"submitted job (\d+)", stdout)


# --- item 2: a local batch job's exit code is never lost -------------------------------------

def test_local_batch_multirun_keeps_each_exit_code(tmp_path):
    """Issue 11.2: `-m -b -w site=local nodes=1,2 /bin/false` said job 0 `COMPLETED 0`."""
    with time_to_clean("local batch multirun /bin/false"):
        result = run_cli(["-m", "-b", "-w", "site=local", "nodes=1,2", "/bin/false"], tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    assert [(r[1], r[2]) for r in rows] == [("FAILED", "1"), ("FAILED", "1")]
    assert [p for p in local_pids(result.stdout) if alive(p)] == []


def test_local_batch_multirun_exit_codes_per_job(tmp_path):
    """Each job's own code in the table; the sweep exits with the first non-zero one."""
    result = run_cli(["-m", "-b", "-w", "site=local", "nodes=1,2,3", *EXIT_BY_NODES], tmp_path)
    assert result.returncode == 3, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    assert [(r[1], r[2]) for r in rows] == [("FAILED", "3"), ("COMPLETED", "0"), ("FAILED", "4")]
    outs = sorted(tmp_path.rglob("job-local.out"), key=lambda p: p.parent.name)
    assert [p.read_text().split() for p in outs] == [["RAN", "1"], ["RAN", "2"], ["RAN", "3"]]


def test_local_interactive_multirun_exit_codes(tmp_path):
    """Interactive sweep: stops at the first failure (table says skipped), or goes on with -k."""
    result = run_cli(["-m", "site=local", "nodes=1,2,3", *EXIT_BY_NODES], tmp_path)
    assert result.returncode == 3
    assert [r[1] for r in table_rows(result.stdout)] == ["FAILED", "skipped", "skipped"]
    result = run_cli(["-m", "-k", "site=local", "nodes=1,2,3", *EXIT_BY_NODES], tmp_path)
    assert result.returncode == 3
    assert [(r[1], r[2]) for r in table_rows(result.stdout)] == [("FAILED", "3"), ("COMPLETED", "0"), ("FAILED", "4")]


# --- items 3, 4: multirun --wait when scontrol forgets a job; sbatch refusing one job ----------

FORGETFUL_SCONTROL = """#!/bin/sh
echo "slurm_load_jobs error: Invalid job id specified" >&2
exit 1
"""
NO_ACCOUNTING_SACCT = """#!/bin/sh
echo "Slurm accounting storage is disabled" >&2
exit 1
"""
#: sbatch stand-in that refuses the job whose script asks for 2 nodes, else hands over to tests/bin/sbatch.
PICKY_SBATCH = """#!/bin/sh
script="$(eval echo \\${$#})"
if grep -q '^#SBATCH -N 2$' "$script"; then
  echo "sbatch: error: Batch job submission failed: Node count specification invalid" >&2
  exit 1
fi
exec "{standin}" "$@"
"""


@pytest.fixture
def fake_slurm(tmp_path, standin_path):
    """PATH with stand-ins: sbatch (tests/bin, refuses 2-node jobs), a scontrol that knows no job, a sacct without accounting."""
    from conftest import TESTS

    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("scontrol", FORGETFUL_SCONTROL), ("sacct", NO_ACCOUNTING_SACCT),
                       ("sbatch", PICKY_SBATCH.replace("{standin}", str(TESTS / "bin" / "sbatch")))):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**standin_path, "PATH": f"{bin_dir}{os.pathsep}{standin_path['PATH']}"}


def test_wait_for_a_job_scontrol_forgot_says_unknown_in_one_line(tmp_path, fake_slurm):
    """Issue 11.3: the wait used to end in a traceback; now: the table, state UNKNOWN, the reason, exit 1."""
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli(["-m", "-b", "-w", "site.slurm_version=22.05.8", "nodes=1,3", "hostname"], work, env=fake_slurm)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    rows = table_rows(result.stdout)
    assert [(r[0], r[1], r[2]) for r in rows] == [("4242", "UNKNOWN", "1"), ("4242", "UNKNOWN", "1")]
    said = [ln for ln in result.stdout.splitlines() if ln.startswith("toksearch_submit: job 4242 UNKNOWN")]
    assert said == ["toksearch_submit: job 4242 UNKNOWN, exit code 1: scontrol no longer knows job 4242 "
                    "(purged after MinJobAge) and sacct has none (Slurm accounting storage is disabled)"]  # the stand-in gives both jobs one id


def test_sbatch_refusing_one_job_of_a_sweep_keeps_the_others(tmp_path, fake_slurm):
    """Issue 11.4: jobs after the refused one are still submitted; all submitted are waited for; the table has every job."""
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli(["-m", "-b", "site.slurm_version=22.05.8", "nodes=1,2,3", "hostname"], work, env=fake_slurm)
    assert result.returncode == 1, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    assert [r[:3] for r in rows] == [["4242", "submitted", "0"], ["-", "NOT_SUBMITTED", "1"], ["4242", "submitted", "0"]]
    assert "(not submitted: sbatch refused the job: sbatch: error: Batch job submission failed: " \
           "Node count specification invalid)" in result.stdout
    assert len(list(work.rglob("slurm-4242.out"))) == 2


def test_a_value_hydra_cannot_compose_stops_the_sweep_before_any_job(tmp_path, fake_slurm):
    """Hydra composes every job before the first runs: one line, nothing submitted, nothing left."""
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli(["-m", "-b", "site.slurm_version=22.05.8", "nodes=1,abc", "hostname"], work, env=fake_slurm)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("toksearch_submit: error: Error merging override nodes=abc: "
                                                      "Value 'abc' of type 'str' could not be converted to Integer")
    assert list(work.iterdir()) == []
    assert read_record(fake_slurm) == []


def test_a_sweep_where_every_job_is_refused_is_one_line_and_leaves_nothing(tmp_path):
    result = run_cli(["-m", "-b", "site=local", "nodes=0,-1", "/bin/true"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "toksearch_submit: error: nodes=0: need a whole number of nodes, 1 or more"
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slurm
def test_slurm_job_scontrol_does_not_know_is_unknown_without_accounting():
    """Real scontrol and sacct: scontrol's answer for a purged job is "Invalid job id"; this cluster has no accounting."""
    from toksearch_launch.run import wait_slurm_job

    end = wait_slurm_job("987654321")
    assert end.state == "UNKNOWN" and end.exit_code == 1
    assert end.reason == ("scontrol no longer knows job 987654321 (purged after MinJobAge) and sacct has none "
                          "(Slurm accounting storage is disabled)")


@pytest.mark.slurm
def test_slurm_sweep_with_a_job_sbatch_refuses(tmp_path):
    """Issue 11.4 on the real cluster: the refused job is in the table with sbatch's reason; the others ran."""
    from slurm_support import TEST_SITE, wait_for

    sweep = "batch.sbatch=[--time=0:30:00,--partition=debug],[--partition=nosuch],[--time=0:30:00,--partition=shared]"
    with time_to_clean("slurm sweep, sbatch refuses job 1"):
        result = run_cli([*TEST_SITE, "-m", "-b", "-w", sweep, "nodes=1", "hostname"], tmp_path,
                         timeout=600)
        jobs = submitted_ids(result.stdout)
        wait_for(lambda: slurm_job_processes(jobs) == {}, 30, what=f"nothing of jobs {jobs} left on the nodes")
    assert result.returncode == 1, result.stdout + result.stderr
    rows = table_rows(result.stdout)
    assert [r[1:3] for r in rows] == [["COMPLETED", "0"], ["NOT_SUBMITTED", "1"], ["COMPLETED", "0"]]
    assert rows[1][0] == "-" and rows[0][0].isdigit() and rows[2][0].isdigit()
    assert ("(not submitted: sbatch refused the job: sbatch: error: invalid partition specified: nosuch; "
            "sbatch: error: Batch job submission failed: Invalid partition name specified)") in result.stdout
    assert len(jobs) == 2


# --- item 7 (launcher part): secrets never printed; file modes ---------------------------------

SECRET = "hunter2-s3cr3t"


def test_printed_interactive_command_is_redacted_but_the_job_gets_the_secret(tmp_path, standin_path):
    command = [sys.executable, "-c", "import sys; print('GOT', sys.argv[1:])", "--token", SECRET, f"--password={SECRET}"]
    env = {**standin_path, "DISPLAY": "", "STANDIN_SRUN_OPTS": "5"}
    result = run_cli(["nodes=2", "site.slurm_version=22.05.8", "ray.master.start=[--redis-password=x]", *command],
                     tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stderr
    [shown] = [ln for ln in result.stderr.splitlines() if ln.startswith("toksearch_submit: salloc ")]
    assert shown.endswith("--token '<redacted>' '--password=<redacted>'")
    assert f"GOT ['--token', '{SECRET}', '--password={SECRET}']" in result.stdout
    [salloc] = read_record(standin_path)
    assert salloc[-3:] == ["--token", SECRET, f"--password={SECRET}"]


def test_dry_run_and_sweep_lines_are_redacted(tmp_path):
    result = run_cli(["-d", "-b", "-m", "site=local", f"ray.master.start=[--redis-password={SECRET}],[--x]",
                      "python", "x.py", "--token", SECRET], tmp_path)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert "exec python x.py --token '<redacted>'" in result.stdout
    assert "ray.master.start=['--redis-password=<redacted>']" in result.stderr


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_batch_script_is_0644_or_tighter_and_never_executable(tmp_path, standin_path, umask, mode):
    old = os.umask(umask)
    try:
        result = run_cli(["-b", "site.slurm_version=22.05.8", "hostname", "--token", SECRET], tmp_path, env=standin_path)
    finally:
        os.umask(old)
    assert result.returncode == 0, result.stderr
    [script] = list(tmp_path.rglob("job.sbatch"))
    assert script.stat().st_mode & 0o777 == mode
    assert SECRET in script.read_text()  # the job needs it; the file is not world-writable nor executable
    assert SECRET not in result.stdout + result.stderr


@pytest.mark.cluster
def test_cluster_temp_dir_is_0700_and_secret_file_0600(tmp_path):
    """The eager Ray cluster's per-job temp dir and its auth token, as the job sees them (site=local)."""
    probe = ("import os, stat, sys; p = os.environ['RAY_AUTH_TOKEN_PATH']; root = p\n"
             "while not os.path.basename(root).startswith('tsl-'): root = os.path.dirname(root)\n"
             "print('MODES', oct(os.stat(p).st_mode & 0o777), oct(os.stat(root).st_mode & 0o777), root)")
    with time_to_clean("eager ray cluster start+stop (modes probe)"):
        result = run_cli(["site=local", "nodes=1", "backend=ray", "backend.start=eager", sys.executable, "-c", probe],
                         tmp_path, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    _, secret_mode, root_mode, root = next(ln for ln in result.stdout.splitlines() if ln.startswith("MODES")).split()
    assert (secret_mode, root_mode) == ("0o600", "0o700")
    assert not Path(root).exists()  # removed at the end of the job


# --- item 8: command-line traps ------------------------------------------------------------------

@pytest.mark.parametrize("flag", [["-N3"], ["-N=3"], ["-N", "3"], ["--nodes=3"]])
def test_slurm_short_forms_of_nodes(tmp_path, standin_path, flag):
    result = run_cli(["-d", *flag, "site.slurm_version=22.05.8", "python", "x.py"], tmp_path, env=standin_path)
    assert result.returncode == 0, result.stderr
    assert "# run: salloc -N 3 " in result.stdout


@pytest.mark.parametrize("flag", [["-c", "4"], ["-c4"]])
def test_slurm_cpus_flag_is_refused_in_one_line_naming_what_to_write(tmp_path, flag):
    result = run_cli([*flag, "python", "x.py"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "toksearch_submit: error: -c is SLURM's --cpus-per-task, which toksearch_submit does not set: add it to the "
        "job's options, e.g. 'interactive.srun_extra=[--cpus-per-task=4]' or 'batch.sbatch_extra=[--cpus-per-task=4]' "
        "(Hydra's config print is --cfg)")
    assert list(tmp_path.iterdir()) == []


def test_extra_options_are_appended_after_the_sites(tmp_path, standin_path):
    """The suggested override really works: the GPUs stay, the option is added, no note about dropping."""
    result = run_cli(["-d", "-N2", "site=saga", "site.slurm_version=22.05.8", "interactive.salloc_extra=[--time=1:00:00]",
                      "ray.worker.start_extra=[--num-cpus=8]", "python", "x.py"], tmp_path,
                     env={**standin_path, "DISPLAY": ":0"})
    assert result.returncode == 0, result.stderr
    assert "# run: salloc -N 2 --exclusive --gres=gpu:volta:1 --x11=all --time=1:00:00 srun" in result.stdout
    # in-job ray worker: the allocation's values, except the CPUs the user set
    assert ("--num-gpus '<gpus:node2>' --memory '<memory:node2>' --object-store-memory '<object-store:node2>' "
            "--num-cpus=8 --block") in result.stdout
    assert "replaces" not in result.stdout


def test_an_override_that_drops_site_options_says_so_in_one_line(tmp_path, standin_path):
    """Issue 11.8: `site=saga 'interactive.salloc=[--time=1:00:00]'` silently dropped --gres=gpu:volta:1."""
    result = run_cli(["site=saga", "site.slurm_version=22.05.8", "interactive.salloc=[--time=1:00:00]",
                      sys.executable, "-c", "print('ran')"], tmp_path,
                     env={**standin_path, "DISPLAY": ":0", "STANDIN_SRUN_OPTS": "6"})
    assert result.returncode == 0, result.stderr
    notes = [ln for ln in result.stderr.splitlines() if "replaces" in ln]
    assert notes == ["toksearch_submit: note: interactive.salloc=[...] replaces the site=saga options and drops "
                     "--gres=gpu:volta:1 --x11=all (to add options instead, use interactive.salloc_extra=[...])"]
    [salloc] = read_record(standin_path)
    assert salloc[:salloc.index("srun")] == ["salloc", "-N", "1", "--exclusive", "--time=1:00:00"]


def test_the_job_config_holds_the_merged_lists(tmp_path):
    code = ("from toksearch_launch.config import load_job_config as l; c = l(); "
            "print('LISTS', list(c.ray.worker.start), list(c.ray.worker.start_extra))")
    result = run_cli(["site=local", "ray.worker.start=[--a]", "ray.worker.start_extra=[--b]", sys.executable, "-c", code],
                     tmp_path)
    assert result.returncode == 0, result.stderr
    assert "LISTS ['--a', '--b'] []" in result.stdout
    assert "replaces" not in result.stderr  # site=local sets no ray.worker.start options


# --- item 9: a missing engine --------------------------------------------------------------------

def blocked_modules_env(tmp_path: Path, *modules: str) -> dict:
    """An environment whose Python cannot import ``modules`` (as after a plain pip install without the extra)."""
    site = tmp_path / "blocker"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(
        "import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules))
    return {"PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.mark.parametrize("backend, module, extra", [("ray", "ray", "ray"), ("spark", "pyspark", "spark"),
                                                    ("dask", "distributed", "dask")])
def test_eager_backend_not_installed_is_one_line_before_any_allocation(tmp_path, standin_path, backend, module, extra):
    env = {**standin_path, **blocked_modules_env(tmp_path, module)}
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli([f"backend={backend}", "backend.start=eager", "-N", "2", "site.slurm_version=22.05.8",
                      "python", "x.py"], work, env=env)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"toksearch_submit: error: backend={backend} needs the {module} package, which is "
                                     f"not installed here: pip install 'toksearch_launch[{extra}]'")
    assert read_record(standin_path) == []  # salloc never ran
    assert list(work.iterdir()) == []


def test_engine_require_names_the_extra(tmp_path):
    code = ("from toksearch_launch.engines import require, EngineMissing\n"
            "require('spark')\n"
            "try:\n    require('ray')\nexcept EngineMissing as e:\n    print('MISSING', e)\n"
            "import sys; print('IMPORTED', 'ray' in sys.modules and sys.modules['ray'] is not None)")
    env = {**os.environ, **blocked_modules_env(tmp_path, "ray")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "MISSING backend=ray needs the ray package, which is not installed here: pip install 'toksearch_launch[ray]'",
        "IMPORTED False"]


@pytest.mark.parametrize("method, module, extra", [("compute_ray", "ray", "ray"), ("compute_spark", "pyspark", "spark"),
                                                  ("compute_dask", "distributed", "dask")])
def test_compute_without_its_engine_names_the_extra(tmp_path, method, module, extra):
    """Issue 11.9: compute_ray()/compute_spark() after a plain pip install ended in ModuleNotFoundError."""
    code = ("from toksearch_launch import Pipeline\n"
            "from toksearch_launch.engines import EngineMissing\n"
            "p = Pipeline([1, 2])\n"
            f"try:\n    p.{method}()\nexcept EngineMissing as e:\n    print('MISSING', e)\n")
    env = {**os.environ, **blocked_modules_env(tmp_path, module)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    backend = method.removeprefix("compute_")
    assert result.stdout.splitlines() == [
        f"MISSING backend={backend} needs the {module} package, which is not installed here: "
        f"pip install 'toksearch_launch[{extra}]'"]


# --- item 10: nothing left behind ----------------------------------------------------------------

@pytest.mark.parametrize("mode", [[], ["-b"], ["-m", "nodes=1,2"], ["-b", "backend.start=eager"]],
                         ids=["interactive", "batch", "multirun", "batch-eager"])
def test_local_program_not_found_leaves_nothing(tmp_path, mode):
    """Issue 11.10: `site=local no-such-program` left toksearch.yaml behind."""
    result = run_cli(["site=local", *mode, "no-such-program-xyz", "arg"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "toksearch_submit: error: no-such-program-xyz: command not found"
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


# --- shared filesystem: the run dir must be visible from the nodes --------------------------------
# The test cluster's nodes are network namespaces on one machine: they share every filesystem, so a
# run dir cannot really be invisible to them. The honest stand-in: hold the job, take away what the
# node would not see (the config, or the whole run dir), release it, and watch the job fail at once.

def _held_batch_job(tmp_path):
    from slurm_support import TEST_SITE

    proc = subprocess.Popen([sys.executable, "-m", "toksearch_launch.cli", *TEST_SITE, "-b", "-w",
                             "batch.sbatch_extra=[--hold]", "hostname"], cwd=tmp_path, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "TOKSEARCH_CONFIG": ""})
    first = proc.stdout.readline()
    match = re.search(r"submitted job (\d+); run dir (\S+);", first)
    assert match, first + proc.stderr.read()
    return proc, match.group(1), Path(match.group(2))


@pytest.mark.slurm
@pytest.mark.parametrize("take_away", ["config", "run dir"])
def test_slurm_run_dir_not_visible_on_the_node_fails_at_once(tmp_path, take_away):
    import shutil

    proc, job_id, run_dir = _held_batch_job(tmp_path)
    try:
        if take_away == "config":
            (run_dir / "toksearch.yaml").unlink()
        else:
            shutil.rmtree(run_dir)
        with time_to_clean(f"slurm batch, {take_away} not visible on the node"):
            subprocess.run(["scontrol", "release", job_id], check=True)
            out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            subprocess.run(["scancel", job_id])
    assert proc.returncode == (1 if take_away == "config" else 181), out + err  # slurmstepd: ExitCode=0:53
    [said] = [ln for ln in out.splitlines() if ln.startswith(f"toksearch_submit: job {job_id} ")]
    if take_away == "config":
        assert said == f"toksearch_submit: job {job_id} FAILED, exit code 1"
        [line] = (run_dir / f"slurm-{job_id}.out").read_text().splitlines()
        assert re.fullmatch(rf"toksearch: {re.escape(str(run_dir / 'toksearch.yaml'))} is not visible on tsn\d: the run "
                            r"directory must be on a filesystem the compute nodes share \(choose one with hydra.run.dir=...\)",
                            line), line
    else:
        assert said.startswith(f"toksearch_submit: job {job_id} FAILED, exit code 181: Slurm's reason: JobLaunchFailure; ")
        assert said.endswith(f"; its output {run_dir}/slurm-{job_id}.out was never written: the run directory "
                             "must be on a filesystem the compute nodes share")
    assert slurm_job_processes([job_id]) == {}


@pytest.mark.slurm
def test_slurm_interactive_step_check_on_a_real_node(tmp_path):
    """The interactive step's check, run by srun on a test node, for a config path the node cannot see."""
    from toksearch_launch.plan import checked_command

    missing = tmp_path / "node-local" / "toksearch.yaml"
    ran = subprocess.run(["salloc", "-N", "1", "--time=0:05:00", "srun", "-N", "1", "--overlap",
                          *checked_command(missing, ["echo", "COMMAND RAN"])], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 1 and "COMMAND RAN" not in ran.stdout
    assert re.search(rf"toksearch: {re.escape(str(missing))} is not visible on tsn\d: the run directory must be on a "
                     r"filesystem the compute nodes share \(choose one with hydra.run.dir=...\)", ran.stderr), ran.stderr


# --- the same faults on the real SLURM cluster ----------------------------------------------------

@pytest.mark.slurm
def test_slurm_batch_multirun_exit_codes_per_job(tmp_path):
    from slurm_support import TEST_SITE

    with time_to_clean("slurm batch multirun, exit codes 3/0"):
        result = run_cli([*TEST_SITE, "-m", "-b", "-w", "nodes=1,2", *EXIT_BY_NODES], tmp_path, timeout=600)
    assert result.returncode == 3, result.stdout + result.stderr
    assert [(r[1], r[2]) for r in table_rows(result.stdout)] == [("FAILED", "3"), ("COMPLETED", "0")]
    assert slurm_job_processes(submitted_ids(result.stdout)) == {}


@pytest.mark.slurm
def test_slurm_printed_commands_are_redacted(tmp_path):
    from slurm_support import TEST_SITE

    command = [sys.executable, "-c", "import sys; print('GOT', sys.argv[1:])", "--token", SECRET]
    for mode in ([], ["-b", "-w"]):
        result = run_cli([*TEST_SITE, *mode, "-N3", *command], tmp_path, timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        ours = [ln for ln in (result.stdout + result.stderr).splitlines() if ln.startswith("toksearch_submit:")]
        assert ours and not [ln for ln in ours if SECRET in ln]
        if not mode:
            assert f"GOT ['--token', '{SECRET}']" in result.stdout  # the job itself got it
            assert any(ln.endswith("--token '<redacted>'") for ln in ours)
    [out] = list(tmp_path.rglob("slurm-*.out"))
    assert out.read_text() == f"GOT ['--token', '{SECRET}']\n"
    assert oct(next(tmp_path.rglob("job.sbatch")).stat().st_mode & 0o777) == "0o644"


@pytest.mark.slurm
def test_slurm_engine_missing_refused_before_salloc(tmp_path):
    from slurm_support import TEST_SITE

    work = tmp_path / "work"
    work.mkdir()
    result = run_cli([*TEST_SITE, "-N3", "backend=ray", "backend.start=eager", "python", "x.py"], work,
                     env=blocked_modules_env(tmp_path, "ray"))
    assert result.returncode == 2
    assert result.stderr.strip() == ("toksearch_submit: error: backend=ray needs the ray package, which is not "
                                     "installed here: pip install 'toksearch_launch[ray]'")
    assert list(work.iterdir()) == []


@pytest.mark.slurm
def test_slurm_program_not_found_on_the_node(tmp_path):
    """On SLURM COMMAND is looked up on the node: the job runs and fails with 127 and sh's one line."""
    from slurm_support import TEST_SITE

    result = run_cli([*TEST_SITE, "no-such-program-xyz", "arg"], tmp_path)
    assert result.returncode == 127
    assert "toksearch: 1: exec: no-such-program-xyz: not found" in result.stderr.splitlines()
    assert "Traceback" not in result.stderr
