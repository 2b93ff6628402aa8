"""The step Launcher protocol: how a role's daemons are run on their nodes, signalled and stopped.

Two launchers, chosen by ``site.scheduler``:

* :class:`LocalLauncher`: each daemon is a process of this machine (site=local),
  under the same step wrapper, which ties its life to its owner's;
* :class:`SrunLauncher`: each role (the head; all the workers) is ONE SLURM job
  step, ``srun --nodes=K --ntasks-per-node=1 --nodelist=<its nodes>``, whose
  task on each node is the step wrapper (``python -m toksearch_launch.cluster.node
  --spec FILE``).  The wrapper finds its node's entry in the role's spec file (by
  node name), writes its own log, resolves what only the node knows, checks its
  ports, writes its secret file and owns the daemon's teardown on that node.

A :class:`~.procs.Daemon` is still one per node: on SLURM the daemons of a role
share one :class:`Step` (one local ``srun`` client, the session leader that the
teardown signals), and each learns its own exit, address and step id from its
node's log.  The lifecycle holds one launcher and never asks which.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol

from .auth import SECRET_FILE_ENV, SECRET_VALUE_ENV
from .backend import NodeCommand, Role
from .dirs import make_private_dir, write_private
from .owner import OWNER_ENV, owner_env, this_owner
from .placement import placeholder_address
from .ports import compress_ports
from .procs import Daemon, display

if TYPE_CHECKING:
    from .plan import ClusterPlan

WRAPPER_MODULE = "toksearch_launch.cluster.node"
#: the wrapper's own lines start with this (``toksearch-node: host=... address=... step=...``)
WRAPPER_PREFIX = "toksearch-node:"


class Launcher(Protocol):
    """Spawn a role on its nodes, tell whether each daemon lives, ask it to stop, cancel it."""

    def daemons(self, role: Role) -> list[Daemon]:
        """The daemons of ``role``, with the exact argv each node runs (nothing started: the dry run)."""
    def spawn(self, role: Role, env: dict[str, str]) -> list[Daemon]:
        """Start every daemon of ``role`` in one call (SLURM: one step for its K nodes; local: one
        process per node), each under a session leader."""
    def watch(self, daemon: Daemon) -> None:
        """While starting: learn what only the node knows (its address, its step)."""
    def exit_code(self, daemon: Daemon) -> Optional[int]:
        """That node's exit code (not its step's, which other nodes share); None while it runs."""
    def signal_stop(self, daemons: list[Daemon]) -> None:
        """Ask each to stop cleanly."""
    def cancel(self, daemon: Daemon) -> None:
        """Still running after the grace period: force it (before SIGKILL of what is left)."""
    def stop_warnings(self, daemons: list[Daemon]) -> list[str]:
        """After the stop: what the nodes did not confirm."""


class _SessionLauncher:
    """What both launchers share: each daemon is one local child, started as a session leader."""

    def __init__(self, plan: "ClusterPlan") -> None:
        self.plan = plan

    def daemons(self, role: Role) -> list[Daemon]:
        raise NotImplementedError

    def spawn(self, role: Role, env: dict[str, str]) -> list[Daemon]:
        out = self.daemons(role)
        owner = this_owner()  # the wrapper stops its daemon once this process is gone
        for d in out:
            d.env[OWNER_ENV] = owner
            d.spawn(env)
        return out

    def exit_code(self, daemon: Daemon) -> Optional[int]:
        return daemon.returncode()


class LocalLauncher(_SessionLauncher):
    """Daemons as processes of this machine, each under the step wrapper (which stops its
    daemon when the owner dies, whatever killed it); SIGTERM to stop, SIGKILL (by the caller)
    to force."""

    def wrapper_argv(self, node: NodeCommand) -> list[str]:
        """The wrapper's part (before ``--``): the same options as on SLURM (:func:`wrapper_options`)."""
        return [*wrapper_command(), *wrapper_options(self.plan, node)]

    def daemons(self, role: Role) -> list[Daemon]:
        """The daemons' own argv (the dry run shows them); each runs under the wrapper."""
        out = []
        for node in role.nodes:
            d = _daemon(role, node, list(node.argv), dict(node.env))
            d.wrapper = self.wrapper_argv(node)
            out.append(d)
        return out

    def watch(self, daemon: Daemon) -> None:
        pass

    def signal_stop(self, daemons: list[Daemon]) -> None:
        _signal(daemons, signal.SIGTERM)

    def cancel(self, daemon: Daemon) -> None:
        pass  # the caller SIGKILLs the session

    def stop_warnings(self, daemons: list[Daemon]) -> list[str]:
        return []


def wrapper_command() -> list[str]:
    """The step wrapper, run by this interpreter (the same venv on every node)."""
    return [sys.executable, "-m", WRAPPER_MODULE]


def wrapper_options(plan: "ClusterPlan", node: NodeCommand) -> list[str]:
    """The step wrapper's options for one node (before ``--``), the same for both launchers.

    No port check on site=local (the owner checked and reserved the whole block on this
    machine) nor in the dry run (no ports are known).
    """
    opts = ["--root", plan.root, "--dir", node.node_dir]
    rule = plan.cfg.site.address
    if node.address:
        opts += ["--ip", node.address]
    elif plan.dry_run and rule.method != "interface":
        opts += ["--ip", placeholder_address(node.host)]
    else:
        opts += ["--interface", rule.interface]
    if plan.engine.node_ip_env:
        opts += ["--ip-env", plan.engine.node_ip_env]
    if not plan.dry_run and plan.scheduler != "local":
        opts += ["--check-ports", compress_ports(node.ports)]
    return opts


# ------------------------------------------------------------------ SLURM: one step per role


def step_argv(hosts: list[str], srun_options: list[str], spec_path: "str | Path") -> list[str]:
    """Pure: the one ``srun`` that starts a role on all of ``hosts``, one task per node.

    ``--ntasks`` too: inside the script's own step srun reads its ``SLURM_NTASKS=1`` and
    would shrink the step to one node.  ``--kill-on-bad-exit=0`` and ``--wait=0``: one
    node's daemon ending does not end the others' (a site's ``KillOnBadExit`` /
    ``WaitTime`` would); the role's configured
    options come after ours, so they win.  Each task is the step wrapper, which picks its
    node's entry of ``spec_path`` by node name.
    """
    import hostlist  # pure; the dry run stays light

    return [
        "srun", f"--nodes={len(hosts)}", f"--ntasks={len(hosts)}", "--ntasks-per-node=1",
        f"--nodelist={hostlist.collect_hostlist(hosts)}",
        "--export=ALL", "--kill-on-bad-exit=0", "--wait=0", "--label",
        *map(str, srun_options), *wrapper_command(), "--spec", str(spec_path),
    ]


def split_env(envs: dict[str, dict[str, str]]) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Pure: (what every node's env shares, what each node adds): the shared part travels in the
    step's environment (secrets included, as before), only the differences in the spec file."""
    if not envs:
        return {}, {}
    first, *rest = envs.values()
    common = {k: v for k, v in first.items() if all(e.get(k) == v for e in rest)}
    return common, {h: {k: v for k, v in e.items() if k not in common} for h, e in envs.items()}


def step_spec(role: str, entries: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Pure: the spec file's content: per node name, the wrapper's argv, its extra env, its log."""
    return {"role": role, "nodes": entries}


@dataclass
class Step:
    """One SLURM step running a whole role: one local ``srun`` client (a session leader), its own
    log (srun's messages, and what a task printed before its wrapper took over its log), and the
    spec file every task of it reads."""

    role: str
    argv: list[str]
    log_path: Path
    spec_path: Path
    hosts: list[str]
    proc: Optional[subprocess.Popen] = None
    started_at: float = 0.0
    step_id: Optional[str] = None
    #: node -> exit code, from srun's ``srun: error: NODE: task K: Exited with exit code N``
    task_exits: dict[str, int] = field(default_factory=dict)
    cancelled: bool = False
    _offset: int = 0

    def spawn(self, env: dict[str, str]) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"==== toksearch {time.strftime('%Y-%m-%d %H:%M:%S')}: {display(self.argv)}\n".encode())
            log.flush()
            self._offset = log.tell()
            self.started_at = time.monotonic()
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True, close_fds=True)

    def follow(self) -> None:
        """Read srun's new lines: which node's task ended, and how."""
        text, self._offset = _new_lines(self.log_path, self._offset)
        self.task_exits.update(srun_task_exits(text))

    def tail(self, n: int = 10) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        mark = text.rfind("==== toksearch ")
        lines = [ln for ln in text[text.find("\n", mark) + 1 if mark >= 0 else 0:].splitlines() if ln.strip()]
        return "\n".join(lines[-n:]) if lines else "(nothing from srun)"


_SRUN_TASK_END = re.compile(r"^srun: error: (\S+): tasks? [\d,\-]+: (.*)$", re.M)
_SIGNAL_WORDS = {"Killed": 128 + 9, "Terminated": 128 + 15, "Aborted": 128 + 6, "Segmentation fault": 128 + 11}


def srun_task_exits(text: str) -> dict[str, int]:
    """Pure: node -> exit code from srun's own lines (``Exited with exit code 3``: 3;
    ``Killed``: 137; any other end: 1)."""
    out = {}
    for node, what in _SRUN_TASK_END.findall(text):
        m = re.match(r"Exited with exit code (\d+)", what)
        out[node] = int(m.group(1)) if m else _SIGNAL_WORDS.get(what.strip(), 1)
    return out


def parse_wrapper_line(line: str) -> Optional[dict[str, str]]:
    """Pure: the fields of a wrapper line ``toksearch-node: host=H address=A step=J.S pid=P``
    or ``toksearch-node: exit=N host=H`` (None for any other line)."""
    if not line.startswith(WRAPPER_PREFIX):
        return None
    words = line[len(WRAPPER_PREFIX):].split()
    if not words or "=" not in words[0]:
        return None
    return dict(w.split("=", 1) for w in words if "=" in w)


def _new_lines(path: Path, offset: int) -> tuple[str, int]:
    """Whole lines appended to ``path`` since ``offset`` (a partial last line waits)."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except OSError:
        return "", offset
    end = data.rfind(b"\n") + 1
    return data[:end].decode(errors="replace"), offset + end


@dataclass
class StepDaemon(Daemon):
    """A daemon on one node of a role's step: the step's ``srun`` is its (shared) session leader;
    its exit, address and step id come from its node's log, written there by its wrapper."""

    step: Optional[Step] = None
    exit: Optional[int] = None
    _offset: int = 0

    def spawn(self, base_env: dict[str, str]) -> None:  # noqa: ARG002 -- the step starts it
        raise RuntimeError("a step daemon is started by its Step (SrunLauncher.spawn)")

    def follow(self) -> None:
        """Read the wrapper's new lines in this node's log (address, step id, exit)."""
        text, self._offset = _new_lines(self.log_path, self._offset)
        for line in text.splitlines():
            fields = parse_wrapper_line(line)
            if not fields:
                continue
            if "exit" in fields:
                self.exit = int(fields["exit"])
            elif "host" in fields:
                if fields.get("address", "?") != "?":
                    self.address = fields["address"]
                self.step_id = fields.get("step")
                if self.step is not None and self.step_id and "-" not in self.step_id:
                    self.step.step_id = self.step_id

    def failure(self, what: str) -> str:
        """The node's message, plus the step's command and srun's last lines (a refused step
        or a task that never reached its wrapper says why there)."""
        text = super().failure(what)
        if self.step is None:
            return text
        tail = "\n".join("    " + ln for ln in self.step.tail().splitlines())
        return (f"{text}\n  its step (all {len(self.step.hosts)} nodes of {self.step.role}): {display(self.step.argv)}\n"
                f"  step log: {self.step.log_path}\n  last lines of the step log:\n{tail}")


class SrunLauncher(_SessionLauncher):
    """One SLURM step per role through the step wrapper; SIGUSR1 to stop, scancel to force."""

    def spec_path(self, role: Role) -> Path:
        """The role's spec, in the run dir (shared with the nodes), unique per start (the temp dir's name)."""
        return self.plan.run_dir / "steps" / f"{Path(self.plan.root).name}-{role.name}.json"

    def node_env(self, node: NodeCommand) -> dict[str, str]:
        """The secret reaches the node in the step's environment; the wrapper writes its 0600 file."""
        env = dict(node.env)
        if self.plan.engine.secret_file_on_nodes:
            env[SECRET_VALUE_ENV] = self.plan.secret
            env[SECRET_FILE_ENV] = self.plan.secret_file
        return env

    def node_args(self, node: NodeCommand) -> list[str]:
        """What the wrapper runs on ``node``: its options, ``--``, the daemon's argv."""
        return [*wrapper_options(self.plan, node), "--", *node.argv]

    def daemons(self, role: Role) -> list[Daemon]:
        """One daemon per node, all sharing the role's one step."""
        hosts = [n.host for n in role.nodes]
        spec = self.spec_path(role)
        step = Step(role.name, step_argv(hosts, list(role.srun), spec),
                    self.plan.log_path(role.name, "step"), spec, hosts)
        out: list[Daemon] = []
        for node in role.nodes:
            d = StepDaemon(role.name, node.host, node.index, [*wrapper_command(), *self.node_args(node)],
                           node.log_path, self.node_env(node), node.address, node_dir=node.node_dir)
            d.step = step
            out.append(d)
        return out

    def spawn(self, role: Role, env: dict[str, str]) -> list[Daemon]:
        """Write the role's spec (0600, in a 0700 dir), a header in each node's log, start the step."""
        if not role.nodes:
            return []
        out = self.daemons(role)
        step = out[0].step  # type: ignore[attr-defined]
        common, extra = split_env({d.host: d.env for d in out})
        skip = len(wrapper_command())
        entries = {d.host: {"argv": d.argv[skip:], "env": extra[d.host], "log": str(d.log_path)} for d in out}
        make_private_dir(str(step.spec_path.parent))
        write_private(str(step.spec_path), json.dumps(step_spec(role.name, entries)))
        for d in out:
            d.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(d.log_path, "ab") as log:
                log.write(f"==== toksearch {time.strftime('%Y-%m-%d %H:%M:%S')}: {display(d.argv)}\n".encode())
                d._offset = log.tell()  # type: ignore[attr-defined]
        beacon = bool(getattr(self.plan.cfg.site, "owner_beacon", True))  # off: where a firewall rejects it
        step.spawn({**env, **common, **owner_env(with_beacon=beacon)})  # the marker, and the beacon other nodes watch
        for d in out:
            d.proc, d.started_at = step.proc, step.started_at
        return out

    def exit_code(self, daemon: Daemon) -> Optional[int]:
        """The node's own exit (its wrapper's last line, else srun's word on its task), else the
        step's once the whole step ended; None while it runs."""
        if not isinstance(daemon, StepDaemon) or daemon.step is None:
            return daemon.returncode()
        daemon.follow()
        if daemon.exit is not None:
            return daemon.exit
        step = daemon.step
        step.follow()
        if daemon.host in step.task_exits:
            return step.task_exits[daemon.host]
        rc = step.proc.poll() if step.proc is not None else None
        if rc is not None:
            step.follow()  # srun's last lines are written before it exits
            daemon.follow()
            return daemon.exit if daemon.exit is not None else step.task_exits.get(daemon.host, rc)
        return None

    def watch(self, daemon: Daemon) -> None:
        if isinstance(daemon, StepDaemon) and daemon.step_id is None:
            daemon.follow()

    def signal_stop(self, daemons: list[Daemon]) -> None:
        """SIGUSR1 to each step's local ``srun`` (once per step), which forwards it to every task.

        Each wrapper stops its daemon's session, removes its dir and exits; then srun
        exits.  SIGTERM to srun would instead force the step's termination: the
        wrapper is killed before it can clean up (measured on Slurm 22.05).
        """
        _signal(_one_per_leader(daemons), signal.SIGUSR1)

    def cancel(self, daemon: Daemon) -> None:
        """A step's srun still running after the grace period: SIGKILL the step (once)."""
        step = getattr(daemon, "step", None)
        if step is None or step.cancelled:
            return
        self.watch(daemon)
        step_id = step.step_id or daemon.step_id
        if step_id and "-" not in step_id and shutil.which("scancel"):
            step.cancelled = True
            subprocess.run(["scancel", "--signal=KILL", step_id], capture_output=True, timeout=5)

    def stop_warnings(self, daemons: list[Daemon]) -> list[str]:
        return [f"{d.label}: the step wrapper did not confirm a clean stop; see {d.log_path}"
                for d in daemons if d.started_at and "nothing left" not in d.tail(3)]


def launcher_for(plan: "ClusterPlan") -> Launcher:
    """site.scheduler=local: processes here; slurm: job steps."""
    return LocalLauncher(plan) if plan.scheduler == "local" else SrunLauncher(plan)


def daemons_of(plan: "ClusterPlan") -> list[Daemon]:
    """Every daemon of the plan, head first, as its launcher would run it (nothing started)."""
    launcher = launcher_for(plan)
    return [d for role in plan.engine.roles(plan) for d in launcher.daemons(role)]


def commands_of(plan: "ClusterPlan") -> list[list[str]]:
    """Every command the plan runs, head first (the dry run): on SLURM each role's one ``srun``
    step, followed by what its wrapper runs on each of its nodes; site=local each daemon's argv."""
    out: list[list[str]] = []
    shown: set[int] = set()
    for d in daemons_of(plan):
        step = getattr(d, "step", None)
        if step is not None and id(step) not in shown:
            shown.add(id(step))
            out.append(step.argv)
        out.append(d.argv)
    return out


def _one_per_leader(daemons: list[Daemon]) -> list[Daemon]:
    """The daemons of one step share its srun: signal it once."""
    seen: set[int] = set()
    out = []
    for d in daemons:
        key = id(d.proc)
        if d.proc is not None and key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _daemon(role: Role, node: NodeCommand, argv: list[str], env: dict[str, str]) -> Daemon:
    return Daemon(role.name, node.host, node.index, argv, node.log_path, env, node.address, node_dir=node.node_dir)


def _signal(daemons: list[Daemon], sig: int) -> None:
    for d in daemons:
        if d.proc is None or d.proc.poll() is not None:
            continue
        try:
            d.proc.send_signal(sig)
        except ProcessLookupError:
            pass


def read_wrapper_line(d: Daemon) -> None:
    """SLURM: the step wrapper's first line in the node's log gives its address and the step id."""
    try:
        text = d.log_path.read_text(errors="replace")
    except OSError:
        return
    mark = text.rfind("==== toksearch ")
    for line in text[mark:].splitlines():
        fields = parse_wrapper_line(line)
        if fields and "host" in fields and "exit" not in fields:
            if fields.get("address", "?") != "?":
                d.address = fields["address"]
            d.step_id = fields.get("step")
            return
