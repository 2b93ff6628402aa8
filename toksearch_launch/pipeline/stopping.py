"""Stopping a run cleanly: Slurm's warning signal before the time limit, or scancel.

In batch mode the launcher asks Slurm for SIGUSR1 ``GRACE`` seconds before the
limit (``--signal=B:USR1@GRACE``); an interactive job sends it to itself with a
timer set from the job's end time (:func:`arm_self_warning`). On it the driver stops
scheduling partitions, lets the running ones finish until the grace is nearly
gone (the job's end time, read from ``scontrol``, minus a teardown margin),
abandons the rest, writes the manifest, stops the cluster, requeues the job
when ``batch.requeue`` asks for it, and exits with :data:`EXIT_STOPPED` and the
resume command. SIGTERM (scancel, preemption) abandons at once: Slurm kills
after ``KillWait`` seconds. Handlers are installed only inside a toksearch job.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, Optional

from toksearch_launch.procutil import die_by_signal

#: Exit status of a run stopped before it finished (EX_TEMPFAIL: try again, i.e. resume).
EXIT_STOPPED = 75
#: Exit status of a resume refused because the pipeline changed.
EXIT_REFUSED = 3
#: Seconds kept before the job's end time for the manifest, the cluster stop and a requeue.
TEARDOWN_MARGIN_S = 20.0
#: Slurm may send the warning signal up to this many seconds early (its scheduler's granularity).
EARLY_SIGNAL_S = 60.0


class StopRequest:
    """Process-wide: has a stop been asked for, why, and when must running partitions be abandoned."""

    def __init__(self) -> None:
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None  # time.time()
        self.end_time: Optional[float] = None  # the job's end time (time.time() scale), if known
        self.abandon_at: Optional[float] = None  # time.monotonic() deadline for running partitions
        self.active = 0  # how many drive() loops run now (a signal outside them is not ours to keep)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int, abandon_in: float, end_time: Optional[float]) -> None:
        if self.signum is None:
            self.signum = signum
            self.received_at = time.time()
            self.end_time = end_time
        deadline = time.monotonic() + max(0.0, abandon_in)
        self.abandon_at = deadline if self.abandon_at is None else min(self.abandon_at, deadline)

    def abandon_now(self) -> bool:
        return self.requested and self.abandon_at is not None and time.monotonic() >= self.abandon_at

    def reason(self) -> str:
        if self.signum is None:
            return "not stopped"
        name = signal.Signals(self.signum).name
        if self.signum == signal.SIGUSR1:
            return f"{name}, the time limit is near" if self.timed_out() else f"{name}, not near the time limit (preemption?)"
        return f"{name} (scancel or preemption)"

    def timed_out(self) -> bool:
        """Did the warning come because of the time limit? Compare the clock with the job's end time
        (as submitit does since its PR #1603), not the signal alone: Slurm also signals on preemption."""
        if self.end_time is None or self.received_at is None:
            return self.signum == signal.SIGUSR1
        return self.end_time - self.received_at <= grace_seconds() + EARLY_SIGNAL_S + TEARDOWN_MARGIN_S

    def reset(self) -> None:
        self.__init__()  # type: ignore[misc]


STOP = StopRequest()
_installed: Dict[int, Any] = {}


def _job_config() -> Any:
    from toksearch_launch.config import load_job_config

    try:
        return load_job_config()
    except Exception:
        return None


def grace_seconds() -> float:
    cfg = _job_config()
    return float(cfg.site.stop_grace) if cfg is not None else 120.0


def job_times(job_id: Optional[str] = None) -> Dict[str, float]:
    """The job's StartTime and EndTime from scontrol (seconds since the epoch); empty outside Slurm."""
    job_id = job_id or os.environ.get("SLURM_JOB_ID")
    if not job_id:
        return {}
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    times: Dict[str, float] = {}
    for field in out.split():
        key, _, value = field.partition("=")
        if key in ("StartTime", "EndTime"):
            try:
                times[key] = time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))
            except ValueError:
                pass
    return times


def job_end_time(job_id: Optional[str] = None) -> Optional[float]:
    return job_times(job_id).get("EndTime")


def self_warning_delay(start: float, end: float, now: float, stop_grace: float) -> Optional[float]:
    """Seconds from ``now`` until the warning: ``stop_grace`` before the end, at most half the limit."""
    if stop_grace <= 0 or end <= start:
        return None
    grace = min(stop_grace, (end - start) / 2)
    return max(0.0, end - grace - now)


def arm_self_warning() -> Optional[threading.Timer]:
    """Interactive jobs warn themselves: a timer sends this process SIGUSR1 GRACE seconds before
    the job's end time (Slurm's ``--signal`` reaches a step only through an allocation srun
    made itself, and salloc's would also hit the cluster daemons' steps)."""
    cfg = _job_config()
    if cfg is None or cfg.mode != "interactive" or cfg.site.scheduler != "slurm":
        return None
    times = job_times()
    if "StartTime" not in times or "EndTime" not in times:
        return None
    delay = self_warning_delay(times["StartTime"], times["EndTime"], time.time(), float(cfg.site.stop_grace))
    if delay is None:
        return None
    timer = threading.Timer(delay, os.kill, (os.getpid(), signal.SIGUSR1))
    timer.daemon = True
    timer.start()
    return timer


def _on_usr1(signum: int, frame: Any) -> None:
    end = job_end_time()
    if end is not None:
        abandon_in = end - time.time() - TEARDOWN_MARGIN_S
    else:
        abandon_in = grace_seconds() / 2
    STOP.request(signum, abandon_in, end)
    print(f"toksearch: {signal.Signals(signum).name} received: no new partitions; running ones get "
          f"{max(0, int(abandon_in))} s to finish", file=sys.stderr, flush=True)


def _on_term(signum: int, frame: Any) -> None:
    if STOP.active:
        STOP.request(signum, 0.0, job_end_time())
        return
    previous = _installed.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    die_by_signal(signum)


def install_job_handlers() -> None:
    """SIGUSR1 and SIGTERM handlers for a job's compute calls (main thread only, once)."""
    if _installed or threading.current_thread() is not threading.main_thread():
        return
    _installed[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, _on_usr1)
    _installed[signal.SIGTERM] = signal.signal(signal.SIGTERM, _on_term)
    arm_self_warning()


def refuse(message: str) -> None:
    """A resume that cannot go on: one line, an entry in the run's log, exit status 3."""
    from toksearch_launch import resume

    resume.log_event(None, "refused", message=message)
    print(f"toksearch: {message}", file=sys.stderr, flush=True)
    raise SystemExit(EXIT_REFUSED)


def stop_run(store: Any) -> None:
    """After the driver stopped: the message, the cluster stop, a requeue if asked; then exit 75."""
    from toksearch_launch import resume

    STOP.active = 0
    store.write_manifest("stopped")
    run_dir = resume.current_run_dir()
    stored = len(store.done)
    where = f"{stored}/{store.total} records stored in {store.path}"
    resume.log_event(None, "stopped", reason=STOP.reason(), stored=stored, total=store.total,
                     timed_out=STOP.timed_out())
    command = resume.resume_command(run_dir) if run_dir else None
    print(f"toksearch: stopped ({STOP.reason()}): {where}"
          + (f"; resume with: {command}" if command else ""), flush=True)
    try:
        from toksearch_launch.cluster import stop_all

        stop_all()
    except Exception as exc:  # the results are safe; say it and go on
        print(f"toksearch: stopping the cluster: {exc}", file=sys.stderr, flush=True)
    if STOP.signum == signal.SIGUSR1 and run_dir:
        resume.continue_after_stop(run_dir, timed_out=STOP.timed_out())
    raise SystemExit(EXIT_STOPPED)
