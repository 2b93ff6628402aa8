"""Faults of ``toksearch_submit`` itself (issue 11): the launcher SIGKILLed, a run dir it cannot
write, two jobs racing on shared SLURM nodes, a job that can never start under ``--wait``.

Each test asserts the outcome: the exit code, the one line the user reads, and the
processes left (by PID, session, the cluster owner's marker, or the job id on the
nodes; never by name). Times to clean are recorded with ``TOKSEARCH_FAULT_TIMES=<file>``,
never asserted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import CLI, ROOT, TESTS, run_cli
from slurm_support import job_field, wait_for
from test_faults import slurm_job_processes, time_to_clean

PORTS_JOB = [sys.executable, str(TESTS / "ports_job.py")]


class Launched:
    """toksearch_submit started in the background, its stdout and stderr read line by line as they come."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None, program: list[str] = CLI) -> None:
        full_env = {k: v for k, v in os.environ.items() if k not in ("TOKSEARCH_CONFIG", "TOKSEARCH_RUN_DIR")}
        full_env.update(env or {})
        self.proc = subprocess.Popen([*program, *args], cwd=cwd, env=full_env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s,), daemon=True)
                         for s in (self.proc.stdout, self.proc.stderr)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.rstrip("\n"))

    def wait_line(self, pattern: str, timeout: float) -> re.Match:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                match = re.search(pattern, line)
                if match:
                    return match
            if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r} within {timeout:.0f} s:\n" + "\n".join(self.lines[-40:]))

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def pid_alive(pid: int) -> bool:
    """Running, not a zombie, by PID."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def children_of(pid: int) -> list[int]:
    import psutil

    return [c.pid for c in psutil.Process(pid).children()]


def only_child(pid: int) -> int:
    """The launcher's one child (salloc or the script), once the watchdog's short-lived
    intermediate fork has exited (it can still be there as the child's first line arrives)."""
    return wait_for(lambda: (kids := children_of(pid)) and len(kids) == 1 and kids[0], 10, 0.02,
                    f"process {pid} to have one child")


def job_state(job_id: str) -> str:
    """scontrol's JobState ("" once scontrol forgot the job)."""
    return job_field(job_id, "JobState")


# --- SIGKILL of toksearch_submit itself ------------------------------------------------------------
# The launcher runs salloc (site=local: the script) as its foreground child. Killed with SIGKILL it
# can do nothing, so the child carries a parent-death signal (SIGTERM): salloc then revokes the
# allocation (Slurm ends the steps: SIGTERM, SIGKILL after KillWait), the local script stops its
# cluster through its SIGTERM hook, and the owner watch takes what is left.

@pytest.mark.slurm
def test_slurm_sigkill_of_the_launcher_while_its_job_pends_cancels_it(tmp_path):
    from slurm_support import TEST_SITE

    launched = Launched([*TEST_SITE, "interactive.salloc_extra=[--begin=now+600]", "hostname"], tmp_path)
    try:
        job_id = launched.wait_line(r"salloc: Pending job allocation (\d+)", 60).group(1)
        salloc = only_child(launched.proc.pid)
        with time_to_clean("slurm, SIGKILL of toksearch_submit while its job pends"):
            launched.kill()
            wait_for(lambda: job_state(job_id) in ("CANCELLED", "") and not pid_alive(salloc), 30, 0.1,
                     f"job {job_id} cancelled and salloc {salloc} gone")
    finally:
        launched.kill()
        subprocess.run(["scancel", job_id] if "job_id" in locals() else ["true"])
    assert job_state(job_id) in ("CANCELLED", "")


@pytest.mark.slurm
def test_slurm_sigkill_of_the_launcher_during_a_run_ends_the_allocation_and_its_cluster(tmp_path):
    """A 2-node job whose script runs a Dask cluster: SIGKILL of toksearch_submit ends the job, the
    script and every daemon on both nodes within seconds (before: the allocation ran on)."""
    from slurm_support import TEST_SITE

    launched = Launched([*TEST_SITE, "nodes=2", "backend=dask", *PORTS_JOB, "600"], tmp_path)  # (a queue wait counts in the 600 s)
    job_id = ""
    try:
        info = json.loads(launched.wait_line(r"^PORTS (.*)", 600).group(1))
        job_id = info["job"]
        before = slurm_job_processes([job_id])
        assert len(before) == 2, before  # the script's node and the worker's
        salloc = only_child(launched.proc.pid)
        with time_to_clean("slurm, SIGKILL of toksearch_submit during a run (2-node dask)"):
            launched.kill()
            wait_for(lambda: job_state(job_id) in ("CANCELLED", "COMPLETED", "FAILED", "")
                     and not pid_alive(salloc) and slurm_job_processes([job_id]) == {}, 40, 0.1,
                     f"job {job_id} ended and nothing of it left on any node")
    finally:
        launched.kill()
        if job_id:
            subprocess.run(["scancel", job_id])
    assert slurm_job_processes([job_id]) == {}
    assert not Path(info["root"]).exists()


def script_and_its_cluster(launched: "Launched", line: str) -> tuple[dict, set[int], set[int]]:
    """The site=local script's JSON line (``line``: its pattern), the PIDs of the script (the
    launcher's one child) and of its 2-node cluster, and their sessions other than ours."""
    from test_faults_cluster import run_of

    info = json.loads(launched.wait_line(line, 600).group(1))
    script = info["pid"]
    assert only_child(launched.proc.pid) == script
    pids = run_of(script) | {script}
    assert len(pids) > 2, pids  # wrappers and daemons of both nodes
    sids = {os.getsid(p) for p in pids if pid_alive(p)} - {os.getsid(0)}
    return info, pids, sids


@pytest.mark.cluster
def test_local_sigkill_of_the_launcher_stops_the_script_and_its_cluster(tmp_path):
    """site=local: the script is the launcher's child; it gets SIGTERM, stops its 2-node Dask cluster
    and exits (before: script and cluster ran on, orphaned)."""
    from test_faults_cluster import alive

    launched = Launched(["site=local", "nodes=2", "backend=dask", *PORTS_JOB, "600"], tmp_path)
    try:
        info, pids, sids = script_and_its_cluster(launched, r"^PORTS (.*)")
        with time_to_clean("site=local, SIGKILL of toksearch_submit during a run (2-node dask)"):
            launched.kill()
            wait_for(lambda: not alive(pids, sids) and not Path(info["root"]).exists(), 40, 0.1,
                     "the script, its cluster and its temp dir gone")
    finally:
        launched.kill()
    assert alive(pids, sids) == set()


IGNORES_SIGTERM = r"""
import json, os, signal, sys, time
if sys.argv[1] != "none":
    from toksearch_launch.cluster import job_cluster
    root = job_cluster(sys.argv[1]).plan.root
else:
    root = None
# replaces the cluster's SIGTERM hook too: nothing here stops on SIGTERM
signal.signal(signal.SIGTERM, lambda *_: print("SIGTERM IGNORED", flush=True))
print("IGNORING " + json.dumps({"pid": os.getpid(), "root": root}), flush=True)
time.sleep(600)
"""
PR_SET_CHILD_SUBREAPER = 36


def become_subreaper(on: bool) -> None:
    """Orphans of our descendants (the launcher's script, once it is killed) become our children:
    we can then read how they died."""
    import ctypes

    assert ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) == 0


def reap(pid: int, timeout: float) -> int:
    """Wait for an adopted child; its wait status."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            raise AssertionError(f"process {pid} still runs after {timeout} s")
        time.sleep(0.05)


def stand_in_launcher(policy: str) -> list[str]:
    """A launcher stand-in: run_foreground of its argv with ``AfterLauncher(<policy>)``."""
    return [sys.executable, "-c", "import sys; from toksearch_launch.run import AfterLauncher, run_foreground; "
            f"sys.exit(run_foreground(sys.argv[1:], {{}}, after_launcher=AfterLauncher({policy}))[0])"]


def test_a_killed_launchers_script_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    """run_foreground as the launcher runs a site=local script, the launcher stand-in SIGKILLed:
    the script gets SIGTERM (its death signal), ignores it, and the watchdog SIGKILLs it after
    the grace (1 s here). The watchdog is not the launcher's child: the script stays its only one."""
    launcher = stand_in_launcher("1.0, None, True")
    become_subreaper(True)
    launched = None
    try:
        launched = Launched([sys.executable, "-c", IGNORES_SIGTERM, "none"], tmp_path,
                            program=launcher)
        script = json.loads(launched.wait_line(r"^IGNORING (.*)", 60).group(1))["pid"]
        assert only_child(launched.proc.pid) == script
        with time_to_clean("SIGKILL of a run_foreground launcher, its script ignoring SIGTERM (grace 1 s)"):
            launched.kill()
            status = reap(script, 30)
        launched.wait_line(r"^SIGTERM IGNORED$", 5)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    finally:
        become_subreaper(False)
        if launched is not None:
            launched.kill()


MISSES_FIRST_SIGTERM = r"""
import os, signal, sys, time
seen = []
def on_term(*_):
    seen.append(time.monotonic())
    print(f"SIGTERM {len(seen)}", flush=True)
    if len(seen) == 2:
        sys.exit(7)
signal.signal(signal.SIGTERM, on_term)
print(f"WAITING {os.getpid()}", flush=True)
while True:
    time.sleep(0.05)
"""


def test_a_killed_launchers_salloc_that_missed_its_death_signal_gets_it_again(tmp_path):
    """run_foreground as the launcher runs salloc, with SLURM's policy (repeat the death signal,
    never SIGKILL), a stand-in that acts as a salloc that missed its first SIGTERM (measured: 4
    in 100 salloc signalled as they print "Pending job allocation" wait on for the job): the
    launcher SIGKILLed, the stand-in gets SIGTERM again and exits by itself (code 7), not by SIGKILL."""
    launcher = stand_in_launcher("20.0, 0.2, False")
    become_subreaper(True)
    launched = None
    try:
        launched = Launched([sys.executable, "-c", MISSES_FIRST_SIGTERM], tmp_path,
                            program=launcher)
        salloc = int(launched.wait_line(r"^WAITING (\d+)$", 60).group(1))
        with time_to_clean("SIGKILL of a run_foreground launcher, its salloc stand-in missing the first SIGTERM"):
            launched.kill()
            status = reap(salloc, 30)
        launched.wait_line(r"^SIGTERM 2$", 5)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7, status
    finally:
        become_subreaper(False)
        if launched is not None:
            launched.kill()


def test_a_sigterm_forwarded_to_a_salloc_that_missed_it_is_forwarded_again(tmp_path):
    """SIGTERM to the launcher (alive) with SLURM's policy: it forwards the signal to its
    salloc stand-in, which misses the first, and forwards it again until the stand-in exits;
    the launcher exits with the stand-in's code (7)."""
    launcher = stand_in_launcher("20.0, 0.2, False")
    launched = Launched([sys.executable, "-c", MISSES_FIRST_SIGTERM], tmp_path, program=launcher)
    try:
        salloc = int(launched.wait_line(r"^WAITING (\d+)$", 60).group(1))
        assert only_child(launched.proc.pid) == salloc
        launched.proc.send_signal(signal.SIGTERM)
        assert launched.proc.wait(30) == 7
        launched.wait_line(r"^SIGTERM 2$", 5)
        assert not pid_alive(salloc)
    finally:
        launched.kill()


@pytest.mark.cluster
def test_local_sigkill_of_the_launcher_kills_its_script_that_ignores_sigterm_and_its_cluster(tmp_path):
    """toksearch_submit site=local nodes=2 backend=dask, its script ignoring SIGTERM (before: the
    script and its cluster outlived the SIGKILLed launcher): SIGTERM, then SIGKILL after
    run.LOCAL_AFTER_LAUNCHER.grace; the owner watch then stops the cluster; nothing left."""
    from test_faults_cluster import alive

    script_file = tmp_path / "ignores_sigterm.py"
    script_file.write_text(IGNORES_SIGTERM)
    become_subreaper(True)
    launched = Launched(["site=local", "nodes=2", "backend=dask", sys.executable, str(script_file), "dask"], tmp_path)
    try:
        info, pids, sids = script_and_its_cluster(launched, r"^IGNORING (.*)")
        script = info["pid"]
        with time_to_clean("site=local, SIGKILL of toksearch_submit, its script ignoring SIGTERM (2-node dask)"):
            launched.kill()
            status = reap(script, 60)
            wait_for(lambda: not alive(pids, sids) and not Path(info["root"]).exists(), 60, 0.1,
                     "the script's cluster and its temp dir gone")
        launched.wait_line(r"^SIGTERM IGNORED$", 5)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
    finally:
        become_subreaper(False)
        launched.kill()
        for pid in locals().get("pids", ()):  # adopted wrappers: reap them
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
    assert alive(pids, sids) == set()


# --- the run directory cannot be written ------------------------------------------------------------

def read_only_run(args: list[str], directory: Path) -> subprocess.CompletedProcess:
    """toksearch_submit run in ``directory`` (cwd) made read-only: a read-only bind mount in a private
    mount namespace when we are root (root writes through a 0555 mode), else mode 0555."""
    env = {k: v for k, v in os.environ.items() if k not in ("TOKSEARCH_CONFIG", "TOKSEARCH_RUN_DIR")}
    if os.geteuid() == 0:
        read_only = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && cd "$1" && shift && exec "$@"'
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", read_only, "sh", str(directory), *CLI, *args]
    else:
        directory.chmod(0o555)
        argv = [*CLI, *args]
    try:
        return subprocess.run(argv, cwd=directory, env=env, capture_output=True, text=True, timeout=120,
                              stdin=subprocess.DEVNULL)
    finally:
        directory.chmod(0o755)


@pytest.fixture
def read_only_dir():
    """A directory outside pytest's 0700 tree (so that a non-root run can reach it), removed afterwards."""
    import shutil

    path = Path(tempfile.mkdtemp(prefix="tsl-ro-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


UNWRITABLE = (r"toksearch_submit: error: cannot write {path}: (Read-only file system|Permission denied): the run "
              r"directory must be writable \(choose one with hydra.run.dir=..., or hydra.sweep.dir=... with -m\)")


@pytest.mark.parametrize("args, where", [
    (["site=local", "echo", "hi"], "toksearch_runs"),
    (["-b", "site=local", "echo", "hi"], "toksearch_runs"),
    (["site=local", "hydra.run.dir=runs/x", "echo", "hi"], "runs"),
    (["site=local", "hydra.run.dir=.", "echo", "hi"], "toksearch.yaml"),
    (["-m", "-b", "site=local", "nodes=1,2", "echo", "hi"], "toksearch_runs"),
], ids=["interactive", "batch", "hydra.run.dir", "existing-dir", "multirun"])
def test_local_run_dir_not_writable_is_one_line_and_runs_nothing(read_only_dir, args, where):
    result = read_only_run(args, read_only_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.splitlines()
    assert re.fullmatch(UNWRITABLE.format(path=re.escape(str(read_only_dir / where))), line), line
    assert "hi" not in result.stdout.split()  # COMMAND never ran
    assert list(read_only_dir.iterdir()) == []


@pytest.mark.slurm
@pytest.mark.parametrize("mode", [[], ["-b", "-w"]], ids=["interactive", "batch"])
def test_slurm_run_dir_not_writable_allocates_nothing(read_only_dir, mode):
    from slurm_support import TEST_SITE

    result = read_only_run([*TEST_SITE, *mode, "-N2", "hostname"], read_only_dir)
    assert result.returncode == 2, result.stdout + result.stderr
    [line] = result.stderr.splitlines()  # no "toksearch_submit: salloc ..." / "sbatch ..." line: nothing ran
    assert re.fullmatch(UNWRITABLE.format(path=re.escape(str(read_only_dir / "toksearch_runs"))), line), line
    assert result.stdout == ""


# --- a job that can never start, under --wait --------------------------------------------------------

@pytest.mark.slurm
def test_slurm_wait_for_a_job_that_can_never_start_cancels_it_in_one_line(tmp_path):
    """nodes=4 on the 3-node partition: sbatch accepts it and it would pend forever (PartitionConfig,
    then PartitionNodeLimit); --wait cancels it and says why."""
    from slurm_support import TEST_SITE

    with time_to_clean("slurm -b -w nodes=4 on 3 nodes"):
        result = run_cli([*TEST_SITE, "-b", "-w", "nodes=4", "hostname"], tmp_path, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    job_id = re.search(r"submitted job (\d+)", result.stdout).group(1)
    [said] = [ln for ln in result.stdout.splitlines() if ln.startswith(f"toksearch_submit: job {job_id} ")]
    assert re.fullmatch(rf"toksearch_submit: job {job_id} CANCELLED, exit code 1: it can never start "
                        r"\((PartitionConfig|PartitionNodeLimit): it asks for 4 nodes and partition debug has 3\): "
                        r"cancelled it", said), said
    assert job_state(job_id) in ("CANCELLED", "")


@pytest.mark.slurm
def test_slurm_interactive_job_that_can_never_start_is_cancelled_in_one_line(tmp_path):
    """The same request interactively: salloc says "Requested partition configuration not available
    now" and would wait forever; the launcher watches the job salloc waits for and cancels it."""
    from slurm_support import TEST_SITE

    with time_to_clean("slurm interactive nodes=4 on 3 nodes"):
        result = run_cli([*TEST_SITE, "nodes=4", "hostname"], tmp_path, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    job_id = re.search(r"salloc: Pending job allocation (\d+)", result.stderr).group(1)
    last = result.stderr.splitlines()[-1]
    assert re.fullmatch(rf"toksearch_submit: error: job {job_id}: it can never start \((PartitionConfig|"
                        r"PartitionNodeLimit): it asks for 4 nodes and partition debug has 3\): cancelled it", last), last
    assert job_state(job_id) in ("CANCELLED", "")


NEVER_SCONTROL = """#!/bin/sh
if [ "$2" = partition ]; then
  echo "PartitionName=debug State=UP TotalNodes=3 MaxNodes=UNLIMITED"
  exit 0
fi
echo "JobId=$4 JobState=PENDING Reason=$STANDIN_REASON NumNodes=$STANDIN_NODES Partition=debug ExitCode=0:0"
"""
RECORDING_SCANCEL = """#!/bin/sh
echo "scancel $*" >> "$STANDIN_SCANCELS"
"""


@pytest.fixture
def pending_slurm(tmp_path, standin_path):
    """PATH with stand-ins: sbatch (tests/bin), a scontrol whose job pends for $STANDIN_REASON, a recording scancel."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    for name, text in (("scontrol", NEVER_SCONTROL), ("scancel", RECORDING_SCANCEL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return {**standin_path, "PATH": f"{bin_dir}{os.pathsep}{standin_path['PATH']}",
            "STANDIN_SCANCELS": str(tmp_path / "scancels")}


@pytest.mark.parametrize("reason, nodes, why", [
    ("PartitionNodeLimit", "4-4", "PartitionNodeLimit: it asks for 4 nodes and partition debug has 3"),
    ("PartitionTimeLimit", "1", "PartitionTimeLimit: its --time is beyond its partition's time limit"),
    ("DependencyNeverSatisfied", "1",
     "DependencyNeverSatisfied: a job it depends on ended in a way that can never satisfy it"),
    ("QOSMaxNodePerJobLimit", "1", "QOSMaxNodePerJobLimit: it is beyond a per-job limit of its QOS or association"),
])
def test_wait_cancels_a_job_pending_for_a_reason_that_never_clears(tmp_path, pending_slurm, reason, nodes, why):
    work = tmp_path / "work"
    work.mkdir()
    env = {**pending_slurm, "STANDIN_REASON": reason, "STANDIN_NODES": nodes}
    result = run_cli(["-b", "-w", "site.slurm_version=22.05.8", "hostname"], work, env=env, timeout=60)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == f"toksearch_submit: job 4242 CANCELLED, exit code 1: it can never start ({why}): cancelled it"
    assert Path(pending_slurm["STANDIN_SCANCELS"]).read_text() == "scancel 4242\n"


def test_never_starts_waits_while_the_reason_can_clear():
    """Reasons that clear by themselves (resources, a hold, nodes down) never cancel a job."""
    from toksearch_launch.run import never_starts

    def three(_partition: str) -> int:
        return 3

    for reason in ("Resources", "Priority", "JobHeldUser", "BeginTime", "Dependency", "ReqNodeNotAvail", "PartitionDown"):
        assert never_starts({"JobState": "PENDING", "Reason": reason, "NumNodes": "1"}, three) == ""
    # PartitionNodeLimit for a job that fits the partition: its nodes are down or drained, which can clear
    assert never_starts({"JobState": "PENDING", "Reason": "PartitionNodeLimit", "NumNodes": "3", "Partition": "debug"},
                        three) == ""
    assert never_starts({"JobState": "PENDING", "Reason": "PartitionNodeLimit", "NumNodes": "4", "Partition": "debug"},
                        lambda _p: None) == ""  # partition unknown: no guess
    assert never_starts({"JobState": "RUNNING", "Reason": "BadConstraints"}, three) == ""


# --- two jobs started at the same instant on shared SLURM nodes, 5 times over ------------------------

@pytest.mark.slurm
def test_slurm_two_jobs_at_once_on_one_shared_node_get_disjoint_ports_5_times(tmp_path):
    """Each round: two 1-node Dask jobs on the OverSubscribe partition, both pinned to tsn3
    (site.exclusive=false), submitted held and released together (one scheduling pass starts
    both); both must finish with compute_dask == compute_serial and port blocks that never meet."""
    from slurm_support import TEST_SITE
    from toksearch_launch.run import wait_slurm_jobs

    shared = [*TEST_SITE, "-m", "-b", "site.exclusive=false", "backend=dask", "nodes=1",
              "batch.sbatch_extra=[--partition=shared,--nodelist=tsn3,--hold]", "batch.job_name=race-a,race-b"]
    for round_ in range(5):
        work = tmp_path / f"round{round_}"
        work.mkdir()
        with time_to_clean(f"slurm, two dask jobs at once on tsn3 (round {round_})"):
            result = run_cli([*shared, *PORTS_JOB], work, timeout=120)
            jobs = re.findall(r"submitted job (\d+)", result.stdout)
            assert result.returncode == 0 and len(jobs) == 2, result.stdout + result.stderr
            subprocess.run(["scontrol", "release", ",".join(jobs)], check=True)
            ends = wait_slurm_jobs(jobs)
        assert [ends[j].state for j in jobs] == ["COMPLETED", "COMPLETED"], ends
        blocks = []
        for job in jobs:
            [out] = work.rglob(f"slurm-{job}.out")
            text = out.read_text()
            assert "SAME 40" in text.split("\n"), text[-2000:]
            info = json.loads(re.search(r"^PORTS (.*)$", text, re.M).group(1))
            assert info["hosts"] == ["tsn3"]
            blocks.append(set(info["ports"]))
        print(f"\nround {round_}: blocks {min(blocks[0])}-{max(blocks[0])} and {min(blocks[1])}-{max(blocks[1])}")
        assert blocks[0] and blocks[1] and not blocks[0] & blocks[1]
        assert slurm_job_processes(jobs) == {}
