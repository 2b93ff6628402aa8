"""Eager wrapper: start the job's cluster, run COMMAND against it, stop it.

    python -m toksearch_launch.cluster.eager --backend ray -- COMMAND [ARGS...]

The launcher wraps COMMAND this way for ``backend.start=eager``.  COMMAND runs
as a child with :meth:`Cluster.client_env` added (``RAY_ADDRESS`` + token path,
``SPARK_MASTER_URL`` + ``SPARK_CONF_DIR`` holding ``spark.master``, or
``DASK_SCHEDULER_ADDRESS`` + the ``DASK_DISTRIBUTED__COMM__TLS__*`` file paths),
so any Ray, PySpark or Dask program uses the cluster with a plain
``ray.init()`` / ``SparkSession.builder.getOrCreate()`` / ``Client()``;
TokSearch's ``job_cluster()`` attaches to it.  SIGTERM/SIGINT/SIGHUP are forwarded to COMMAND; the cluster is stopped
after COMMAND ends (or at once, if the signal comes while it is starting).
Exit status: COMMAND's (128+N if it died of signal N); 1 if the cluster could
not start (the reason on stderr).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from typing import Optional

from ..procutil import exit_status
from .backend import backend_names
from .errors import ClusterError
from .lifecycle import Cluster
from .site import default_local_config

EXIT_CLUSTER_FAILED = 1
_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print(f"usage: python -m toksearch_launch.cluster.eager --backend {{{','.join(backend_names())}}}"
              " -- COMMAND [ARGS...]", file=sys.stderr)
        return 2
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="toksearch_launch.cluster.eager")
    ap.add_argument("--backend", required=True, choices=backend_names())
    ap.add_argument("--run-dir", default=None)
    args = ap.parse_args(argv[:split])
    command = argv[split + 1 :]
    if not command:
        print("toksearch: eager: no COMMAND after --", file=sys.stderr)
        return 2

    from ..config import load_job_config

    cluster = Cluster(args.backend, load_job_config() or default_local_config(), run_dir=args.run_dir)
    cluster.signal_hooks = False  # ours below: forward to COMMAND, stop the cluster after it
    state: dict = {"child": None, "signal": 0, "tty": os.isatty(0)}

    def on_signal(signum: int, frame) -> None:  # noqa: ARG001
        state["signal"] = state["signal"] or signum
        child = state["child"]
        if child is None:
            cluster.stop()  # still starting: the start loop sees it and gives up
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

    previous = {sig: signal.signal(sig, on_signal) for sig in _SIGNALS}
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
        env = dict(os.environ)
        env.update(cluster.client_env())
        # With a terminal, COMMAND stays in our process group (job control, reading the tty);
        # without one it gets its own group, so a forwarded signal reaches its children too.
        kwargs = {} if state["tty"] else {"start_new_session": False, "process_group": 0}
        if sys.version_info < (3, 11) and not state["tty"]:
            kwargs = {"preexec_fn": os.setpgrp}
        try:
            state["child"] = subprocess.Popen(command, env=env, **kwargs)
        except OSError as exc:
            print(f"toksearch: cannot run {command[0]!r}: {exc.strerror}", file=sys.stderr)
            return 127
        return exit_status(state["child"].wait())
    finally:
        cluster.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
