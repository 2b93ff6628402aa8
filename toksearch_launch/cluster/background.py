"""``backend.start=background``: the in-job wrapper starts the cluster while COMMAND already runs.

Two processes share one status file in the run dir, named in COMMAND's
environment by ``TOKSEARCH_CLUSTER_<NAME>_START`` (:func:`start_env`):

* the wrapper (:class:`BackgroundStart`) writes ``starting``, then ``ready``
  with the attach file of :meth:`Cluster.attach`, or ``failed`` with the
  start's own message (node, command, log);
* COMMAND's ``job_cluster()`` (:func:`await_cluster`) waits on it, so
  ``compute_*()`` waits only for what remains of the start, and raises the
  same error a lazy start would have raised.

The address cannot be known before the start ends (a port conflict moves the
block), so COMMAND's environment has no ``RAY_ADDRESS`` / ``SPARK_MASTER_URL``
/ ``DASK_SCHEDULER_ADDRESS``: only ``job_cluster()`` finds the cluster.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .backend import info_env
from .dirs import write_private
from .errors import ClusterError, StartError
from .owner import marker_alive, parse_owner, this_owner

if TYPE_CHECKING:
    from .lifecycle import Cluster

STARTING, READY, FAILED = "starting", "ready", "failed"
#: seconds between two reads of the status file while COMMAND waits
POLL = 0.05
#: beyond the start's own deadlines (one per port retry): the waiter's backstop
WAIT_MARGIN = 60.0


def start_env(backend: str) -> str:
    """Env var naming the status file of a cluster being started in the background."""
    return f"TOKSEARCH_CLUSTER_{backend.upper()}_START"


def status_path(run_dir: "str | Path", backend: str) -> Path:
    return Path(run_dir) / f"cluster-{backend}-{os.getpid()}.start.json"


def write_status(path: "str | Path", **fields: Any) -> None:
    """Replace the status atomically (a reader never sees half a file); 0600."""
    write_private(str(path), json.dumps(fields))


def read_status(path: "str | Path") -> Optional[dict]:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "(no message)"


def wait_limit(cfg: Any) -> float:
    """How long COMMAND may wait at most: every start attempt's own deadline, plus a margin."""
    from .lifecycle import PORT_RETRIES

    return (PORT_RETRIES + 1) * float(cfg.site.ready_timeout) + WAIT_MARGIN


class BackgroundStart:
    """The wrapper's side: ``cluster.start()`` in a thread, its outcome in the status file."""

    def __init__(self, cluster: "Cluster", path: "str | Path") -> None:
        self.cluster = cluster
        self.path = Path(path)
        self.error: str = ""
        self.interrupted = False
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"{cluster.backend}-start")

    def begin(self) -> None:
        """Write ``starting`` (so COMMAND, spawned next, finds it) and start in the background."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_status(self.path, state=STARTING, backend=self.cluster.backend, owner=this_owner(),
                     until=time.time() + wait_limit(self.cluster.cfg))
        self._thread.start()

    def _run(self) -> None:
        backend = self.cluster.backend
        try:
            self.cluster.start()
        except BaseException as exc:  # noqa: BLE001 - every outcome goes to the waiter
            self.error = str(exc) or type(exc).__name__
            kind = "start" if isinstance(exc, StartError) else "cluster"
            write_status(self.path, state=FAILED, backend=backend, kind=kind, error=self.error)
            return
        write_status(self.path, state=READY, backend=backend, info=self.cluster.client_env()[info_env(backend)])

    def interrupt(self) -> None:
        """COMMAND ended or a stop signal came: a start still running gives up at its next poll."""
        if self._thread.is_alive():
            self.interrupted = True
            self.cluster.interrupt_start()

    def finish(self) -> None:
        """After COMMAND: stop the start if it still runs, then the cluster; nothing is left.

        A start that failed and that COMMAND never asked about is said in one line."""
        if self._thread.ident is not None:
            self.interrupt()
            self._thread.join()
        self.cluster.stop()
        status = read_status(self.path) or {}
        if status.get("state") == FAILED and not status.get("seen") and not self.interrupted:
            print(f"toksearch: the {self.cluster.backend} cluster started in the background did not start "
                  f"(COMMAND never asked for it): {first_line(self.error)}", file=sys.stderr, flush=True)


def await_cluster(backend: str, path: "str | Path") -> str:
    """COMMAND's side: the attach file of the cluster, once the wrapper's start is ready.

    Waits only for what remains of the start.  A failed start raises the start's
    own error (:class:`StartError` naming node, command, log, as a lazy start
    would); a wrapper gone, or no outcome by the status' deadline, a
    :class:`ClusterError` saying so."""
    while True:
        status = read_status(path)
        if status is None:
            raise ClusterError(f"the {backend} cluster's start status {path} cannot be read")
        state = status.get("state")
        if state == READY:
            return str(status["info"])
        if state == FAILED:
            if not status.get("seen"):
                write_status(path, **{**status, "seen": True})
            error = StartError if status.get("kind") == "start" else ClusterError
            raise error(str(status.get("error", "")))
        owner = str(status.get("owner", ""))
        if not marker_alive(owner):
            pid = (parse_owner(owner) or ("", 0, 0.0))[1]
            raise ClusterError(f"the process starting the {backend} cluster in the background (PID {pid}) "
                               f"is gone before the cluster was ready (status: {path})")
        if time.time() > float(status.get("until", 0)):
            raise ClusterError(f"the {backend} cluster started in the background gave no outcome in time "
                               f"(status: {path}; log: {Path(path).parent / 'logs' / f'{backend}-cluster.log'})")
        time.sleep(POLL)
