"""Process-wide hooks: stop this process's clusters at exit and on SIGTERM/SIGHUP, and the
one cluster per backend that a job's code shares (:func:`job_cluster`).

The signal handler is chained: whatever handler was there before runs after
ours, and a default-action signal still kills the process.  A signal that
arrives while a teardown runs waits until it is done.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from typing import TYPE_CHECKING, Any, Iterator, Optional

from ..config import CONFIG_ENV, load_job_config
from ..procutil import die_by_signal
from .auth import DAEMON_ENV
from .backend import get_backend, info_env
from .background import await_cluster, start_env

if TYPE_CHECKING:
    from .lifecycle import Cluster

log = logging.getLogger("toksearch_launch.cluster")

_HOOK_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
#: Clusters of this process that are starting or running (stopped at exit / SIGTERM).
_live: "set[Cluster]" = set()
_job_clusters: "dict[str, Cluster]" = {}
_job_lock = threading.RLock()  # two threads asking at once get one cluster
_teardown_depth = [0]
_pending_signals: list[int] = []
_hooks = {"atexit": False}
_prev_handlers: dict[int, Any] = {}


def register(cluster: "Cluster", *, signal_hooks: bool) -> None:
    """From now on exit stops ``cluster``; SIGTERM/SIGHUP too (main thread only)."""
    _live.add(cluster)
    if not _hooks["atexit"]:
        import atexit

        atexit.register(stop_all)
        _hooks["atexit"] = True
    if signal_hooks:
        _install_signal_hooks()


def unregister(cluster: "Cluster") -> None:
    _live.discard(cluster)


def stop_all() -> None:
    """Stop every cluster this process started and still runs."""
    _job_clusters.clear()
    for c in list(_live):
        try:
            c.stop()
        except Exception as exc:  # pragma: no cover - best effort at exit
            log.error("stopping the %s cluster: %s", c.backend, exc)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """A SIGTERM arriving inside waits until the block (a teardown) is done."""
    _teardown_depth[0] += 1
    try:
        yield
    finally:
        _teardown_depth[0] -= 1
        if _teardown_depth[0] == 0 and _pending_signals:
            _on_signal(_pending_signals.pop(0), None)


def _on_signal(signum: int, frame: Any) -> None:
    """SIGTERM/SIGHUP: stop the job's clusters, then do what the signal would have done."""
    if _teardown_depth[0]:
        _pending_signals.append(signum)  # a teardown is running below us: let it finish first
        return
    stop_all()
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_IGN:
        return
    else:  # default action: die by the same signal, as if we had not been here
        die_by_signal(signum)


def _install_signal_hooks() -> None:
    if threading.current_thread() is not threading.main_thread():
        log.warning("job_cluster() called outside the main thread: no SIGTERM teardown hook")
        return
    for sig in _HOOK_SIGNALS:
        current = signal.getsignal(sig)
        if current is _on_signal:
            continue
        if sig == signal.SIGHUP and current == signal.SIG_IGN:
            continue  # nohup: keep ignoring hangups
        _prev_handlers[sig] = current
        signal.signal(sig, _on_signal)


def reinstall_signal_hooks() -> None:
    """An engine's client may replace the SIGTERM handler (ray.init does): chain ours in front again."""
    if _live:
        _install_signal_hooks()


def job_cluster(backend: str) -> Optional["Cluster"]:
    """Inside a toksearch job (env TOKSEARCH_CONFIG set): the job's cluster for ``backend``.

    Started on first call and stopped at process exit / SIGTERM / SIGHUP (SIGINT
    raises KeyboardInterrupt, then the exit hook stops it); or attached to the one
    the eager wrapper started, or (``backend.start=background``) to the one it is
    starting, once ready: the wait is only what remains of that start, and a failed
    start raises the start's own error.  Outside a job, or inside a daemon's own process
    (a Ray task, a Spark executor, a Dask worker): None.
    """
    get_backend(backend)
    if not os.environ.get(CONFIG_ENV) or os.environ.get(DAEMON_ENV):
        return None
    with _job_lock:
        return _job_cluster_locked(backend)


def _job_cluster_locked(backend: str) -> Optional["Cluster"]:
    from .lifecycle import Cluster

    existing = _job_clusters.get(backend)
    if existing is not None and (existing._started or not existing._owner):
        return existing
    starting = os.environ.get(start_env(backend))
    if starting:  # backend.start=background: wait for what remains of the wrapper's start
        cluster = Cluster.attach(backend, await_cluster(backend, starting))
        _job_clusters[backend] = cluster
        return cluster
    info = os.environ.get(info_env(backend))
    if info and os.path.exists(info):
        cluster = Cluster.attach(backend, info)
        _job_clusters[backend] = cluster
        return cluster
    cluster = Cluster(backend, load_job_config())
    _job_clusters[backend] = cluster
    try:
        cluster.start()
    except BaseException:
        _job_clusters.pop(backend, None)
        raise
    return cluster
