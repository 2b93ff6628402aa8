"""The Spark standalone backend: master/worker commands, readiness probe, driver config and auth.

Never imports pyspark at module level.  Secrets: the daemons get
``_SPARK_AUTH_SECRET`` in their environment plus ``-Dspark.authenticate=true``
in SPARK_MASTER_OPTS / SPARK_WORKER_OPTS; the driver reads a 0600
``spark-defaults.conf`` from its own SPARK_CONF_DIR.  The secret is never on
a command line (pyspark's ``builder.config("spark.authenticate.secret", ...)``
would put it on the driver JVM's argv).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import socket
import sys
from typing import TYPE_CHECKING, Any, Optional

from .auth import DAEMON_ENV, random_token
from .backend import NodeCommand, Role
from .dirs import make_private_dir, write_private
from .ports import PortLayout
from .procs import ENV_MARK
from .resources import dry_run_shown, spark_allocation_flags

if TYPE_CHECKING:
    from .plan import ClusterPlan

NAME = "spark"
MASTER_CLASS = "org.apache.spark.deploy.master.Master"
WORKER_CLASS = "org.apache.spark.deploy.worker.Worker"
PORTS = PortLayout(head=("master", "master_ui", "driver", "driver_block_manager"), node=("worker", "worker_ui"))
#: The web UIs are not covered by spark.authenticate: whoever reaches one must not be able to
#: kill an application or driver through it (the master UI's POST /app/kill, /driver/kill).
UI_LOCKED = "-Dspark.ui.killEnabled=false"


def pyspark_home() -> Optional[str]:
    """The installed pyspark package dir (it is a Spark home: bin/spark-class, jars/), found without importing it."""
    try:
        spec = importlib.util.find_spec("pyspark")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


@functools.lru_cache(maxsize=1)  # once per process: the dry run asks per node
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


def _env_base(plan: "ClusterPlan", index: int, node_dir: str) -> dict[str, str]:
    _, home = spark_class()
    env = {
        "_SPARK_AUTH_SECRET": plan.secret,
        "PYSPARK_PYTHON": sys.executable,
        # daemon temp files (Jetty, JVM) in our dir, removed at teardown
        "SPARK_DAEMON_JAVA_OPTS": f"-Djava.io.tmpdir={node_dir} -XX:-UsePerfData",
        DAEMON_ENV: NAME,
        ENV_MARK: plan.root,
    }
    if home:
        env["SPARK_HOME"] = home
    if plan.addresses[index]:  # web UIs bind here, not 0.0.0.0 (SLURM interface rule: the wrapper sets it)
        env["SPARK_LOCAL_IP"] = plan.addresses[index]
    return env


def master_url(plan: "ClusterPlan") -> str:
    return f"spark://{plan.head_ip}:{plan.ports.head['master']}"


def master_argv(plan: "ClusterPlan") -> list[str]:
    h = plan.ports.head
    return [
        spark_class()[0], MASTER_CLASS, "--host", plan.head_ip, "--port", str(h["master"]),
        "--webui-port", str(h["master_ui"]),
        *map(str, plan.cfg.spark.master.start),
    ]


def worker_argv(plan: "ClusterPlan", index: int) -> list[str]:
    slot = plan.ports.nodes[index]
    argv = [
        spark_class()[0], WORKER_CLASS, "--host", plan.ip(index),
        "--port", str(slot["worker"]), "--webui-port", str(slot["worker_ui"]),
        "--work-dir", f"{plan.node_dir(index)}/work",
    ]
    if plan.scheduler == "local":
        argv += ["-c", str(plan.cpus_per_node)]
    else:  # SLURM: the node's allocation, filled in by its step wrapper; the user's option wins
        shown = dry_run_shown(plan.hosts[index]) if plan.dry_run else str
        argv += spark_allocation_flags(list(map(str, plan.cfg.spark.worker.start)), shown)
    return argv + [*map(str, plan.cfg.spark.worker.start), master_url(plan)]


def conf_dir(plan: "ClusterPlan") -> str:
    return f"{plan.root}/spark-conf"


def driver_conf(plan: "ClusterPlan") -> dict[str, str]:
    """The driver's settings (secret included): written to the 0600 spark-defaults.conf."""
    h = plan.ports.head
    return {
        "spark.master": master_url(plan),
        "spark.authenticate": "true",
        "spark.authenticate.secret": plan.secret,
        "spark.driver.host": plan.head_ip,
        "spark.driver.bindAddress": plan.head_ip,
        "spark.driver.port": str(h["driver"]),
        "spark.driver.blockManager.port": str(h["driver_block_manager"]),
        "spark.ui.enabled": "false",
        "spark.ui.killEnabled": "false",  # should a user turn the driver UI on
        "spark.pyspark.python": sys.executable,
        "spark.pyspark.driver.python": sys.executable,
        "spark.local.dir": f"{plan.root}/driver",
    }


def write_driver_conf(plan: "ClusterPlan") -> None:
    """SPARK_CONF_DIR for drivers: the user's spark-defaults.conf first (if any), ours after."""
    d = conf_dir(plan)
    make_private_dir(d)
    lines = []
    user_dir = os.environ.get("SPARK_CONF_DIR")
    if user_dir and os.path.abspath(user_dir) != d:
        try:
            with open(os.path.join(user_dir, "spark-defaults.conf")) as fh:
                lines.append(fh.read().rstrip("\n"))
        except OSError:
            pass
    lines += [f"{k} {v}" for k, v in driver_conf(plan).items()]
    write_private(os.path.join(d, "spark-defaults.conf"), "\n".join(lines) + "\n")


@functools.lru_cache(maxsize=None)
def direct_opener() -> Any:
    """Reads the master's /json/ directly: HPC nodes often set http_proxy, and a proxy
    cannot reach (or misreports) a cluster-internal address. Built on first use: the CLI's
    dry run plans with this module and must not pay for urllib.request."""
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class Probe:
    """Master RPC port answers (head up) -> master /json/ ALIVE with ``expected`` workers ALIVE."""

    unit = "workers"

    def __init__(self, plan: "ClusterPlan", expected: int) -> None:
        self.host = plan.head_ip
        self.rpc_port = plan.ports.head["master"]
        self.url = f"http://{plan.head_ip}:{plan.ports.head['master_ui']}/json/"
        self.expected = expected
        self.head_up = False
        self.workers: list[dict] = []
        self.error: Optional[str] = None

    @property
    def workers_go(self) -> bool:
        """Workers may start: the master's RPC port answers (one started before may miss
        the master and wait ~10 s for its registration retry)."""
        return self.head_up

    def poll(self) -> bool:
        if not self.head_up:
            try:
                socket.create_connection((self.host, self.rpc_port), timeout=0.3).close()
                self.head_up = True
            except OSError:
                return False
        try:
            with direct_opener().open(self.url, timeout=1.0) as resp:
                state = json.load(resp)
        except (OSError, ValueError) as exc:
            self.error = str(exc)
            return False
        self.workers = [w for w in state.get("workers", []) if w.get("state") == "ALIVE"]
        return state.get("status") == "ALIVE" and len(self.workers) >= self.expected

    @property
    def ips(self) -> list[str]:
        return [w.get("host", "") for w in self.workers]

    @property
    def cpus(self) -> int:
        return int(sum(w.get("cores", 0) for w in self.workers))

    @property
    def alive(self) -> list[dict]:
        return self.workers

    def close(self) -> None:
        pass


class SparkBackend:
    """Master on node 0, one worker on every node (node 0 included); spark.authenticate on."""

    name = NAME
    ports = PORTS
    workers_on_head = True
    head_last = False
    secret_file_on_nodes = False  # daemons get _SPARK_AUTH_SECRET in their environment
    node_ip_env = "SPARK_LOCAL_IP"
    env_to_drop = ("SPARK_CONF_DIR",)

    def preflight(self, cfg: Any, plan: Optional["ClusterPlan"]) -> list[str]:  # noqa: ARG002
        problems = []
        if pyspark_home() is None:
            problems.append(f"PySpark is not installed for {sys.executable}: pip install 'toksearch_launch[spark]'")
        java_home = os.environ.get("JAVA_HOME")
        java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
        if not java or not os.access(java, os.X_OK):
            problems.append("Java is missing (Spark needs it): install a JDK (17 or 21) or set JAVA_HOME")
        return problems

    def new_secret(self) -> str:
        return random_token()

    def roles(self, plan: "ClusterPlan") -> tuple[Role, Role]:
        menv = _env_base(plan, 0, plan.master_dir)
        # REST submission off; a taken port fails the start instead of silently moving
        menv["SPARK_MASTER_OPTS"] = " ".join([
            "-Dspark.authenticate=true -Dspark.master.rest.enabled=false -Dspark.port.maxRetries=0",
            UI_LOCKED, "-Dspark.master.ui.decommission.allow.mode=DENY",
        ])
        h = plan.hosts[0]
        master = Role("spark-master", [NodeCommand(
            0, h, master_argv(plan), menv, plan.log_path("spark-master", h), plan.addresses[0],
            plan.master_dir, [] if plan.dry_run else plan.ports.head_ports())], list(plan.cfg.spark.master.srun))
        nodes = []
        for i, host in enumerate(plan.hosts):
            wenv = _env_base(plan, i, plan.node_dir(i))
            wenv["SPARK_WORKER_OPTS"] = f"-Dspark.authenticate=true -Dspark.port.maxRetries=0 {UI_LOCKED}"
            wenv["SPARK_LOCAL_DIRS"] = f"{plan.node_dir(i)}/local"
            nodes.append(NodeCommand(
                i, host, worker_argv(plan, i), wenv, plan.log_path("spark-worker", host), plan.addresses[i],
                plan.node_dir(i), [] if plan.dry_run else plan.ports.ports_of_node(i, head=False)))
        return master, Role("spark-worker", nodes, list(plan.cfg.spark.worker.srun))

    def prepare(self, plan: "ClusterPlan") -> None:
        write_driver_conf(plan)

    def probe(self, plan: "ClusterPlan") -> Probe:
        return Probe(plan, expected=plan.n_nodes)

    def address(self, plan: "ClusterPlan") -> str:
        return master_url(plan)

    def client_env(self, plan: "ClusterPlan") -> dict[str, str]:
        env = {
            "SPARK_MASTER_URL": master_url(plan),
            "SPARK_CONF_DIR": conf_dir(plan),
            "PYSPARK_PYTHON": sys.executable,
            "SPARK_LOCAL_IP": plan.head_ip,  # the driver runs on the head node: bind there
        }
        _, home = spark_class()
        if home:
            env["SPARK_HOME"] = home
        return env

    def connect(self, cluster: Any, **kwargs: Any) -> Any:
        """A SparkSession bound to the master; the secret reaches the driver JVM only via SPARK_CONF_DIR."""
        for k, v in cluster.client_env().items():
            os.environ[k] = v
        from pyspark import SparkContext
        from pyspark.sql import SparkSession

        if SparkContext._active_spark_context is None and SparkContext._gateway is not None:
            # A driver JVM left by an earlier, stopped session never read this cluster's
            # SPARK_CONF_DIR (its secret): launch a fresh one.
            _shutdown_gateway()
            SparkSession._instantiatedSession = None
            SparkSession._activeSession = None
        builder = SparkSession.builder.master(cluster.address)
        builder = builder.appName(str(kwargs.pop("app_name", "toksearch")))
        for k, v in kwargs.items():
            if "secret" in k.lower():
                raise ValueError(f"{k}: secrets go through SPARK_CONF_DIR, never through the builder (argv)")
            builder = builder.config(k, v)
        return builder.getOrCreate()

    def disconnect(self, session: Any) -> None:
        disconnect(session)

    def forget_client(self) -> None:
        pass  # the driver JVM that read the conf is stopped by disconnect()


BACKEND = SparkBackend()


def disconnect(session: Any) -> None:
    """Stop the session and its driver JVM (it read this cluster's SPARK_CONF_DIR at launch and
    could not serve another cluster); a later connect() launches a fresh one."""
    try:
        session.stop()
    finally:
        _shutdown_gateway()


def _shutdown_gateway() -> None:
    """End this process's driver JVM, if any, so the next session launches a fresh one."""
    from pyspark import SparkContext

    gateway = SparkContext._gateway
    SparkContext._gateway = None
    SparkContext._jvm = None
    if gateway is not None:
        proc = getattr(gateway, "proc", None)
        try:
            gateway.shutdown()
        except Exception:
            pass
        if proc is not None:
            try:
                if proc.stdin:
                    proc.stdin.close()  # the driver JVM exits when its stdin closes
                proc.wait(timeout=5)
            except Exception:
                proc.kill()
                proc.wait()

