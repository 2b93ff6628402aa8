"""MdsSignal against a real mdsip peer (tests/mdsip_server.py) through the real mdsthin client."""

from __future__ import annotations

import os
import pickle
import select
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import mdsthin
import numpy as np
import pytest
from mdsthin.exceptions import TreeFOPENR, TreeNNF, TreeNODATA

from toksearch_launch.config import CONFIG_ENV
from toksearch_launch.signals import mds
from toksearch_launch.signals.mds import (
    MdsConnectionError,
    MdsError,
    MdsSignal,
    parse_server,
    server_from_tree_path,
)

sys.path.insert(0, str(Path(__file__).parent))
from mdsip_server import MdsipServer, closed_port  # noqa: E402

SHOTS = (1001, 1002)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No tree-path variables or job config from the outside; no connection outlives a test."""
    for name in ("efit01_path", "EFIT01_path", CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)
    mds.close_all_connections()
    yield
    mds.close_all_connections()


@pytest.fixture
def server() -> Iterator[MdsipServer]:
    """An mdsip server on 127.0.0.1, ephemeral port, serving the demo efit01 tree."""
    with MdsipServer() as srv:
        yield srv


def ip_signal(location: str | None, **kw) -> MdsSignal:
    return MdsSignal(r"\ipmhd", "efit01", location=location, **kw)


def expected_ip(shot: int) -> np.ndarray:
    return np.sin(np.linspace(0.0, 1.0, 11)) * shot


# --------------------------------------------------------------------------- the peer itself


def test_mdsthin_connection_end_to_end(server: MdsipServer) -> None:
    """mdsthin.Connection directly: login, TreeOpen, values with $ args, units, real exception classes."""
    conn = mdsthin.Connection(f"tester@{server.address}", timeout=2)
    try:
        conn.openTree("efit01", 1001)
        ip = conn.get(r"\ipmhd")
        assert isinstance(ip, mdsthin.Float64Array)
        np.testing.assert_allclose(ip.data(), expected_ip(1001))
        np.testing.assert_allclose(conn.get(r"dim_of(\ipmhd, 0)").data(), np.linspace(0, 1, 11))
        assert conn.get(r"units_of(\ipmhd)").data() == "A"
        assert conn.get(r"units_of(\psin)").data() is None  # '' comes back as an empty answer
        arr = np.arange(6, dtype=np.int16).reshape(2, 3)
        echoed = conn.get("$", arr).data()
        assert echoed.dtype == np.int16 and echoed.shape == (2, 3) and (echoed == arr).all()
        assert conn.get("data($)", "text").data() == "text"
        assert conn.get("$", np.float32(1.5)).data() == np.float32(1.5)
        with pytest.raises(TreeNNF):
            conn.get(r"\nope")
        with pytest.raises(TreeNODATA):
            conn.get(r"\empty")
        with pytest.raises(TreeFOPENR):
            conn.openTree("efit01", 999)
        conn.closeTree("efit01", 1001)
    finally:
        conn.disconnect()
    assert server.connections_accepted == 1
    assert server.count("TreeOpen") == 2 and server.count("TreeClose") == 1


def test_server_script_runs_standalone() -> None:
    """`python tests/mdsip_server.py --port 0` announces its port once listening and serves mdsthin."""
    script = Path(__file__).with_name("mdsip_server.py")
    proc = subprocess.Popen([sys.executable, str(script), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        line = ""
        while not line and time.monotonic() < deadline:
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if ready:
                line = proc.stdout.readline()
        assert line.startswith("LISTENING "), f"no LISTENING line before the deadline: {line!r}"
        address = line.split()[1]
        conn = mdsthin.Connection(f"tester@{address}", timeout=2)
        conn.openTree("efit01", 1002)
        np.testing.assert_allclose(conn.get(r"\ipmhd").data(), expected_ip(1002))
        conn.disconnect()
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "STOPPED after 1 connection(s)" in out


# --------------------------------------------------------------------------- gather


def test_gather_data_dims_units(server: MdsipServer) -> None:
    sig = ip_signal(server.address)
    assert sig.data_order == ("times",)
    result = sig.gather(1001)
    assert set(result) == {"data", "times", "units"}
    np.testing.assert_allclose(result["data"], expected_ip(1001))
    np.testing.assert_allclose(result["times"], np.linspace(0, 1, 11))
    assert result["units"] == {"data": "A", "times": "s"}


def test_gather_two_dims_keeps_toksearch_data_order(server: MdsipServer) -> None:
    """dims name dim_of(0), dim_of(1); data keeps the stored shape; data_order only labels it."""
    sig = MdsSignal(r"\psin", "efit01", server.address, dims=("rho", "times"), data_order=("times", "rho"))
    result = sig.gather(1002)
    assert result["data"].shape == (11, 4)
    assert result["rho"].shape == (4,) and result["times"].shape == (11,)
    assert result["units"] == {"data": "", "rho": "", "times": "ms"}
    assert sig.data_order == ("times", "rho")


def test_fetch_units_false_sends_no_units_query(server: MdsipServer) -> None:
    result = ip_signal(server.address, fetch_units=False).gather(1001)
    assert "units" not in result and set(result) == {"data", "times"}
    assert server.count("units_of") == 0


@pytest.mark.parametrize(
    "expression, shot, mds_name, cause, text",
    [
        (r"\nope", 1001, "TreeNNF", TreeNNF, "NNF, Node Not Found"),
        (r"\empty", 1001, "TreeNODATA", TreeNODATA, "NODATA"),
        (r"\ipmhd", 4242, "TreeFOPENR", TreeFOPENR, "FOPENR"),
    ],
)
def test_mdsplus_errors_become_clear_exceptions(
    server: MdsipServer, expression: str, shot: int, mds_name: str, cause: type, text: str
) -> None:
    sig = MdsSignal(expression, "efit01", server.address)
    with pytest.raises(MdsError) as info:
        sig.gather(shot)
    err = info.value
    assert not isinstance(err, MdsConnectionError)
    assert err.mds_name == mds_name and isinstance(err.__cause__, cause)
    message = str(err)
    for part in (text, expression, "efit01", str(shot), server.address):
        assert part in message
    back = pickle.loads(pickle.dumps(err))  # mdsthin's own exceptions do not survive pickling
    assert type(back) is MdsError and str(back) == message and back.mds_name == mds_name
    # the connection is still good for the next signal
    np.testing.assert_allclose(ip_signal(server.address).gather(1001)["data"], expected_ip(1001))
    assert server.connections_accepted == 1


# --------------------------------------------------------------------------- failures of the server


def test_server_down_fails_fast() -> None:
    with closed_port() as port:
        sig = ip_signal(f"127.0.0.1:{port}", connect_timeout=1)
        start = time.monotonic()
        with pytest.raises(MdsConnectionError, match="refused"):
            sig.gather(1001)
        assert time.monotonic() - start < 2
    assert mds.cached_servers() == ()


def test_server_that_never_answers_login_times_out() -> None:
    with MdsipServer(mode="stall") as srv:
        sig = ip_signal(srv.address, connect_timeout=0.5)
        start = time.monotonic()
        with pytest.raises(MdsConnectionError, match="timed out after 0.5 s"):
            sig.gather(1001)
        assert time.monotonic() - start < 2
        assert srv.connections_accepted == 1 and mds.cached_servers() == ()


def test_server_that_stops_answering_times_out_then_reconnects(server: MdsipServer) -> None:
    sig = ip_signal(server.address, read_timeout=0.5)
    sig.gather(1001)
    server.mode = "hang"
    start = time.monotonic()
    with pytest.raises(MdsConnectionError, match="timed out"):
        sig.gather(1002)
    assert time.monotonic() - start < 2
    assert mds.cached_servers() == ()  # the dead connection was dropped
    server.mode = "ok"
    np.testing.assert_allclose(sig.gather(1002)["data"], expected_ip(1002))
    assert server.connections_accepted == 2


def test_login_refused_is_a_connection_error() -> None:
    with MdsipServer(mode="deny") as srv:
        with pytest.raises(MdsConnectionError, match="refused the connection"):
            ip_signal(srv.address, connect_timeout=1).gather(1001)


def test_broken_connection_is_replaced(server: MdsipServer) -> None:
    sig = ip_signal(server.address)
    sig.gather(1001)
    assert server.drop_clients() == 1  # as a server restart would
    result = sig.gather(1001)  # the stale socket fails, one reconnect, the tree is reopened
    np.testing.assert_allclose(result["data"], expected_ip(1001))
    assert server.connections_accepted == 2 and server.count("TreeOpen") == 2


# --------------------------------------------------------------------------- connection reuse


def test_one_connection_for_all_shots_and_signals(server: MdsipServer) -> None:
    ip = ip_signal(server.address)
    psin = MdsSignal(r"\psin", "efit01", f"remote://{server.address}", dims=("rho", "times"))
    for shot in SHOTS:
        for sig in (ip, psin):
            assert sig.gather(shot)["data"].size > 0
        for sig in (ip, psin):
            sig.cleanup_shot(shot)
    assert server.connections_accepted == 1
    assert server.count("TreeOpen") == len(SHOTS) and server.count("TreeClose") == len(SHOTS)
    ip.cleanup()
    assert mds.cached_servers() == ()
    psin.gather(SHOTS[0])
    assert server.connections_accepted == 2


def test_threads_share_the_connection_safely(server: MdsipServer) -> None:
    sigs = [ip_signal(server.address), MdsSignal(r"\psin", "efit01", server.address, dims=("rho", "times"))]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for k in range(10):
                shot = SHOTS[(i + k) % 2]
                r = sigs[i % 2].gather(shot)
                expect = expected_ip(shot) if i % 2 == 0 else None
                if expect is not None:
                    np.testing.assert_allclose(r["data"], expect)
                else:
                    assert r["data"].shape == (11, 4) and r["data"][0, 0] == shot
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert not errors and server.connections_accepted == 1


# --------------------------------------------------------------------------- where the server comes from


@pytest.mark.parametrize(
    "value, expected",
    [
        ("atlas.gat.com::", "atlas.gat.com:8000"),
        ("atlas.gat.com:8020::/trees/efit01", "atlas.gat.com:8020"),
        ("/local/trees;alpha:9000::;beta::", "alpha:9000"),
        ("/local/trees;/more/trees", None),
        ("", None),
    ],
)
def test_server_from_tree_path(value: str, expected: str | None) -> None:
    assert server_from_tree_path(value) == expected


def test_parse_server_forms() -> None:
    assert parse_server("remote://atlas") == "atlas:8000"
    assert parse_server("tcp://me@atlas:81") == "me@atlas:81"
    assert parse_server("ssh://atlas") == "ssh://atlas:8000"
    with pytest.raises(ValueError, match="local tree paths"):
        parse_server("/some/tree/path")
    with pytest.raises(ValueError, match="numeric port"):
        parse_server("atlas:http")


def test_server_from_tree_path_variable(server: MdsipServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("efit01_path", f"/local/efit01;{server.address}::/trees/efit01;other::")
    sig = ip_signal(None)
    np.testing.assert_allclose(sig.gather(1001)["data"], expected_ip(1001))
    assert sig.resolve_server() == server.address


def test_location_wins_over_tree_path_variable(server: MdsipServer, monkeypatch: pytest.MonkeyPatch) -> None:
    with closed_port() as port:
        monkeypatch.setenv("efit01_path", f"127.0.0.1:{port}::")
        assert ip_signal(server.address).gather(1001)["units"]["data"] == "A"


def test_server_from_site_config(server: MdsipServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = tmp_path / "toksearch.yaml"
    config.write_text(f"site:\n  mds_server: '{server.address}'\n")
    monkeypatch.setenv(CONFIG_ENV, str(config))
    sig = ip_signal(None)
    np.testing.assert_allclose(sig.gather(1002)["data"], expected_ip(1002))


def test_no_server_anywhere_is_an_error_from_gather() -> None:
    sig = ip_signal(None)  # constructing is fine: the worker resolves
    with pytest.raises(MdsError, match=r"no MDSplus server.*efit01_path=host::.*site\.mds_server"):
        sig.gather(1001)


# --------------------------------------------------------------------------- pickling


def test_used_signal_pickles_without_its_connection(server: MdsipServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("efit01_path", f"{server.address}::")
    sig = ip_signal(None, read_timeout=5)
    sig.gather(1001)
    payload = pickle.dumps(sig)
    assert b"socket" not in payload and b"mdsthin" not in payload
    clone = pickle.loads(payload)
    assert clone._server is None  # resolved again where it runs
    assert (clone.expression, clone.treename, clone.dims, clone.read_timeout) == (r"\ipmhd", "efit01", ("times",), 5.0)
    np.testing.assert_allclose(clone.gather(1002)["data"], expected_ip(1002))
    assert server.connections_accepted == 1  # the clone reuses this process's connection


# --------------------------------------------------------------------------- local tree paths


@pytest.mark.parametrize("location", ["/data/trees/efit01", "./trees", "~/trees", "file:///data/trees"])
def test_local_tree_path_is_refused_in_one_line(location):
    with pytest.raises(mds.MdsLocalTreeError) as info:
        ip_signal(location)
    message = str(info.value)
    assert "\n" not in message and "is a local tree path" in message
    assert "location='remote://HOST:PORT'" in message and "efit01_path=HOST:PORT::" in message


def test_local_tree_path_variable_and_mds_tree_path(monkeypatch, server):
    monkeypatch.setenv("efit01_path", "/local/trees")
    with pytest.raises(MdsError, match=r"efit01_path=/local/trees is a local tree path"):
        ip_signal(None).gather(1001)
    with pytest.raises(mds.MdsLocalTreeError):
        ip_signal(mds.MdsTreePath(efit01="/local/trees"))
    sig = ip_signal(mds.MdsTreePath(efit01=f"{server.address}::"))  # a server entry works
    np.testing.assert_allclose(sig.fetch(1001)["data"], expected_ip(1001))


# --------------------------------------------------------------------------- fork and ssh:// (issue 11)

FAKE_SSH = r'''#!{python}
"""Stand-in for ssh: relays stdin/stdout to the mdsip server in $FAKE_SSH_TARGET, as `ssh host mdsip-server-ssh` would."""
import os, socket, sys, threading
host, port = os.environ["FAKE_SSH_TARGET"].rsplit(":", 1)
with open(os.environ["FAKE_SSH_PIDS"], "a") as f:
    f.write(f"{{os.getpid()}}\n")
sock = socket.create_connection((host, int(port)))
def up():
    while True:
        data = os.read(0, 65536)
        if not data:
            sock.shutdown(socket.SHUT_WR)
            return
        sock.sendall(data)
threading.Thread(target=up, daemon=True).start()
while True:
    data = sock.recv(65536)
    if not data:
        break
    os.write(1, data)
'''


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_forked_child_never_closes_the_parents_ssh_connection(server, tmp_path, monkeypatch):
    """A real mdsthin ssh:// connection (through a stand-in ssh) survives a fork in the parent.

    On CPython 3.9+ Popen.terminate() in a forked child is already a no-op (it polls
    first and sees ECHILD), so this passes without the fix too; the test below checks
    the fix's mechanism itself."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    ssh = bindir / "ssh"
    ssh.write_text(FAKE_SSH.format(python=sys.executable))
    ssh.chmod(0o755)
    pids = tmp_path / "ssh.pids"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SSH_TARGET", server.address)
    monkeypatch.setenv("FAKE_SSH_PIDS", str(pids))

    sig = ip_signal("ssh://127.0.0.1:22")
    np.testing.assert_allclose(sig.fetch(1001)["data"], expected_ip(1001))  # a real mdsthin ssh:// connection
    (ssh_pid,) = [int(x) for x in pids.read_text().split()]
    assert _alive(ssh_pid) and server.connections_accepted == 1

    child = os.fork()
    if child == 0:  # the child forgets the parent's connection and collects garbage, then exits
        import gc

        code = 0 if mds.cached_servers() == () else 3
        gc.collect()
        os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0

    assert _alive(ssh_pid), "the forked child terminated the parent's ssh process"
    np.testing.assert_allclose(sig.fetch(1002)["data"], expected_ip(1002))  # same connection, still working
    assert server.connections_accepted == 1
    mds.close_all_connections()  # the parent's own close still ends its ssh process
    deadline = time.monotonic() + 10
    while _alive(ssh_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(ssh_pid)


def test_forked_child_never_runs_an_inherited_connections_disconnect(tmp_path):
    """The mechanism, for every transport (paramiko's close would end the parent's SSH session; on
    Pythons whose Popen.terminate does not poll first, the subprocess one would kill the parent's ssh):
    a forked child disarms the connections it inherited, so their disconnect never runs in it."""
    log = tmp_path / "disconnects"

    class RecordingConnection:
        def __init__(self):
            self._socket = object()

        def disconnect(self):
            if self._socket is not None:
                with open(log, "a") as f:
                    f.write(f"{os.getpid()}\n")
                self._socket = None

        def __del__(self):  # what mdsthin's Connection does
            self.disconnect()

    mds._CONNECTIONS["fake:1"] = mds._Cached(RecordingConnection())
    try:
        child = os.fork()
        if child == 0:
            import gc

            gc.collect()
            os._exit(0 if mds.cached_servers() == () else 3)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert not log.exists(), f"disconnect ran in the forked child {child}"
        assert mds.close_all_connections() == 1  # the parent's own close still runs it
        assert log.read_text().split() == [str(os.getpid())]
    finally:
        mds._CONNECTIONS.pop("fake:1", None)
