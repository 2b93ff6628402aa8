"""Running a plan: the only module of the launcher that starts programs.

Interactive jobs run in the foreground and their exit code becomes ours; they end with
the launcher, whatever killed it (:func:`dies_with_launcher`), and one that can never
start is cancelled (:func:`never_starts`). Batch jobs are submitted with ``sbatch
--parsable``; ``--wait`` polls ``scontrol show job`` (``sbatch --wait`` adds about 10 s
to every job), cancels a job that can never start, and asks ``sacct`` for a job that
scontrol has purged; without accounting such a job's state is UNKNOWN (exit code 1).
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional

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


def write_script(path: Path, text: str) -> None:
    """job.sbatch (new, or replaced on a resume): 0644 at most (the umask may tighten it), never executable: sbatch and bash read it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)


#: errno values of a run dir (or a file in it) that cannot be created or written.
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.ENOENT,
               errno.EISDIR, errno.EEXIST}


def unwritable_run_dir(exc: OSError) -> Optional[LaunchError]:
    """The one line for a run directory that cannot be written (Hydra creates it, the launcher writes
    toksearch.yaml and job.sbatch into it before anything is allocated); None for other errors."""
    if exc.errno not in _UNWRITABLE:
        return None
    where = os.path.abspath(exc.filename) if isinstance(exc.filename, str) else "the run directory"
    return LaunchError(f"cannot write {where}: {exc.strerror or exc}: the run directory must be writable "
                       "(choose one with hydra.run.dir=..., or hydra.sweep.dir=... with -m)")


def require_command(name: str) -> None:
    """site=local: COMMAND must exist here (checked before the run dir gets any file)."""
    if shutil.which(name) is None:
        raise LaunchError(f"{name}: command not found")


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


#: salloc's line for a request that waits in the queue.
_SALLOC_PENDING = re.compile(r"salloc: Pending job allocation (\d+)")


class _StderrWatch:
    """Copy salloc's stderr to ours as it comes, remembering whether X11 setup failed, and watch
    the job salloc waits for: one that can never start (:func:`never_starts`) is cancelled, so
    that an interactive ``salloc -N 4`` on a 3-node partition does not wait forever."""

    def __init__(self, stream, poll: float = 1.0) -> None:
        import threading

        self.x11_failed = False
        self.never_started = ""  # "job N: it can never start (...): cancelled it", once we cancelled it
        self._poll = poll
        self._stream = stream
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._copy, daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        import threading

        out = sys.stderr.buffer
        fd = self._stream.fileno()
        partial = b""
        while True:
            chunk = os.read(fd, 65536)  # as it comes: a progress line without a newline shows at once
            if not chunk:
                return
            out.write(chunk)
            out.flush()
            *lines, partial = (partial + chunk).split(b"\n")
            partial = partial[-4096:]
            for line in lines:
                text = line.decode("utf-8", "replace")
                if "error" in text.lower() and any(k.lower() in text.lower() for k in X11_FAILURES):
                    self.x11_failed = True
                pending = _SALLOC_PENDING.search(text)
                if pending and shutil.which("scontrol"):
                    threading.Thread(target=self._watch_pending, args=(pending.group(1),), daemon=True).start()

    def _watch_pending(self, job_id: str) -> None:
        """Poll the pending job until it leaves PENDING; cancel it if it can never start."""
        scontrol = shutil.which("scontrol") or "scontrol"
        partition_nodes = partition_total_nodes(scontrol)
        while not self._stop.is_set():
            out = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True)
            fields = _scontrol_fields(out.stdout) if out.returncode == 0 else {}
            if fields.get("JobState") != "PENDING":
                return
            why = never_starts(fields, partition_nodes)
            if why:
                end = cancel_never_starting(job_id, why)
                self.never_started = f"job {job_id}: {end.reason}"
                return
            self._stop.wait(self._poll)

    def join(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


#: What the foreground child of an interactive job gets when the launcher dies, whatever killed
#: it (SIGKILL included): salloc then revokes the allocation (measured: the job gone in 0.3 s,
#: its step's tasks get SIGTERM, SIGKILL after KillWait); on site=local the script stops its
#: clusters (their SIGTERM hook) and exits, as after scancel.
LAUNCHER_DEATH_SIGNAL = signal.SIGTERM
PR_SET_PDEATHSIG = 1


def dies_with_launcher(sig: int = LAUNCHER_DEATH_SIGNAL) -> Optional[Callable[[], None]]:
    """A ``preexec_fn`` that asks Linux to send ``sig`` to the child when this process dies
    (``prctl(PR_SET_PDEATHSIG)``), so that no allocation outlives a killed launcher; None where
    there is no prctl. prctl is looked up here, in the parent: the forked child only calls it."""
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    launcher = os.getpid()

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
        if os.getppid() != launcher:  # the launcher died between fork and prctl
            os.kill(os.getpid(), sig)

    return arm


class AfterLauncher(NamedTuple):
    """What the watchdog does with the launcher's child once the launcher died and the child
    still runs (it got :data:`LAUNCHER_DEATH_SIGNAL` from the kernel at that instant)."""

    #: Seconds the child has to exit, from the launcher's death.
    grace: float
    #: Seconds between repeats of the death signal within the grace; None: no repeats.
    resend_every: Optional[float]
    #: SIGKILL the child once the grace is over.
    kill: bool


#: site=local: the script has 10 s for its SIGTERM hook to stop its cluster (which takes at
#: most about that), then SIGKILL; what a cluster's stop leaves undone its step wrappers' owner watch finishes.
LOCAL_AFTER_LAUNCHER = AfterLauncher(grace=10.0, resend_every=None, kill=True)

#: SLURM: salloc must rescind its own allocation, so it gets the death signal again each second
#: for a minute and is never SIGKILLed (a SIGKILLed salloc leaves its job pending or running).
#: The repeats are needed: a salloc signalled just as it printed "Pending job allocation N" may
#: miss it and wait on for the job (measured under load: 4 in 100 did, each ended by a second
#: SIGTERM; Slurm 22.05). A SIGTERM or SIGHUP we forward to salloc is repeated the same way.
SLURM_AFTER_LAUNCHER = AfterLauncher(grace=60.0, resend_every=1.0, kill=False)


def watch_after_launcher(proc: subprocess.Popen, policy: AfterLauncher) -> Optional[int]:
    """Start a watchdog that carries out ``policy`` on ``proc`` once this process dies (whatever
    killed it), unless ``proc`` has exited by then; returns the fd whose close tells the watchdog
    that we are gone (close it once ``proc`` is reaped), None where Linux's pidfds are missing.

    The death signal alone (:func:`dies_with_launcher`) is sent once: a script that ignores
    SIGTERM never ends, a salloc that missed it waits on, and a SIGKILLed launcher can send
    nothing more. The watchdog is a grandchild in its
    own session (no terminal signal reaches it, it is nobody's foreground job and not our
    child), holding only two fds: the read end of a pipe whose write end only we hold (EOF at
    our death, never before), and a pidfd of ``proc`` (a PID reused after ``proc`` is reaped is
    never signalled). The child stays our direct child, so its stdin/stdout/stderr, signals,
    exit code and timing are untouched; the watchdog is a fork, no new interpreter."""
    try:
        pidfd = os.pidfd_open(proc.pid)  # before our wait(): the PID is proc's until we reap it
    except (AttributeError, OSError):
        return None
    gone_r, gone_w = os.pipe()
    try:
        middle = os.fork()
    except OSError:  # no process to spare: the child runs as before, with its death signal only
        for fd in (gone_r, gone_w, pidfd):
            os.close(fd)
        return None
    if middle == 0:  # the intermediate: it exits at once, so the watchdog is nobody's child
        try:
            os.setsid()
            if os.fork() == 0:
                _watchdog(gone_r, pidfd, policy)
        finally:
            os._exit(0)
    os.close(gone_r)
    os.close(pidfd)
    os.waitpid(middle, 0)
    return gone_w


def _watchdog(gone_fd: int, pidfd: int, policy: AfterLauncher) -> None:
    """The watchdog's life (a forked copy of the launcher; only os calls, never returns)."""
    import select

    try:
        for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGTSTP, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)  # never holds the launcher's terminal or pipes open
        keep = sorted({0, 1, 2, gone_fd, pidfd})
        for low, high in zip(keep, keep[1:] + [os.sysconf("SC_OPEN_MAX")]):
            os.closerange(low + 1, high)
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(gone_fd, select.POLLIN)
        while True:
            try:
                ready = {fd for fd, _ in poller.poll()}
                break
            except InterruptedError:
                continue
        if pidfd in ready:  # the child exited first: nothing to do
            os._exit(0)
        deadline = time.monotonic() + policy.grace  # the launcher is gone and the child runs
        while (left := deadline - time.monotonic()) > 0:
            if select.select([pidfd], [], [], min(left, policy.resend_every or left))[0]:
                os._exit(0)
            if policy.resend_every is not None and deadline > time.monotonic():
                signal.pidfd_send_signal(pidfd, LAUNCHER_DEATH_SIGNAL)
        if policy.kill:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except BaseException:  # noqa: BLE001 -- a watchdog never raises into a copy of the launcher
        pass
    os._exit(0)


def run_foreground(argv: List[str], env: Dict[str, str], watch_stderr: bool = False,
                   after_launcher: Optional[AfterLauncher] = None) -> tuple[int, "_StderrWatch | None"]:
    """Run a command in our terminal; SIGINT reaches it through the terminal, SIGTERM and SIGHUP
    we forward (again every ``after_launcher.resend_every`` seconds until it exits, if set),
    and it gets SIGTERM if we die (:func:`dies_with_launcher`), then what ``after_launcher``
    says if it is still there (:func:`watch_after_launcher`; None: nothing more).

    Returns (exit code, the stderr watch when ``watch_stderr``: salloc's X11 failure, a job that can never start).
    """
    arm = dies_with_launcher()
    try:
        proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE if watch_stderr else None,
                                preexec_fn=arm)
    except FileNotFoundError:
        raise LaunchError(f"{argv[0]}: command not found") from None
    except PermissionError:
        raise LaunchError(f"{argv[0]}: permission denied") from None
    watchdog = watch_after_launcher(proc, after_launcher) if after_launcher is not None and arm is not None else None
    reaped = threading.Event()
    repeating: List[threading.Thread] = []

    def repeat(signum: int, policy: AfterLauncher) -> None:
        """The forwarded signal again, as the watchdog would send it after our death."""
        deadline = time.monotonic() + policy.grace
        while not reaped.wait(policy.resend_every) and time.monotonic() < deadline:
            proc.send_signal(signum)  # nothing once proc is reaped

    def forward(signum: int, _frame: object) -> None:
        if proc.poll() is None:
            proc.send_signal(signum)
            if after_launcher is not None and after_launcher.resend_every and not repeating:
                repeating.append(threading.Thread(target=repeat, args=(signum, after_launcher), daemon=True))
                repeating[0].start()

    previous = {
        signal.SIGINT: signal.signal(signal.SIGINT, signal.SIG_IGN),  # the terminal delivers it to the child too
        signal.SIGTERM: signal.signal(signal.SIGTERM, forward),
        signal.SIGHUP: signal.signal(signal.SIGHUP, forward),
    }
    watch = _StderrWatch(proc.stderr) if watch_stderr else None
    try:
        code = exit_status(proc.wait())
    finally:
        reaped.set()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if watchdog is not None:
            os.close(watchdog)  # proc is reaped: the watchdog has seen it exit (its pidfd), never kills
    if watch:
        watch.join()
    return code, watch


def run_interactive(plan: Plan) -> int:
    """salloc ... srun ... COMMAND (or COMMAND itself on site=local); returns the job's exit code.

    The caller has checked, before writing anything, that salloc (:func:`require_program`)
    or, on site=local, COMMAND (:func:`require_command`) is there."""
    print(f"toksearch_submit: {display(plan.argv)}", file=sys.stderr, flush=True)
    slurm = plan.scheduler == "slurm"  # salloc is the child: Slurm ends the steps (KillWait)
    code, watch = run_foreground(plan.argv, _child_env(plan), watch_stderr=slurm,
                                 after_launcher=SLURM_AFTER_LAUNCHER if slurm else LOCAL_AFTER_LAUNCHER)
    if code != 0 and watch and watch.never_started:
        raise LaunchError(watch.never_started, exit_code=code)
    if code != 0 and watch and watch.x11_failed and plan.x11_fix is not None:
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
        job_id = f"local-{proc.pid}"
        _LOCAL_JOBS[job_id] = proc  # reaped by wait_local_job: another Popen must not reap it first
        return Submission(job_id=job_id, run_dir=str(plan.run_dir), output=str(output))
    print(f"toksearch_submit: {display(plan.argv)}", file=sys.stderr, flush=True)
    result = subprocess.run(plan.argv, env=_child_env(plan), capture_output=True, text=True)
    if result.returncode != 0:
        message = "; ".join(" ".join(ln.split()) for ln in result.stderr.splitlines() if ln.strip())
        message = message or f"exit code {result.returncode}"
        raise LaunchError(f"sbatch refused the job: {message}", exit_code=1)
    job_id = result.stdout.strip().split(";")[0]
    output = str(plan.output).replace("%j", job_id)
    return Submission(job_id=job_id, run_dir=str(plan.run_dir), output=output)


class JobEnd(NamedTuple):
    """How a batch job ended: its final state, exit code, and why we say so when it is unsure."""

    state: str
    exit_code: int
    reason: str = ""
    #: False for a job cancelled before it ever ran (no output file is then expected).
    started: bool = True


#: State of a job whose end we could not observe (its exit code is then 1: never a false 0).
UNKNOWN = "UNKNOWN"


def _scontrol_fields(text: str) -> Dict[str, str]:
    """``scontrol show job -o`` prints one line of Key=Value pairs."""
    return dict(re.findall(r"(\w+)=(\S*)", text))


def _job_end(state: str, exit_field: str) -> JobEnd:
    """scontrol's/sacct's ``ExitCode=code:signal`` as a shell reports it; a non-COMPLETED job never exits 0."""
    code, _, sig = (exit_field or "0:0").partition(":")
    exit_code = int(code or 0)
    if exit_code == 0 and sig and int(sig):
        exit_code = 128 + int(sig)
    if exit_code == 0 and state != "COMPLETED":
        exit_code = 1
    return JobEnd(state, exit_code)


def sacct_job_end(job_id: str) -> JobEnd:
    """The job's end from accounting, for a job scontrol has purged (after MinJobAge); UNKNOWN without accounting."""
    sacct = shutil.which("sacct")
    forgotten = f"scontrol no longer knows job {job_id} (purged after MinJobAge)"
    if sacct is None:
        return JobEnd(UNKNOWN, 1, f"{forgotten} and sacct is not installed")
    try:
        out = subprocess.run([sacct, "-n", "-P", "-X", "-j", job_id, "-o", "State,ExitCode"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return JobEnd(UNKNOWN, 1, f"{forgotten} and sacct failed: {exc}")
    line = next((ln for ln in out.stdout.splitlines() if ln.strip()), "")
    if out.returncode != 0 or "|" not in line:
        why = " ".join(out.stderr.split()) or "no record"
        return JobEnd(UNKNOWN, 1, f"{forgotten} and sacct has none ({why})")
    state, _, exit_field = line.partition("|")
    state = state.split()[0]  # "CANCELLED by 0"
    if state not in FINAL_STATES:
        return JobEnd(UNKNOWN, 1, f"{forgotten}; sacct says {state}")
    return _job_end(state, exit_field.strip())


class _ControllerUnreachable(Exception):
    """scontrol failed for another reason than an unknown job id (slurmctld busy or restarting)."""


#: Pending reasons (Slurm's job reason codes) that no other job's end can clear: the request
#: itself is beyond what its partition, account or QOS allows, or its dependency failed. Such
#: a job pends until someone cancels it; ``--wait`` would wait with it forever.
NEVER_STARTS = {
    "PartitionNodeLimit": "it asks for more nodes than its partition has or allows",
    "PartitionTimeLimit": "its --time is beyond its partition's time limit",
    "BadConstraints": "no node can satisfy its constraints",
    "InvalidAccount": "its account is invalid",
    "InvalidQOS": "its QOS is invalid",
    "AccountNotAllowed": "its account may not use this partition",
    "DependencyNeverSatisfied": "a job it depends on ended in a way that can never satisfy it",
}
#: Per-job limits of a QOS or an association (QOSMaxNodePerJobLimit, AssocMaxWallDurationPerJobLimit...).
_PER_JOB_LIMIT = re.compile(r"^(QOS|Assoc)Max\w*PerJob\w*$")


def never_starts(fields: Dict[str, str], partition_nodes: Callable[[str], Optional[int]]) -> str:
    """Why a pending job can never start (one phrase), or "" while it may still start.

    PartitionNodeLimit and PartitionConfig ("Requested partition configuration not available
    now", the first reason a too-large job gets) also show while too many of a partition's
    nodes are down or drained, which can clear: they count only when the job asks for more
    nodes than the partition has at all (``partition_nodes``: its TotalNodes, None if unknown)."""
    if fields.get("JobState") != "PENDING":
        return ""
    reason = fields.get("Reason", "")
    if reason in ("PartitionNodeLimit", "PartitionConfig"):
        wanted = int(re.match(r"\d*", fields.get("NumNodes", "")).group() or 0)
        total = partition_nodes(fields.get("Partition", "").split(",")[0])
        if total is None or wanted <= total:
            return ""
        return f"{reason}: it asks for {wanted} nodes and partition {fields.get('Partition')} has {total}"
    if reason in NEVER_STARTS:
        return f"{reason}: {NEVER_STARTS[reason]}"
    if _PER_JOB_LIMIT.match(reason):
        return f"{reason}: it is beyond a per-job limit of its QOS or association"
    return ""


def partition_total_nodes(scontrol: str) -> Callable[[str], Optional[int]]:
    """``scontrol show partition``'s TotalNodes, asked once per partition."""
    known: Dict[str, Optional[int]] = {}

    def total(partition: str) -> Optional[int]:
        if partition not in known:
            out = subprocess.run([scontrol, "show", "partition", "-o", partition], capture_output=True, text=True)
            value = _scontrol_fields(out.stdout).get("TotalNodes", "") if out.returncode == 0 else ""
            known[partition] = int(value) if value.isdigit() else None
        return known[partition]

    return total


def cancel_never_starting(job_id: str, why: str) -> JobEnd:
    """scancel a job that can never start; its end says why, in one line."""
    scancel = shutil.which("scancel")
    result = subprocess.run([scancel, job_id], capture_output=True, text=True) if scancel else None
    if result is not None and result.returncode == 0:
        return JobEnd("CANCELLED", 1, f"it can never start ({why}): cancelled it", started=False)
    failed = " ".join(result.stderr.split()) if result is not None else "scancel not found"
    return JobEnd(UNKNOWN, 1, f"it can never start ({why}), and scancel failed ({failed}): cancel it yourself",
                  started=False)


def poll_slurm_job(job_id: str, scontrol: str,
                   partition_nodes: Optional[Callable[[str], Optional[int]]] = None) -> Optional[JobEnd]:
    """The job's end, or None while it may still run; a pending job that can never start is cancelled."""
    result = subprocess.run([scontrol, "show", "job", "-o", job_id], capture_output=True, text=True)
    if result.returncode != 0:
        message = " ".join(result.stderr.split())
        if "invalid job id" in message.lower():
            return sacct_job_end(job_id)
        raise _ControllerUnreachable(message or f"scontrol exit code {result.returncode}")
    fields = _scontrol_fields(result.stdout)
    state = fields.get("JobState", "")
    hopeless = never_starts(fields, partition_nodes or partition_total_nodes(scontrol))
    if hopeless:
        return cancel_never_starting(job_id, hopeless)
    if state not in FINAL_STATES:
        return None
    end = _job_end(state, fields.get("ExitCode", "0:0"))
    why = fields.get("Reason", "None")
    return end._replace(reason=f"Slurm's reason: {why}") if state != "COMPLETED" and why not in ("None", "", "NonZeroExitCode") else end


def wait_slurm_jobs(job_ids: List[str], poll: float = 0.25, max_poll: float = 2.0,
                    sleep: Callable[[float], None] = time.sleep,
                    on_end: Callable[[str, JobEnd], None] = lambda job_id, end: None,
                    controller_grace: float = 300.0,
                    clock: Callable[[], float] = time.monotonic) -> Dict[str, JobEnd]:
    """Poll all jobs together until each has ended (one at a time would let scontrol purge the others).

    A job pending for a reason that can never clear (:func:`never_starts`) is cancelled and
    ends CANCELLED, exit code 1, with the reason. A controller that does not answer is
    retried for ``controller_grace`` seconds, then the job is UNKNOWN (it may still run:
    the reason says so)."""
    scontrol = require_program("scontrol")
    partition_nodes = partition_total_nodes(scontrol)
    ends: Dict[str, JobEnd] = {}
    failing_since: Dict[str, float] = {}
    while len(ends) < len(job_ids):
        for job_id in job_ids:
            if job_id in ends:
                continue
            try:
                end = poll_slurm_job(job_id, scontrol, partition_nodes)
                failing_since.pop(job_id, None)
            except _ControllerUnreachable as exc:
                since = failing_since.setdefault(job_id, clock())
                end = None
                if clock() - since >= controller_grace:
                    end = JobEnd(UNKNOWN, 1, f"scontrol failed for {controller_grace:.0f} s ({exc}); the job may still run")
            if end is not None:
                ends[job_id] = end
                on_end(job_id, end)
        if len(ends) < len(job_ids):
            sleep(poll)
            poll = min(poll * 1.5, max_poll)
    return ends


def wait_slurm_job(job_id: str, **kwargs) -> JobEnd:
    """Poll until the job reaches a final state."""
    return wait_slurm_jobs([job_id], **kwargs)[job_id]


#: site=local batch jobs started by this process, by job id: their handles, so that
#: their exit codes are ours to collect (any later ``Popen`` reaps finished children
#: it does not know, and a pid alone then tells nothing).
_LOCAL_JOBS: Dict[str, subprocess.Popen] = {}

def wait_local_job(job_id: str) -> JobEnd:
    """Wait for a site=local batch job this process started."""
    proc = _LOCAL_JOBS.pop(job_id, None)
    if proc is None:  # not our child: nobody can tell us how it ended
        return JobEnd(UNKNOWN, 1, f"{job_id} was not started by this process: its exit code is unknown")
    code = exit_status(proc.wait())
    return JobEnd("COMPLETED" if code == 0 else "FAILED", code)
