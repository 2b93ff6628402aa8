"""Node loss during a compute: one line per lost node, naming it and how many partitions were rerun.

Ray, Spark and Dask rerun the tasks of a node that dies on the nodes that
remain, and say so in their own words (Ray: several lines per lost worker), or
not at all. The driver's loop asks a :class:`NodeWatch` to look at the engine's
list of live nodes at most once per :data:`POLL_S` while it waits for
partitions; a node that leaves the list is reported once:

    toksearch_launch: lost node tsn2 (ray) during compute_ray; 3 partitions rerun on the remaining nodes

How many were rerun is counted, not guessed: Ray and Spark tell each task its
attempt number (0 for a first run), and each partition hands it back with its
records; a partition that comes back with an attempt above 0 was started again.
The line waits until every partition that was in flight when the loss was seen
has come back (so the count is complete), or until the compute ends. Dask has
no attempt number in the task: its scheduler's count of workers that died
while running each task (``suspicious``) is read once, when the loss is seen.

The cost without a lost node: one list of nodes per :data:`POLL_S`, and an
int per partition.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Dict, Iterator, List, Mapping, Optional, Set

#: Seconds between two looks at the engine's node list.
POLL_S = 2.0
PREFIX = "toksearch_launch:"


def lost_node_line(node: str, engine: str, reruns: Optional[int]) -> str:
    """The one line said for a lost node (``reruns`` None: the engine could not tell)."""
    if reruns is None:
        count = "an unknown number of partitions"
    else:
        count = f"{reruns} partition{'' if reruns == 1 else 's'}"
    return f"{PREFIX} lost node {node} ({engine}) during compute_{engine}; {count} rerun on the remaining nodes"


def node_name(host: str) -> str:
    """A node's name for the line: an address is turned into its host name where the resolver knows
    one (the /etc/hosts lines of a cluster), else kept as it is."""
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    try:
        return socket.gethostbyaddr(host)[0].split(".")[0] or host
    except (OSError, UnicodeError):
        return host


@dataclass
class _Loss:
    """A lost node waiting for its line: the partitions in flight when it was seen, the reruns so far."""

    node: str
    waiting: Set[int]
    reruns: Optional[int] = 0


@dataclass
class NodeWatch:
    """Watches one engine's live nodes during one run of partitions and says each loss in one line.

    ``live_nodes()`` maps a stable id of each live node to its name (it may raise: a failed
    look is skipped). ``count_reruns(running)``, when given, counts at once how many of the
    partitions in flight were rerun (Dask); otherwise each partition reports its attempt
    number through :meth:`finished` (Ray, Spark).
    """

    engine: str
    live_nodes: Callable[[], Mapping[str, str]]
    count_reruns: Optional[Callable[[Collection[int]], Optional[int]]] = None
    say: Callable[[str], None] = field(default=lambda line: print(line, file=sys.stderr, flush=True))
    clock: Callable[[], float] = time.monotonic
    poll_s: float = POLL_S
    known: Dict[str, str] = field(default_factory=dict)
    pending: List[_Loss] = field(default_factory=list)
    #: reruns that came back before any loss was seen (the engine noticed first)
    unattributed: int = 0
    #: names of the nodes reported, in order
    reported: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.known = dict(self._look() or {})
        self._next = self.clock() + self.poll_s

    def check(self, running: Collection[int]) -> None:
        """Called by the driver's loop after each wait; looks at the nodes at most once per ``poll_s``."""
        now = self.clock()
        if now < self._next:
            return
        self._next = now + self.poll_s
        self._poll(running)

    def finished(self, index: int, attempt: Optional[int]) -> None:
        """Partition ``index`` came back from its ``attempt`` (0: first run; None: not known)."""
        rerun = bool(attempt)
        if not self.pending:
            self.unattributed += rerun
            return
        for loss in self.pending:
            if index in loss.waiting:
                loss.waiting.discard(index)
                if rerun and loss.reruns is not None:
                    loss.reruns += 1
                    rerun = False  # counted once, for the first loss that was waiting for it
        self.unattributed += rerun
        self._say_done(final=False)

    def close(self, look: bool = True) -> None:
        """The run of partitions is over: a last look (unless it failed), then every loss not yet said is said."""
        if look:
            self._poll(())
        self._say_done(final=True)

    def _look(self) -> Optional[Mapping[str, str]]:
        try:
            return self.live_nodes()
        except Exception:  # diagnostics only: a failed look never fails the run
            return None

    def _poll(self, running: Collection[int]) -> None:
        live = self._look()
        if live is None:
            return
        gone = [node_id for node_id in self.known if node_id not in live]
        for node_id in gone:
            name = self.known.pop(node_id)
            if self.count_reruns is not None:
                self.pending.append(_Loss(name, set(), self._counted(running)))
            else:
                self.pending.append(_Loss(name, set(running), self.unattributed))
                self.unattributed = 0
        for node_id, name in live.items():
            self.known.setdefault(node_id, name)  # a node that joins later can be lost too
        self._say_done(final=False)

    def _counted(self, running: Collection[int]) -> Optional[int]:
        try:
            return self.count_reruns(running)  # type: ignore[misc]
        except Exception:
            return None

    def _say_done(self, final: bool) -> None:
        while self.pending and (final or not self.pending[0].waiting):
            loss = self.pending.pop(0)
            self.reported.append(loss.node)
            self.say(lost_node_line(loss.node, self.engine, loss.reruns))


def unique_names(nodes: Mapping[str, Any]) -> Dict[str, str]:
    """id -> name from id -> (host name, address): the host name where it is one node's alone
    (a SLURM node), else the address (several nodes on one machine share its host name)."""
    hosts = [host for host, _ in nodes.values()]
    return {node_id: host if host and hosts.count(host) == 1 else address
            for node_id, (host, address) in nodes.items()}


# -- per engine: the live nodes, and the attempt number a task sees ---------------------------


def ray_live_nodes(table: Optional[List[Dict[str, Any]]] = None) -> Dict[str, str]:
    """NodeID -> name of every alive Ray node (one GCS query, or ``table``: ``ray.nodes()`` already read)."""
    import ray

    alive = {n["NodeID"]: (n.get("NodeManagerHostname", ""), n.get("NodeManagerAddress", ""))
             for n in (ray.nodes() if table is None else table) if n.get("Alive")}
    return unique_names(alive)


#: The first words of Ray's own messages about a lost node (one per lost raylet, with the last
#: 20 lines of its log; one for the node marked dead; one per task it will retry).
RAY_NODE_LOSS_TEXT = re.compile(
    r"Raylet is terminated\. Termination is unexpected"
    r"|The node with node id: \S+ and address: \S+ and node name: \S+ has been marked dead"
    r"|Task \S+ failed\. There are \d+ retries remaining, so the task will be retried"
)


@contextlib.contextmanager
def quiet_ray_node_loss() -> Iterator[None]:
    """While a compute runs, Ray's notices about a lost node are not printed (the raylet's death
    with the last 20 lines of its log, the node marked dead, each task to be retried): the
    node-loss line says it in one line. Every other message Ray sends the driver passes, errors
    included (a task whose retries are exhausted fails the compute with Ray's full error)."""
    try:
        from ray._private import worker

        original = worker.print_to_stdstream  # what Ray's error listener calls, by this name, per message
    except (ImportError, AttributeError):  # a Ray without it: its messages stay as they are
        yield
        return

    def without_node_loss(data: Dict[str, Any], ignore_prefix: bool) -> None:
        lines = data.get("lines") or [""]
        if data.get("pid") == "raylet" and RAY_NODE_LOSS_TEXT.match(str(lines[0])):
            return
        original(data, ignore_prefix)

    worker.print_to_stdstream = without_node_loss
    try:
        yield
    finally:
        worker.print_to_stdstream = original


def ray_attempt() -> Optional[int]:
    """Inside a Ray task: how many times it was started before (0 for the first run)."""
    try:
        import ray

        return int(ray._private.worker.global_worker.core_worker.get_current_task_attempt_number())
    except Exception:  # not in a task, or an API Ray moved
        return None


def spark_live_nodes(sc: Any) -> Dict[str, str]:
    """host:port -> name of every Spark executor's block manager (the driver's included; it is
    never lost while the run goes on).

    An executor whose block manager has not registered yet is listed by Spark with port 0
    (measured on the test cluster; -1 where Spark has no port at all) and, a moment later,
    with its block manager's host:port. It is left out until it has its port: its first key
    would otherwise leave the list and read as a lost node (seen in CI: "lost node tsn3 ...
    0 partitions rerun", and no node was lost)."""
    infos = sc._jsc.sc().statusTracker().getExecutorInfos()
    return {f"{i.host()}:{i.port()}": node_name(str(i.host())) for i in infos if int(i.port()) > 0}


def spark_attempt() -> Optional[int]:
    """Inside a Spark task: its attempt number (0 for the first run)."""
    from pyspark import TaskContext

    context = TaskContext.get()
    return None if context is None else int(context.attemptNumber())


def dask_live_nodes(client: Any) -> Dict[str, str]:
    """worker address -> name of every Dask worker (one scheduler query)."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return unique_names({address: (node_name(str(info.get("host", ""))), address) for address, info in workers.items()})


def dask_reruns(client: Any, keys: Collection[str]) -> int:
    """How many of ``keys`` the scheduler gave to another worker after theirs died."""

    def suspicious(dask_scheduler: Any, keys: List[str]) -> int:
        tasks = dask_scheduler.tasks
        return sum(1 for key in keys if key in tasks and tasks[key].suspicious > 0)

    return int(client.run_on_scheduler(suspicious, keys=list(keys)))
