"""A cluster's owner: the process that started it.  Every daemon and probe dies with it.

The owner is named by ``host:pid:create_time`` (create_time tells a reused PID
apart) in ``TOKSEARCH_CLUSTER_OWNER``, which every child of a cluster carries:
the step wrapper around each daemon and the readiness probes.  A child on the
owner's host watches it two ways: Linux's parent-death signal
(``prctl(PR_SET_PDEATHSIG)``, immediate when the owner is its parent) and a
poll of the owner's PID and create time (any parent, any platform).  A child on
another node (a SLURM step wrapper) cannot see the owner's PID: it holds a TCP
connection to the owner's *beacon* instead (:func:`owner_env`), a listener the
owner opens once, on a port the kernel picks, that sends each caller the owner's
marker and then keeps the connection open for the owner's life.  The kernel closes
it when the owner dies, whatever killed it: EOF (or a reset) on a connection whose
greeting named our owner is the owner's death; so is a connect refused on every
address of the beacon (the owner opens it before it launches any step, so nothing
listening there means the owner is gone).  Nothing else is (a timeout, an unreachable
network, a wrong greeting: no watch, never a teardown).  The
cluster's temp dir holds an owner file, so a later start can sweep the temp
dirs of owners that are gone (only ours: our uid, our file, a dead owner).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

#: Env var every child of a cluster carries: ``host:pid:create_time`` of its owner.
OWNER_ENV = "TOKSEARCH_CLUSTER_OWNER"
#: Env var a cluster's SLURM steps carry: ``ADDR:PORT,...``, the owner's beacon on each IPv4
#: address of the owner's node (a wrapper takes the first whose greeting names its owner).
BEACON_ENV = "TOKSEARCH_CLUSTER_OWNER_BEACON"
#: File in a cluster's temp dir naming its owner (what the sweep reads).
OWNER_FILE = ".toksearch-owner"
#: create_time differences below this are rounding, not a reused PID.
CREATE_TIME_SLACK = 0.5
PR_SET_PDEATHSIG = 1


def process_create_time(pid: int) -> Optional[float]:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def this_owner() -> str:
    """The marker of this process as an owner."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{process_create_time(pid) or 0.0:.3f}"


def parse_owner(marker: str) -> Optional[tuple[str, int, float]]:
    """``host:pid:create_time`` -> its parts; None if malformed."""
    host, _, rest = marker.rpartition(":")  # create_time
    host, _, pid = host.rpartition(":")
    try:
        return host, int(pid), float(rest)
    except ValueError:
        return None


def owner_alive(pid: int, create_time: float) -> bool:
    """False once the process is gone, a zombie, or its PID now belongs to another process."""
    import psutil

    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(p.create_time() - create_time) < CREATE_TIME_SLACK
    except psutil.NoSuchProcess:
        return False
    except (psutil.Error, OSError):
        return True  # cannot tell (access denied): never tear down on a guess


def marker_alive(marker: str) -> bool:
    """True unless the owner named by ``marker`` is known to be gone (other hosts: True)."""
    parts = parse_owner(marker)
    if parts is None or parts[0] != socket.gethostname():
        return True
    return owner_alive(parts[1], parts[2])


def watched_owner(env: "dict[str, str] | os._Environ[str]") -> Optional[tuple[int, float]]:
    """(pid, create_time) of the owner in ``env`` if it runs on this host (only then can it be watched)."""
    parts = parse_owner(env.get(OWNER_ENV, ""))
    if parts is None or parts[0] != socket.gethostname():
        return None
    return parts[1], parts[2]


def set_parent_death_signal(sig: int) -> bool:
    """Linux: ask the kernel to send ``sig`` when our parent dies.  False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def exit_with_owner(interval: float = 0.5) -> None:
    """A probe child: exit at once when its owner dies (parent-death signal + a poll thread)."""
    owner = watched_owner(os.environ)
    if owner is None:
        return
    pid, ctime = owner
    if os.getppid() == pid:
        set_parent_death_signal(signal.SIGKILL)
    if not owner_alive(pid, ctime):
        os._exit(1)

    def poll() -> None:
        while owner_alive(pid, ctime):
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=poll, daemon=True, name="owner-watch").start()


# ------------------------------------------------------------ the beacon: the owner's life over TCP

_beacon: dict[int, str] = {}  # owner pid -> BEACON_ENV value (a forked child is another owner)
_beacon_lock = threading.Lock()


def owner_env(with_beacon: bool = True) -> dict[str, str]:
    """What every child of this owner's cluster on other nodes carries: the owner's marker and,
    unless turned off (``site.owner_beacon=false``) or where a listener could not be opened, its
    beacon's addresses (:data:`BEACON_ENV`)."""
    env = {OWNER_ENV: this_owner()}
    beacon = start_beacon() if with_beacon else None
    if beacon:
        env[BEACON_ENV] = beacon
    return env


def node_addresses() -> list[str]:
    """This node's IPv4 addresses other than loopback (where the other nodes may reach it)."""
    import psutil

    try:
        return [a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                if a.family == socket.AF_INET and not a.address.startswith("127.")]
    except (OSError, psutil.Error):
        return []


def start_beacon() -> Optional[str]:
    """Open this process's beacon once (kernel-chosen port on every address: no other job can
    hold it, no lease needed); its ``ADDR:PORT,...``, or None where it cannot be opened."""
    with _beacon_lock:
        pid = os.getpid()
        if pid not in _beacon:
            addresses = node_addresses()
            try:
                listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                listener.bind(("0.0.0.0", 0))
                listener.listen(128)
            except OSError:
                return None
            port = listener.getsockname()[1]
            hello = (this_owner() + "\n").encode()
            threading.Thread(target=_serve_beacon, args=(listener, hello), daemon=True, name="owner-beacon").start()
            _beacon[pid] = ",".join(f"{a}:{port}" for a in addresses)
        return _beacon[pid] or None


def _serve_beacon(listener: socket.socket, hello: bytes) -> None:
    """Greet each caller with the owner's marker and hold its connection for the owner's life."""
    held = []
    while True:
        try:
            conn, _ = listener.accept()
            conn.sendall(hello)
        except OSError:
            continue
        held.append(conn)  # never closed by us: its close at our death is what the caller waits for


#: Verdicts of :func:`ask_beacon`.
WATCHING, REFUSED, NO_WATCH = "watching", "refused", "no watch"
#: Seconds a connect to one of the beacon's addresses may take, and its greeting after it.
CONNECT_TIMEOUT, GREETING_TIMEOUT = 3.0, 5.0


@dataclass
class BeaconAnswer:
    """What the owner's beacon said to one ask: the greeted connection (WATCHING), a refusal on
    every address (REFUSED: nothing listens on the owner's port), or anything else (NO_WATCH)."""

    verdict: str
    address: str = ""
    conn: Optional[socket.socket] = None


def ask_beacon(beacon: str, marker: str, connect_timeout: float = CONNECT_TIMEOUT,
               greeting_timeout: float = GREETING_TIMEOUT) -> BeaconAnswer:
    """Connect to each of the beacon's addresses in turn: the first whose greeting is ``marker``
    is WATCHING.  REFUSED only if every address answered ECONNREFUSED (the owner's host said no
    one listens there; the owner opens its beacon before any step and holds it for its life, so
    that means the owner is gone).  A timeout, an unreachable network, a wrong or missing
    greeting, any other error: NO_WATCH, never a death."""
    addresses = [a for a in beacon.split(",") if a]
    refused = 0
    for address in addresses:
        host, _, port = address.rpartition(":")
        try:
            conn = socket.create_connection((host, int(port)), timeout=connect_timeout)
        except ConnectionRefusedError:
            refused += 1
            continue
        except (OSError, ValueError):
            continue
        try:
            conn.settimeout(greeting_timeout)
            greeting = _read_line(conn)
        except OSError:
            greeting = None
        if greeting != marker:
            conn.close()
            continue
        conn.settimeout(None)
        return BeaconAnswer(WATCHING, address, conn)
    return BeaconAnswer(REFUSED if addresses and refused == len(addresses) else NO_WATCH)


def watch_beacon(beacon: str, marker: str, gone: threading.Event, say,
                 answered: Optional[Callable[[BeaconAnswer], None]] = None) -> None:
    """A wrapper's thread: ask the owner's beacon (:func:`ask_beacon`), hand the answer to
    ``answered``, then, if greeted, wait; EOF or a reset sets ``gone``, so does a refusal on
    every address (said by the wrapper).  Anything else: say why, no watch."""
    answer = ask_beacon(beacon, marker)
    if answer.verdict == REFUSED:
        gone.set()  # the wrapper says it, with what it does about it (one line)
    elif answer.verdict == WATCHING:
        say(f"watching owner {marker} through its beacon {answer.address}")
    else:
        say(f"cannot reach the owner's beacon ({beacon}): this node's daemons end with the job")
    if answered is not None:
        answered(answer)
    conn = answer.conn
    if conn is None:
        return
    try:
        while conn.recv(256):
            pass
    except ConnectionResetError:
        pass
    except OSError as exc:  # not a close by the owner's kernel: no conclusion
        say(f"lost the owner's beacon {answer.address} ({exc}): no watch")
        return
    gone.set()


class BeaconWatch:
    """A step wrapper's watch of its owner on another node: :func:`watch_beacon` in a thread,
    its first answer kept for the wrapper's two questions (before the start, at teardown)."""

    def __init__(self, beacon: str, marker: str, say) -> None:
        self.beacon, self.marker = beacon, marker
        self.gone = threading.Event()
        self.answered = threading.Event()
        self.answer: Optional[BeaconAnswer] = None
        threading.Thread(target=watch_beacon, args=(beacon, marker, self.gone, say, self._keep),
                         daemon=True, name="owner-beacon").start()

    def _keep(self, answer: BeaconAnswer) -> None:
        self.answer = answer
        self.answered.set()

    @property
    def how(self) -> str:
        """How the owner's death was seen (for the wrapper's line)."""
        refused = self.answer is not None and self.answer.verdict == REFUSED
        return "its beacon refused every address" if refused else "its beacon closed"

    def gone_before_start(self, wait: float) -> bool:
        """Wait up to ``wait`` s for the first answer: True if the beacon refused on every address."""
        self.answered.wait(wait)
        return self.gone.is_set()

    def gone_at_teardown(self, timeout: float = 0.5) -> bool:
        """Asked once the daemon is stopped (a signal may come before the death is seen): its
        connection closed, or, never watched (NO_WATCH), the beacon now refuses on every address.
        Short timeouts: Slurm's SIGKILL follows its SIGTERM after KillWait."""
        if self.gone.is_set():
            return True
        if self.answer is None or self.answer.verdict != NO_WATCH:
            return False
        return ask_beacon(self.beacon, self.marker, timeout, timeout).verdict == REFUSED


def _read_line(conn: socket.socket, limit: int = 512) -> str:
    data = b""
    while not data.endswith(b"\n") and len(data) < limit:
        chunk = conn.recv(limit - len(data))
        if not chunk:
            break
        data += chunk
    return data.decode(errors="replace").strip()


# ------------------------------------------------------------ temp dir sweep


def write_owner_file(root: str) -> None:
    """Name this process as the owner of the temp dir ``root`` (the sweep reads it)."""
    parts = parse_owner(this_owner())
    assert parts is not None
    host, pid, ctime = parts
    path = os.path.join(root, OWNER_FILE)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, json.dumps({"host": host, "pid": pid, "create_time": ctime}).encode())
    finally:
        os.close(fd)


def stale_owner(root: Path) -> bool:
    """True only if ``root`` is our dir (uid), carries our owner file, and that owner is gone."""
    try:
        st = root.lstat()
        fst = (root / OWNER_FILE).lstat()
    except OSError:
        return False
    uid = os.getuid()
    if not (root.is_dir() and not root.is_symlink() and st.st_uid == uid and fst.st_uid == uid):
        return False
    try:
        info = json.loads((root / OWNER_FILE).read_text())
        host, pid, ctime = str(info["host"]), int(info["pid"]), float(info["create_time"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return host == socket.gethostname() and not owner_alive(pid, ctime)


def sweep_stale_roots(tmp_base: str, prefix: str) -> list[str]:
    """Remove ``<tmp_base>/<prefix>*`` dirs whose owner is gone; the removed paths."""
    removed = []
    try:
        entries = list(Path(tmp_base).glob(prefix + "*"))
    except OSError:
        return removed
    for root in entries:
        if stale_owner(root):
            shutil.rmtree(root, ignore_errors=True)
            removed.append(str(root))
    return removed
