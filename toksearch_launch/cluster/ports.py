"""Port blocks: every port a job's daemons open, chosen so that jobs sharing a node never collide.

Ray and Spark defaults (6379, 7077, 8265, 10001, 52365, 44217, ...) are what
two jobs on one node fight over.  A cluster instead takes one block of
consecutive ports, pins every daemon port inside it, and checks the block is
free here before starting.  With ``site.ports.policy=auto`` the block is at a
random place in a high range below the kernel's ephemeral range (so outgoing
connections never take our ports); ``fixed`` starts it at ``site.ports.base``.

Layout of a block (offsets from ``base``):

* Ray: head ports at 0..4 (GCS, client server, dashboard, autoscaler metrics,
  dashboard metrics), then one slot per node at 10 + k*S: node manager, object
  manager, dashboard agent HTTP and gRPC, metrics export, runtime env agent,
  then the node's worker port range.
* Spark: master 0, master UI 1, driver 2, driver block manager 3, then one
  slot per node at 4 + 2k: worker RPC, worker UI.

On SLURM the nodes are distinct hosts, so all nodes share one slot (the block
stays small); on site=local every node gets its own slot.
"""

from __future__ import annotations

import errno
import random
import socket
import threading
from dataclasses import dataclass, field
from typing import Optional

from .errors import ClusterError

RAY_HEAD_PORTS = ("gcs", "client_server", "dashboard", "autoscaler_metrics", "dashboard_metrics")
RAY_NODE_PORTS = (
    "node_manager",
    "object_manager",
    "agent_http",
    "agent_grpc",
    "metrics",
    "runtime_env_agent",
)
SPARK_HEAD_PORTS = ("master", "master_ui", "driver", "driver_block_manager")
SPARK_NODE_PORTS = ("worker", "worker_ui")

#: Ray worker processes per node (each takes one port of the node's range).
RAY_WORKER_PORTS_LOCAL = 64
RAY_WORKER_PORTS_SLURM = 1000
#: Where auto blocks go: above Ray's default worker range (10002-19999), below the
#: ephemeral range (Linux default 32768-60999).
AUTO_LOW = 20000
AUTO_HIGH = 32768
_RAY_HEAD_SLOT = 10
_SPARK_HEAD_SLOT = len(SPARK_HEAD_PORTS)


@dataclass
class PortPlan:
    """Every port of one cluster. ``nodes[k]`` holds the ports of the node at placement index k."""

    backend: str
    base: int
    size: int
    head: dict[str, int]
    nodes: list[dict[str, int]] = field(default_factory=list)

    def ports_of_node(self, index: int, *, head: Optional[bool] = None) -> list[int]:
        """The ports the daemons of node ``index`` listen on (head ports on node 0).

        head: include the head's ports (default: on node 0); Spark's worker on node 0
        passes False (the master there holds those).
        """
        out = list(self.head.values()) if (index == 0 if head is None else head) else []
        slot = self.nodes[index]
        if self.backend == "ray":
            out += [slot[k] for k in RAY_NODE_PORTS]
            out += list(range(slot["min_worker"], slot["max_worker"] + 1))
        else:
            out += [slot[k] for k in SPARK_NODE_PORTS]
        return out

    def head_ports(self) -> list[int]:
        return list(self.head.values())

    def all_ports(self) -> list[int]:
        return sorted({p for i in range(len(self.nodes)) for p in self.ports_of_node(i)})

    def describe(self) -> str:
        """One line for the log: every port by name."""
        head = " ".join(f"{k}={v}" for k, v in self.head.items())
        nodes = []
        for i, slot in enumerate(self.nodes):
            if i and slot == self.nodes[0]:
                continue
            if self.backend == "ray":
                fixed = " ".join(f"{k}={slot[k]}" for k in RAY_NODE_PORTS)
                nodes.append(f"node{i}: {fixed} workers={slot['min_worker']}-{slot['max_worker']}")
            else:
                nodes.append(f"node{i}: " + " ".join(f"{k}={slot[k]}" for k in SPARK_NODE_PORTS))
        shared = " (same ports on every node)" if len(self.nodes) > 1 and self.nodes[1] == self.nodes[0] else ""
        return f"ports {self.base}-{self.base + self.size - 1}: {head}; " + "; ".join(nodes) + shared


def plan_ports(
    backend: str, n_nodes: int, base: int, *, shared_host: bool, worker_ports: Optional[int] = None
) -> PortPlan:
    """The block at ``base`` for ``n_nodes`` nodes.

    shared_host: all nodes on one machine (site=local), so each needs its own ports.
    """
    slots = n_nodes if shared_host else 1
    if backend == "ray":
        w = worker_ports or (RAY_WORKER_PORTS_LOCAL if shared_host else RAY_WORKER_PORTS_SLURM)
        step = len(RAY_NODE_PORTS) + w
        head = {k: base + i for i, k in enumerate(RAY_HEAD_PORTS)}
        nodes = []
        for k in range(n_nodes):
            s = base + _RAY_HEAD_SLOT + (k if shared_host else 0) * step
            slot = {name: s + i for i, name in enumerate(RAY_NODE_PORTS)}
            slot["min_worker"] = s + len(RAY_NODE_PORTS)
            slot["max_worker"] = s + step - 1
            nodes.append(slot)
        size = _RAY_HEAD_SLOT + slots * step
    elif backend == "spark":
        head = {k: base + i for i, k in enumerate(SPARK_HEAD_PORTS)}
        nodes = []
        for k in range(n_nodes):
            s = base + _SPARK_HEAD_SLOT + (k if shared_host else 0) * len(SPARK_NODE_PORTS)
            nodes.append({name: s + i for i, name in enumerate(SPARK_NODE_PORTS)})
        size = _SPARK_HEAD_SLOT + slots * len(SPARK_NODE_PORTS)
    else:
        raise ClusterError(f"unknown backend {backend!r}")
    if base + size > 65536:
        raise ClusterError(f"port block {base}-{base + size - 1} goes past 65535")
    return PortPlan(backend, base, size, head, nodes)


def placeholder_ports(backend: str, n_nodes: int, *, shared_host: bool) -> PortPlan:
    """A plan whose ports read as ``<port:name>`` (dry run with policy=auto): planned at base 0."""
    return plan_ports(backend, n_nodes, 0, shared_host=shared_host)


# ------------------------------------------------------------ free-port checks


def port_free(port: int) -> bool:
    """True if nothing on this machine listens on ``port`` (any address, IPv4 or IPv6).

    Binds the wildcard address without SO_REUSEADDR: that fails if any socket,
    on any local address, holds the port.
    """
    for family, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            s = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue  # no IPv6 on this machine
        try:
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind((addr, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            if exc.errno == errno.EADDRNOTAVAIL:
                continue
            raise
        finally:
            s.close()
    return True


def busy_ports(ports: list[int]) -> list[int]:
    return [p for p in ports if not port_free(p)]


def ephemeral_range() -> tuple[int, int]:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as fh:
            lo, hi = (int(x) for x in fh.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999


def auto_range() -> tuple[int, int]:
    """[low, high) for auto blocks: below the ephemeral range, or above it if that leaves no room."""
    eph_lo, eph_hi = ephemeral_range()
    high = min(AUTO_HIGH, eph_lo)
    if high - AUTO_LOW >= 4000:
        return AUTO_LOW, high
    return max(eph_hi + 1, 1024), 65536


# Blocks taken by clusters of this process (two clusters in one process never overlap).
_reserved: dict[int, int] = {}
_reserved_lock = threading.Lock()


def _overlaps(base: int, size: int) -> bool:
    return any(base < b + s and b < base + size for b, s in _reserved.items())


def choose_block(
    size: int,
    policy: str,
    fixed_base: int = 0,
    *,
    check: bool = True,
    avoid: tuple[int, ...] = (),
    rng: Optional[random.Random] = None,
    attempts: int = 200,
) -> int:
    """A free block of ``size`` ports; reserved in this process until :func:`release_block`.

    auto: random base in :func:`auto_range` whose every port binds here (and not
    one of ``avoid``, the bases that already failed).  fixed: ``fixed_base``,
    which must be free.
    """
    rng = rng or random.SystemRandom()
    with _reserved_lock:
        if policy == "fixed":
            if fixed_base + size > 65536:
                raise ClusterError(f"site.ports.base={fixed_base}: a block of {size} ports goes past 65535")
            if _overlaps(fixed_base, size):
                raise ClusterError(
                    f"site.ports.policy=fixed: ports {fixed_base}-{fixed_base + size - 1} are already "
                    "used by another cluster of this process"
                )
            if check:
                busy = busy_ports(list(range(fixed_base, fixed_base + size)))
                if busy:
                    raise ClusterError(
                        f"site.ports.policy=fixed: ports {_short(busy)} of the block "
                        f"{fixed_base}-{fixed_base + size - 1} are in use on {socket.gethostname()}; "
                        "choose another site.ports.base or policy=auto"
                    )
            _reserved[fixed_base] = size
            return fixed_base
        lo, hi = auto_range()
        if hi - lo < size:
            raise ClusterError(f"no room for a block of {size} ports in {lo}-{hi - 1}")
        for _ in range(attempts):
            base = rng.randrange(lo, hi - size)
            if base in avoid or _overlaps(base, size):
                continue
            if check and busy_ports(list(range(base, base + size))):
                continue
            _reserved[base] = size
            return base
    raise ClusterError(f"found no free block of {size} ports in {lo}-{hi - 1} after {attempts} tries")


def release_block(base: int) -> None:
    with _reserved_lock:
        _reserved.pop(base, None)


def _short(ports: list[int], limit: int = 8) -> str:
    s = ", ".join(map(str, ports[:limit]))
    return s + (f" (+{len(ports) - limit} more)" if len(ports) > limit else "")
