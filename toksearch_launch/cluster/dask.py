"""The Dask backend (dask.distributed): a scheduler on the script's node, a worker on every node.

Everything Dask-specific lives in this module; the lifecycle, planner and
launchers reach it only through :class:`~.backend.Backend`.  Never imports
dask at module level.

* **Commands:** ``python -m dask scheduler --protocol tls --host IP --port P ...``
  and ``python -m dask worker tls://IP:P --host IP --nanny-port A:B
  --worker-port C:D --nworkers N ...`` (the venv's own Dask); user options from
  ``dask.master.start`` / ``dask.worker.start`` come last and win.
* **Ports:** scheduler and its HTTP/dashboard port on the head; per node the
  nanny, the worker and the worker's HTTP port (it serves health and metrics
  routes even with ``--no-dashboard``), all inside the cluster's block and
  bound to the node's address.  One worker process per node (threads = the
  node's CPUs): the CLI cannot pin the HTTP ports of ``--nworkers N``.  The
  dashboards are off; ``dask.master.start=[--dashboard]`` turns the
  scheduler's on at its pinned port.
* **Auth: mutual TLS, on by default.**  Each job makes a fresh EC key and a
  self-signed certificate (as ``distributed.security.Security.temporary()``
  does, but written to one 0600 PEM file so separate processes and nodes can
  share it).  The scheduler, every worker and every client present it and
  require it: a client without the key is refused (``TLS certificate does not
  match``).  On SLURM the PEM reaches each node in its step's environment and
  the step wrapper writes the node's 0600 copy, like Ray's token.
* **Readiness:** a child probe waits for the scheduler port, then polls
  ``Client.scheduler_info()`` until every expected worker process is there.
* **Client:** ``DASK_SCHEDULER_ADDRESS`` + ``DASK_DISTRIBUTED__COMM__TLS__*``
  (file paths), so a plain ``distributed.Client()`` in any process finds it.
"""

from __future__ import annotations

import datetime
import importlib.util
import os
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Optional

from .auth import DAEMON_ENV
from .backend import ChildProbe, NodeCommand, Role, probe_say, python_module
from .dirs import write_private
from .ports import PortLayout
from .procs import ENV_MARK
from .resources import allocated_cpus, allocated_memory, total_memory

if TYPE_CHECKING:
    from .plan import ClusterPlan

NAME = "dask"
#: Worker processes a node may run.  Each opens a nanny port, a worker port and an HTTP
#: port (health and metrics routes, even with --no-dashboard); ``dask worker --nworkers N``
#: would give all N one HTTP address, so a small per-node supervisor (``python -m
#: toksearch_launch.cluster.dask workers``) starts N single-process workers instead.
MAX_WORKERS_LOCAL = 8
MAX_WORKERS_SLURM = 64
PORTS = PortLayout(
    head=("scheduler", "dashboard"),
    node=(),
    ranges=tuple((name, MAX_WORKERS_LOCAL, MAX_WORKERS_SLURM) for name in ("nanny", "worker", "http")),
)
CERT_DAYS = 365


def scheduler_address(plan: "ClusterPlan") -> str:
    return f"tls://{plan.head_ip}:{plan.ports.head['scheduler']}"


def _tls_flags(plan: "ClusterPlan") -> list[str]:
    pem = plan.secret_file  # key + certificate; the certificate is its own CA
    return ["--tls-ca-file", pem, "--tls-cert", pem, "--tls-key", pem]


def _env(plan: "ClusterPlan", node_dir: str) -> dict[str, str]:
    return {
        DAEMON_ENV: NAME,
        ENV_MARK: plan.root,
        "DASK_TEMPORARY_DIRECTORY": node_dir,
        "DASK_DISTRIBUTED__WORKER__DAEMON": "False",  # worker processes may start their own pools
    }


def scheduler_argv(plan: "ClusterPlan") -> list[str]:
    h = plan.ports.head
    return [
        *python_module("dask", "scheduler"), "--protocol", "tls", "--host", plan.head_ip,
        "--port", str(h["scheduler"]), "--dashboard-address", f"{plan.head_ip}:{h['dashboard']}",
        "--no-dashboard", *_tls_flags(plan),
        *map(str, plan.cfg.dask.master.start),
    ]


def processes_on(plan: "ClusterPlan", index: int) -> int:
    """Single-threaded worker processes on node ``index``: one per CPU it has for the job
    (site=local: its share of this machine; SLURM: SLURM_JOB_CPUS_PER_NODE), at least 1.

    Processes, not threads: the steps are Python (the GIL) and MdsSignal keeps one
    connection per process, which threads of one worker would share."""
    if plan.scheduler == "local":
        cpus = plan.cpus_per_node or 1
        limit = MAX_WORKERS_LOCAL
    else:
        cpus = 1 if plan.dry_run else allocated_cpus().get(plan.hosts[index], 1)
        limit = MAX_WORKERS_SLURM
    return max(1, min(int(cpus), limit))


def worker_argv(plan: "ClusterPlan", index: int) -> list[str]:
    """The node's supervisor, which runs ``processes_on()`` workers, each on its own ports."""
    slot, ip = plan.ports.nodes[index], plan.ip(index)
    count = processes_on(plan, index)
    worker = [
        *python_module("dask", "worker"), scheduler_address(plan), "--protocol", "tls", "--host", ip,
        "--nworkers", "1", "--nthreads", "1", "--no-dashboard",
        "--local-directory", f"{plan.node_dir(index)}/work", *_tls_flags(plan),
    ]
    if plan.scheduler == "local":  # a share of this machine; SLURM: the node's allocation
        share = max(256 << 20, total_memory() // max(1, plan.n_nodes) // count)
        worker += ["--memory-limit", str(share)]
    elif not plan.dry_run and (memory := allocated_memory(
            os.environ, allocated_cpus().get(plan.hosts[index], count))):
        worker += ["--memory-limit", str(max(256 << 20, memory // count))]
    return [
        *python_module("toksearch_launch.cluster.dask", "workers"), "--count", str(count),
        "--name", plan.hosts[index], "--host", ip, "--nanny-port", str(slot["min_nanny"]),
        "--worker-port", str(slot["min_worker"]), "--http-port", str(slot["min_http"]),
        "--", *worker, *map(str, plan.cfg.dask.worker.start),
    ]


def make_pem() -> str:
    """A fresh EC private key and its self-signed certificate, PEM (key first): the job's secret."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "toksearch-dask")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return (key_pem + cert.public_bytes(serialization.Encoding.PEM)).decode()


def security(pem: str) -> Any:
    """The client's ``distributed.Security`` for the job's PEM (encryption required)."""
    from distributed.security import Security

    return Security(tls_ca_file=pem, tls_client_cert=pem, tls_client_key=pem, require_encryption=True)


class DaskBackend:
    """Scheduler on node 0, a worker (nanny + worker processes) on every node; mutual TLS."""

    name = NAME
    ports = PORTS
    workers_on_head = True
    #: workers first: a nanny whose scheduler is gone retries its goodbye until the
    #: grace period ends (measured: 6.2 s all at once, see docs/cluster.md)
    head_last = True
    secret_file_on_nodes = True
    node_ip_env = None
    env_to_drop = (
        "DASK_SCHEDULER_ADDRESS", "DASK_DISTRIBUTED__COMM__TLS__CA_FILE",
        "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT", "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY",
        "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION",
    )

    def preflight(self, cfg: Any, plan: Optional["ClusterPlan"]) -> list[str]:  # noqa: ARG002
        missing = [m for m in ("distributed", "cryptography") if importlib.util.find_spec(m) is None]
        if missing:
            return [f"{' and '.join(missing)} not installed for {sys.executable}: "
                    "pip install 'toksearch_launch[dask]'"]
        return []

    def new_secret(self) -> str:
        return make_pem()

    def roles(self, plan: "ClusterPlan") -> tuple[Role, Role]:
        h = plan.hosts[0]
        scheduler = Role("dask-scheduler", [NodeCommand(
            0, h, scheduler_argv(plan), _env(plan, plan.master_dir), plan.log_path("dask-scheduler", h),
            plan.addresses[0], plan.master_dir, [] if plan.dry_run else plan.ports.head_ports())],
            list(plan.cfg.dask.master.srun))
        workers = Role("dask-worker", [
            NodeCommand(i, host, worker_argv(plan, i), _env(plan, plan.node_dir(i)),
                        plan.log_path("dask-worker", host), plan.addresses[i], plan.node_dir(i),
                        [] if plan.dry_run else plan.ports.ports_of_node(i, head=False))
            for i, host in enumerate(plan.hosts)
        ], list(plan.cfg.dask.worker.srun))
        return scheduler, workers

    def prepare(self, plan: "ClusterPlan") -> None:
        write_private(plan.secret_file, plan.secret)

    def probe(self, plan: "ClusterPlan") -> ChildProbe:
        expected = sum(processes_on(plan, i) for i in range(plan.n_nodes))
        argv = python_module("toksearch_launch.cluster.dask", "probe", scheduler_address(plan),
                             str(expected), plan.secret_file)
        env = {k: v for k, v in os.environ.items() if k not in self.env_to_drop}
        return ChildProbe(argv, env, expected=expected, unit="workers",
                          log_path=plan.log_path("dask-probe", plan.hosts[0]))

    def address(self, plan: "ClusterPlan") -> str:
        return scheduler_address(plan)

    def client_env(self, plan: "ClusterPlan") -> dict[str, str]:
        """What a plain ``distributed.Client()`` reads from dask's config: address + TLS file paths."""
        pem = plan.secret_file
        return {
            "DASK_SCHEDULER_ADDRESS": scheduler_address(plan),
            "DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION": "True",
            "DASK_DISTRIBUTED__COMM__TLS__CA_FILE": pem,
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT": pem,
            "DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY": pem,
        }

    def connect(self, cluster: Any, **kwargs: Any) -> Any:
        """A ``distributed.Client`` on the scheduler, with the job's TLS identity."""
        from distributed import Client

        env = cluster.client_env()
        kwargs.setdefault("timeout", "30s")
        return Client(env["DASK_SCHEDULER_ADDRESS"], security=security(env["DASK_DISTRIBUTED__COMM__TLS__CA_FILE"]),
                      **kwargs)

    def disconnect(self, session: Any) -> None:
        session.close()

    def forget_client(self) -> None:
        pass  # connect() passes its Security explicitly: nothing cached from the environment


BACKEND = DaskBackend()


# ------------------------------------------------------------------ probe child


def _probe_main(addr: str, expected: int, pem: str) -> int:
    """Child side of the probe: the scheduler port, then the registered workers."""
    host, _, port = addr.removeprefix("tls://").rpartition(":")
    while True:
        try:
            socket.create_connection((host, int(port)), timeout=0.5).close()
            break
        except OSError:
            time.sleep(0.05)
    probe_say(head_up=True)
    from distributed import Client

    client = None
    last = None
    while True:
        try:
            if client is None:
                client = Client(addr, security=security(pem), timeout="5s", set_as_default=False)
            workers = client.scheduler_info(n_workers=-1).get("workers", {})
            alive = sorted(({"ip": w.get("host", ""), "cpus": w.get("nthreads", 0)} for w in workers.values()),
                           key=lambda w: w["ip"])
            if alive != last:
                probe_say(alive=alive)
                last = alive
            if len(alive) >= expected:
                client.close()
                return 0
        except Exception as exc:  # keep polling until the parent's deadline
            probe_say(error=f"{type(exc).__name__}: {exc}"[:300])
            time.sleep(0.2)
        time.sleep(0.1)


# ------------------------------------------------------------------ per-node supervisor


def worker_process_argv(worker: list[str], k: int, name: str, host: str, ports: dict[str, int]) -> list[str]:
    """Worker process ``k`` of a node: its own name and ports, put right after ``dask worker
    SCHEDULER`` so that the user's options (last in ``worker``) still win."""
    at = worker.index("worker") + 2
    return [
        *worker[:at], "--name", f"{name}-{k}", "--nanny-port", str(ports["nanny"] + k),
        "--worker-port", str(ports["worker"] + k), "--dashboard-address", f"{host}:{ports['http'] + k}",
        *worker[at:],
    ]


def _workers_main(argv: list[str]) -> int:
    """Run COUNT single-process Dask workers on this node; stop them all on SIGTERM/SIGINT/SIGHUP.

    Every child stays in this process's session, so the lifecycle's (or the step
    wrapper's) session teardown finds them; the first to exit ends the others.
    """
    import argparse
    import signal
    import subprocess

    from ..procutil import exit_status

    split = argv.index("--")
    ap = argparse.ArgumentParser(prog="toksearch_launch.cluster.dask workers")
    for opt in ("--count", "--nanny-port", "--worker-port", "--http-port"):
        ap.add_argument(opt, type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--host", required=True)
    args = ap.parse_args(argv[:split])
    ports = {"nanny": args.nanny_port, "worker": args.worker_port, "http": args.http_port}
    stop = {"signal": 0}

    def on_signal(signum: int, frame: Any) -> None:  # noqa: ARG001
        stop["signal"] = signum

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    children = [subprocess.Popen(worker_process_argv(argv[split + 1:], k, args.name, args.host, ports),
                                 stdin=subprocess.DEVNULL) for k in range(args.count)]
    while not stop["signal"] and all(c.poll() is None for c in children):
        time.sleep(0.1)
    first = next((c.returncode for c in children if c.returncode is not None), None)
    for c in children:
        if c.poll() is None:
            c.send_signal(signal.SIGTERM)
    for c in children:
        c.wait()
    return 0 if stop["signal"] else exit_status(first)


if __name__ == "__main__":
    from .owner import exit_with_owner

    # python -m toksearch_launch.cluster.dask probe ADDRESS N PEM
    # python -m toksearch_launch.cluster.dask workers --count N ... -- DASK_WORKER_ARGV
    if len(sys.argv) == 5 and sys.argv[1] == "probe":
        exit_with_owner()  # a probe whose owner died must not spin on
        sys.exit(_probe_main(sys.argv[2], int(sys.argv[3]), sys.argv[4]))
    if len(sys.argv) > 2 and sys.argv[1] == "workers" and "--" in sys.argv:
        sys.exit(_workers_main(sys.argv[2:]))
    print("usage: python -m toksearch_launch.cluster.dask probe ADDRESS N PEM | workers ... -- ARGV",
          file=sys.stderr)
    sys.exit(2)
