"""Cluster faults on site=local with real daemons: the owner SIGKILLed, two jobs racing for ports.

Processes are found by what the run itself reports (the owner's PID, the temp dir
its daemons are marked with) and by session id, never by name.  Times to clean are
printed and recorded (``TOKSEARCH_FAULT_TIMES=<file>``), never asserted beyond a
generous deadline poll.
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

import psutil
import pytest

from toksearch_launch.cluster.owner import OWNER_ENV
from toksearch_launch.cluster.procs import ENV_MARK

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CLEAN_DEADLINE = 60.0

OWNER_SCRIPT = r"""
import json, sys, time
from toksearch_launch.cluster import Cluster, default_local_config
backend, nodes, run_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = Cluster(backend, default_local_config(nodes=nodes, site={"ready_timeout": 180}), run_dir=run_dir)
c.start()
print("READY " + json.dumps({"root": c.plan.root, "ports": c.plan.ports.all_ports()}), flush=True)
if len(sys.argv) > 4 and sys.argv[4] == "stop":
    c.stop()
    print("STOPPED", flush=True)
else:
    time.sleep(600)
"""


def record(name: str, seconds: float, left: int) -> None:
    print(f"\n{name}: clean after {seconds:.2f} s, {left} processes left")
    path = os.environ.get("TOKSEARCH_FAULT_TIMES")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"test": name, "seconds": round(seconds, 2), "left": left}) + "\n")


def run_of(owner_pid: int) -> set[int]:
    """Every live process naming ``owner_pid`` as its owner: step wrappers, probes, daemons."""
    pids: set[int] = set()
    for p in psutil.process_iter(["pid"]):
        try:
            marker = p.environ().get(OWNER_ENV, "")
        except (psutil.Error, OSError):
            continue
        if re.fullmatch(rf".*:{owner_pid}:[0-9.]+", marker):
            pids.add(p.pid)
    return pids


def alive(pids: set[int], sids: set[int]) -> set[int]:
    """Live, non-zombie processes among ``pids`` or in one of the sessions ``sids``."""
    out = set()
    for p in psutil.process_iter(["pid", "status"]):
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if p.pid in pids or os.getsid(p.pid) in sids:
                out.add(p.pid)
        except OSError:
            continue
    return out


def start_owner(tmp_path: Path, backend: str, nodes: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([PY, "-c", OWNER_SCRIPT, backend, str(nodes), str(tmp_path / "run"), *extra],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def kill_and_measure(owner: subprocess.Popen, name: str, root_hint: "str | None") -> None:
    """SIGKILL the owner; every process of its run and its temp dir must go."""
    pids = run_of(owner.pid)
    assert pids, "the run has no processes to watch"
    sids = {os.getsid(p) for p in pids if psutil.pid_exists(p)} - {os.getsid(0)}
    roots = {root_hint} if root_hint else set()
    for p in pids:
        try:
            mark = psutil.Process(p).environ().get(ENV_MARK, "")
        except (psutil.Error, OSError):
            continue
        m = re.match(r"(/.*?/tsl-[0-9a-f]{6})", mark)
        if m:
            roots.add(m.group(1))
    assert roots, "no temp dir found for the run"
    t0 = time.monotonic()
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    deadline = t0 + CLEAN_DEADLINE
    while time.monotonic() < deadline:
        if not alive(pids, sids) and not any(os.path.exists(r) for r in roots):
            break
        time.sleep(0.05)
    took = time.monotonic() - t0
    left = alive(pids, sids)
    record(name, took, len(left))
    assert left == set(), [(p, psutil.Process(p).cmdline()[:4]) for p in left if psutil.pid_exists(p)]
    assert [r for r in roots if os.path.exists(r)] == []


def head_started(tmp_path: Path, backend: str) -> bool:
    logs = tmp_path / "run" / "logs"
    return any("toksearch-node: host=" in f.read_text(errors="replace")
               for f in logs.glob(f"{backend}-*.log") if "cluster" not in f.name and "probe" not in f.name)


@pytest.mark.parametrize("backend", ["ray", "spark"])
def test_sigkill_of_the_owner_during_the_start_leaves_nothing(tmp_path: Path, backend: str) -> None:
    owner = start_owner(tmp_path, backend, 2)
    try:
        wait_for(lambda: head_started(tmp_path, backend), 120, f"the {backend} head's step wrapper")
        wait_for(lambda: run_of(owner.pid), 30, "the run's processes")
        assert owner.poll() is None, owner.stdout.read() if owner.stdout else ""
        kill_and_measure(owner, f"sigkill-during-start-{backend}", None)
    finally:
        if owner.poll() is None:
            owner.kill()


@pytest.mark.parametrize("backend", ["ray", "spark"])
def test_sigkill_of_the_owner_during_a_run_leaves_nothing(tmp_path: Path, backend: str) -> None:
    owner = start_owner(tmp_path, backend, 2)
    try:
        assert owner.stdout is not None
        line = wait_for(lambda: owner.stdout.readline(), 180, "READY")
        while not line.startswith("READY"):
            assert line, "the owner exited before READY"
            line = owner.stdout.readline()
        info = json.loads(line.split(" ", 1)[1])
        kill_and_measure(owner, f"sigkill-during-run-{backend}", info["root"])
    finally:
        if owner.poll() is None:
            owner.kill()


def read_until_ready(owner: subprocess.Popen) -> list[str]:
    """The owner's lines up to its READY line (the rest is read at its end)."""
    assert owner.stdout is not None
    lines = []
    for line in owner.stdout:
        lines.append(line)
        if line.startswith("READY "):
            return lines
    raise AssertionError("the owner exited before READY:\n" + "".join(lines)[-2000:])


def test_two_clusters_started_at_once_get_disjoint_ports_5_times(tmp_path: Path) -> None:
    """Two jobs' clusters on one node, started at the same instant, 5 times over: every start
    finishes, and the two port sets (from each plan, and the block each logged) never meet.
    A round starts once the previous round's clusters are ready, while they stop: their
    leases are then still held, which the new round's blocks must avoid too."""
    rounds = []
    for round_ in range(5):
        runs = [tmp_path / f"r{round_}-{k}" for k in range(2)]
        owners = [subprocess.Popen([PY, "-c", OWNER_SCRIPT, "ray", "1", str(run), "stop"], cwd=REPO,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                  for run in runs]
        rounds.append((runs, owners, [read_until_ready(o) for o in owners]))
    for round_, (runs, owners, heads) in enumerate(rounds):
        outs = ["".join(head) + o.communicate(timeout=300)[0] for o, head in zip(owners, heads)]
        ports = []
        for o, out, run in zip(owners, outs, runs):
            assert o.returncode == 0 and "STOPPED" in out, out[-2000:]
            ready = next(ln for ln in out.splitlines() if ln.startswith("READY "))
            planned = set(json.loads(ready.split(" ", 1)[1])["ports"])
            logged = re.findall(r"ports (\d+)-(\d+):", (run / "logs" / "ray-cluster.log").read_text())
            lo, hi = map(int, logged[-1])
            assert planned <= set(range(lo, hi + 1))
            ports.append(set(range(lo, hi + 1)))
        print(f"\nround {round_}: blocks {min(ports[0])}-{max(ports[0])} and {min(ports[1])}-{max(ports[1])}")
        assert not ports[0] & ports[1]
