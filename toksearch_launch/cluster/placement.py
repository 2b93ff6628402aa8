"""Which node runs what, and which address each node's daemons bind to.

Placement follows TokSearch's documentation: the node that runs the script hosts
the Ray head / Spark master / Dask scheduler; Ray workers run on the other N-1
nodes, Spark and Dask workers on all N nodes.  Everything here is pure or reads only local files, so
the dry run can use it without starting anything.
"""

from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from typing import Iterable, Optional

import hostlist

from .errors import ClusterError

#: Placeholder the node step wrapper replaces with the node's own address
#: (``site.address.method=interface`` on SLURM: only the node itself knows it).
NODE_IP = "@NODE_IP@"


def expand_nodelist(nodelist: str) -> list[str]:
    """``saga[1-3,10]`` -> ``[saga1, saga2, saga3, saga10]`` (python-hostlist, SLURM's syntax)."""
    try:
        hosts = hostlist.expand_hostlist(nodelist.strip())
    except hostlist.BadHostlist as exc:
        raise ClusterError(f"cannot expand node list {nodelist!r}: {exc}") from None
    if not hosts:
        raise ClusterError(f"node list {nodelist!r} names no nodes")
    return hosts


def local_hosts(n: int) -> list[str]:
    """site=local: ``n`` pseudo-nodes ``local1..localN`` on this machine."""
    return [f"local{k}" for k in range(1, max(1, n) + 1)]


def job_hosts(scheduler: str, nodes: int, env: Optional[dict] = None) -> list[str]:
    """The job's nodes: the SLURM allocation, or local pseudo-nodes."""
    env = os.environ if env is None else env
    if scheduler == "local":
        return local_hosts(nodes)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ClusterError(
            "site.scheduler=slurm but SLURM_JOB_NODELIST is not set: run inside a "
            "toksearch_submit job (or salloc/sbatch), or use site=local"
        )
    return expand_nodelist(nodelist)


def script_host(hosts: list[str], scheduler: str, env: Optional[dict] = None) -> str:
    """The node this process runs on, which must be one of the job's nodes (it hosts the head)."""
    if scheduler == "local":
        return hosts[0]
    env = os.environ if env is None else env
    names = [env.get("SLURMD_NODENAME"), socket.gethostname(), socket.gethostname().split(".")[0]]
    for name in names:
        if name and name in hosts:
            return name
    raise ClusterError(
        f"this process runs on {socket.gethostname()!r}, which is not one of the job's nodes "
        f"({hostlist.collect_hostlist(hosts)}); the head must run on the script's node: "
        "start the script with srun inside the allocation (toksearch_submit does this)"
    )


def order_hosts(hosts: list[str], head: str) -> list[str]:
    """Head first, then the others in allocation order (node index = position in this list)."""
    return [head] + [h for h in hosts if h != head]


@dataclass(frozen=True)
class Placement:
    """Where each daemon runs: ``hosts[0]`` is the head / master node."""

    backend: str
    hosts: list[str]

    @property
    def head(self) -> str:
        return self.hosts[0]

    @property
    def workers(self) -> list[str]:
        """Ray: the other N-1 nodes; Spark, Dask: all N nodes (the head's node works too)."""
        from .backend import get_backend

        return list(self.hosts) if get_backend(self.backend).workers_on_head else list(self.hosts[1:])


def place(backend: str, hosts: list[str], head: Optional[str] = None) -> Placement:
    if not hosts:
        raise ClusterError("no nodes to place a cluster on")
    return Placement(backend, order_hosts(hosts, head or hosts[0]))


# ---------------------------------------------------------------- addresses


def loopback_address(index: int) -> str:
    """site=local: node K (1-based) -> 127.0.0.(K+1); Ray rewrites 127.0.0.1, not .2 and up."""
    if not 0 <= index < 250:
        raise ClusterError(f"site=local supports up to 250 nodes, not {index + 1}")
    return f"127.0.0.{index + 2}"


def hosts_file_lookup(name: str, hosts_file: str) -> Optional[str]:
    """The IPv4 address of the exact entry ``name`` in a hosts file (whole-word match).

    ``saga1-ib`` must never match ``saga10-ib``: names are compared as whole
    fields, never as prefixes or substrings.
    """
    try:
        with open(hosts_file, encoding="utf-8", errors="replace") as fh:
            lines = fh.readlines()
    except OSError as exc:
        raise ClusterError(f"cannot read {hosts_file}: {exc.strerror}") from None
    for line in lines:
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2 or name not in fields[1:]:
            continue
        try:
            if ipaddress.ip_address(fields[0]).version == 4:
                return fields[0]
        except ValueError:
            continue
    return None


def dns_address(name: str) -> str:
    """Resolve a node name to IPv4, refusing loopback (Debian maps the own hostname to 127.0.1.1)."""
    try:
        infos = socket.getaddrinfo(name, None, socket.AF_INET, socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ClusterError(f"cannot resolve node {name!r}: {exc.strerror}") from None
    addrs = [info[4][0] for info in infos]
    usable = [a for a in addrs if not ipaddress.ip_address(a).is_loopback]
    if not usable:
        raise ClusterError(
            f"node {name!r} resolves only to loopback ({', '.join(sorted(set(addrs)))}): other nodes "
            "could not reach it; use site.address.method=interface or suffix"
        )
    return usable[0]


def interface_address(interface: str) -> str:
    """IPv4 address of a network interface of THIS machine."""
    import psutil

    addrs = psutil.net_if_addrs()
    if interface not in addrs:
        raise ClusterError(
            f"no network interface {interface!r} on {socket.gethostname()} "
            f"(have: {', '.join(sorted(addrs))})"
        )
    for a in addrs[interface]:
        if a.family == socket.AF_INET:
            return a.address
    raise ClusterError(f"interface {interface!r} on {socket.gethostname()} has no IPv4 address")


def resolve_address(
    host: str, index: int, rule, *, on_this_node: bool
) -> Optional[str]:
    """The address ``host``'s daemons bind to, by ``site.address`` (``rule``).

    Returns None for ``interface`` on another node: that node's step wrapper
    resolves it there (the interface is only visible on the node itself).
    """
    method = rule.method
    if method == "loopback":
        return loopback_address(index)
    if method == "dns":
        return dns_address(host)
    if method == "suffix":
        name = f"{host}{rule.suffix}"
        addr = hosts_file_lookup(name, rule.hosts_file)
        if addr is None:
            raise ClusterError(f"no entry {name!r} in {rule.hosts_file} (site.address.method=suffix)")
        return addr
    if method == "interface":
        return interface_address(rule.interface) if on_this_node else None
    raise ClusterError(f"unknown site.address.method {method!r}")


def placeholder_address(host: str) -> str:
    """What the dry run shows for an address it does not resolve."""
    return f"<IP:{host}>"


def describe_addresses(hosts: Iterable[str], addrs: Iterable[Optional[str]]) -> str:
    return ", ".join(f"{h}={a or '(resolved on the node)'}" for h, a in zip(hosts, addrs))
