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


BEACON_OWNER = """
import json, time
from toksearch_launch.cluster.owner import owner_env
print(json.dumps(owner_env()), flush=True)
time.sleep(120)
"""


def beacon_owner() -> tuple[subprocess.Popen, dict]:
    proc = subprocess.Popen([sys.executable, "-c", BEACON_OWNER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def watching(beacon: str, marker: str):
    import threading

    gone, said = threading.Event(), []
    thread = threading.Thread(target=owner.watch_beacon, args=(beacon, marker, gone, said.append), daemon=True)
    thread.start()
    return gone, said, thread


def test_the_beacon_closes_when_its_owner_is_sigkilled() -> None:
    """A wrapper on another node watches its owner through the beacon: connected and greeted with
    the owner's marker, it sees the owner's SIGKILL as EOF, and only then."""
    import time

    proc, env = beacon_owner()
    try:
        assert env[owner.OWNER_ENV].split(":")[1] == str(proc.pid)
        addresses = env[owner.BEACON_ENV].split(",")
        assert addresses and not any(a.startswith("127.") for a in addresses)
        gone, said, thread = watching(env[owner.BEACON_ENV], env[owner.OWNER_ENV])
        deadline = time.monotonic() + 20
        while not said and time.monotonic() < deadline:
            time.sleep(0.02)
        assert said and said[0].startswith(f"watching owner {env[owner.OWNER_ENV]} through its beacon "), said
        assert not gone.is_set() and proc.poll() is None  # connected to a live owner: no teardown
        proc.kill()
        proc.wait()
        thread.join(20)
        assert gone.is_set(), said
    finally:
        proc.kill()
        proc.wait()


def test_a_beacon_that_does_not_name_our_owner_or_does_not_answer_is_no_watch() -> None:
    """No false positives: another owner's beacon (wrong greeting), a closed port: no watch, never 'gone'."""
    import socket as sock

    proc, env = beacon_owner()
    closed = sock.socket()
    closed.bind(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    try:
        for beacon, marker in ((env[owner.BEACON_ENV], "elsewhere:1:2.000"), (f"127.0.0.1:{closed_port}", env[owner.OWNER_ENV])):
            gone, said, thread = watching(beacon, marker)
            thread.join(20)
            assert not thread.is_alive() and not gone.is_set(), said
            assert said == [f"cannot reach the owner's beacon ({beacon}): this node's daemons end with the job"]
    finally:
        proc.kill()
        proc.wait()


def test_the_last_wrapper_removes_a_root_only_when_no_live_owner_uses_it(tmp_path) -> None:
    """Another node's root (no owner file) goes with its last wrapper, lock file and all; the owner's
    root stays for the owner's own stop unless the owner is gone; a wrapper still running keeps it."""
    import argparse

    from toksearch_launch.cluster import node

    def wrapper_of(root, name):
        os.makedirs(root / name, exist_ok=True)
        return argparse.Namespace(root=str(root), dir=str(root / name)), node._announce(str(root))

    remote = tmp_path / "tsl-remote"
    first, first_lock = wrapper_of(remote, "r2")
    second, second_lock = wrapper_of(remote, "r3")
    node._cleanup(first, None, presence=first_lock)
    assert remote.is_dir()  # the other wrapper of the root still runs
    node._cleanup(second, None, presence=second_lock)
    assert not remote.exists()

    owned = tmp_path / "tsl-owned"
    owned.mkdir()
    owner.write_owner_file(str(owned))
    args, lock = wrapper_of(owned, "r1")
    node._cleanup(args, None, presence=lock)
    assert sorted(os.listdir(owned)) == [OWNER_FILE, node.WRAPPERS_LOCK]  # the owner's stop removes it
    os.close(lock)  # that wrapper exits
    args, lock = wrapper_of(owned, "r1")
    node._cleanup(args, None, orphaned=True, presence=lock)
    assert not owned.exists()
