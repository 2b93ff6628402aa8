"""The owner marker and the sweep of stale temp dirs: only our dirs, only with our owner
file, only when that owner is gone (dead, or its PID reused)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from toksearch_launch.cluster import owner
from toksearch_launch.cluster.owner import OWNER_FILE, parse_owner, sweep_stale_roots, this_owner


def dead_owner() -> tuple[int, float]:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    ctime = owner.process_create_time(p.pid)
    p.wait()
    assert ctime is not None
    return p.pid, ctime


def owned_dir(base, name: str, pid: int, ctime: float, host: str = "") -> str:
    d = base / name
    d.mkdir(mode=0o700)
    (d / OWNER_FILE).write_text(json.dumps({"host": host or socket.gethostname(), "pid": pid, "create_time": ctime}))
    return str(d)


def test_marker_names_this_process() -> None:
    host, pid, ctime = parse_owner(this_owner())  # type: ignore[misc]
    assert (host, pid) == (socket.gethostname(), os.getpid())
    assert owner.owner_alive(pid, ctime)
    assert not owner.owner_alive(pid, ctime - 100)  # same PID, another process: reused
    assert parse_owner("garbage") is None


def test_sweep_removes_only_dirs_of_gone_owners(tmp_path) -> None:
    pid, ctime = dead_owner()
    me = os.getpid()
    my_ctime = owner.process_create_time(me) or 0.0
    dead = owned_dir(tmp_path, "tsl-aaaaaa", pid, ctime)
    reused = owned_dir(tmp_path, "tsl-dddddd", me, my_ctime - 1000)  # our PID, older create time
    live = owned_dir(tmp_path, "tsl-bbbbbb", me, my_ctime)
    elsewhere = owned_dir(tmp_path, "tsl-eeeeee", pid, ctime, host="another-node")
    (tmp_path / "tsl-cccccc").mkdir()  # no owner file: not ours to judge
    other = owned_dir(tmp_path, "other-ffffff", pid, ctime)  # not our prefix
    removed = sweep_stale_roots(str(tmp_path), "tsl-")
    assert sorted(removed) == sorted([dead, reused])
    for kept in (live, elsewhere, str(tmp_path / "tsl-cccccc"), other):
        assert os.path.isdir(kept), kept
