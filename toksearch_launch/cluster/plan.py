"""The plan of one cluster: nodes, addresses, ports, dirs, secrets, and how a daemon is launched.

Planning is separate from starting so that the dry run (:func:`plan_commands`)
shows exactly the argv the job would run, with placeholders where only the
running job can know a value (random ports, the temp dir name, node addresses).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import ClusterError
from .placement import NODE_IP, Placement, placeholder_address
from .ports import PortPlan

#: Ray's Unix socket path is the temp dir + about 62 bytes and may not exceed 107.
MAX_TMP_DIR = 40
TMP_PREFIX = "tsl-"
#: Env var the daemons carry so that code running inside them (a Ray task, a Spark
#: executor) never starts a cluster of its own from `job_cluster()`.
DAEMON_ENV = "TOKSEARCH_CLUSTER_DAEMON"
#: SLURM: env vars through which the step wrapper gets a secret it must write to a
#: 0600 file on its node (removed from the daemon's environment).
SECRET_VALUE_ENV = "_TOKSEARCH_SECRET"
SECRET_FILE_ENV = "_TOKSEARCH_SECRET_FILE"

_SECRETS: dict[str, str] = {}


def job_secret(kind: str) -> str:
    """A fresh random secret per process (= per job), one per kind ("ray", "spark").

    Per process rather than per cluster because Ray caches its token and a pyspark
    driver JVM reads its secret once at launch: clusters of one process share it.
    """
    if kind not in _SECRETS:
        _SECRETS[kind] = secrets.token_hex(32)
    return _SECRETS[kind]


def ray_executable() -> str:
    """The venv's ``ray`` script next to the running interpreter (same Ray as the driver)."""
    cand = Path(sys.executable).with_name("ray")
    if cand.exists():
        return str(cand)
    found = shutil.which("ray")
    return found or str(cand)


def pyspark_home() -> Optional[str]:
    """The installed pyspark package dir (it is a Spark home: bin/spark-class, jars/), found without importing it."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("pyspark")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def spark_class() -> tuple[str, Optional[str]]:
    """(spark-class path, SPARK_HOME to set).

    The installed pyspark's own ``bin/spark-class`` with SPARK_HOME pointing at it,
    so the daemons run the same Spark version as the driver. (The venv's
    ``bin/spark-class`` wrapper looks for Spark with whatever ``python3`` is first
    on PATH, and fails when the venv is not activated; another Spark on PATH may
    be another version.)  Falls back to ``spark-class`` on PATH without pyspark.
    """
    home = pyspark_home()
    if home and os.path.exists(os.path.join(home, "bin", "spark-class")):
        return os.path.join(home, "bin", "spark-class"), home
    found = shutil.which("spark-class")
    if found:
        return found, None
    return "spark-class", None


def shm_bytes(path: str = "/dev/shm") -> Optional[int]:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_blocks * st.f_frsize


def total_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 << 30


def local_cpus_per_node(cfg: Any, n_nodes: int) -> int:
    """site=local: ``site.local_cpus_per_node``, or this machine's CPUs split over the nodes (at least 1)."""
    given = cfg.site.get("local_cpus_per_node")
    if given:
        return int(given)
    return max(1, (os.cpu_count() or 1) // max(1, n_nodes))


def local_ray_memory(n_nodes: int) -> tuple[int, int]:
    """(object store, memory) bytes per local Ray node: modest, so several nodes fit one machine."""
    shm = shm_bytes() or (2 << 30)
    store = min(1 << 30, max(128 << 20, shm // (4 * max(1, n_nodes))))
    memory = max(512 << 20, total_memory() // max(1, n_nodes))
    return store, memory


_SIZE = re.compile(r"^\s*([0-9.]+(?:e[0-9]+)?)\s*$", re.I)


def option_value(opts: list[str], name: str) -> Optional[str]:
    """The last value of ``--name V`` / ``--name=V`` in an option list (the one that wins)."""
    value = None
    for i, opt in enumerate(opts):
        if opt == name and i + 1 < len(opts):
            value = opts[i + 1]
        elif opt.startswith(name + "="):
            value = opt.split("=", 1)[1]
    return value


def parse_bytes(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    m = _SIZE.match(str(text))
    return int(float(m.group(1))) if m else None


@dataclass
class ClusterPlan:
    """Everything needed to start, probe and stop one cluster."""

    backend: str
    scheduler: str  # local | slurm
    cfg: Any
    placement: Placement
    #: address per placement index; None: resolved by the node's step wrapper (interface rule)
    addresses: list[Optional[str]]
    ports: PortPlan
    root: str  # per-job temp dir, same path on every node, 0700
    run_dir: Path
    cpus_per_node: Optional[int] = None  # site=local only
    object_store: Optional[int] = None  # site=local only (bytes per node)
    memory: Optional[int] = None  # site=local only (bytes per node)
    dry_run: bool = False
    secret: str = field(default="", repr=False)

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
        """The daemon's own dir on its node: ``<root>/r1`` (Ray) or ``<root>/s1`` (Spark)."""
        return f"{self.root}/{self.backend[0]}{index + 1}"

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

    # --------------------------------------------------------------- launching

    @property
    def master_dir(self) -> str:
        """Spark's master has its own dir: node 0 also runs a worker, and each wrapper removes its dir."""
        return f"{self.root}/sm"

    def launch_argv(
        self, index: int, daemon_argv: list[str], srun_opts: list[str], *, spark: bool,
        node_dir: Optional[str] = None, check_ports: Optional[list[int]] = None,
    ) -> list[str]:
        """The argv that runs ``daemon_argv`` on node ``index``.

        site=local: the daemon itself.  SLURM: one step on that node through the
        step wrapper (``python -m toksearch_launch.cluster.node``), which resolves
        the node address when only the node knows it, makes the 0700 temp dir,
        writes the secret file, checks the node's ports, and on SIGTERM stops the
        daemon's whole session and removes the dir.
        """
        if self.scheduler == "local":
            return list(daemon_argv)
        rule = self.cfg.site.address
        wrapper = [sys.executable, "-m", "toksearch_launch.cluster.node", "--root", self.root,
                   "--dir", node_dir or self.node_dir(index)]
        if self.addresses[index]:
            wrapper += ["--ip", self.addresses[index]]
        elif self.dry_run and rule.method != "interface":
            wrapper += ["--ip", placeholder_address(self.hosts[index])]
        else:
            wrapper += ["--interface", rule.interface]
        if spark:
            wrapper += ["--spark"]
        if not self.dry_run:
            ports = self.ports.ports_of_node(index) if check_ports is None else check_ports
            wrapper += ["--check-ports", compress_ports(ports)]
        return [
            "srun", "--nodes=1", "--ntasks=1", "-w", self.hosts[index], "--export=ALL",
            *map(str, srun_opts), *wrapper, "--", *daemon_argv,
        ]

    def secret_env(self, local_file_env: dict[str, str]) -> dict[str, str]:
        """SLURM: the env that makes the node wrapper write the secret file on its node."""
        if self.scheduler == "local":
            return local_file_env
        env = dict(local_file_env)
        env[SECRET_VALUE_ENV] = self.secret
        env[SECRET_FILE_ENV] = self.secret_file
        return env


def compress_ports(ports: list[int]) -> str:
    """[1,2,3,7] -> "1-3,7" (the wrapper's --check-ports)."""
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


def new_root(tmp_base: str) -> str:
    """``<tmp_base>/tsl-<6 random chars>``: short (Ray's sockets) and unguessable."""
    return os.path.join(tmp_base.rstrip("/") or "/", TMP_PREFIX + secrets.token_hex(3))


def check_root_length(root: str, longest: str) -> None:
    if len(longest) > MAX_TMP_DIR:
        raise ClusterError(
            f"temp dir {longest!r} is {len(longest)} characters; Ray's Unix sockets (temp dir + "
            f"~62 bytes, 107 at most) need {MAX_TMP_DIR} or less: set site.tmp_base to a short path such as /tmp"
        )


def make_root(root: str) -> None:
    """Create the job's temp dir, 0700 (fails if it exists: the name is ours alone)."""
    os.makedirs(os.path.dirname(root), exist_ok=True)
    os.mkdir(root, 0o700)
    os.chmod(root, 0o700)


def write_private(path: str, text: str) -> None:
    """Write a 0600 file atomically (the secret never exists with looser permissions)."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
