"""The Backend protocol: everything the lifecycle needs to know about one engine (Ray, Spark, Dask).

A backend module (``cluster/ray.py``, ``spark.py``, ``dask.py``) defines one
object satisfying :class:`Backend` and registers its name in :data:`BACKENDS`.
The lifecycle (:mod:`.lifecycle`), the planner (:mod:`.plan`) and the step
launchers (:mod:`.launcher`) call only these methods: no code outside a
backend module asks which engine it holds.  Backend modules never import
their engine at module level (importing the cluster package stays fast).
"""

from __future__ import annotations

import importlib
import json
import queue
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Protocol, runtime_checkable

from .errors import ClusterError
from .owner import OWNER_ENV, this_owner  # the probe child exits when its owner dies

if TYPE_CHECKING:
    from .plan import ClusterPlan
    from .ports import PortLayout

#: name -> module that defines ``BACKEND``; a new engine is one module plus one line here.
BACKENDS: dict[str, str] = {
    "ray": "toksearch_launch.cluster.ray",
    "spark": "toksearch_launch.cluster.spark",
    "dask": "toksearch_launch.cluster.dask",
}


@dataclass
class NodeCommand:
    """One daemon on one node, as the backend wants it run (before any launcher wraps it)."""

    index: int  # placement index (0 = the head's node)
    host: str
    argv: list[str]
    env: dict[str, str]  # added to the launcher's environment; may hold secrets
    log_path: Path
    address: Optional[str]  # None: only the node knows it (the step wrapper resolves it)
    node_dir: str  # the daemon's own dir on its node (removed at its stop)
    ports: list[int] = field(default_factory=list)  # the ports it listens on (checked on its node)


@dataclass
class Role:
    """One kind of daemon on a set of nodes: the head, or the workers."""

    name: str  # e.g. ray-head, spark-worker
    nodes: list[NodeCommand]
    srun: list[str] = field(default_factory=list)  # extra options for its SLURM step(s)


class Probe(Protocol):
    """Readiness of a starting cluster, polled by the lifecycle until its deadline."""

    expected: int
    unit: str  # what ``expected`` counts: "nodes" or "workers"
    head_up: bool
    error: Optional[str]

    @property
    def workers_go(self) -> bool: ...  # the workers may start now
    @property
    def ips(self) -> list[str]: ...  # addresses of what registered
    @property
    def cpus(self) -> int: ...
    @property
    def alive(self) -> list[dict]: ...
    def poll(self) -> bool: ...  # True once ``expected`` registered
    def close(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """One engine's daemons, readiness, client side and auth."""

    name: str
    ports: "PortLayout"
    #: a worker also runs on the head's node (Spark, Dask) or not (Ray)
    workers_on_head: bool
    #: stop the workers before the head (Ray: a worker stopped with its GCS waits on it)
    head_last: bool
    #: the secret travels to each node as a 0600 file (SLURM: written by the step wrapper)
    secret_file_on_nodes: bool
    #: env var the step wrapper sets to the node's address (e.g. SPARK_LOCAL_IP), or None
    node_ip_env: Optional[str]
    #: env vars of the caller that must not leak into the daemons (another cluster's address, ...)
    env_to_drop: tuple[str, ...]

    def preflight(self, cfg: Any, plan: Optional["ClusterPlan"]) -> list[str]:
        """Problems found before anything starts (not installed, sizes that cannot fit)."""
    def new_secret(self) -> str:
        """A fresh per-job secret (token, or key + certificate)."""
    def roles(self, plan: "ClusterPlan") -> tuple[Role, Role]:
        """(head, workers): the daemon commands of each role, per node."""
    def prepare(self, plan: "ClusterPlan") -> None:
        """Files the script's node needs before the start (secret file, driver config)."""
    def probe(self, plan: "ClusterPlan") -> Probe:
        """A readiness probe for this plan."""
    def address(self, plan: "ClusterPlan") -> str:
        """What a client connects to."""
    def client_env(self, plan: "ClusterPlan") -> dict[str, str]:
        """What another driver process needs (paths to 0600 files, never a secret value)."""
    def connect(self, cluster: Any, **kwargs: Any) -> Any:
        """A client session in this process (ray context, SparkSession, distributed.Client)."""
    def disconnect(self, session: Any) -> None:
        """Close what connect() opened."""
    def forget_client(self) -> None:
        """After connect()'s environment was undone: drop what the engine cached from it."""


def backend_names() -> tuple[str, ...]:
    return tuple(BACKENDS)


def get_backend(name: str) -> Backend:
    """The registered backend ``name`` (its module is imported, its engine is not)."""
    if name not in BACKENDS:
        raise ClusterError(f"unknown cluster backend {name!r} (choose: {', '.join(BACKENDS)})")
    return importlib.import_module(BACKENDS[name]).BACKEND


def info_env(name: str) -> str:
    """Env var (set by `Cluster.client_env()`) naming the JSON file that describes a running
    cluster; `job_cluster()` in a child process attaches to it instead of starting one."""
    return f"TOKSEARCH_CLUSTER_{name.upper()}"


def foreign_env() -> set[str]:
    """Env vars no daemon may inherit: every backend's client settings and attach files."""
    out: set[str] = set()
    for name in BACKENDS:
        out.add(info_env(name))
        out.update(get_backend(name).env_to_drop)
    return out


class ChildProbe:
    """A readiness probe run as a child process that prints one JSON line per change.

    Lines: ``{"head_up": true}``, ``{"alive": [{"ip":..., "cpus":...}, ...]}``,
    ``{"error": "..."}``.  A child because an engine's client may block for tens of
    seconds on an address that does not answer, while the lifecycle must keep
    watching its daemons; it can be killed at any time.
    """

    def __init__(self, argv: list[str], env: dict[str, str], expected: int, unit: str,
                 log_path: Optional[Path] = None) -> None:
        self.expected = expected
        self.unit = unit
        self.head_up = False
        self._alive: list[dict] = []
        self.error: Optional[str] = None
        self._q: "queue.Queue[Optional[str]]" = queue.Queue()
        # its stderr goes to the run dir's logs (a probe that cannot even start says why there)
        err = open(log_path, "ab") if log_path is not None else subprocess.DEVNULL
        try:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                env={**env, OWNER_ENV: this_owner()}, start_new_session=True, text=True,
            )
        finally:
            if log_path is not None:
                err.close()  # type: ignore[union-attr]
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._q.put(line)
        self._q.put(None)

    @property
    def workers_go(self) -> bool:
        return self.head_up

    def poll(self) -> bool:
        while True:
            try:
                line = self._q.get_nowait()
            except queue.Empty:
                break
            if line is None:
                break
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            self._alive = msg.get("alive", self._alive)
            self.head_up = self.head_up or bool(msg.get("head_up"))
            self.error = msg.get("error", self.error)
        return len(self._alive) >= self.expected

    @property
    def alive(self) -> list[dict]:
        return self._alive

    @property
    def ips(self) -> list[str]:
        return [n["ip"] for n in self._alive]

    @property
    def cpus(self) -> int:
        return int(sum(n.get("cpus", 0) for n in self._alive))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()


def probe_say(**msg: Any) -> None:
    """Child side of :class:`ChildProbe`: one JSON line."""
    print(json.dumps(msg), flush=True)


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
