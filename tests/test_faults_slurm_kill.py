"""SIGKILL of the script on the real 3-node SLURM test cluster (issue 11): during its cluster's
start and during a run, Ray and Spark, interactive (``-N 3``) and batch (``-N 3 -b``).

The script (KILL_JOB below, one for every case) names itself on its first line: its PID,
node, job id and run dir. The test checks that PID on that node (it is in the node's
namespace and carries the job's ``SLURM_JOB_ID``), SIGKILLs it either as soon as a worker's
step wrapper process runs on another node, before any of them has said a word (the start: the
remote wrappers ask the owner's beacon after the kill, so they find it refused) or once a worker
node has computed a record (the run), and then polls until nothing of the job is left on any node (found by
the job id in each process's environment or in slurmstepd's name, never by name), the
cluster's temp dirs (from its steps' specs in the run dir) are gone and the
job has ended. Time from the kill to clean is recorded (``TOKSEARCH_FAULT_TIMES``), never
asserted.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli
from slurm_support import NODES, TEST_SITE, job_field, job_id_from, namespace_pids, wait_for
from test_faults import slurm_job_processes
from test_faults_submit import Launched
from toksearch_launch.cluster.owner import OWNER_ENV

pytestmark = pytest.mark.slurm

KILL_JOB = r"""
import json, os, socket, sys, time
from toksearch_launch import Pipeline
from toksearch_launch.cluster import job_cluster

backend, marks = sys.argv[1], sys.argv[2]
print("OWNER " + json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "job": os.environ["SLURM_JOB_ID"], "run_dir": os.environ["TOKSEARCH_RUN_DIR"]}), flush=True)
cluster = job_cluster(backend)
print("READY " + json.dumps({"root": cluster.plan.root}), flush=True)


def mark(rec):  # a record computed on a node: the run is on
    open(os.path.join(marks, f"{rec['shot']}.{socket.gethostname()}"), "w").close()
    time.sleep(0.5)


p = Pipeline(range(1, 100001))
p.map(mark)
getattr(p, f"compute_{backend}")(numparts=2000)
print("FINISHED", flush=True)  # never: the script is killed long before
"""

FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


def record(name: str, seconds: float) -> None:
    print(f"\n{name}: clean {seconds:.2f} s after the kill")
    path = os.environ.get("TOKSEARCH_FAULT_TIMES")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"fault": name, "seconds": round(seconds, 2)}) + "\n")


def owner_line(text: str) -> "dict | None":
    match = re.search(r"^OWNER (\{.*\})$", text, re.M)
    return json.loads(match.group(1)) if match else None


def remote_worker_logs(run_dir: Path, backend: str, head: str) -> dict[str, Path]:
    return {node: run_dir / "logs" / f"{backend}-worker-{node}.log" for node in NODES if node != head}


def wrapper_lines(log: Path) -> list[str]:
    """What a node's step wrapper said (the owner writes the log's ``====`` header before the step)."""
    text = log.read_text(errors="replace") if log.exists() else ""
    return [ln for ln in text.splitlines() if ln.startswith("toksearch-node:")]


def once_a_remote_wrapper_runs(job_id: str, backend: str, head: str) -> "dict[str, list[str]] | None":
    """The job's processes once a worker's step wrapper process runs on a node other than the
    script's (its python, by the job id in its environment and the worker step's spec on its
    command line), else None."""
    processes = slurm_job_processes([job_id])
    running = any(node != head and "toksearch_launch.cluster.node" in line and f"-{backend}-worker.json" in line
                  for node, lines in processes.items() for line in lines)
    return processes if running else None


def what_the_remote_wrapper_did(lines: list[str]) -> str:
    """One word per node for the record: the wrapper never ran, found the owner gone before its
    start, watched the beacon, or (the gap this test holds closed) ran unwatched."""
    text = "\n".join(lines)
    if "is gone before the start" in text:
        return "gone before the start"
    if "cannot reach the owner's beacon" in text:
        return "unwatched"
    if "through its beacon" in text:
        return "watched"
    return "never ran" if not lines else "other"


def worker_computed(marks: Path, head: str) -> bool:
    return any(name.split(".", 1)[1] != head for name in os.listdir(marks))


def process_env(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(e.split("=", 1) for e in raw.decode(errors="replace").split("\0") if "=" in e)


def cluster_roots(run_dir: Path) -> set[str]:
    """The temp dirs of the job's clusters, from their steps' specs in the run dir (each node's
    wrapper gets its ``--root`` there): known before any wrapper runs, and after the kill."""
    roots = set()
    for spec in (run_dir / "steps").glob("tsl-*.json"):
        for entry in json.loads(spec.read_text()).get("nodes", {}).values():
            argv = entry["argv"]
            roots.add(argv[argv.index("--root") + 1])
    return roots


def script_pid(owner: dict) -> int:
    """The script's PID, checked on its node: in the node's namespace and of this job."""
    pid = owner["pid"]
    assert pid in namespace_pids(owner["host"]), owner
    assert process_env(pid).get("SLURM_JOB_ID") == owner["job"], owner
    return pid


#: Every pair of (backend, mode, phase) values appears once: 4 cases, not the 8 of the full
#: product (each is a 3-node job; the CI run's budget).
PAIRWISE = [("ray", "interactive", "start"), ("ray", "batch", "run"),
            ("spark", "interactive", "run"), ("spark", "batch", "start")]


@pytest.mark.parametrize("backend,mode,phase", PAIRWISE)
def test_slurm_sigkill_of_the_script_leaves_nothing_on_any_node(tmp_path, backend, mode, phase):
    script = tmp_path / "kill_job.py"
    script.write_text(KILL_JOB)
    marks = tmp_path / "marks"
    marks.mkdir()
    args = [*TEST_SITE, "-N", "3", *(["-b"] if mode == "batch" else []), sys.executable, str(script), backend, str(marks)]
    launched = None
    job_id = ""
    try:
        if mode == "batch":
            submitted = run_cli(args, tmp_path)
            assert submitted.returncode == 0, submitted.stdout + submitted.stderr
            job_id = job_id_from(submitted.stdout)
            out = Path(re.search(r"run dir (\S+);", submitted.stdout).group(1)) / f"slurm-{job_id}.out"
            owner = wait_for(lambda: out.exists() and owner_line(out.read_text()), 300, 0.1, "the script's OWNER line")
            text = lambda: out.read_text()  # noqa: E731
        else:
            launched = Launched(args, tmp_path)
            owner = json.loads(launched.wait_line(r"^OWNER (\{.*\})$", 300).group(1))
            job_id = owner["job"]
            text = lambda: "\n".join(launched.lines)  # noqa: E731
        run_dir = Path(owner["run_dir"])
        pid = script_pid(owner)
        logs = remote_worker_logs(run_dir, backend, owner["host"])
        if phase == "start":
            # the kill at once: the remote wrappers then ask the owner's beacon after its death
            before = wait_for(lambda: once_a_remote_wrapper_runs(job_id, backend, owner["host"]), 120, 0.02,
                              f"a {backend} worker's step wrapper running on a node other than {owner['host']}")
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            said = {node: wrapper_lines(log) for node, log in logs.items()}
            assert "READY " not in text(), "the cluster was ready before the kill"
        else:
            wait_for(lambda: "READY " in text(), 180, 0.1, "the cluster's READY line")
            wait_for(lambda: worker_computed(marks, owner["host"]), 120, 0.1, "a record computed on a worker node")
            before = slurm_job_processes([job_id])
            t0 = time.monotonic()
            os.kill(pid, signal.SIGKILL)
        roots = cluster_roots(run_dir)
        assert roots, sorted((run_dir / "steps").iterdir())
        try:
            wait_for(lambda: job_field(job_id, "JobState") in FINAL | {""} and slurm_job_processes([job_id]) == {}
                     and not any(os.path.exists(r) for r in roots), 60, 0.05,
                     f"job {job_id} ended, nothing of it on any node and its temp dirs {sorted(roots)} gone")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: job {job_id} {job_field(job_id, 'JobState')}, temp dirs left "
                                 f"{[r for r in roots if os.path.exists(r)]}, processes {slurm_job_processes([job_id])}"
                                 ) from None
        took = time.monotonic() - t0
        state, exit_code = job_field(job_id, "JobState"), job_field(job_id, "ExitCode")
        record(f"slurm -N 3 {mode}, SIGKILL of the {backend} script during the {phase}", took)
        print(f"job {job_id}: {state} ExitCode={exit_code}; before the kill: "
              + ", ".join(f"{node} {len(p)}" for node, p in sorted(before.items())))
        did = {node: what_the_remote_wrapper_did(wrapper_lines(log)) for node, log in logs.items()}
        if phase == "start":
            print(f"remote wrappers' lines at the kill: {said}; then: {did}")
        assert "unwatched" not in did.values(), {node: wrapper_lines(log) for node, log in logs.items()}
        assert len(before) == (3 if phase == "run" else len(before)) >= 2, before  # the cluster on remote nodes too
        assert slurm_job_processes([job_id]) == {}
        assert [r for r in roots if os.path.exists(r)] == []
        if mode == "batch":
            assert (state, exit_code) == ("FAILED", "0:9"), (state, exit_code)
        else:
            code = launched.proc.wait(timeout=30)
            print(f"toksearch_submit exit code {code}")
            assert state in ("COMPLETED", "FAILED", "CANCELLED"), state
            assert code == 137, (code, launched.lines[-10:])
        assert "FINISHED" not in text()
    finally:
        if launched is not None:
            launched.kill()
        if job_id:
            subprocess.run(["scancel", job_id])


def marked_processes(owner_pid: int) -> dict[str, list[int]]:
    """Per node, the processes carrying the owner marker of ``owner_pid`` (wrappers, daemons, sruns)."""
    found: dict[str, list[int]] = {}
    for node in NODES:
        for pid in namespace_pids(node):
            if re.fullmatch(rf"[^:]+:{owner_pid}:[0-9.]+", process_env(pid).get(OWNER_ENV, "")):
                found.setdefault(node, []).append(pid)
    return found


def test_slurm_sigkill_of_the_script_while_its_allocation_lives_on_stops_every_node(tmp_path):
    """The script is one step of a longer job (``sh -c 'python SCRIPT; sleep 300'``): its death
    does not end the allocation, so Slurm ends nothing. The wrappers on the other nodes watch
    the owner through its beacon and stop their daemons at once (before: they ran until the job ended)."""
    script = tmp_path / "kill_job.py"
    script.write_text(KILL_JOB)
    marks = tmp_path / "marks"
    marks.mkdir()
    launched = Launched([*TEST_SITE, "-N", "3", "sh", "-c", '"$@"; exec sleep 300', "sh",
                         sys.executable, str(script), "ray", str(marks)], tmp_path)
    job_id = ""
    try:
        owner = json.loads(launched.wait_line(r"^OWNER (\{.*\})$", 300).group(1))
        job_id = owner["job"]
        pid = script_pid(owner)
        launched.wait_line(r"^READY ", 180)
        wait_for(lambda: worker_computed(marks, owner["host"]), 120, 0.1, "a record computed on a worker node")
        roots = cluster_roots(Path(owner["run_dir"]))
        before = marked_processes(pid)
        assert sorted(before) == NODES and roots, before
        t0 = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: marked_processes(pid) == {} and not any(os.path.exists(r) for r in roots), 60, 0.05,
                 f"no process of the cluster on any node and its temp dirs {sorted(roots)} gone")
        record("slurm -N 3 interactive, SIGKILL of the ray script, the allocation living on", time.monotonic() - t0)
        assert job_field(job_id, "JobState") == "RUNNING"  # nobody but the owner watch could have done it
        assert marked_processes(pid) == {}
        logs = Path(owner["run_dir"]) / "logs"
        for node in NODES:
            if node != owner["host"]:
                assert "is gone (its beacon closed): stopping session" in (logs / f"ray-worker-{node}.log").read_text()
    finally:
        launched.kill()
        if job_id:
            subprocess.run(["scancel", job_id])
