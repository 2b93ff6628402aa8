"""Step wrapper: runs one cluster daemon on a SLURM node and owns its teardown there.

    srun --nodes=K --ntasks-per-node=1 --nodelist=NODES ... python -m toksearch_launch.cluster.node \\
        --spec RUN_DIR/steps/tsl-ab12cd-ray-worker.json

One task per node: the wrapper looks up its node (``SLURMD_NODENAME``, else the
host name) in the role's spec file, appends its output to that node's log, adds
the node's env, and runs as if called with that node's own options
(:func:`run_from_spec`); its last line is ``toksearch-node: exit=N host=NODE``.
The options themselves (site=local passes them directly)::

    python -m toksearch_launch.cluster.node \\
        --root /tmp/tsl-ab12cd --dir /tmp/tsl-ab12cd/r2 [--ip IP | --interface IF] [--ip-env VAR] \\
        [--check-ports 20010-20015,...] -- ray start ... --block

On the node it: resolves the node's address when only the node knows it
(``--interface``; replaces ``@NODE_IP@`` in the command), makes the 0700 temp
dir, writes the secret file (0600) from the environment, leases the daemon's ports on this node for its life (an flock per
64-port slot in /tmp/toksearch-ports, :func:`~.ports.lease_ports`; the owner
holds it on its own node) and checks they are free (exit 75 with a clear message
if not), prints one
line ``toksearch-node: host=... address=... step=JOB.STEP`` and starts the
daemon as its own session.  It watches the cluster's owner (``TOKSEARCH_CLUSTER_OWNER``):
on the owner's host (site=local: always; SLURM: the script's node) by the
parent-death signal and a poll of the owner's PID and create time; on any other
node through the owner's beacon (a TCP connection the owner's kernel closes at its
death, :func:`~.owner.watch_beacon`), so a daemon outlives a killed owner by about
a second, on every node, even while the allocation lives on.  A beacon that refuses the
connection on every address before the daemon's start means the owner is gone (it opens
its beacon before any step): the wrapper starts nothing, says so and exits 1, and as the
last wrapper of the root removes it.  On SIGUSR1 (the launcher signals its local srun,
which forwards it) or SIGTERM/SIGINT/SIGHUP (scancel, job end) it stops the
daemon's session with the package's one TERM -> grace -> KILL routine
(:func:`~.procs.terminate`), removes the temp dir, and reports whether
anything remained.  A daemon that exits while nobody asked it to stop is reported
at once: one line ``toksearch_launch: ROLE on NODE exited with code N while the job
ran (log: PATH)`` on stderr and a record in the run dir for the owner
(:mod:`.deaths`); then its session is stopped as above.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import Optional

from ..procutil import exit_status
from .auth import SECRET_FILE_ENV, SECRET_VALUE_ENV
from .deaths import EXITS_ENV, DaemonExit, exit_of, record_exit
from .dirs import make_private_dir, write_private
from .placement import NODE_IP, interface_address
from .ports import PortsLeased, busy_ports, expand_ports, lease_ports
from .owner import (BEACON_ENV, OWNER_ENV, OWNER_FILE, BeaconWatch, owner_alive, parse_owner,
                    set_parent_death_signal, watched_owner)
from .procs import ENV_MARK, Session, terminate
from .resources import fill_node_values, node_problems, shm_bytes, this_node_values

EXIT_PORTS_BUSY = 75
#: seconds between two checks that the cluster's owner still lives
OWNER_POLL = 0.5
#: seconds the daemon's start waits at most for the beacon's first answer (a refusal or a
#: greeting takes a round trip; only a beacon that does not answer costs this wait)
BEACON_ANSWER_WAIT = 2.0
#: in the cluster's root: every wrapper of the root holds a shared flock on it
WRAPPERS_LOCK = ".wrappers.lock"
PREFIX = "toksearch-node:"


def _say(msg: str) -> None:
    """One line in one write: the beacon's thread says its lines beside the main thread's."""
    sys.stdout.write(f"{PREFIX} {msg}\n")
    sys.stdout.flush()


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
    ap.add_argument("--ip-env", default=None, help="env var set to the node's address (e.g. SPARK_LOCAL_IP)")
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
    owner = watched_owner(os.environ)
    check_owner = {"now": False}
    if owner is not None:
        # the kernel's word when the owner is our parent (site=local); the poll below otherwise.
        # SIGUSR2 only prompts a check: the signal also comes when the parent *thread* ends.
        signal.signal(signal.SIGUSR2, lambda *_: check_owner.update(now=True))
        if os.getppid() == owner[0]:
            set_parent_death_signal(signal.SIGUSR2)
        if not owner_alive(*owner):
            _say(f"owner PID {owner[0]} is gone before the start on {host}")
            return 1
    beacon: Optional[BeaconWatch] = None  # the owner runs on another node: watched through its beacon
    if owner is None and os.environ.get(BEACON_ENV) and parse_owner(os.environ.get(OWNER_ENV, "")):
        beacon = BeaconWatch(os.environ[BEACON_ENV], os.environ[OWNER_ENV], _say)

    def owner_gone_now() -> bool:
        """Asked after a stop: a signal (the job's end) may come before the owner's death is seen."""
        if owner is not None:
            return not owner_alive(*owner)
        return beacon is not None and beacon.gone_at_teardown()

    try:
        ip = args.ip or (interface_address(args.interface) if args.interface else None)
    except Exception as exc:  # ClusterError: one line is enough
        _say(f"ERROR on {host}: {exc}")
        return 1
    if ip:
        cmd = [a.replace(NODE_IP, ip) for a in cmd]
    filled = fill_node_values(cmd, this_node_values())  # this node's CPUs, memory, GPUs, /dev/shm
    allocation = [f"{cmd[i - 1]} {new}" for i, new in enumerate(filled) if i and new != cmd[i]]
    cmd = filled
    problems = node_problems(cmd, shm_bytes(), host)
    if problems:  # before anything is made on the node; the launcher shows this line and the node
        _say(f"ERROR on {host}: {'; '.join(problems)}")
        return 1
    env = dict(os.environ)
    env[ENV_MARK] = args.dir  # teardown finds this daemon's processes by it, on this node only
    if args.ip_env and ip:
        env[args.ip_env] = ip

    for d in (args.root, args.dir):
        make_private_dir(d)
    presence = _announce(args.root)
    if beacon is not None and beacon.gone_before_start(BEACON_ANSWER_WAIT):
        _cleanup(args, None, orphaned=True, presence=presence)  # the last wrapper of the root removes it
        _say(f"owner {beacon.marker} is gone before the start on {host}: its beacon {beacon.beacon} refused "
             "the connection on every address; started nothing, nothing left (if the owner still runs, a firewall "
             "between the nodes rejects that port: site.owner_beacon=false turns the beacon off)")
        return 1
    secret_file = env.pop(SECRET_FILE_ENV, None)
    secret = env.pop(SECRET_VALUE_ENV, None)
    wrote_secret = False
    if secret_file and secret:
        write_private(secret_file, secret)
        wrote_secret = True

    lease = None
    if args.check_ports and not _owner_here(os.environ):  # on the owner's node the owner holds it
        try:
            lease = lease_ports(expand_ports(args.check_ports))  # held until this process exits
        except PortsLeased as exc:
            _say(f"ERROR: port {expand_ports(args.check_ports)[0]} is busy on {host}: {exc}")
            _cleanup(args, secret_file if wrote_secret else None, presence=presence)
            return EXIT_PORTS_BUSY
    busy = busy_ports(expand_ports(args.check_ports)) if args.check_ports else []
    if busy:
        _say(f"ERROR: port {busy[0]} is busy on {host} ({len(busy)} of the job's ports are taken)")
        _cleanup(args, secret_file if wrote_secret else None, presence=presence)
        return EXIT_PORTS_BUSY

    step = f"{os.environ.get('SLURM_JOB_ID', '-')}.{os.environ.get('SLURM_STEP_ID', '-')}"
    _say(f"host={host} address={ip or '?'} step={step} pid={os.getpid()}")
    if allocation:
        _say(f"from the allocation on {host}: {' '.join(allocation)}")
    if stop["signal"]:
        _cleanup(args, secret_file if wrote_secret else None, orphaned=owner_gone_now(), presence=presence)
        _say(f"signal {stop['signal']} before the daemon's start on {host}: started nothing, nothing left")
        return 128 + stop["signal"]
    child = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
    owner_gone = False
    next_check = time.monotonic()
    while child.poll() is None and not stop["signal"]:
        if beacon is not None and beacon.gone.is_set():
            owner_gone = True
            break
        if owner is not None and (check_owner["now"] or time.monotonic() >= next_check):
            check_owner["now"] = False
            next_check = time.monotonic() + OWNER_POLL
            if not owner_alive(*owner):
                owner_gone = True
                break
        time.sleep(0.1)
    rc = child.poll()
    if owner_gone:
        if owner is not None:
            _say(f"owner PID {owner[0]} is gone: stopping session {child.pid}")
        else:
            assert beacon is not None
            _say(f"owner {os.environ.get(OWNER_ENV)} is gone ({beacon.how}): stopping session {child.pid}")
    elif rc is None:
        _say(f"signal {stop['signal']}: stopping session {child.pid}")
    elif not stop["signal"]:  # nobody asked: the daemon died while the job ran
        report_exit(args.dir, rc, os.path.basename(cmd[0]), host)
    # short grace: a Ray worker whose head is gone ignores SIGTERM for a minute
    remaining = terminate([Session(child)], markers=[args.dir], grace=args.grace, kill_wait=3.0)
    orphaned = owner_gone or owner_gone_now()
    _cleanup(args, secret_file if wrote_secret else None, orphaned=orphaned, presence=presence)
    if lease is not None:
        lease.release()  # only now: the daemon held these ports until its teardown
    if remaining:
        _say(f"ERROR: processes left on {host}: {sorted(remaining)}")
    else:
        _say(f"stopped on {host}; nothing left")
    if stop["signal"] or owner_gone:
        return 0
    return exit_status(rc)


def report_exit(node_dir: str, returncode: int, fallback_role: str, host: str) -> DaemonExit:
    """The daemon exited unasked: one line on stderr (its log) and a record in the run dir,
    which the owner's :class:`~.deaths.DeathWatch` shows on the owner's stderr at once."""
    ex = exit_of(node_dir, returncode, os.environ, fallback_role, host)
    print(ex.line(), file=sys.stderr, flush=True)
    record_exit(os.environ.get(EXITS_ENV), ex)
    return ex


def _owner_here(env: "os._Environ[str]") -> bool:
    """The cluster's owner runs on this node (it leased the block here itself)."""
    parts = parse_owner(env.get(OWNER_ENV, ""))
    return parts is not None and parts[0] == socket.gethostname()


def _announce(root: str) -> Optional[int]:
    """Hold a shared lock on ``<root>/.wrappers.lock`` for the wrapper's life: the last wrapper
    of a dead owner is the one that can then take it exclusively."""
    try:
        fd = os.open(os.path.join(root, WRAPPERS_LOCK), os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)
        return fd
    except OSError:
        return None


def _last_wrapper(fd: Optional[int]) -> bool:
    """True if no other wrapper of this root still runs (each holds the shared lock)."""
    if fd is None:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _cleanup(args: argparse.Namespace, secret_file: Optional[str], orphaned: bool = False,
             presence: Optional[int] = None) -> None:
    """Remove the daemon's dir and secret; the root too once empty, or once this is the last wrapper
    of the root and no owner still uses it: its owner is gone (orphaned), or the root has no owner
    file (another node's root: the owner's file is on the owner's node)."""
    shutil.rmtree(args.dir, ignore_errors=True)
    if secret_file:
        try:
            os.unlink(secret_file)
        except OSError:
            pass
    ownerless = not os.path.lexists(os.path.join(args.root, OWNER_FILE))
    if (orphaned or ownerless) and _last_wrapper(presence):
        shutil.rmtree(args.root, ignore_errors=True)  # nobody else would remove it
    try:
        os.rmdir(args.root)  # only if empty: on the script's node the launcher still uses it
    except OSError:
        pass


# ------------------------------------------------------------------ one step, many nodes: pick this node


def this_node_name(env: "dict[str, str] | os._Environ[str]") -> str:
    """The node this task runs on, by Slurm's name for it (``SLURMD_NODENAME``), else the host name."""
    return env.get("SLURMD_NODENAME") or socket.gethostname()


def node_entry(spec: dict, node: str) -> Optional[dict]:
    """Pure: this node's entry of a role's spec (by its name, or its short name)."""
    nodes = spec.get("nodes", {})
    return nodes.get(node) or nodes.get(node.split(".")[0])


def run_from_spec(path: str, node: Optional[str] = None) -> int:
    """Run this node's part of a role's step: its log, its env, its own options (:func:`main`)."""
    node = node or this_node_name(os.environ)
    try:
        with open(path) as fh:
            spec = json.load(fh)
    except (OSError, ValueError) as exc:
        _say(f"ERROR on {node}: cannot read the step's spec {path}: {exc}")
        return 2
    entry = node_entry(spec, node)
    if entry is None:
        _say(f"ERROR: node {node} has no entry in {path} (nodes: {', '.join(sorted(spec.get('nodes', {})))})")
        return 2
    try:
        fd = os.open(entry["log"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:  # srun's step log shows this line (the run dir must be shared)
        _say(f"ERROR on {node}: cannot open its log {entry['log']}: {exc.strerror}")
        return 2
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)  # this node's own log: the wrapper's lines, then its daemon's output
    os.dup2(fd, 2)
    os.close(fd)
    os.environ.update(entry.get("env", {}))
    rc = 1
    try:
        rc = main(list(entry["argv"]))
        return rc
    finally:
        _say(f"exit={rc} host={node}")


def entry_point(argv: Optional[list[str]] = None) -> int:
    """``--spec FILE [--node NAME]`` (one task of a role's step), else the node's own options."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--spec"] and len(argv) >= 2:
        node = argv[3] if argv[2:3] == ["--node"] and len(argv) >= 4 else None
        return run_from_spec(argv[1], node)
    return main(argv)


if __name__ == "__main__":
    sys.exit(entry_point())
