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


def closed_port() -> int:
    """A loopback port nothing listens on: a connect there is refused (ECONNREFUSED)."""
    import socket as sock

    closed = sock.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()
    return port


def test_a_beacon_that_does_not_name_our_owner_is_no_watch() -> None:
    """No false positives: another owner's beacon (wrong greeting): no watch, never 'gone'."""
    proc, env = beacon_owner()
    try:
        beacon, marker = env[owner.BEACON_ENV], "elsewhere:1:2.000"
        gone, said, thread = watching(beacon, marker)
        thread.join(20)
        assert not thread.is_alive() and not gone.is_set(), said
        assert said == [f"cannot reach the owner's beacon ({beacon}): this node's daemons end with the job"]
    finally:
        proc.kill()
        proc.wait()


def test_a_beacon_port_refused_on_every_address_is_the_owner_gone() -> None:
    """Nothing listens on the owner's port (ECONNREFUSED on every address): the owner is gone, as
    the owner opens its beacon before any step.  One address refused and another not: no verdict."""
    port = closed_port()
    for beacon in (f"127.0.0.1:{port}", f"127.0.0.1:{port},127.0.0.2:{port}"):
        assert owner.ask_beacon(beacon, "tsn1:1:2.000").verdict == owner.REFUSED
        gone, said, thread = watching(beacon, "tsn1:1:2.000")
        thread.join(20)
        assert gone.is_set(), said
        assert said == []  # the wrapper says it, with what it does (one line)
    proc, env = beacon_owner()
    try:
        mixed = f"127.0.0.1:{port},{env[owner.BEACON_ENV]}"  # refused, then a live beacon of another owner
        assert owner.ask_beacon(mixed, "elsewhere:1:2.000").verdict == owner.NO_WATCH
        live = owner.ask_beacon(mixed, env[owner.OWNER_ENV])  # refused, then ours: watching
        assert (live.verdict, live.address) == (owner.WATCHING, env[owner.BEACON_ENV].split(",")[0])
        assert live.conn is not None
        live.conn.close()
    finally:
        proc.kill()
        proc.wait()


def test_a_beacon_that_never_greets_is_no_watch() -> None:
    """A listener that accepts and says nothing (a connect that succeeds, then silence): a timeout, no
    verdict of death; a malformed address neither."""
    import socket as sock

    silent = sock.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # the kernel completes the handshake; nobody ever writes
    try:
        beacon = f"127.0.0.1:{silent.getsockname()[1]}"
        assert owner.ask_beacon(beacon, "tsn1:1:2.000", greeting_timeout=0.3).verdict == owner.NO_WATCH
        assert owner.ask_beacon("127.0.0.1:notaport", "tsn1:1:2.000").verdict == owner.NO_WATCH
        assert owner.ask_beacon("", "tsn1:1:2.000").verdict == owner.NO_WATCH
    finally:
        silent.close()


def run_remote_wrapper(tmp_path, beacon: str, marker: str) -> tuple[subprocess.CompletedProcess, str, str]:
    """The real step wrapper as on a node other than its owner's (the marker names another host),
    its root shared with the owner's (an owner file in it, as on the CI nodes' one /tmp)."""
    root = tmp_path / "tsl-beacon"
    root.mkdir(mode=0o700)
    owner.write_owner_file(str(root))
    started = tmp_path / "daemon-started"
    env = {**os.environ, owner.OWNER_ENV: marker, owner.BEACON_ENV: beacon}
    argv = [sys.executable, "-m", "toksearch_launch.cluster.node", "--root", str(root), "--dir", f"{root}/x2",
            "--", "touch", str(started)]
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    return done, str(root), str(started)


def test_a_wrapper_whose_beacon_is_refused_starts_nothing_and_removes_the_root(tmp_path) -> None:
    """The owner was killed before this node's wrapper started: its beacon's port refuses. The
    wrapper starts nothing, says so in one line (node, owner, beacon), exits 1, and as the last
    wrapper of the root removes it (before: it started its daemon unwatched and left the root)."""
    marker, beacon = "tsn-elsewhere:4242:1.000", f"127.0.0.1:{closed_port()}"
    done, root, started = run_remote_wrapper(tmp_path, beacon, marker)
    assert done.returncode == 1, done.stdout + done.stderr
    assert not os.path.exists(started)  # the daemon never ran
    assert not os.path.exists(root)
    gone = [ln for ln in done.stdout.splitlines() if "is gone before the start" in ln]
    assert gone == [f"toksearch-node: owner {marker} is gone before the start on {socket.gethostname()}: its beacon "
                    f"{beacon} refused the connection on every address; started nothing, nothing left (if the owner "
                    "still runs, a firewall between the nodes rejects that port: site.owner_beacon=false turns the beacon off)"]
    assert "host=" not in done.stdout


def test_a_wrapper_whose_beacon_answers_otherwise_starts_its_daemon(tmp_path) -> None:
    """A live beacon that does not name our owner (a wrong greeting) is no verdict: no watch, the
    daemon runs (it ends with the job), the owner's root stays for the owner's own stop."""
    proc, env = beacon_owner()
    try:
        done, root, started = run_remote_wrapper(tmp_path, env[owner.BEACON_ENV], "tsn-elsewhere:4242:1.000")
        assert done.returncode == 0, done.stdout + done.stderr
        assert os.path.exists(started), done.stdout
        assert "is gone" not in done.stdout
        assert f"cannot reach the owner's beacon ({env[owner.BEACON_ENV]})" in done.stdout, done.stdout
        assert os.path.isdir(root)  # its owner file: the owner's stop removes it
    finally:
        proc.kill()
        proc.wait()


def test_a_never_watched_wrapper_asks_again_at_teardown() -> None:
    """Stopped by a signal without a watch (NO_WATCH at the start): a beacon that now refuses on every
    address is the owner gone (the last wrapper removes the root); a beacon still greeting is not."""
    import time

    proc, env = beacon_owner()
    try:
        watch = owner.BeaconWatch(env[owner.BEACON_ENV], "elsewhere:1:2.000", lambda line: None)
        deadline = time.monotonic() + 20
        while not watch.answered.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert watch.answer is not None and watch.answer.verdict == owner.NO_WATCH
        assert not watch.gone_at_teardown()  # still listening: not gone
        proc.kill()
        proc.wait()
        assert watch.gone_at_teardown()  # the port now refuses
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


def test_site_owner_beacon_false_gives_the_steps_no_beacon(tmp_path, monkeypatch) -> None:
    """The escape hatch for a site whose firewall rejects the beacon's port: with
    ``site.owner_beacon=false`` a role's srun carries the owner's marker and no beacon (its
    wrappers then have no watch: daemons end with the job); by default it carries both."""
    from test_slurm_launcher import _saga_plan

    from toksearch_launch.cluster import launcher
    from toksearch_launch.cluster.ports import release_block

    started: list[dict] = []

    class FakeProc:
        pid = 4242

        def poll(self):
            return None

    monkeypatch.setattr(launcher.subprocess, "Popen", lambda argv, **kw: started.append(kw["env"]) or FakeProc())
    for beacon in (True, False):
        (tmp_path / str(beacon)).mkdir()
        plan = _saga_plan("spark", tmp_path / str(beacon), monkeypatch, ["n1", "n2"])
        try:
            plan.cfg.site.owner_beacon = beacon
            _, workers = plan.engine.roles(plan)
            launcher.SrunLauncher(plan).spawn(workers, {"PATH": "/bin"})
        finally:
            release_block(plan.ports.base)
    with_beacon, without = started
    assert with_beacon[owner.OWNER_ENV] == without[owner.OWNER_ENV] == this_owner()
    assert with_beacon[owner.BEACON_ENV] and owner.BEACON_ENV not in without
