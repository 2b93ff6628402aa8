"""A daemon that exits while its job runs: the one line that says so, its record, the watch that shows it.

The step wrapper (:mod:`.node`) sees its daemon exit on its own node, whatever the
launcher; its stderr is the daemon's log, which the user does not watch.  So it
also appends one JSON line to the cluster's *exits file* in the run dir (shared
with the nodes), and the owner's :class:`DeathWatch` prints each new line on the
owner's stderr at once.  The wrapper learns its role, node and log from the
*daemons file* the lifecycle writes before the start (keyed by the daemon's own
dir, which every launcher passes to the wrapper), so one environment serves
every node of a role.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Optional

#: env var: the JSON-lines file where step wrappers record their daemons' unasked exits
EXITS_ENV = "TOKSEARCH_CLUSTER_EXITS"
#: env var: the JSON file mapping each daemon's dir to its role, node and log path
DAEMONS_ENV = "TOKSEARCH_CLUSTER_DAEMONS"
PREFIX = "toksearch_launch:"
#: seconds between two reads of the exits file by the owner's watch
WATCH_POLL = 0.25


def describe_exit(returncode: int) -> str:
    """``exited with code 1`` / ``was killed by SIGKILL`` (Popen's negative code is a signal)."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


@dataclass(frozen=True)
class DaemonExit:
    """One daemon that exited while nobody had asked it to stop."""

    role: str
    node: str
    returncode: int  # as Popen reports it: negative for a signal
    log: str
    dir: str = ""  # the daemon's own dir (matches the lifecycle's Daemon.node_dir)
    #: False: it died before its cluster was ready (the failed start says so at length)
    ran: bool = True

    def line(self) -> str:
        """The one line shown at once."""
        when = "while the job ran" if self.ran else "during the cluster's start"
        return f"{PREFIX} {self.role} on {self.node} {describe_exit(self.returncode)} {when} (log: {self.log})"

    def brief(self) -> str:
        """For the teardown summary: ``ray-worker on local2 (exited with code 1)``."""
        return f"{self.role} on {self.node} ({describe_exit(self.returncode)})"

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Optional["DaemonExit"]:
        """None for a line that is not a whole record (a torn or foreign write)."""
        try:
            raw = json.loads(text)
            return cls(str(raw["role"]), str(raw["node"]), int(raw["returncode"]), str(raw["log"]),
                       str(raw.get("dir", "")), bool(raw.get("ran", True)))
        except (ValueError, KeyError, TypeError):
            return None


# ------------------------------------------------------------------ the wrapper's side


def write_daemons_file(path: str, daemons: dict[str, dict[str, str]], ready: bool) -> None:
    """``{"ready": ..., "daemons": {node_dir: {"role", "node", "log"}}}`` for every daemon of a plan:
    written before its start (not ready) and again once the cluster is ready."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as fh:
        json.dump({"ready": ready, "daemons": daemons}, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)


def who_am_i(daemons_file: Optional[str], node_dir: str) -> tuple[Optional[dict[str, str]], bool]:
    """This daemon's role, node and log from the daemons file (None if it cannot be read), and
    whether its cluster was ready (True when unknown: a wrapper run without a lifecycle)."""
    if not daemons_file:
        return None, True
    try:
        with open(daemons_file) as fh:
            raw = json.load(fh)
        entry = raw["daemons"].get(node_dir)
        ready = bool(raw.get("ready", True))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, True
    return (entry if isinstance(entry, dict) else None), ready


def own_log() -> str:
    """The file this process's stdout goes to (site=local: the daemon's log), else ``?``."""
    try:
        target = os.readlink("/proc/self/fd/1")
    except OSError:
        return "?"
    return target if target.startswith("/") and os.path.isfile(target) else "?"


def exit_of(node_dir: str, returncode: int, env: "dict[str, str] | os._Environ[str]", fallback_role: str,
            fallback_node: str) -> DaemonExit:
    """The record for this wrapper's daemon: from the daemons file, or what the wrapper itself knows."""
    entry, ready = who_am_i(env.get(DAEMONS_ENV), node_dir)
    entry = entry or {}
    return DaemonExit(
        role=entry.get("role") or fallback_role,
        node=entry.get("node") or fallback_node,
        returncode=returncode,
        log=entry.get("log") or own_log(),
        dir=node_dir,
        ran=ready,
    )


def record_exit(path: Optional[str], ex: DaemonExit) -> bool:
    """Append the record (one ``write`` in append mode: whole lines, whoever writes at once)."""
    if not path:
        return False
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, (ex.to_json() + "\n").encode())
        finally:
            os.close(fd)
        return True
    except OSError:
        return False


# ------------------------------------------------------------------ the owner's side


def read_exits(path: "str | os.PathLike[str]", offset: int = 0) -> tuple[list[DaemonExit], int]:
    """Records after ``offset`` (whole lines only) and the offset to read from next time."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
    out = [ex for ln in data[:end].decode(errors="replace").splitlines() if (ex := DaemonExit.from_json(ln))]
    return out, offset + end


class DeathWatch:
    """A thread of the owner that prints each new record's line on stderr as soon as it appears.

    ``keep(record)`` filters records (e.g. only this plan's daemons); :meth:`stop`
    ends the watch and returns every record kept, read once more at the end.
    """

    def __init__(self, path: "str | os.PathLike[str]", keep: Callable[[DaemonExit], bool],
                 say: Optional[Callable[[str], None]] = None) -> None:
        self.path = path
        self.keep = keep
        self.say = say or _to_stderr
        self.seen: list[DaemonExit] = []
        self._offset = 0
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="toksearch-death-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(WATCH_POLL):
            self.check()

    def check(self) -> list[DaemonExit]:
        """Read what is new; show and keep it.  Returns the new records."""
        with self._lock:
            found, self._offset = read_exits(self.path, self._offset)
            new = [ex for ex in found if self.keep(ex)]
            self.seen.extend(new)
        for ex in new:
            try:
                self.say(ex.line())
            except Exception:  # a closed stderr must not end the watch's owner
                pass
        return new

    def stop(self) -> list[DaemonExit]:
        self._done.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self.check()
        return list(self.seen)


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
