"""Daemon processes: start each in its own session, watch it, stop exactly what we started.

Every daemon (or, on SLURM, the local ``srun`` of its step) is started as a
session leader (``setsid``), so everything it forks can be found again by
session id without looking at process names.  Stopping is: SIGTERM to each
leader only (SIGTERM to a whole Ray process group hangs gcs_server), wait, then
SIGKILL whatever is left in those sessions or still names our temp dir on its
command line, and check that nothing remains.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

from ..procutil import REDACTED, display, redact  # noqa: F401  (re-exported: one display, always redacted)

#: Log lines that mean "port taken": worth a retry with another block.
PORT_CONFLICT = re.compile(
    r"address already in use|already in use|BindException|failed after \d+ retries|"
    r"failed to bind|bind\(\) failed|Could not bind|port \d+ is busy",
    re.I,
)


@dataclass
class Daemon:
    """One daemon of a cluster: where it runs, how it is started, where its output goes."""

    role: str  # ray-head | ray-worker | spark-master | spark-worker | dask-scheduler | dask-worker
    host: str
    index: int  # placement index (0 = head node)
    argv: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)  # added to the parent's env; may hold secrets
    address: Optional[str] = None
    proc: Optional[subprocess.Popen] = None
    started_at: float = 0.0
    #: SLURM: "JOBID.STEPID" of the daemon's step, read from the wrapper's first log line.
    step_id: Optional[str] = None
    #: the daemon's own dir on its node
    node_dir: str = ""
    #: site=local: the step wrapper's argv (before ``--``) that runs ``argv`` and ties it to its owner
    wrapper: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.role} on node {self.host}"

    def spawn(self, base_env: dict[str, str]) -> None:
        """Start as a session leader, output appended to the log file."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = dict(base_env)
        env.update(self.env)
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            log.write(f"==== toksearch {stamp}: {display(self.argv)}\n".encode())
            log.flush()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(
                [*self.wrapper, "--", *self.argv] if self.wrapper else self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )

    def returncode(self) -> Optional[int]:
        """None while running (or never started)."""
        return None if self.proc is None else self.proc.poll()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def tail(self, n: int = 25) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                fh.seek(max(0, fh.tell() - 64 * 1024))
                text = fh.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        # only this start's output: after the last header line we wrote
        mark = text.rfind("==== toksearch ")
        if mark >= 0:
            text = text[text.find("\n", mark) + 1 :]
        lines = [ln for ln in text.splitlines() if ln.strip()]
        return "\n".join(lines[-n:]) if lines else "(log is empty)"

    def failure(self, what: str) -> str:
        """One message: node, exact command, log path and its last lines."""
        tail = "\n".join("    " + ln for ln in self.tail().splitlines())
        return (
            f"{self.label} {what}\n"
            f"  command: {display(self.argv)}\n"
            f"  log: {self.log_path}\n"
            f"  last lines of the log:\n{tail}"
        )

    def looks_like_port_conflict(self) -> bool:
        return bool(PORT_CONFLICT.search(self.tail(60)))


# ------------------------------------------------------------------ teardown


def _own_lineage() -> set[int]:
    """This process and its ancestors: never signalled, even if they match a marker."""
    out = {os.getpid()}
    try:
        import psutil

        out.update(p.pid for p in psutil.Process().parents())
    except Exception:
        pass
    return out


#: Env var every daemon carries: its cluster's temp dir (node wrapper: the daemon's own dir).
#: Teardown finds processes that left their session by it -- never by name, and not by
#: command line (the launcher's own ``srun`` carries the daemon's argv too).
ENV_MARK = "TOKSEARCH_CLUSTER_MARK"


def _marked(pid: int, marks: list[str]) -> bool:
    import psutil

    try:
        value = psutil.Process(pid).environ().get(ENV_MARK)
    except (psutil.Error, OSError):
        return False
    return bool(value) and any(value == m or value.startswith(m.rstrip("/") + "/") for m in marks)


def members(sids: set[int], markers: Iterable[str] = ()) -> list[int]:
    """Live (non-zombie) processes in one of the sessions ``sids``, or whose environment has
    ``ENV_MARK`` equal to (or under) one of ``markers`` (our temp dirs): catches any daemon
    process that left its session.  This process and its ancestors are never listed.
    """
    import psutil

    marks = [m for m in markers if m]
    mine = _own_lineage()
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        pid = p.info["pid"]
        if pid in mine or p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if os.getsid(pid) in sids:
                out.append(pid)
                continue
        except OSError:
            continue
        if marks and _marked(pid, marks):
            out.append(pid)
    return out


def _signal_all(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Leader(Protocol):
    """A session leader we started: a :class:`Daemon`, or :class:`Session` around a bare Popen."""

    proc: Optional[subprocess.Popen]


@dataclass
class Session:
    """A bare child process started as a session leader (the step wrapper's daemon)."""

    proc: Optional[subprocess.Popen]


def terminate(
    daemons: "list[Any]",
    *,
    markers: Iterable[str] = (),
    grace: float = 6.0,
    kill_wait: float = 3.0,
    head_last: bool = False,
    send_term: Optional[Callable[[list[Any]], None]] = None,
    on_stuck: Optional[Callable[[Any], None]] = None,
) -> list[int]:
    """Stop session leaders (:class:`Leader`): SIGTERM each leader, wait up to ``grace``, SIGKILL what is left.

    The one TERM -> grace -> KILL routine of the package (the lifecycle and the
    step wrapper both use it).

    head_last: SIGTERM the workers first and the head (``daemons[0]``) once they are
    gone or after half the grace period (a Ray worker stopped together with its GCS
    waits on the dead GCS for seconds).  Returns the PIDs still alive afterwards
    (empty when the teardown was clean).  ``on_stuck(daemon)`` runs for leaders
    still alive after the grace period, before SIGKILL (SLURM: cancel the step);
    ``send_term(daemons)`` replaces the plain SIGTERM (SLURM: scancel --signal=TERM).
    """
    markers = list(markers)
    started = [d for d in daemons if d.proc is not None]
    sids = {d.proc.pid for d in started}
    t0 = time.monotonic()

    def sigterm(ds: list[Daemon]) -> None:
        if send_term is not None:
            send_term([d for d in ds if d.proc.poll() is None])
            return
        for d in ds:
            if d.proc.poll() is None:
                try:
                    d.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def gone(ds: list[Daemon]) -> bool:
        if any(d.proc.poll() is None for d in ds):
            return False
        return not members({d.proc.pid for d in ds}, ())

    first = started[1:] if head_last and started and started[0] is daemons[0] else started
    later = [d for d in started if d not in first]
    sigterm(first)
    if later:
        while not gone(first) and time.monotonic() - t0 < grace / 2:
            time.sleep(0.05)
        sigterm(later)
    deadline = t0 + grace
    left: list[int] = []
    leaders_alive: list[Daemon] = []
    orphans_termed: set[int] = set()
    while True:
        leaders_alive = [d for d in started if d.proc.poll() is None]
        left = members(sids, markers)
        if not leaders_alive and not left:
            return []
        # once every leader is gone, what remains are stragglers: SIGTERM them (once)
        if not leaders_alive:
            _signal_all(set(left) - orphans_termed, signal.SIGTERM)
            orphans_termed.update(left)
        if time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    for d in leaders_alive:
        if on_stuck is not None:
            try:
                on_stuck(d)
            except Exception:
                pass
    _signal_all({d.proc.pid for d in started if d.proc.poll() is None} | set(left), signal.SIGKILL)
    deadline = time.monotonic() + kill_wait
    while time.monotonic() < deadline:
        for d in started:
            d.proc.poll()
        left = members(sids, markers)
        if not left and all(d.proc.poll() is not None for d in started):
            return []
        _signal_all(left, signal.SIGKILL)
        time.sleep(0.05)
    return members(sids, markers)
