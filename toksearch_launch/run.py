"""Running a plan: the only module of the launcher that starts programs.

Interactive jobs run in the foreground and their exit code becomes ours. Batch jobs
are submitted with ``sbatch --parsable``; ``--wait`` polls ``scontrol show job``
(``sbatch --wait`` adds about 10 s to every job, and without accounting there is no
``sacct``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

from toksearch_launch.plan import LOCAL_BATCH_OUTPUT, Plan, Version, parse_slurm_version
from toksearch_launch.procutil import display, exit_status


class LaunchError(RuntimeError):
    """Something the user must fix before a job can run; the message is one line."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


#: Job states after which a job never runs again (scontrol's JobState values).
FINAL_STATES = {
    "BOOT_FAIL", "CANCELLED", "COMPLETED", "DEADLINE", "FAILED",
    "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "TIMEOUT",
}


@dataclass
class Submission:
    """What a batch submission returned: the job id and where its output goes."""

    job_id: str
    run_dir: str
    output: str
    exit_code: Optional[int] = None
    state: Optional[str] = None


def require_program(name: str) -> str:
    """The program's path, or a one-line error that says what to do instead."""
    path = shutil.which(name)
    if path is None:
        raise LaunchError(
            f"{name} not found on PATH: this does not look like a SLURM login node "
            "(use site=local to run on this machine)"
        )
    return path


_slurm_version_cache: Dict[str, Optional[Version]] = {}


def slurm_version() -> Optional[Version]:
    """Read ``srun --version`` once per process."""
    if "v" not in _slurm_version_cache:
        srun = shutil.which("srun")
        version = None
        if srun:
            try:
                out = subprocess.run([srun, "--version"], capture_output=True, text=True, timeout=30)
                version = parse_slurm_version(out.stdout)
            except (OSError, subprocess.SubprocessError):
                version = None
        _slurm_version_cache["v"] = version
    return _slurm_version_cache["v"]


def _child_env(plan: Plan) -> Dict[str, str]:
    env = dict(os.environ)
    env.update(plan.env)
    return env


#: What salloc/srun print when X11 forwarding cannot be set up.
X11_FAILURES = ("x11 forwarding", "X11 socket", "x11 auth", "X11 DISPLAY")


class _StderrWatch:
    """Copy a child's stderr to ours as it comes, remembering whether X11 setup failed."""

    def __init__(self, stream) -> None:
        import threading

        self.x11_failed = False
        self._stream = stream
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        out = sys.stderr.buffer
        for line in iter(self._stream.readline, b""):
            out.write(line)
            out.flush()
            text = line.decode("utf-8", "replace")
            if "error" in text.lower() and any(k.lower() in text.lower() for k in X11_FAILURES):
                self.x11_failed = True

    def join(self) -> None:
        self._thread.join(timeout=5)


def run_foreground(argv: List[str], env: Dict[str, str], watch_x11: bool = False) -> tuple[int, bool]:
    """Run a command in our terminal; SIGINT reaches it through the terminal, SIGTERM we forward.

    Returns (exit code, whether stderr reported an X11 setup failure).
    """
    try:
        proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE if watch_x11 else None)
    except FileNotFoundError:
        raise LaunchError(f"{argv[0]}: command not found") from None
    except PermissionError:
        raise LaunchError(f"{argv[0]}: permission denied") from None

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),  # the terminal delivers it to the child too
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGHUP: signal.signal(signal.SIGHUP, forward),
    }
    watch = _StderrWatch(proc.stderr) if watch_x11 else None
    try:
        code = exit_status(proc.wait())
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if watch:
        watch.join()
    return code, bool(watch and watch.x11_failed)


def run_interactive(plan: Plan) -> int:
    """salloc ... srun ... COMMAND (or COMMAND itself on site=local); returns the job's exit code.

    On SLURM the caller has checked, before writing anything, that salloc is there
    (:func:`require_program`)."""
    if plan.scheduler == "local" and shutil.which(plan.argv[0]) is None:
        raise LaunchError(f"{plan.argv[0]}: command not found")
    print(f"toksearch_submit: {display(plan.argv)}", file=sys.stderr, flush=True)
    code, x11_failed = run_foreground(plan.argv, _child_env(plan), watch_x11=plan.x11_fix is not None)
    if code != 0 and x11_failed:
        raise LaunchError(
            f"salloc could not set up X11 forwarding for DISPLAY={os.environ.get('DISPLAY', '')}: "
            f"run without it by adding {plan.x11_fix}", exit_code=code)
    return code


def submit_batch(plan: Plan) -> Submission:
    """Submit the written job.sbatch (the caller has checked sbatch is there); site=local starts
    it detached in its own session."""
    if plan.scheduler == "local":
        output = plan.run_dir / LOCAL_BATCH_OUTPUT
        with open(output, "wb") as out:
            proc = subprocess.Popen(
                plan.argv, env=_child_env(plan), stdin=subprocess.DEVNULL,
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return Submission(job_id=f"local-{proc.pid}", run_dir=str(plan.run_dir), output=str(output))
    print(f"toksearch_submit: {display(plan.argv)}", file=sys.stderr, flush=True)
    result = subprocess.run(plan.argv, env=_child_env(plan), capture_output=True, text=True)
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"exit code {result.returncode}"
        raise LaunchError(f"sbatch refused the job: {message}", exit_code=1)
    job_id = result.stdout.strip().split(";")[0]
    output = str(plan.output).replace("%j", job_id)
    return Submission(job_id=job_id, run_dir=str(plan.run_dir), output=output)


def _scontrol_fields(text: str) -> Dict[str, str]:
    """``scontrol show job -o`` prints one line of Key=Value pairs."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


def wait_slurm_job(job_id: str, poll: float = 0.25, max_poll: float = 2.0,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[str, int]:
    """Poll until the job reaches a final state; return (state, exit code)."""
    scontrol = require_program("scontrol")
    while True:
        result = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True)
        if result.returncode != 0:
            raise LaunchError(f"scontrol lost job {job_id}: {' '.join(result.stderr.split())}")
        fields = _scontrol_fields(result.stdout)
        state = fields.get("JobState", "")
        if state in FINAL_STATES:
            code, _, sig = fields.get("ExitCode", "0:0").partition(":")
            exit_code = int(code or 0)
            if exit_code == 0 and sig and int(sig):
                exit_code = 128 + int(sig)
            if exit_code == 0 and state != "COMPLETED":
                exit_code = 1
            return state, exit_code
        sleep(poll)
        poll = min(poll * 1.5, max_poll)


def wait_local_job(job_id: str, sleep: Callable[[float], None] = time.sleep) -> tuple[str, int]:
    """A site=local batch job is a process of ours: wait for it directly."""
    import psutil

    pid = int(job_id.split("-", 1)[1])
    try:
        code = psutil.Process(pid).wait()
    except psutil.NoSuchProcess:
        return "COMPLETED", 0
    code = exit_status(code)
    return ("COMPLETED" if code == 0 else "FAILED"), code
