"""The Ray backend: `ray start` commands, readiness probe, client environment and token auth.

Never imports ray at module level (importing the cluster package must stay
fast).  Readiness is probed in a small child process (``python -m
toksearch_launch.cluster.ray probe ...``): a GCS client blocks for up to 40 s
on an address that does not answer, and a child can be killed at any time
while the parent keeps watching the daemons for an early exit.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from .auth import DAEMON_ENV, random_token
from .backend import ChildProbe, NodeCommand, Role, probe_say, python_module
from .dirs import write_private
from .ports import PortLayout
from .procs import ENV_MARK
from .resources import (dry_run_shown, gigabytes, option_value, parse_bytes, ray_allocation_flags, shm_bytes,
                        total_memory)

if TYPE_CHECKING:
    from .plan import ClusterPlan

NAME = "ray"
#: Ray worker processes per node (each takes one port of the node's range).
WORKER_PORTS_LOCAL = 64
WORKER_PORTS_SLURM = 1000
PORTS = PortLayout(
    head=("gcs", "client_server", "dashboard", "autoscaler_metrics", "dashboard_metrics"),
    node=("node_manager", "object_manager", "agent_http", "agent_grpc", "metrics", "runtime_env_agent"),
    ranges=(("worker", WORKER_PORTS_LOCAL, WORKER_PORTS_SLURM),),
    head_slot=10,
)


@functools.lru_cache(maxsize=1)  # once per process: the dry run asks per node
def ray_executable() -> str:
    """The venv's ``ray`` script next to the running interpreter (same Ray as the driver)."""
    cand = Path(sys.executable).with_name("ray")
    if cand.exists():
        return str(cand)
    found = shutil.which("ray")
    return found or str(cand)


def local_ray_memory(n_nodes: int) -> tuple[int, int]:
    """(object store, memory) bytes per local Ray node: modest, so several nodes fit one machine."""
    shm = shm_bytes() or (2 << 30)
    store = min(1 << 30, max(128 << 20, shm // (4 * max(1, n_nodes))))
    memory = max(512 << 20, total_memory() // max(1, n_nodes))
    return store, memory


def _env_base(plan: "ClusterPlan") -> dict[str, str]:
    return {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": plan.secret_file,
        # a node running a task drains for 30 s on SIGTERM otherwise
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        DAEMON_ENV: NAME,
        ENV_MARK: plan.root,
    }


def _node_flags(plan: "ClusterPlan", index: int) -> list[str]:
    slot = plan.ports.nodes[index]
    flags = [
        "--node-manager-port", str(slot["node_manager"]),
        "--object-manager-port", str(slot["object_manager"]),
        "--dashboard-agent-listen-port", str(slot["agent_http"]),
        "--dashboard-agent-grpc-port", str(slot["agent_grpc"]),
        "--metrics-export-port", str(slot["metrics"]),
        "--runtime-env-agent-port", str(slot["runtime_env_agent"]),
        "--min-worker-port", str(slot["min_worker"]),
        "--max-worker-port", str(slot["max_worker"]),
        "--disable-usage-stats",
    ]
    if plan.scheduler == "local":
        store, memory = local_ray_memory(plan.n_nodes)
        flags += ["--num-cpus", str(plan.cpus_per_node), "--object-store-memory", str(store),
                  "--memory", str(memory)]
    else:  # SLURM: the node's allocation, filled in by its step wrapper; the user's option wins
        opts = plan.cfg.ray.master.start if index == 0 else plan.cfg.ray.worker.start
        shown = dry_run_shown(plan.hosts[index]) if plan.dry_run else str
        flags += ray_allocation_flags(list(map(str, opts)), shown)
    return flags


def head_argv(plan: "ClusterPlan") -> list[str]:
    ip, h = plan.head_ip, plan.ports.head
    return [
        ray_executable(), "start", "--head", "--node-ip-address", ip, "--port", str(h["gcs"]),
        "--temp-dir", plan.node_dir(0),
        "--ray-client-server-port", str(h["client_server"]),
        "--dashboard-host", ip, "--dashboard-port", str(h["dashboard"]),
        "--include-dashboard", "false",
        *_node_flags(plan, 0),
        *map(str, plan.cfg.ray.master.start),
        "--block",
    ]


def worker_argv(plan: "ClusterPlan", index: int) -> list[str]:
    return [
        ray_executable(), "start", "--node-ip-address", plan.ip(index),
        "--address", f"{plan.head_ip}:{plan.ports.head['gcs']}",
        "--temp-dir", plan.node_dir(index),
        *_node_flags(plan, index),
        *map(str, plan.cfg.ray.worker.start),
        "--block",
    ]


def address(plan: "ClusterPlan") -> str:
    return f"{plan.head_ip}:{plan.ports.head['gcs']}"


def _ports_of(plan: "ClusterPlan", index: int) -> list[int]:
    return [] if plan.dry_run else plan.ports.ports_of_node(index)


class RayBackend:
    """Head on node 0, one worker on each other node; token auth on every node and driver."""

    name = NAME
    ports = PORTS
    workers_on_head = False
    head_last = True
    secret_file_on_nodes = True
    node_ip_env = None
    env_to_drop = ("RAY_ADDRESS", "RAY_AUTH_TOKEN")

    def preflight(self, cfg: Any, plan: Optional["ClusterPlan"]) -> list[str]:
        if importlib.util.find_spec("ray") is None:
            return [f"Ray is not installed for {sys.executable}: pip install 'toksearch_launch[ray]'"]
        if not os.path.exists(ray_executable()):
            return [f"the `ray` command is missing next to {sys.executable}"]
        return object_store_problems(cfg, plan) if plan is not None else []

    def new_secret(self) -> str:
        return random_token()

    def roles(self, plan: "ClusterPlan") -> tuple[Role, Role]:
        head_env = _env_base(plan)
        head_env["AUTOSCALER_METRIC_PORT"] = str(plan.ports.head["autoscaler_metrics"])
        head_env["DASHBOARD_METRIC_PORT"] = str(plan.ports.head["dashboard_metrics"])
        h = plan.hosts[0]
        head = Role("ray-head", [NodeCommand(
            0, h, head_argv(plan), head_env, plan.log_path("ray-head", h), plan.addresses[0],
            plan.node_dir(0), _ports_of(plan, 0))], list(plan.cfg.ray.master.srun))
        workers = Role("ray-worker", [
            NodeCommand(i, plan.hosts[i], worker_argv(plan, i), _env_base(plan),
                        plan.log_path("ray-worker", plan.hosts[i]), plan.addresses[i], plan.node_dir(i),
                        _ports_of(plan, i))
            for i in range(1, plan.n_nodes)
        ], list(plan.cfg.ray.worker.srun))
        return head, workers

    def prepare(self, plan: "ClusterPlan") -> None:
        write_private(plan.secret_file, plan.secret)

    def probe(self, plan: "ClusterPlan") -> ChildProbe:
        """Polls the GCS node table from a child process until every node is alive."""
        env = dict(os.environ)
        env.pop("RAY_AUTH_TOKEN", None)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=plan.secret_file)
        argv = python_module("toksearch_launch.cluster.ray", "probe", address(plan), str(plan.n_nodes))
        return ChildProbe(argv, env, expected=plan.n_nodes, unit="nodes", log_path=plan.log_path("ray-probe", plan.hosts[0]))

    def address(self, plan: "ClusterPlan") -> str:
        return address(plan)

    def client_env(self, plan: "ClusterPlan") -> dict[str, str]:
        """The GCS address and the token (by file path, never the value)."""
        return {"RAY_ADDRESS": address(plan), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": plan.secret_file}

    def connect(self, cluster: Any, **kwargs: Any) -> Any:
        """``ray.init(address=...)`` with the token applied to this process (by file path)."""
        for k, v in cluster.client_env().items():
            if k != "RAY_ADDRESS":
                os.environ[k] = v
        os.environ.pop("RAY_AUTH_TOKEN", None)
        import ray

        _refresh_auth_config()
        if ray.is_initialized():
            current = ray.get_runtime_context().gcs_address
            if current != cluster.address:
                from .errors import ClusterError

                raise ClusterError(f"Ray is already connected to {current}, not to this job's cluster "
                                   f"{cluster.address}: call ray.shutdown() first")
            return ray.get_runtime_context()
        kwargs.setdefault("address", cluster.address)
        kwargs.setdefault("log_to_driver", True)
        return ray.init(**kwargs)

    def disconnect(self, session: Any) -> None:  # noqa: ARG002
        if "ray" in sys.modules:
            import ray

            if ray.is_initialized():
                ray.shutdown()

    def forget_client(self) -> None:
        if "ray" in sys.modules:
            _refresh_auth_config()


BACKEND = RayBackend()


def object_store_problems(cfg: Any, plan: "ClusterPlan") -> list[str]:
    """Object stores that cannot fit /dev/shm (site=local: all nodes share this machine's)."""
    shm = shm_bytes()
    if not shm:
        return []
    head = parse_bytes(option_value(list(map(str, cfg.ray.master.start)), "--object-store-memory"))
    worker = parse_bytes(option_value(list(map(str, cfg.ray.worker.start)), "--object-store-memory"))
    if plan.scheduler == "local":
        default = local_ray_memory(plan.n_nodes)[0]
        total = (head or default) + (plan.n_nodes - 1) * (worker or default)
        if total > shm:
            return [f"Ray object stores ask {gigabytes(total)} in all on this machine, more than /dev/shm "
                    f"({gigabytes(shm)}): lower --object-store-memory in ray.master.start / ray.worker.start"]
        return []
    out = []
    for what, value in (("ray.master.start", head), ("ray.worker.start", worker)):
        if value and value > shm:
            out.append(f"Ray object store asked in {what} ({gigabytes(value)}) is larger than /dev/shm "
                       f"({gigabytes(shm)}) on {os.uname().nodename}: lower --object-store-memory")
    return out


def _refresh_auth_config() -> None:
    """Ray caches its config and token per process: reload them after the env changed.

    Private API, kept here alone: Ray 2.60 has no public way to drop the cached
    token (its own test helpers, ``ray._private.authentication_test_utils``, do
    exactly this).  Without it a later ``ray.init()`` in this process would send
    a removed cluster's token.
    """
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:
        pass


# ------------------------------------------------------------------ probe child


def _probe_main(addr: str, expected: int) -> int:
    """Child side of the probe: one JSON line per change of the alive set."""
    import socket

    host, _, port = addr.rpartition(":")
    while True:  # the GCS port first: a GCS client on a dead port blocks for 40 s
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    from ray._raylet import GcsClient

    client = None
    last = None
    while True:
        try:
            if client is None:
                client = GcsClient(address=addr)
            infos = client.get_all_node_info(timeout=2)
            alive = []
            for info in infos.values():
                if info.state != 0:  # GcsNodeInfo.ALIVE
                    continue
                res = dict(info.resources_total)
                alive.append({"ip": info.node_manager_address, "cpus": res.get("CPU", 0.0),
                              "head": bool(info.is_head_node)})
            alive.sort(key=lambda n: (not n["head"], n["ip"]))
            if alive != last:
                probe_say(alive=alive, head_up=any(n["head"] for n in alive))
                last = alive
            if len(alive) >= expected:
                return 0
        except Exception as exc:  # keep polling until the parent's deadline
            probe_say(error=f"{type(exc).__name__}: {exc}"[:300])
            time.sleep(0.2)
        time.sleep(0.1)


if __name__ == "__main__":  # python -m toksearch_launch.cluster.ray probe ADDRESS N
    from .owner import exit_with_owner

    exit_with_owner()  # a probe whose owner died must not spin on
    if len(sys.argv) == 4 and sys.argv[1] == "probe":
        sys.exit(_probe_main(sys.argv[2], int(sys.argv[3])))
    print("usage: python -m toksearch_launch.cluster.ray probe ADDRESS N", file=sys.stderr)
    sys.exit(2)
