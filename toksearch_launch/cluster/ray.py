"""The Ray part: `ray start` commands, readiness probe, client environment.

Never imports ray at module level (importing the cluster package must stay
fast).  Readiness is probed in a small child process (``python -m
toksearch_launch.cluster.ray probe ...``): a GCS client blocks for up to 40 s
on an address that does not answer, and a child can be killed at any time
while the parent keeps watching the daemons for an early exit.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from typing import Any, Optional

from .plan import DAEMON_ENV, ClusterPlan, local_ray_memory, ray_executable
from .procs import ENV_MARK, Daemon

NAME = "ray"


def _env_base(plan: ClusterPlan) -> dict[str, str]:
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": plan.secret_file,
        # a node running a task drains for 30 s on SIGTERM otherwise
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "RAY_USAGE_STATS_ENABLED": "0",
        DAEMON_ENV: NAME,
        ENV_MARK: plan.root,
    }
    return plan.secret_env(env)


def _node_flags(plan: ClusterPlan, index: int) -> list[str]:
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
        store, memory = plan.object_store, plan.memory
        if store is None or memory is None:
            store, memory = local_ray_memory(plan.n_nodes)
        flags += ["--num-cpus", str(plan.cpus_per_node), "--object-store-memory", str(store),
                  "--memory", str(memory)]
    return flags


def head_argv(plan: ClusterPlan) -> list[str]:
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


def worker_argv(plan: ClusterPlan, index: int) -> list[str]:
    return [
        ray_executable(), "start", "--node-ip-address", plan.ip(index),
        "--address", f"{plan.head_ip}:{plan.ports.head['gcs']}",
        "--temp-dir", plan.node_dir(index),
        *_node_flags(plan, index),
        *map(str, plan.cfg.ray.worker.start),
        "--block",
    ]


def daemons(plan: ClusterPlan) -> list[Daemon]:
    """Head on node 0, one worker on each other node."""
    out = []
    head_env = dict(_env_base(plan))
    head_env["AUTOSCALER_METRIC_PORT"] = str(plan.ports.head["autoscaler_metrics"])
    head_env["DASHBOARD_METRIC_PORT"] = str(plan.ports.head["dashboard_metrics"])
    out.append(Daemon(
        "ray-head", plan.hosts[0], 0,
        plan.launch_argv(0, head_argv(plan), list(plan.cfg.ray.master.srun), spark=False),
        plan.log_path("ray-head", plan.hosts[0]), head_env, plan.addresses[0],
    ))
    for index in range(1, plan.n_nodes):
        host = plan.hosts[index]
        out.append(Daemon(
            "ray-worker", host, index,
            plan.launch_argv(index, worker_argv(plan, index), list(plan.cfg.ray.worker.srun), spark=False),
            plan.log_path("ray-worker", host), _env_base(plan), plan.addresses[index],
        ))
    return out


#: Ray workers start (all at once) as soon as the head node is registered in the GCS. A
#: worker started earlier asks the GCS for the head node, misses it and sleeps 2 s
#: before asking again: measured side by side here, starting with the head gave
#: 3.5 s or 5.5-6.6 s (median 4.5 s) for 2 nodes, starting at head-up 3.7-4.8 s
#: (median 4.1 s); for 3 nodes 6.5 s against 5.1 s.
WORKERS_WAIT_FOR_HEAD = True


def address(plan: ClusterPlan) -> str:
    return f"{plan.head_ip}:{plan.ports.head['gcs']}"


def client_env(plan: ClusterPlan) -> dict[str, str]:
    """What a driver needs: the GCS address and the token (by file path, never the value)."""
    return {
        "RAY_ADDRESS": address(plan),
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": plan.secret_file,
    }


# ------------------------------------------------------------------ readiness


class Probe:
    """Polls the GCS node table from a child process until ``expected`` nodes are alive."""

    def __init__(self, plan: ClusterPlan, expected: int) -> None:
        env = dict(os.environ)
        env.pop("RAY_AUTH_TOKEN", None)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=plan.secret_file)
        self.expected = expected
        self.head_up = False
        self.alive: list[dict] = []
        self.error: Optional[str] = None
        self._q: "queue.Queue[Optional[str]]" = queue.Queue()
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "toksearch_launch.cluster.ray", "probe", address(plan), str(expected)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True, text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._q.put(line)
        self._q.put(None)

    @property
    def workers_go(self) -> bool:
        """Workers may start: the head node is registered."""
        return self.head_up

    def poll(self) -> bool:
        """Update head_up / alive; True when ``expected`` nodes are alive."""
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
            self.alive = msg.get("alive", self.alive)
            self.head_up = self.head_up or any(n.get("head") for n in self.alive)
            self.error = msg.get("error", self.error)
        return len(self.alive) >= self.expected

    @property
    def ips(self) -> list[str]:
        return [n["ip"] for n in self.alive]

    @property
    def cpus(self) -> int:
        return int(sum(n.get("cpus", 0) for n in self.alive))

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()


def _probe_main(addr: str, expected: int) -> int:
    """Child side of :class:`Probe`: one JSON line per change of the alive set."""
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
                print(json.dumps({"alive": alive}), flush=True)
                last = alive
            if len(alive) >= expected:
                return 0
        except Exception as exc:  # keep polling until the parent's deadline
            print(json.dumps({"error": f"{type(exc).__name__}: {exc}"[:300]}), flush=True)
            time.sleep(0.2)
        time.sleep(0.1)


# ------------------------------------------------------------------ driver


def connect(cluster: Any, **kwargs: Any) -> Any:
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


def _refresh_auth_config() -> None:
    """Ray caches its config and token per process: reload them after the env changed."""
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except Exception:
        pass


def disconnect() -> None:
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            ray.shutdown()


if __name__ == "__main__":  # python -m toksearch_launch.cluster.ray probe ADDRESS N
    if len(sys.argv) == 4 and sys.argv[1] == "probe":
        sys.exit(_probe_main(sys.argv[2], int(sys.argv[3])))
    print("usage: python -m toksearch_launch.cluster.ray probe ADDRESS N", file=sys.stderr)
    sys.exit(2)
