"""A daemon that dies while its job runs: one line at once (node, role, exit code, log), a true teardown summary.

Unit tests: the line's wording, the record and its reading back, the step wrapper
with a stand-in command (real processes, no cluster).  Integration tests
(``cluster``: site=local, real Ray, Spark and Dask daemons; ``slurm``: the real
3-node test cluster) kill one worker node's daemon by PID while the cluster runs.
The victim is found from the run itself (the worker's step wrapper and its
children, or the temp-dir marker in the environment); what is left is checked by
the owner marker every process of the run carries, never by name.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from toksearch_launch.cluster.deaths import (
    DAEMONS_ENV,
    EXITS_ENV,
    DaemonExit,
    DeathWatch,
    describe_exit,
    exit_of,
    read_exits,
    record_exit,
    write_daemons_file,
)
from toksearch_launch.cluster.lifecycle import teardown_summary
from toksearch_launch.cluster.owner import OWNER_ENV
from toksearch_launch.cluster.procs import ENV_MARK

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable


# ------------------------------------------------------------------ the line and its record


def test_the_line_names_role_node_code_and_log() -> None:
    ex = DaemonExit("ray-worker", "local2", 1, "/run/logs/ray-worker-local2.log")
    assert ex.line() == ("toksearch_launch: ray-worker on local2 exited with code 1 while the job ran "
                         "(log: /run/logs/ray-worker-local2.log)")


def test_a_signal_death_is_named_by_its_signal() -> None:
    ex = DaemonExit("spark-worker", "tsn3", -signal.SIGKILL, "/r/logs/spark-worker-tsn3.log")
    assert ex.line() == ("toksearch_launch: spark-worker on tsn3 was killed by SIGKILL while the job ran "
                         "(log: /r/logs/spark-worker-tsn3.log)")
    assert describe_exit(-signal.SIGTERM) == "was killed by SIGTERM"
    assert describe_exit(137) == "exited with code 137"  # a shell's 128+9 is a code, as reported
    assert describe_exit(-77) == "was killed by signal 77"
    assert ex.brief() == "spark-worker on tsn3 (was killed by SIGKILL)"


def test_records_round_trip_and_a_torn_line_waits(tmp_path: Path) -> None:
    path = tmp_path / "exits.jsonl"
    a = DaemonExit("dask-worker", "local2", 137, "/l/a.log", "/tmp/tsl-abc123/d2")
    assert record_exit(str(path), a)
    with open(path, "a") as fh:
        fh.write('{"role": "half')  # a writer not done yet
    got, offset = read_exits(path)
    assert got == [a]
    assert offset == len(a.to_json()) + 1
    with open(path, "a") as fh:
        fh.write('"}\nnot json\n')
    more, offset2 = read_exits(path, offset)
    assert more == []  # neither line is a whole record
    assert offset2 == path.stat().st_size
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert record_exit(None, a) is False
    assert record_exit(str(tmp_path / "no" / "such" / "dir.jsonl"), a) is False


def test_the_wrapper_learns_its_role_node_and_log_from_the_daemons_file(tmp_path: Path) -> None:
    daemons = tmp_path / "daemons.json"
    write_daemons_file(str(daemons), {"/tmp/tsl-x/r2": {"role": "ray-worker", "node": "local2", "log": "/l/w.log"}},
                       ready=True)
    env = {DAEMONS_ENV: str(daemons)}
    assert exit_of("/tmp/tsl-x/r2", 1, env, "ray", "machine") == DaemonExit("ray-worker", "local2", 1, "/l/w.log",
                                                                              "/tmp/tsl-x/r2")
    other = exit_of("/tmp/tsl-x/r9", -9, env, "ray", "machine")  # not in the file: what it knows itself
    assert (other.role, other.node, other.returncode) == ("ray", "machine", -9)
    assert exit_of("/d", 2, {}, "java", "tsn2").node == "tsn2"


def test_a_death_before_the_cluster_is_ready_is_said_to_be_in_the_start(tmp_path: Path) -> None:
    daemons = tmp_path / "daemons.json"
    write_daemons_file(str(daemons), {"/tmp/tsl-x/r3": {"role": "ray-worker", "node": "local3", "log": "/l/w3.log"}},
                       ready=False)
    ex = exit_of("/tmp/tsl-x/r3", 1, {DAEMONS_ENV: str(daemons)}, "ray", "machine")
    assert ex.line() == "toksearch_launch: ray-worker on local3 exited with code 1 during the cluster's start (log: /l/w3.log)"
    assert DaemonExit.from_json(ex.to_json()) == ex


def test_the_watch_shows_each_new_record_once_and_keeps_only_its_own(tmp_path: Path) -> None:
    path = tmp_path / "exits.jsonl"
    shown: list[str] = []
    watch = DeathWatch(path, keep=lambda ex: ex.dir.startswith("/tmp/tsl-mine/"), say=shown.append)
    try:
        mine = DaemonExit("spark-worker", "local2", -9, "/l/s.log", "/tmp/tsl-mine/s2")
        record_exit(str(path), DaemonExit("spark-worker", "local2", 1, "/l/o.log", "/tmp/tsl-other/s2"))
        record_exit(str(path), mine)
        deadline = time.monotonic() + 10
        while not shown and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shown == [mine.line()]
    finally:
        seen = watch.stop()
    assert seen == [mine]
    assert shown == [mine.line()]  # stop() reads once more, shows nothing twice


def test_the_summary_says_what_died_and_what_was_left() -> None:
    died = [DaemonExit("ray-worker", "local2", 1, "/l", "/d")]
    assert teardown_summary(2, 1.234, [], [], []) == "stopped 2 daemons in 1.23 s; nothing left"
    assert teardown_summary(1, 1.0, died, [], []) == (
        "stopped 1 daemon in 1.00 s; 1 had exited before the stop: ray-worker on local2 "
        "(exited with code 1); nothing left")
    assert teardown_summary(2, 1.0, died, [4242, 17], []).endswith(
        "processes still running after the stop: [17, 4242]")
    assert teardown_summary(3, 1.0, [], [], ["tsn2: ..."]).endswith(
        "nothing left here; 1 nodes did not confirm a clean stop")


# ------------------------------------------------------------------ the step wrapper, stand-in daemon


def run_wrapper(tmp_path: Path, command: list[str], stop_after_start: bool = False) -> tuple[subprocess.CompletedProcess, Path]:
    root = tmp_path / "tsl-unit01"
    node_dir = f"{root}/x2"
    exits = tmp_path / "exits.jsonl"
    daemons = tmp_path / "daemons.json"
    log = tmp_path / "x-worker-node2.log"
    write_daemons_file(str(daemons), {node_dir: {"role": "x-worker", "node": "node2", "log": str(log)}}, ready=True)
    env = {k: v for k, v in os.environ.items() if k != OWNER_ENV}
    env.update({EXITS_ENV: str(exits), DAEMONS_ENV: str(daemons)})
    argv = [PY, "-m", "toksearch_launch.cluster.node", "--root", str(root), "--dir", node_dir, "--", *command]
    p = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if stop_after_start:  # once the daemon runs (the wrapper's child), ask the wrapper to stop
        deadline = time.monotonic() + 30
        while not psutil.Process(p.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    return subprocess.CompletedProcess(argv, p.returncode, out, err), exits


@pytest.mark.parametrize("command,how,status", [
    (["sh", "-c", "exit 3"], "exited with code 3", 3),
    (["sh", "-c", "kill -9 $$"], "was killed by SIGKILL", 137),
])
def test_a_daemon_that_exits_unasked_is_reported_in_one_line(tmp_path: Path, command, how, status) -> None:
    res, exits = run_wrapper(tmp_path, command)
    line = f"toksearch_launch: x-worker on node2 {how} while the job ran (log: {tmp_path / 'x-worker-node2.log'})"
    assert res.stderr.splitlines() == [line]
    assert res.returncode == status
    assert [ex.line() for ex in read_exits(exits)[0]] == [line]
    assert re.search(r"toksearch-node: stopped on \S+; nothing left", res.stdout), res.stdout


def test_a_daemon_stopped_on_request_is_not_reported(tmp_path: Path) -> None:
    res, exits = run_wrapper(tmp_path, ["sleep", "60"], stop_after_start=True)
    assert res.returncode == 0
    assert "while the job ran" not in res.stderr
    assert not exits.exists()


# ------------------------------------------------------------------ real clusters

#: The owner: start a 2+ node cluster, say which worker to kill, stop when told, report.
OWNER_SCRIPT = r"""
import json, os, sys, time
from toksearch_launch.cluster import Cluster, default_local_config, job_cluster
backend, control = sys.argv[1], sys.argv[2]
if len(sys.argv) > 3:
    c = Cluster(backend, default_local_config(nodes=int(sys.argv[3]), site={"ready_timeout": 240}), run_dir=control)
    c.start()
else:  # in a SLURM job: the job's config
    c = job_cluster(backend)
last = max(d.index for d in c.daemons)
w = next(d for d in c.daemons if d.index == last and d is not c.daemons[0])
print("READY " + json.dumps({"wrapper": w.proc.pid, "role": w.role, "host": w.host, "log": str(w.log_path),
                             "dir": w.node_dir, "root": c.plan.root, "n": len(c.daemons)}), flush=True)
def wait_file(name):
    while not os.path.exists(os.path.join(control, name)):
        time.sleep(0.1)
wait_file("stop")
c.stop()
print("STOPPED " + json.dumps({"summary": c.summary, "exits": [e.line() for e in c.exits],
                               "leftovers": c.leftovers}), flush=True)
wait_file("exit")
"""


class Owner:
    """The owner process, its stdout and stderr read as they come."""

    def __init__(self, argv: list[str], env: "dict[str, str] | None" = None) -> None:
        self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        for stream, lines in ((self.proc.stdout, self.out), (self.proc.stderr, self.err)):
            threading.Thread(target=lambda s=stream, ls=lines: [ls.append(ln.rstrip("\n")) for ln in s],
                             daemon=True).start()

    def wait_line(self, lines: list[str], pred, timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((ln for ln in list(lines) if pred(ln)), None)
            if hit is not None:
                return hit
            if self.proc.poll() is not None and lines is self.out:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {what} within {timeout:.0f} s\nstdout:\n" + "\n".join(self.out[-40:])
                             + "\nstderr:\n" + "\n".join(self.err[-60:]))

    def json_after(self, tag: str, timeout: float) -> dict:
        return json.loads(self.wait_line(self.out, lambda ln: ln.startswith(tag + " "), timeout, tag)[len(tag) + 1:])


def carrying_owner(owner_pid: int) -> set[int]:
    """Live processes whose owner marker names ``owner_pid`` (wrappers, daemons, probes)."""
    out = set()
    for p in psutil.process_iter(["pid", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if p.environ().get(OWNER_ENV, "").split(":")[1:2] == [str(owner_pid)]:
                out.add(p.pid)
        except (psutil.Error, OSError):
            pass
    return out


def marked_with(node_dir: str) -> list[psutil.Process]:
    """Live processes whose temp-dir marker is this daemon's own dir."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if p.environ().get(ENV_MARK) == node_dir:
                out.append(p)
        except (psutil.Error, OSError):
            pass
    return out


def ray_victim(info: dict) -> tuple[psutil.Process, str]:
    """The worker node's raylet (``ray start --block`` sees it die and exits 1)."""
    daemon = psutil.Process(info["wrapper"]).children()[0]  # ray start, a session leader
    raylet = next(p for p in daemon.children(recursive=True) if p.name() == "raylet")
    return raylet, "exited with code 1"


def spark_victim(info: dict) -> tuple[psutil.Process, str]:
    """The worker's JVM, as the OOM killer would take it (spark-class execs the JVM)."""
    return psutil.Process(info["wrapper"]).children()[0], "was killed by SIGKILL"


def dask_victim(info: dict) -> tuple[psutil.Process, str]:
    """One ``dask worker`` process under the node's supervisor, which then exits with 128+9."""
    supervisor = psutil.Process(info["wrapper"]).children()[0]
    return supervisor.children()[0], "exited with code 137"


VICTIMS = {"ray": ray_victim, "spark": spark_victim, "dask": dask_victim}


def kill_a_worker_and_stop(owner: Owner, control: Path, info: dict, victim: psutil.Process, how: str) -> dict:
    """Kill ``victim`` while the cluster runs; the line must come before any stop; then stop."""
    assert owner.proc.poll() is None
    t0 = time.monotonic()
    victim.send_signal(signal.SIGKILL)
    line = f"toksearch_launch: {info['role']} on {info['host']} {how} while the job ran (log: {info['log']})"
    owner.wait_line(owner.err, lambda ln: ln == line, 90, "death line")
    shown_after = time.monotonic() - t0
    assert os.path.isfile(info["log"]) and line in Path(info["log"]).read_text(errors="replace")
    (control / "stop").touch()
    stopped = owner.json_after("STOPPED", 120)
    assert [ln for ln in owner.err if "while the job ran" in ln] == [line]  # one line, once
    assert stopped["exits"] == [line]
    brief = f"{info['role']} on {info['host']} ({how})"
    assert f"1 had exited before the stop: {brief}" in stopped["summary"], stopped["summary"]
    record(f"{info['role']}-killed-mid-run", shown_after, stopped["summary"])
    return stopped


def record(name: str, shown_after: float, summary: str) -> None:
    """Measured, never asserted: how long the line took to show, and the summary."""
    print(f"\n{name}: line shown {shown_after:.2f} s after the kill; summary: {summary}")
    path = os.environ.get("TOKSEARCH_FAULT_TIMES")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"test": name, "line_after": round(shown_after, 2), "summary": summary}) + "\n")


@pytest.mark.cluster
@pytest.mark.parametrize("backend", ["ray", "spark", "dask"])
def test_a_worker_daemon_killed_mid_run_is_reported_and_teardown_tells_the_truth(tmp_path: Path, backend: str) -> None:
    control = tmp_path / "run"
    control.mkdir()
    owner = Owner([PY, "-c", OWNER_SCRIPT, backend, str(control), "2"])
    try:
        info = owner.json_after("READY", 300)
        assert info["host"] == "local2"
        run = carrying_owner(owner.proc.pid)
        assert len(run) >= info["n"]  # every wrapper and its daemon carry the owner marker
        victim, how = VICTIMS[backend](info)
        stopped = kill_a_worker_and_stop(owner, control, info, victim, how)
        assert stopped["summary"].endswith("; nothing left"), stopped["summary"]
        assert stopped["leftovers"] == []
        # by value: no process of the run is left (the owner itself, still alive, carries no marker)
        assert carrying_owner(owner.proc.pid) == set()
        assert not os.path.exists(info["root"])
        (control / "exit").touch()
        assert owner.proc.wait(timeout=30) == 0
    finally:
        if owner.proc.poll() is None:
            owner.proc.kill()
            owner.proc.wait()


def slurm_job_config(path: Path) -> Path:
    from omegaconf import OmegaConf

    from toksearch_launch.cluster import default_local_config

    cfg = default_local_config(
        nodes=3,
        site={"name": "ci", "scheduler": "slurm", "address": {"method": "dns"}, "ready_timeout": 240},
        spark={"master": {"srun": ["--overlap"]}, "worker": {"srun": ["--overlap"], "start": ["-c", "1", "-m", "1G"]}},
    )
    OmegaConf.save(cfg, path)
    return path


@pytest.mark.slurm
@pytest.mark.cluster
def test_slurm_a_spark_worker_killed_mid_run_is_reported_and_teardown_tells_the_truth(tmp_path: Path) -> None:
    from slurm_support import NODES

    env = dict(os.environ, TOKSEARCH_CONFIG=str(slurm_job_config(tmp_path / "toksearch.yaml")),
               TOKSEARCH_RUN_DIR=str(tmp_path))
    owner = Owner(["salloc", "-N3", "srun", "-N1", "--overlap", PY, "-c", OWNER_SCRIPT, "spark", str(tmp_path)], env)
    try:
        info = owner.json_after("READY", 400)
        assert info["host"] in NODES
        # the worker's JVM on its node: the session leader among the processes marked with its dir
        victim = next(p for p in marked_with(info["dir"]) if os.getsid(p.pid) == p.pid)
        stopped = kill_a_worker_and_stop(owner, tmp_path, info, victim, "was killed by SIGKILL")
        assert stopped["summary"].endswith("; nothing left"), stopped["summary"]
        marks = [p.pid for p in psutil.process_iter() if _marked_under(p, info["root"])]
        assert marks == []  # every node (they share this PID namespace): nothing of the cluster is left
        (tmp_path / "exit").touch()
        assert owner.proc.wait(timeout=60) == 0
    finally:
        if owner.proc.poll() is None:
            owner.proc.kill()
            owner.proc.wait()


def _marked_under(p: psutil.Process, root: str) -> bool:
    try:
        return p.status() != psutil.STATUS_ZOMBIE and p.environ().get(ENV_MARK, "").startswith(root.rstrip("/") + "/")
    except (psutil.Error, OSError):
        return False
