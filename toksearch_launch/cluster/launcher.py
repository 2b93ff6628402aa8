"""The step Launcher protocol: how a role's daemons are run on their nodes, signalled and stopped.

Two launchers, chosen by ``site.scheduler``:

* :class:`LocalLauncher`: each daemon is a process of this machine (site=local),
  under the same step wrapper, which ties its life to its owner's;
* :class:`SrunLauncher`: each daemon runs in a SLURM job step through the step
  wrapper (``python -m toksearch_launch.cluster.node``), which resolves what only
  the node knows, checks its ports, writes its secret file and owns the
  daemon's teardown on that node.

The lifecycle holds one of them and never asks which.  ``spawn`` takes a whole
role (all its nodes) in one call, so a launcher is free to start a role as one
step; :class:`SrunLauncher` starts one step per node today (each a session
leader, so its teardown is exact).
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from typing import TYPE_CHECKING, Optional, Protocol

from .auth import SECRET_FILE_ENV, SECRET_VALUE_ENV
from .backend import NodeCommand, Role
from .owner import OWNER_ENV, this_owner
from .placement import placeholder_address
from .ports import compress_ports
from .procs import Daemon

if TYPE_CHECKING:
    from .plan import ClusterPlan

WRAPPER_MODULE = "toksearch_launch.cluster.node"


class Launcher(Protocol):
    """Spawn a role on its nodes, tell whether each daemon lives, ask it to stop, cancel it."""

    def daemons(self, role: Role) -> list[Daemon]:
        """The daemons of ``role``, with the exact argv each node runs (nothing started: the dry run)."""
    def spawn(self, role: Role, env: dict[str, str]) -> list[Daemon]:
        """Start every daemon of ``role`` (one call for K nodes), each as a session leader."""
    def watch(self, daemon: Daemon) -> None:
        """While starting: learn what only the node knows (its address, its step)."""
    def exit_code(self, daemon: Daemon) -> Optional[int]:
        """None while it runs."""
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
        """The wrapper's part (before ``--``); no port check: the owner checked and reserved the
        whole block on this machine."""
        wrapper = [sys.executable, "-m", WRAPPER_MODULE, "--root", self.plan.root, "--dir", node.node_dir]
        return wrapper + (["--ip", node.address] if node.address else [])

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


class SrunLauncher(_SessionLauncher):
    """One SLURM step per daemon, through the step wrapper; SIGUSR1 to stop, scancel to force."""

    def wrapper_argv(self, role: Role, node: NodeCommand) -> list[str]:
        plan = self.plan
        rule = plan.cfg.site.address
        wrapper = [sys.executable, "-m", WRAPPER_MODULE, "--root", plan.root, "--dir", node.node_dir]
        if node.address:
            wrapper += ["--ip", node.address]
        elif plan.dry_run and rule.method != "interface":
            wrapper += ["--ip", placeholder_address(node.host)]
        else:
            wrapper += ["--interface", rule.interface]
        ip_env = plan.engine.node_ip_env
        if ip_env:
            wrapper += ["--ip-env", ip_env]
        if not plan.dry_run:
            wrapper += ["--check-ports", compress_ports(node.ports)]
        return [
            "srun", "--nodes=1", "--ntasks=1", "-w", node.host, "--export=ALL",
            *map(str, role.srun), *wrapper, "--", *node.argv,
        ]

    def node_env(self, node: NodeCommand) -> dict[str, str]:
        """The secret reaches the node in the step's environment; the wrapper writes its 0600 file."""
        env = dict(node.env)
        if self.plan.engine.secret_file_on_nodes:
            env[SECRET_VALUE_ENV] = self.plan.secret
            env[SECRET_FILE_ENV] = self.plan.secret_file
        return env

    def daemons(self, role: Role) -> list[Daemon]:
        return [_daemon(role, node, self.wrapper_argv(role, node), self.node_env(node)) for node in role.nodes]

    def watch(self, daemon: Daemon) -> None:
        if daemon.step_id is None:
            read_wrapper_line(daemon)

    def signal_stop(self, daemons: list[Daemon]) -> None:
        """SIGUSR1 to each daemon's local ``srun``, which forwards it to the step wrapper.

        The wrapper stops its daemon's session, removes its dir and exits; then srun
        exits.  SIGTERM to srun would instead force the step's termination: the
        wrapper is killed before it can clean up (measured on Slurm 22.05).
        """
        _signal(daemons, signal.SIGUSR1)

    def cancel(self, daemon: Daemon) -> None:
        """A daemon's srun still running after the grace period: SIGKILL its step."""
        if daemon.step_id is None:
            read_wrapper_line(daemon)
        if daemon.step_id and "-" not in daemon.step_id and shutil.which("scancel"):
            subprocess.run(["scancel", "--signal=KILL", daemon.step_id], capture_output=True, timeout=5)

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
    """SLURM: the step wrapper's first line gives the node address and the step id."""
    try:
        text = d.log_path.read_text(errors="replace")
    except OSError:
        return
    mark = text.rfind("==== toksearch ")
    for line in text[mark:].splitlines():
        if line.startswith("toksearch-node: host="):
            fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
            if fields.get("address", "?") != "?":
                d.address = fields["address"]
            d.step_id = fields.get("step")
            return
