"""Step wrapper: runs one cluster daemon on a SLURM node and owns its teardown there.

    srun --nodes=1 --ntasks=1 -w NODE ... python -m toksearch_launch.cluster.node \\
        --root /tmp/tsl-ab12cd --dir /tmp/tsl-ab12cd/r2 [--ip IP | --interface IF] [--spark] \\
        [--check-ports 20010-20015,...] -- ray start ... --block

On the node it: resolves the node's address when only the node knows it
(``--interface``; replaces ``@NODE_IP@`` in the command), makes the 0700 temp
dir, writes the secret file (0600) from the environment, checks the daemon's
ports are free on this node (exit 75 with a clear message if not), prints one
line ``toksearch-node: host=... address=... step=JOB.STEP`` and starts the
daemon as its own session.  On SIGUSR1 (the launcher signals its local srun,
which forwards it) or SIGTERM/SIGINT/SIGHUP (scancel, job end) it SIGTERMs the
daemon's session leader, SIGKILLs what is left in that session after a grace period, removes
the temp dir, and reports whether anything remained.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

from .placement import NODE_IP, interface_address
from .plan import SECRET_FILE_ENV, SECRET_VALUE_ENV, expand_ports, write_private
from .ports import busy_ports
from .procs import ENV_MARK, members

EXIT_PORTS_BUSY = 75
PREFIX = "toksearch-node:"


def _say(msg: str) -> None:
    print(f"{PREFIX} {msg}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: python -m toksearch_launch.cluster.node [options] -- COMMAND ...", file=sys.stderr)
        return 2
    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="toksearch_launch.cluster.node")
    ap.add_argument("--root", required=True)
    ap.add_argument("--dir", required=True)
    ap.add_argument("--ip")
    ap.add_argument("--interface")
    ap.add_argument("--spark", action="store_true")
    ap.add_argument("--check-ports", default="")
    # short: a Ray worker whose head is gone ignores SIGTERM for a minute, and scancel
    # SIGKILLs the whole step after KillWait (30 s by default, 5 s on our CI cluster)
    ap.add_argument("--grace", type=float, default=3.0)
    args = ap.parse_args(argv[:split])
    cmd = argv[split + 1 :]
    host = socket.gethostname()

    stop = {"signal": 0}

    def on_signal(signum: int, frame) -> None:  # noqa: ARG001
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1):
        signal.signal(sig, on_signal)

    try:
        ip = args.ip or (interface_address(args.interface) if args.interface else None)
    except Exception as exc:  # ClusterError: one line is enough
        _say(f"ERROR on {host}: {exc}")
        return 1
    if ip:
        cmd = [a.replace(NODE_IP, ip) for a in cmd]
    env = dict(os.environ)
    env[ENV_MARK] = args.dir  # teardown finds this daemon's processes by it, on this node only
    if args.spark and ip:
        env["SPARK_LOCAL_IP"] = ip

    for d in (args.root, args.dir):
        os.makedirs(d, mode=0o700, exist_ok=True)
        os.chmod(d, 0o700)
    secret_file = env.pop(SECRET_FILE_ENV, None)
    secret = env.pop(SECRET_VALUE_ENV, None)
    wrote_secret = False
    if secret_file and secret:
        write_private(secret_file, secret)
        wrote_secret = True

    busy = busy_ports(expand_ports(args.check_ports)) if args.check_ports else []
    if busy:
        _say(f"ERROR: port {busy[0]} is busy on {host} ({len(busy)} of the job's ports are taken)")
        _cleanup(args, secret_file if wrote_secret else None)
        return EXIT_PORTS_BUSY

    step = f"{os.environ.get('SLURM_JOB_ID', '-')}.{os.environ.get('SLURM_STEP_ID', '-')}"
    _say(f"host={host} address={ip or '?'} step={step} pid={os.getpid()}")
    if stop["signal"]:
        _cleanup(args, secret_file if wrote_secret else None)
        return 128 + stop["signal"]
    child = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    while child.poll() is None and not stop["signal"]:
        time.sleep(0.1)
    rc = child.poll()
    sid = child.pid
    if rc is None:
        _say(f"signal {stop['signal']}: stopping session {sid}")
        child.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + args.grace
    termed: set[int] = set()
    while time.monotonic() < deadline:
        child.poll()
        if child.returncode is not None:
            left = members({sid}, [args.dir])
            if not left:
                break
            for pid in set(left) - termed:  # the leader is gone: SIGTERM the stragglers once
                try:
                    os.kill(pid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
            termed.update(left)
        time.sleep(0.05)
    left = members({sid}, [args.dir])
    if child.poll() is None:
        left.append(child.pid)
    for pid in set(left):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and (child.poll() is None or members({sid}, [args.dir])):
        time.sleep(0.05)
    remaining = members({sid}, [args.dir])
    _cleanup(args, secret_file if wrote_secret else None)
    if remaining:
        _say(f"ERROR: processes left on {host}: {sorted(remaining)}")
    else:
        _say(f"stopped on {host}; nothing left" + (f" (killed {len(set(left))})" if left else ""))
    if stop["signal"]:
        return 0
    return rc if rc is not None and rc >= 0 else 128 + (-(rc or 0))


def _cleanup(args: argparse.Namespace, secret_file: Optional[str]) -> None:
    shutil.rmtree(args.dir, ignore_errors=True)
    if secret_file:
        try:
            os.unlink(secret_file)
        except OSError:
            pass
    try:
        os.rmdir(args.root)  # only if empty: on the script's node the launcher still uses it
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
