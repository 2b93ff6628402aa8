"""Cluster planning: which node runs what, at which address, on which ports, in which dirs.

One plan type for this layer, :class:`ClusterPlan` (the launcher's own plan is
``toksearch_launch.plan.Plan``; the ports of a cluster are its
:class:`~.ports.PortBlock`).  Planning is separate from starting so that the
dry run (:func:`plan_commands`) shows exactly the argv the job would run, with
placeholders where only the running job can know a value (random ports, the
temp dir name, node addresses).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .auth import job_secret
from .backend import Backend, get_backend
from .dirs import new_root, placeholder_root
from .errors import ClusterError
from .placement import NODE_IP, Placement, place, placeholder_address, resolve_address, script_host
from .ports import PortBlock, choose_block, placeholder_ports, plan_ports
from .resources import local_cpus_per_node


@dataclass
class ClusterPlan:
    """Everything needed to start, probe and stop one cluster."""

    backend: str
    scheduler: str  # local | slurm
    cfg: Any
    placement: Placement
    #: address per placement index; None: resolved by the node's step wrapper (interface rule)
    addresses: list[Optional[str]]
    ports: PortBlock
    root: str  # per-job temp dir, same path on every node, 0700
    run_dir: Path
    cpus_per_node: Optional[int] = None  # site=local only
    dry_run: bool = False
    secret: str = field(default="", repr=False)

    @functools.cached_property
    def engine(self) -> Backend:
        return get_backend(self.backend)

    @property
    def options(self) -> Any:
        """The config's ``<backend>.master`` / ``.worker`` options (srun + start)."""
        return self.cfg[self.backend]

    @property
    def hosts(self) -> list[str]:
        return self.placement.hosts

    @property
    def n_nodes(self) -> int:
        return len(self.placement.hosts)

    @property
    def head_ip(self) -> str:
        return self.ip(0)

    def ip(self, index: int) -> str:
        """The node's address for a command line: resolved, or the wrapper's placeholder."""
        addr = self.addresses[index]
        if addr:
            return addr
        if self.dry_run:
            return placeholder_address(self.hosts[index])
        return NODE_IP

    def node_dir(self, index: int) -> str:
        """The daemon's own dir on its node: ``<root>/r1`` (Ray), ``<root>/s1`` (Spark), ..."""
        return f"{self.root}/{self.backend[0]}{index + 1}"

    @property
    def master_dir(self) -> str:
        """A head daemon beside a worker on node 0 has its own dir (each step wrapper removes its dir)."""
        return f"{self.root}/{self.backend[0]}m"

    @property
    def secret_file(self) -> str:
        return f"{self.root}/{self.backend}-secret"

    @property
    def log_dir(self) -> Path:
        return self.run_dir / "logs"

    def log_path(self, role: str, host: str) -> Path:
        return self.log_dir / f"{role}-{host}.log"

    def longest_node_dir(self) -> str:
        return max([self.node_dir(i) for i in range(self.n_nodes)] + [self.master_dir], key=len)

    def local_dirs(self) -> list[str]:
        """site=local: every daemon dir, made by the lifecycle (no step wrapper there)."""
        return [self.node_dir(i) for i in range(self.n_nodes)] + [self.master_dir]


def make_plan(
    backend: str,
    cfg: Any,
    hosts: list[str],
    run_dir: Path,
    *,
    dry_run: bool = False,
    avoid_bases: tuple[int, ...] = (),
) -> ClusterPlan:
    """Placement, addresses, ports, dirs for a cluster on ``hosts`` (dry_run: pure, placeholders)."""
    engine = get_backend(backend)
    scheduler = cfg.site.scheduler
    local = scheduler == "local"
    head = hosts[0] if (local or dry_run) else script_host(hosts, scheduler)
    placement = place(backend, hosts, head)
    n = len(placement.hosts)
    rule = cfg.site.address
    addresses = (_placeholder_addresses if dry_run else _resolved_addresses)(placement.hosts, rule, local)
    if dry_run and cfg.site.ports.policy == "auto":
        ports = placeholder_ports(engine.ports, n, shared_host=local)
    else:
        base = cfg.site.ports.base if cfg.site.ports.policy == "fixed" else 0
        if not dry_run:
            size = plan_ports(engine.ports, n, 0, shared_host=local).size
            base = choose_block(size, cfg.site.ports.policy, cfg.site.ports.base, avoid=avoid_bases)
        ports = plan_ports(engine.ports, n, base, shared_host=local)
    plan = ClusterPlan(
        backend=backend, scheduler=scheduler, cfg=cfg, placement=placement, addresses=addresses,
        ports=ports, root=placeholder_root(cfg.site.tmp_base) if dry_run else new_root(cfg.site.tmp_base),
        run_dir=Path(run_dir), dry_run=dry_run,
        secret="<redacted>" if dry_run else job_secret(backend, engine.new_secret),
    )
    if local:
        plan.cpus_per_node = local_cpus_per_node(cfg, n)
    return plan


def _resolved_addresses(hosts: list[str], rule: Any, local: bool) -> list[Optional[str]]:
    return [resolve_address(h, i, rule, on_this_node=(i == 0 or local)) for i, h in enumerate(hosts)]


def _placeholder_addresses(hosts: list[str], rule: Any, local: bool) -> list[Optional[str]]:  # noqa: ARG001
    if rule.method == "loopback":
        return [f"127.0.0.{i + 2}" for i in range(len(hosts))]
    if rule.method == "interface":  # the head's is shown, the others' are the node wrapper's
        return [placeholder_address(hosts[0])] + [None] * (len(hosts) - 1)
    return [placeholder_address(h) for h in hosts]


def plan_commands(backend: str, cfg: Any, hosts: list[str]) -> list[list[str]]:
    """Pure: every command the job would run on ``hosts`` (head first): on SLURM each role's one
    ``srun`` step followed by what its wrapper runs on each node; site=local each daemon's argv.

    No address is resolved, no port checked, nothing imported from the engines;
    values only the running job knows read as placeholders (``<IP:tsn1>``,
    ``<port:gcs>``, ``/tmp/tsl-XXXXXX``).  Secrets are never on a command line.
    """
    from ..procutil import redact
    from .launcher import commands_of

    if not hosts:
        raise ClusterError("plan_commands needs at least one host")
    cfg = plain_config(cfg)
    plan = make_plan(backend, cfg, list(hosts), Path(cfg.site.get("tmp_base", "/tmp")) / "run", dry_run=True)
    return [redact(argv) for argv in commands_of(plan)]


class PlainConfig(dict):
    """A composed config as plain dicts and lists, read by attribute or key like the OmegaConf tree.

    Why: the planner reads the config a few times per node, and one OmegaConf access costs
    ~20 us (validation, interpolation checks): 1,000 nodes took seconds (bench/bench_dry_run.py).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def plain_config(cfg: Any) -> Any:
    """``cfg`` resolved once into :class:`PlainConfig` (an OmegaConf tree; anything else as it is)."""
    try:
        from omegaconf import DictConfig, OmegaConf
    except ImportError:
        return cfg
    if not isinstance(cfg, DictConfig):
        return cfg
    return _plain(OmegaConf.to_container(cfg, resolve=True))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return PlainConfig((k, _plain(v)) for k, v in value.items())
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value
