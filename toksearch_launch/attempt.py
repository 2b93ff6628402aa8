"""One attempt of a batch job's COMMAND, with its start and its exit code in the run's log.

    python -m toksearch_launch.attempt -- COMMAND [ARGS...]

The batch script execs this as the batch step's process (plan.batch_script), so it
outlives COMMAND: it logs ``command started`` in ``jobs.jsonl`` (with the job id
and Slurm's restart count), runs COMMAND as its child, passes on every signal
Slurm sends the batch step (the time-limit warning ``B:USR1``, scancel's
SIGTERM: measured on Slurm 22.05, they reach the batch step's process alone) to
COMMAND alone, as if COMMAND had been exec'd, and then logs ``command ended``
with COMMAND's exit code. ``--status`` and ``--resume`` call a run finished only
when its last attempt ended with exit code 0 (:func:`toksearch_launch.resume.is_finished`):
a SIGKILL of COMMAND is seen here (exit code 137); a kill of the whole job (the
time limit, scancel after KillWait, a lost node) leaves a start without an end,
which reads as not finished too.

Exit status: COMMAND's; if COMMAND died of a signal, this process dies of the same
signal, so Slurm's ExitCode reads as it would without this wrapper.
Imports nothing heavy (it runs before every batch COMMAND).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any, Dict, List, Optional

#: Signals passed on to COMMAND (Slurm signals the batch step's process alone).
FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: What kills COMMAND before it starts: this attempt then ends without running it.
_STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _handler(state: Dict[str, Any]):
    def on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001
        child: Optional[subprocess.Popen] = state["child"]
        if child is None:  # COMMAND is not running yet
            if signum in _STOPS:
                state["stopped_by"] = signum
            return
        if child.poll() is None:
            try:
                child.send_signal(signum)  # COMMAND alone, as Slurm's signal would reach it if exec'd
            except ProcessLookupError:
                pass

    return on_signal


def die_like(returncode: int) -> int:
    """Exit as COMMAND did: the same status, or death by the same signal."""
    if returncode >= 0:
        return returncode
    from toksearch_launch.procutil import die_by_signal

    signum = -returncode
    die_by_signal(signum)
    return 128 + signum  # not reached for a signal whose default action ends the process


def run_attempt(command: List[str]) -> int:
    from toksearch_launch.procutil import exit_status
    from toksearch_launch.resume import log_event

    state: Dict[str, Any] = {"child": None, "stopped_by": 0}
    for signum in FORWARDED:
        signal.signal(signum, _handler(state))
    log_event(None, "command started", pid=os.getpid())
    if state["stopped_by"]:
        returncode = -state["stopped_by"]
    else:
        try:
            state["child"] = subprocess.Popen(command)
        except OSError as exc:
            print(f"toksearch: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr, flush=True)
            log_event(None, "command ended", pid=os.getpid(), exit_code=127)
            return 127
        returncode = state["child"].wait()
    ended: Dict[str, Any] = {"pid": os.getpid(), "exit_code": exit_status(returncode)}
    if returncode < 0:
        ended["signal"] = signal.Signals(-returncode).name
    log_event(None, "command ended", **ended)
    return die_like(returncode)


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] != "--" or len(args) < 2:
        print("usage: python -m toksearch_launch.attempt -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    return run_attempt(args[1:])


if __name__ == "__main__":
    sys.exit(main())
