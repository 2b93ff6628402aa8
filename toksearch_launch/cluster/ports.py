"""Port blocks: every port a job's daemons open, chosen so that jobs sharing a node never collide.

Ray, Spark and Dask defaults (6379, 7077, 8786, 8265, 10001, 52365, 44217, ...)
are what two jobs on one node fight over.  A cluster instead takes one block of
consecutive ports, pins every daemon port inside it, and checks the block is
free here before starting.  With ``site.ports.policy=auto`` the block is at a
random place in a high range below the kernel's ephemeral range (so outgoing
connections never take our ports); ``fixed`` starts it at ``site.ports.base``.

Each backend declares its :class:`PortLayout` (head ports, per-node ports,
per-node ranges); a block is: head ports from offset 0, then one slot per node
at ``head_slot + k*S``.

On SLURM the nodes are distinct hosts, so all nodes share one slot (the block
stays small); on site=local every node gets its own slot.

A bind check alone reserves nothing (Ray binds its worker range only when a
worker starts), so each job also *leases* its block on each node for its whole
life: a non-blocking ``flock`` on one lock file per 64-port slot the block
touches, in the node-local ``/tmp/toksearch-ports/<host>`` (mode 1777, like
/tmp; lock files 0644) that every job of every user shares.  The owner holds the lease on its
node, the step wrapper on every other node; the kernel drops a lock when its
holder dies, so a lease can never outlive its job.
"""

from __future__ import annotations

import errno
import fcntl
import os
import random
import socket
import threading
from dataclasses import dataclass, field
from typing import Optional

from .errors import ClusterError

#: Where auto blocks go: above Ray's default worker range (10002-19999), below the
#: ephemeral range (Linux default 32768-60999).
AUTO_LOW = 20000
AUTO_HIGH = 32768


@dataclass(frozen=True)
class PortLayout:
    """Which ports a backend's daemons open: declared by the backend, laid out here.

    head: ports only the head node opens; node: fixed ports every node opens;
    ranges: (name, size on one shared host, size per node on SLURM) -- a node's
    ``min_<name>``..``max_<name>`` (e.g. Ray's worker processes); head_slot:
    offset of the first node slot in the block.
    """

    head: tuple[str, ...]
    node: tuple[str, ...]
    ranges: tuple[tuple[str, int, int], ...] = ()
    head_slot: int = 0

    def slot_size(self, shared_host: bool) -> int:
        return len(self.node) + sum(local if shared_host else slurm for _, local, slurm in self.ranges)


@dataclass
class PortBlock:
    """Every port of one cluster. ``nodes[k]`` holds the ports of the node at placement index k."""

    layout: PortLayout
    base: int
    size: int
    head: dict[str, int]
    nodes: list[dict[str, int]] = field(default_factory=list)

    def ports_of_node(self, index: int, *, head: Optional[bool] = None) -> list[int]:
        """The ports the daemons of node ``index`` listen on (head ports on node 0).

        head: include the head's ports (default: on node 0); a worker on node 0
        beside a separate head daemon passes False (the head holds those).
        """
        out = list(self.head.values()) if (index == 0 if head is None else head) else []
        slot = self.nodes[index]
        out += [slot[k] for k in self.layout.node]
        for name, _, _ in self.layout.ranges:
            out += list(range(slot[f"min_{name}"], slot[f"max_{name}"] + 1))
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
            words = [f"{k}={slot[k]}" for k in self.layout.node]
            words += [f"{r}s={slot[f'min_{r}']}-{slot[f'max_{r}']}" for r, _, _ in self.layout.ranges]
            nodes.append(f"node{i}: " + " ".join(words))
        shared = " (same ports on every node)" if len(self.nodes) > 1 and self.nodes[1] == self.nodes[0] else ""
        return f"ports {self.base}-{self.base + self.size - 1}: {head}; " + "; ".join(nodes) + shared


def _layout(backend: "str | PortLayout") -> PortLayout:
    if isinstance(backend, PortLayout):
        return backend
    from .backend import get_backend

    return get_backend(backend).ports


def plan_ports(backend: "str | PortLayout", n_nodes: int, base: int, *, shared_host: bool) -> PortBlock:
    """The block at ``base`` for ``n_nodes`` nodes of ``backend`` (a name or its layout).

    shared_host: all nodes on one machine (site=local), so each needs its own ports.
    """
    layout = _layout(backend)
    step = layout.slot_size(shared_host)
    first = max(layout.head_slot, len(layout.head))
    head = {k: base + i for i, k in enumerate(layout.head)}
    nodes = []
    for k in range(n_nodes):
        s = base + first + (k if shared_host else 0) * step
        slot = {name: s + i for i, name in enumerate(layout.node)}
        at = s + len(layout.node)
        for name, local, slurm in layout.ranges:
            count = local if shared_host else slurm
            slot[f"min_{name}"], slot[f"max_{name}"] = at, at + count - 1
            at += count
        nodes.append(slot)
    size = first + (n_nodes if shared_host else 1) * step
    if base + size > 65536:
        raise ClusterError(f"port block {base}-{base + size - 1} goes past 65535")
    return PortBlock(layout, base, size, head, nodes)


def placeholder_ports(backend: "str | PortLayout", n_nodes: int, *, shared_host: bool) -> PortBlock:
    """A plan whose ports read as ``<port:name>`` (dry run with policy=auto): planned at base 0."""
    block = plan_ports(backend, n_nodes, 0, shared_host=shared_host)
    block.head = {k: f"<port:{k}>" for k in block.head}  # type: ignore[misc]
    shared = not shared_host or n_nodes == 1
    block.nodes = [  # type: ignore[assignment]
        {k: (f"<port:{k}>" if shared else f"<port:{k}@{i + 1}>") for k in slot}
        for i, slot in enumerate(block.nodes)
    ]
    return block


def compress_ports(ports: list[int]) -> str:
    """[1,2,3,7] -> "1-3,7" (the step wrapper's --check-ports)."""
    ports = sorted(set(ports))
    out: list[str] = []
    i = 0
    while i < len(ports):
        j = i
        while j + 1 < len(ports) and ports[j + 1] == ports[j] + 1:
            j += 1
        out.append(str(ports[i]) if i == j else f"{ports[i]}-{ports[j]}")
        i = j + 1
    return ",".join(out)


def expand_ports(text: str) -> list[int]:
    out: list[int] = []
    for part in filter(None, text.split(",")):
        a, _, b = part.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return out


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


# ------------------------------------------------------------ leases between jobs

#: Node-local, shared by every job of every user (like /tmp: sticky, world-writable).
LOCK_DIR = "/tmp/toksearch-ports"
#: Ports per lock file: a block leases every slot it touches.
LOCK_SLOT = 64


def lock_slots(ports: "list[int] | range") -> list[int]:
    """The slot numbers (port // LOCK_SLOT) that ``ports`` touch: two port sets that share a
    port always share a slot, so a lease on all slots excludes every overlap."""
    return sorted({p // LOCK_SLOT for p in ports})


def node_lock_dir() -> str:
    """``LOCK_DIR/<hostname>``: per host, because nodes that share one /tmp (the CI cluster's
    network namespaces) still have a port space each."""
    return os.path.join(LOCK_DIR, socket.gethostname())


def slot_lock_path(slot: int, lock_dir: str) -> str:
    start = slot * LOCK_SLOT
    return os.path.join(lock_dir, f"{start}-{start + LOCK_SLOT - 1}.lock")


class PortLease:
    """flocks held on lock files of one block; released by :meth:`release` or by process death."""

    def __init__(self, fds: list[int], lock_dir: str) -> None:
        self.fds = fds
        self.lock_dir = lock_dir

    def release(self) -> None:
        fds, self.fds = self.fds, []
        for fd in fds:
            try:
                os.close(fd)  # closing the only descriptor drops its flock
            except OSError:
                pass


class PortsLeased(ClusterError):
    """Another job holds (part of) the block on this node."""


def _lock_dir(lock_dir: str) -> None:
    for d in (os.path.dirname(lock_dir), lock_dir):
        try:
            os.mkdir(d, 0o1777)
            os.chmod(d, 0o1777)  # whatever the umask: every user's jobs lock here
        except FileExistsError:
            pass


def _open_lock(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, 0o644)  # readable by other users' jobs whatever the umask
    except OSError:
        pass
    return fd


def lease_ports(ports: "list[int] | range", lock_dir: Optional[str] = None) -> PortLease:
    """Take every lock slot ``ports`` touch, without waiting; :class:`PortsLeased` if one is held.

    A lock dir we cannot use (not creatable, another user's files we cannot open)
    gives an empty lease: the bind check is then all there is, as before.
    """
    lock_dir = lock_dir or node_lock_dir()
    fds: list[int] = []
    try:
        _lock_dir(lock_dir)
        for slot in lock_slots(ports):
            fd = _open_lock(slot_lock_path(slot, lock_dir))
            fds.append(fd)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                start = slot * LOCK_SLOT
                raise PortsLeased(
                    f"ports {start}-{start + LOCK_SLOT - 1} are reserved by another job on "
                    f"{socket.gethostname()} ({slot_lock_path(slot, lock_dir)} is locked)"
                ) from None
    except PortsLeased:
        PortLease(fds, lock_dir).release()
        raise
    except OSError:
        PortLease(fds, lock_dir).release()
        return PortLease([], lock_dir)
    return PortLease(fds, lock_dir)


# Blocks taken by clusters of this process (two clusters in one process never overlap),
# each with its lease between jobs.
_reserved: dict[int, tuple[int, PortLease]] = {}
_reserved_lock = threading.Lock()


def _overlaps(base: int, size: int) -> bool:
    return any(base < b + s and b < base + size for b, (s, _) in _reserved.items())


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
    """A free block of ``size`` ports; reserved in this process and leased on this node (see
    :func:`lease_ports`) until :func:`release_block`.

    auto: random base in :func:`auto_range` that no other job leases and whose every
    port binds here (and not one of ``avoid``, the bases that already failed).  fixed: ``fixed_base``,
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
            lease = PortLease([], LOCK_DIR)
            if check:
                try:
                    lease = lease_ports(range(fixed_base, fixed_base + size))
                except PortsLeased as exc:
                    raise ClusterError(f"site.ports.policy=fixed: {exc}; choose another site.ports.base "
                                       "or policy=auto") from None
                busy = busy_ports(list(range(fixed_base, fixed_base + size)))
                if busy:
                    lease.release()
                    raise ClusterError(
                        f"site.ports.policy=fixed: ports {_short(busy)} of the block "
                        f"{fixed_base}-{fixed_base + size - 1} are in use on {socket.gethostname()}; "
                        "choose another site.ports.base or policy=auto"
                    )
            _reserved[fixed_base] = (size, lease)
            return fixed_base
        lo, hi = auto_range()
        if hi - lo < size:
            raise ClusterError(f"no room for a block of {size} ports in {lo}-{hi - 1}")
        for _ in range(attempts):
            base = rng.randrange(lo, hi - size)
            if base in avoid or _overlaps(base, size):
                continue
            lease = PortLease([], LOCK_DIR)
            if check:
                try:  # the lease first: a block another job holds may not be bound yet
                    lease = lease_ports(range(base, base + size))
                except PortsLeased:
                    continue
                if busy_ports(list(range(base, base + size))):
                    lease.release()
                    continue
            _reserved[base] = (size, lease)
            return base
    raise ClusterError(f"found no free block of {size} ports in {lo}-{hi - 1} after {attempts} tries")


def release_block(base: int) -> None:
    with _reserved_lock:
        taken = _reserved.pop(base, None)
    if taken is not None:
        taken[1].release()


def _short(ports: list[int], limit: int = 8) -> str:
    s = ", ".join(map(str, ports[:limit]))
    return s + (f" (+{len(ports) - limit} more)" if len(ports) > limit else "")
