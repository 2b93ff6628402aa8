"""Eager wrapper: start the job's cluster, run COMMAND against it, stop it.

    python -m toksearch_launch.cluster.eager --backend ray -- COMMAND [ARGS...]

The launcher wraps COMMAND this way for ``backend.start=eager``.  COMMAND runs
as a child with :meth:`Cluster.client_env` added (``RAY_ADDRESS`` + token path,
``SPARK_MASTER_URL`` + ``SPARK_CONF_DIR`` holding ``spark.master``, or
``DASK_SCHEDULER_ADDRESS`` + the ``DASK_DISTRIBUTED__COMM__TLS__*`` file paths),
so any Ray, PySpark or Dask program uses the cluster with a plain
``ray.init()`` / ``SparkSession.builder.getOrCreate()`` / ``Client()``;
TokSearch's ``job_cluster()`` attaches to it.  SIGTERM/SIGINT/SIGHUP are
forwarded to COMMAND's process group, SIGUSR1 (the time-limit warning) to
COMMAND alone; the cluster is stopped after COMMAND ends (or at once, if a stop
signal comes while it is starting).  Exit status: COMMAND's (128+N if it died
of signal N); 1 if the cluster could not start (the reason on stderr).

``--start background`` (``backend.start=background``): the start runs in a
thread while COMMAND runs at once as a child (:mod:`.background`); COMMAND's
``job_cluster()`` waits for what remains of it.  No address is exported (none is
known before the start ends).  Signals go to COMMAND as above (SIGUSR1 too,
even during the start); when COMMAND ends, a start still running is stopped, or
the cluster, used or not.  Exit status: COMMAND's, whether the start worked or not.

Ray, ``python SCRIPT ARGS`` or ``python -m MODULE ARGS`` with this very
interpreter: the script runs *here*, after ``ray.init(address=...)``, so a
program that guards its own init the way TokSearch does (``if not
ray.is_initialized(): ray.init(_temp_dir=..., ...)``) uses the job's cluster
instead of failing to find a local node with that temp dir.  It runs as Python
would run it (``__main__``, ``sys.argv``, ``sys.path[0]``, the exit status of
``SystemExit``, a traceback and status 1 for an exception); signals reach its
own handlers; the cluster stops when the interpreter exits, after the script's
threads and atexit handlers, as in lazy mode.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import runpy
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Callable, Optional, Sequence

from ..config import RUN_DIR_ENV
from ..procutil import die_by_signal, exit_status
from .backend import backend_names
from .background import BackgroundStart, start_env, status_path
from .errors import ClusterError
from .lifecycle import Cluster
from .site import default_local_config

EXIT_CLUSTER_FAILED = 1
#: What Python itself exits with after an uncaught KeyboardInterrupt, as a shell reports it.
EXIT_INTERRUPTED = 128 + signal.SIGINT
#: Stop signals: forwarded to COMMAND's process group (while starting: stop the start).
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
#: Slurm's time-limit warning (docs/durability.md): for COMMAND alone, never a reason to stop.
_WARNING_SIGNAL = signal.SIGUSR1
_SIGNALS = (*_STOP_SIGNALS, _WARNING_SIGNAL)


@dataclass(frozen=True)
class PythonTarget:
    """A ``python SCRIPT ARGS`` (kind ``script``) or ``python -m MODULE ARGS`` (kind ``module``)."""

    kind: str
    name: str
    args: tuple[str, ...]


def _environment_of(interpreter: str) -> str:
    """The venv an interpreter path starts in (a ``pyvenv.cfg`` beside it or one level up, where
    Python's start-up looks), "" for none: a venv's python is a symlink to the base one."""
    here = os.path.dirname(interpreter)
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "pyvenv.cfg")):
            return os.path.realpath(folder)
    return ""


def same_interpreter(program: str, executable: str = sys.executable) -> bool:
    """Would exec'ing ``program`` (looked up on PATH as exec does) start this very Python: the
    same binary in the same environment?"""
    found = shutil.which(program)
    if not found or not executable:
        return False
    mine, theirs = os.path.abspath(executable), os.path.abspath(found)
    return os.path.realpath(mine) == os.path.realpath(theirs) and _environment_of(mine) == _environment_of(theirs)


def _module_found(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def python_target(command: Sequence[str], executable: str = sys.executable) -> Optional[PythonTarget]:
    """The script or module COMMAND runs, if this interpreter can run it itself; else None.

    Only the plain forms: any interpreter option (``-u``, ``-X``, ``-c`` ...), a
    missing script or module, or another Python keep the child process (which
    then reports its own errors as Python does)."""
    if len(command) < 2 or not same_interpreter(command[0], executable):
        return None
    if command[1] == "-m":
        if len(command) < 3 or not _module_found(command[2]):
            return None
        return PythonTarget("module", command[2], tuple(command[3:]))
    if command[1].startswith("-") or not os.path.isfile(command[1]):
        return None
    return PythonTarget("script", command[1], tuple(command[2:]))


def _from_the_script(tb: Optional[TracebackType]) -> Optional[TracebackType]:
    """Drop this wrapper's and runpy's frames: the traceback starts in the script, as Python's."""
    ours = {os.path.abspath(__file__), os.path.abspath(runpy.__file__), "<frozen runpy>"}
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name not in ours and os.path.abspath(name) not in ours:
            break
        tb = tb.tb_next
    return tb


def run_python(target: PythonTarget) -> int:
    """Run the script / module in this interpreter as ``python`` would; its exit status.

    SystemExit is not caught: it ends the wrapper exactly as it would end
    ``python`` (status, message).  Any other exception: Python's traceback on
    stderr (from the script's first frame) and status 1 (130 for Ctrl-C)."""
    try:
        if target.kind == "module":
            sys.argv = [target.name, *target.args]  # run_module puts the module's file in argv[0]
            sys.path[0] = os.getcwd()
            runpy.run_module(target.name, run_name="__main__", alter_sys=True)
        else:
            path = os.path.abspath(target.name)
            sys.argv = [path, *target.args]
            sys.path[0] = os.path.dirname(os.path.realpath(path))
            runpy.run_path(path, run_name="__main__")
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - as Python's top level: print it, exit non-zero
        tb = _from_the_script(exc.__traceback__)
        sys.excepthook(type(exc), exc.with_traceback(tb), tb)  # Python prints the exception's own
        return EXIT_INTERRUPTED if isinstance(exc, KeyboardInterrupt) else 1
    return 0


def _stop_then_default(cluster: Cluster):
    """A handler for a signal whose default action kills: stop the cluster, then die by it.
    The script's own handler, once installed (the pipeline's SIGUSR1), replaces it."""

    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001
        cluster.stop()
        die_by_signal(signum)

    return handler


def _run_here(cluster: Cluster, target: PythonTarget, previous: dict, state: dict) -> int:
    """Connect Ray in this process, then run the script in it (the cluster stops at exit)."""
    for sig, handler in previous.items():
        signal.signal(sig, handler)  # the script sees signals as it would without the wrapper
    signal.signal(_WARNING_SIGNAL, _stop_then_default(cluster))
    try:  # connect() chains the cluster's SIGTERM/SIGHUP teardown in front of Ray's own handler
        cluster.connect()
    except Exception as exc:  # noqa: BLE001 - one line, then the wrapper stops the cluster
        print(f"toksearch: cannot connect to the ray cluster at {cluster.address}: {exc}", file=sys.stderr)
        return EXIT_CLUSTER_FAILED
    state["here"] = True  # from now on the exit hooks stop the cluster, after the script's own
    os.environ.update(cluster.client_env())  # as the child would get it (job_cluster(), subprocesses)
    return run_python(target)


def _run_child(command: list[str], extra_env: dict[str, str], state: dict) -> int:
    env = dict(os.environ)
    env.update(extra_env)
    # With a terminal, COMMAND stays in our process group (job control, reading the tty);
    # without one it gets its own group, so a forwarded signal reaches its children too.
    kwargs: dict = {} if state["tty"] else {"process_group": 0}
    if sys.version_info < (3, 11) and not state["tty"]:
        kwargs = {"preexec_fn": os.setpgrp}
    try:
        state["child"] = subprocess.Popen(command, env=env, **kwargs)
    except OSError as exc:
        print(f"toksearch: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127
    return exit_status(state["child"].wait())


def _signal_handler(stop_start: Callable[[], None], state: dict):
    """Before COMMAND runs: a stop signal stops the start, SIGUSR1 is noted; then: forward to COMMAND."""

    def on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001
        child = state["child"]
        if signum == _WARNING_SIGNAL:
            if child is None:
                print("toksearch: SIGUSR1 (time-limit warning) came while the cluster was starting: "
                      "COMMAND will not see it", file=sys.stderr, flush=True)
            elif child.poll() is None:
                try:
                    child.send_signal(signum)  # COMMAND alone, as Slurm's B: signal would
                except ProcessLookupError:
                    pass
            return
        state["signal"] = state["signal"] or signum
        if child is None:
            stop_start()  # COMMAND not started yet: the start loop sees it and gives up
            return
        if child.poll() is not None:
            return
        if signum == signal.SIGINT and state["tty"]:
            return  # the terminal already sent it to COMMAND (same process group)
        try:
            if state["tty"]:
                child.send_signal(signum)
            else:
                os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    return on_signal


def _parse(argv: list[str]) -> "tuple[argparse.Namespace, list[str]] | int":
    if "--" not in argv:
        print(f"usage: python -m toksearch_launch.cluster.eager --backend {{{','.join(backend_names())}}}"
              " -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="toksearch_launch.cluster.eager")
    ap.add_argument("--backend", required=True, choices=backend_names())
    ap.add_argument("--run-dir", default=None)
    ap.add_argument("--start", choices=("eager", "background"), default="eager",
                    help="eager: the cluster is ready before COMMAND; background: started while COMMAND runs")
    args = ap.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        print("toksearch: eager: no COMMAND after --", file=sys.stderr)
        return 2
    return args, command


def main(argv: Optional[list[str]] = None) -> int:
    parsed = _parse(sys.argv[1:] if argv is None else argv)
    if isinstance(parsed, int):
        return parsed
    args, command = parsed

    from ..config import load_job_config

    cfg = load_job_config() or default_local_config()
    if args.start == "background":
        return run_background(args.backend, cfg, command, args.run_dir)
    cluster = Cluster(args.backend, cfg, run_dir=args.run_dir)
    cluster.signal_hooks = False  # ours below: forward to COMMAND, stop the cluster after it
    state: dict = {"child": None, "signal": 0, "tty": os.isatty(0), "here": False}
    previous = {sig: signal.signal(sig, _signal_handler(cluster.stop, state)) for sig in _SIGNALS}
    try:
        try:
            cluster.start()
        except (ClusterError, OSError) as exc:
            if state["signal"]:
                return 128 + state["signal"]
            print(f"toksearch: the {args.backend} cluster did not start: {exc}", file=sys.stderr)
            return EXIT_CLUSTER_FAILED
        if state["signal"]:
            return 128 + state["signal"]
        target = python_target(command) if args.backend == "ray" else None
        if target is None:
            return _run_child(command, cluster.client_env(), state)
        return _run_here(cluster, target, previous, state)
    finally:
        if not state["here"]:
            cluster.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_background(backend: str, cfg: Any, command: list[str], run_dir: Optional[str]) -> int:
    """Start the cluster in a thread and run COMMAND at once; after COMMAND, stop whatever
    started.  COMMAND's exit status, whatever became of the start."""
    import tempfile

    run_dir = run_dir or os.environ.get(RUN_DIR_ENV) or tempfile.mkdtemp(prefix="toksearch-run-")
    cluster = Cluster(backend, cfg, run_dir=run_dir)
    cluster.signal_hooks = False  # ours: forward to COMMAND, stop the cluster after it
    starter = BackgroundStart(cluster, status_path(run_dir, backend))
    state: dict = {"child": None, "signal": 0, "tty": os.isatty(0), "here": False}
    previous = {sig: signal.signal(sig, _signal_handler(starter.interrupt, state)) for sig in _SIGNALS}
    try:
        starter.begin()
        if state["signal"]:
            return 128 + state["signal"]
        return _run_child(command, {start_env(backend): str(starter.path)}, state)
    finally:
        starter.finish()  # the start stopped if still running, then the cluster: nothing left
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
