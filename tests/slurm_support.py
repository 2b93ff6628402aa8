"""Helpers for the tests that run on the real SLURM test cluster of ci/slurm."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Dict, List, Set

ROOT = Path(__file__).resolve().parent.parent
NODES = [f"tsn{k}" for k in range(1, 4)]
NETNS = {node: f"tsci-{node}" for node in NODES}
TEST_SITE = ["--config-dir", str(ROOT / "tests" / "conf"), "site=tsci"]


def cluster_problem() -> str | None:
    """None when the 3 test nodes answer, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo not found (start the cluster: bash ci/slurm/up.sh)"
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"sinfo failed: {exc}"
    states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
    missing = [n for n in NODES if n not in states]
    if missing:
        return f"test nodes {missing} not in sinfo (start the cluster: bash ci/slurm/up.sh)"
    return None


def namespace_pids(node: str) -> Set[int]:
    """Every process in a node's network namespace (what runs "on" that node)."""
    out = subprocess.run(["ip", "netns", "pids", NETNS[node]], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}


def slurmd_pids() -> Set[int]:
    state = Path(os.environ.get("TOKSEARCH_CI_SLURM_STATE", "/var/run/toksearch-ci-slurm"))
    pids = set()
    for pidfile in state.rglob("slurmd*.pid"):
        try:
            pids.add(int(pidfile.read_text().split()[0]))
        except (OSError, ValueError, IndexError):
            pass
    return pids


def job_processes() -> Dict[str, List[str]]:
    """Processes on each node other than slurmd itself: (node -> ["pid cmdline"])."""
    daemons = slurmd_pids()
    left: Dict[str, List[str]] = {}
    for node in NODES:
        for pid in sorted(namespace_pids(node) - daemons):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            except OSError:
                continue
            if not cmd:  # a zombie waiting for its reaper
                continue
            left.setdefault(node, []).append(f"{pid} {cmd}")
    return left


def wait_for(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll until predicate() is truthy; return its value, or raise with what we waited for."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def job_field(job_id: str, name: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    match = re.search(rf"\b{name}=(\S*)", out)
    return match.group(1) if match else ""


def job_id_from(output: str) -> str:
    match = re.search(r"submitted job (\d+)", output)
    assert match, output
    return match.group(1)
