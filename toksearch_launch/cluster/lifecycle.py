"""One lifecycle for both backends: plan, start head, start workers in parallel, wait until
ready, run, stop.

The Ray and Spark modules only say which commands to run, how to probe
readiness and what a client needs; everything about processes, deadlines,
failures, ports and teardown lives here, once.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Optional

from ..config import CONFIG_ENV, RUN_DIR_ENV, as_typed, load_job_config, validate
from .errors import ClusterError, StartError
from .placement import (
    describe_addresses,
    job_hosts,
    place,
    resolve_address,
    script_host,
)
from .plan import (
    ClusterPlan,
    check_root_length,
    job_secret,
    local_cpus_per_node,
    local_ray_memory,
    make_root,
    new_root,
    option_value,
    parse_bytes,
    pyspark_home,
    ray_executable,
    shm_bytes,
    write_private,
)
from .ports import choose_block, plan_ports, release_block
from .procs import Daemon, terminate

log = logging.getLogger("toksearch_launch.cluster")

BACKENDS = ("ray", "spark")
#: Env var (set by `client_env()`) naming the JSON file that describes a running
#: cluster; `job_cluster()` in a child process attaches to it instead of starting one.
INFO_ENV = {"ray": "TOKSEARCH_CLUSTER_RAY", "spark": "TOKSEARCH_CLUSTER_SPARK"}
#: Extra starts after a start that failed on a taken port (policy auto only).
PORT_RETRIES = 2
STOP_GRACE = 6.0
STOP_KILL_WAIT = 3.0

#: site=local defaults (conf/site/local.yaml) for code that runs outside any job.
LOCAL_SITE = {
    "site": {"name": "local", "scheduler": "local", "address": {"method": "loopback"},
             "exclusive": False},
    "spark": {"worker": {"start": ["-m", "2G"]}},
}


def default_local_config(**overrides: Any) -> Any:
    """The site=local config (this machine, loopback pseudo-nodes), typed like a job's."""
    from omegaconf import OmegaConf

    cfg = as_typed(LOCAL_SITE)
    if overrides:
        cfg = OmegaConf.merge(cfg, overrides)
    return cfg


def _backend_module(name: str):
    if name not in BACKENDS:
        raise ClusterError(f"unknown cluster backend {name!r} (choose: {', '.join(BACKENDS)})")
    return importlib.import_module(f"toksearch_launch.cluster.{name}")


# ---------------------------------------------------------------- pre-flight


def preflight(backend: str, cfg: Any, plan: Optional[ClusterPlan] = None) -> None:
    """Problems found before anything starts, all in one message."""
    problems = []
    if backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            problems.append(f"Ray is not installed for {sys.executable}: pip install 'toksearch_launch[ray]'")
        elif not os.path.exists(ray_executable()):
            problems.append(f"the `ray` command is missing next to {sys.executable}")
    else:
        if pyspark_home() is None:
            problems.append(f"PySpark is not installed for {sys.executable}: pip install 'toksearch_launch[spark]'")
        java_home = os.environ.get("JAVA_HOME")
        java = os.path.join(java_home, "bin", "java") if java_home else shutil.which("java")
        if not java or not os.access(java, os.X_OK):
            problems.append("Java is missing (Spark needs it): install a JDK (17 or 21) or set JAVA_HOME")
    if plan is not None:
        try:
            check_root_length(plan.root, plan.longest_node_dir())
        except ClusterError as exc:
            problems.append(str(exc))
        base = os.path.dirname(plan.root)
        if not os.path.isdir(base) or not os.access(base, os.W_OK):
            problems.append(f"site.tmp_base {base!r} is not a writable directory")
        if backend == "ray":
            problems += _object_store_problems(cfg, plan)
    if problems:
        raise ClusterError("cannot start the %s cluster:\n  - %s" % (backend, "\n  - ".join(problems)))


def _object_store_problems(cfg: Any, plan: ClusterPlan) -> list[str]:
    shm = shm_bytes()
    if not shm:
        return []
    head = parse_bytes(option_value(list(map(str, cfg.ray.master.start)), "--object-store-memory"))
    worker = parse_bytes(option_value(list(map(str, cfg.ray.worker.start)), "--object-store-memory"))
    gb = lambda b: f"{b / 1e9:.1f} GB"  # noqa: E731
    if plan.scheduler == "local":  # all nodes share this machine's /dev/shm
        default = plan.object_store or local_ray_memory(plan.n_nodes)[0]
        total = (head or default) + (plan.n_nodes - 1) * (worker or default)
        if total > shm:
            return [f"Ray object stores ask {gb(total)} in all on this machine, more than /dev/shm "
                    f"({gb(shm)}): lower --object-store-memory in ray.master.start / ray.worker.start"]
        return []
    out = []
    for what, value in (("ray.master.start", head), ("ray.worker.start", worker)):
        if value and value > shm:
            out.append(f"Ray object store asked in {what} ({gb(value)}) is larger than /dev/shm "
                       f"({gb(shm)}) on {os.uname().nodename}: lower --object-store-memory")
    return out


# ---------------------------------------------------------------- planning


def make_plan(
    backend: str,
    cfg: Any,
    hosts: list[str],
    run_dir: Path,
    *,
    dry_run: bool = False,
    avoid_bases: tuple[int, ...] = (),
) -> ClusterPlan:
    """Placement, addresses, ports, dirs for a cluster on ``hosts`` (dry_run: pure, placeholders)."""
    from .placement import placeholder_address
    from .ports import placeholder_ports

    scheduler = cfg.site.scheduler
    local = scheduler == "local"
    head = hosts[0] if (local or dry_run) else script_host(hosts, scheduler)
    placement = place(backend, hosts, head)
    n = len(placement.hosts)
    rule = cfg.site.address
    if dry_run:
        addresses = [
            f"127.0.0.{i + 2}" if rule.method == "loopback" else
            (None if rule.method == "interface" and i else placeholder_address(h))
            for i, h in enumerate(placement.hosts)
        ]
        if rule.method == "interface":
            addresses[0] = placeholder_address(placement.hosts[0])
    else:
        addresses = [
            resolve_address(h, i, rule, on_this_node=(i == 0 or local))
            for i, h in enumerate(placement.hosts)
        ]
    if dry_run and cfg.site.ports.policy == "auto":
        ports = placeholder_ports(backend, n, shared_host=local)
        _label_placeholders(ports)
    else:
        size = plan_ports(backend, n, 0, shared_host=local).size
        base = cfg.site.ports.base if cfg.site.ports.policy == "fixed" else 0
        if not dry_run:
            base = choose_block(size, cfg.site.ports.policy, cfg.site.ports.base, avoid=avoid_bases)
        ports = plan_ports(backend, n, base, shared_host=local)
    root = os.path.join(cfg.site.tmp_base.rstrip("/") or "/", "tsl-XXXXXX") if dry_run else new_root(cfg.site.tmp_base)
    plan = ClusterPlan(
        backend=backend, scheduler=scheduler, cfg=cfg, placement=placement, addresses=addresses,
        ports=ports, root=root, run_dir=Path(run_dir), dry_run=dry_run,
        secret="<redacted>" if dry_run else job_secret(backend),
    )
    if local:
        plan.cpus_per_node = local_cpus_per_node(cfg, n)
        if backend == "ray":
            plan.object_store, plan.memory = local_ray_memory(n)
    return plan


def _label_placeholders(ports) -> None:
    """Dry run, policy=auto: ports read as <port:NAME> (node ports: <port:NAME@K>)."""
    ports.head = {k: f"<port:{k}>" for k in ports.head}  # type: ignore[assignment]
    shared = len(ports.nodes) > 1 and ports.nodes[1] == ports.nodes[0]
    ports.nodes = [  # type: ignore[assignment]
        {k: (f"<port:{k}>" if shared or len(ports.nodes) == 1 else f"<port:{k}@{i + 1}>") for k in slot}
        for i, slot in enumerate(ports.nodes)
    ]


# ---------------------------------------------------------------- the cluster


class Cluster:
    """A Ray or Spark cluster across the job's nodes; a context manager.

    ``with Cluster("ray", cfg) as c: c.connect(); ...`` starts it (head on this
    node, workers on the others), waits until every node is registered, and
    stops exactly what it started: at the end of the ``with``, on an exception,
    at process exit, or on SIGTERM/SIGHUP (a chained handler, installed from the
    main thread; SIGINT raises KeyboardInterrupt as usual and the exit hook runs).
    """

    #: Install the SIGTERM/SIGHUP teardown handler at start (the eager wrapper turns it
    #: off: it forwards the signal to COMMAND and stops the cluster after COMMAND ends).
    signal_hooks: bool = True

    def __init__(
        self,
        backend: str,
        cfg: Any = None,
        hosts: Optional[list[str]] = None,
        run_dir: "str | Path | None" = None,
    ) -> None:
        self.backend = backend
        self._mod = _backend_module(backend)
        if cfg is None:
            cfg = load_job_config() or default_local_config()
        validate(cfg)
        self.cfg = cfg
        self._hosts = list(hosts) if hosts else None
        self._run_dir_arg = run_dir
        self.address: str = ""
        self.num_cpus: int = 0
        self.node_addresses: list[str] = []
        self.run_dir: Optional[Path] = None
        self.plan: Optional[ClusterPlan] = None
        self.timings: dict[str, float] = {}
        self.leftovers: list[int] = []
        self.daemons: list[Daemon] = []
        #: every daemon leader (session id) this cluster ever started, retries included
        self.started_pids: list[int] = []
        #: every temp dir root it used
        self.roots: list[str] = []
        self._owner = True
        self._saved_env: Optional[dict[str, Optional[str]]] = None
        self._started = False
        self._stopping = False
        self._stopped = False
        self._session: Any = None  # SparkSession / ray context from connect()
        self._info_path: Optional[Path] = None
        self._attached_env: dict[str, str] = {}

    # ------------------------------------------------------------ public API

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else ("running" if self._started else "new")
        return f"<Cluster {self.backend} {self.address or '-'} {len(self.node_addresses)} nodes {state}>"

    def start(self) -> "Cluster":
        """Start and wait until every node is registered; on failure stop what started and raise."""
        if self._started:
            return self
        if self._stopped:
            raise ClusterError("this Cluster was stopped; create a new one")
        hosts = self._hosts or job_hosts(self.cfg.site.scheduler, self.cfg.nodes)
        preflight(self.backend, self.cfg)
        self.run_dir = self._make_run_dir()
        _register(self)  # from here on, exit and SIGTERM/SIGHUP stop it
        failed_bases: list[int] = []
        attempt = 0
        while True:
            plan = make_plan(self.backend, self.cfg, hosts, self.run_dir, avoid_bases=tuple(failed_bases))
            self.plan = plan
            try:
                preflight(self.backend, self.cfg, plan)
                self._launch(plan)
                break
            except StartError as exc:
                self._teardown(quiet=True)
                retry = (exc.port_conflict and self.cfg.site.ports.policy == "auto"
                         and attempt < PORT_RETRIES and not self._stopping)
                if not retry:
                    self._stopped = True
                    _live.discard(self)
                    raise
                self._note(f"port conflict on block {plan.ports.base}: retrying with another block")
                failed_bases.append(plan.ports.base)
                attempt += 1
            except BaseException:
                self._teardown(quiet=True)
                self._stopped = True
                _live.discard(self)
                raise
        self._started = True
        return self

    def stop(self) -> None:
        """Stop every daemon this cluster started and remove its temp dir; idempotent."""
        _live.discard(self)
        if self._stopped and not self.daemons:
            return
        self._stopping = True
        self._disconnect()
        if self._owner:
            self._teardown(quiet=False)
        self._stopped = True
        self._started = False

    def client_env(self) -> dict[str, str]:
        """Env a driver needs (Ray: RAY_ADDRESS + token path; Spark: master URL + SPARK_CONF_DIR).

        Holds paths to 0600 files, never a secret value.
        """
        if not self._owner:
            return dict(self._attached_env)
        if self.plan is None:
            raise ClusterError("the cluster is not started")
        env = self._mod.client_env(self.plan)
        if self._info_path is not None:
            env[INFO_ENV[self.backend]] = str(self._info_path)
        return env

    def connect(self, **kwargs: Any) -> Any:
        """Ray: ``ray.init(address=...)`` (returns its context). Spark: a SparkSession on the master."""
        if not (self._started or not self._owner):
            raise ClusterError("the cluster is not started")
        if self._saved_env is None:  # connect() points this process at the cluster; stop() undoes it
            self._saved_env = {k: os.environ.get(k) for k in [*self.client_env(), "RAY_AUTH_TOKEN"]}
        self._session = self._mod.connect(self, **kwargs)
        _reinstall_signal_hooks()
        return self._session

    # ------------------------------------------------------------ attach

    @classmethod
    def attach(cls, backend: str, info_path: "str | Path") -> "Cluster":
        """A handle on a cluster another process started and owns (the eager wrapper)."""
        with open(info_path) as fh:
            info = json.load(fh)
        self = cls(backend, cfg=default_local_config())
        self._owner = False
        self._started = True
        self.address = info["address"]
        self.num_cpus = int(info["num_cpus"])
        self.node_addresses = list(info["node_addresses"])
        self._attached_env = dict(info["client_env"])
        self._attached_env[INFO_ENV[backend]] = str(info_path)
        self.run_dir = Path(info.get("run_dir", "."))
        return self

    # ------------------------------------------------------------ internals

    def _make_run_dir(self) -> Path:
        given = self._run_dir_arg or os.environ.get(RUN_DIR_ENV)
        if given:
            path = Path(given)
        else:  # outside a job: a fresh run dir that outlives the cluster (its logs)
            path = Path(tempfile.mkdtemp(prefix="toksearch-run-"))
        (path / "logs").mkdir(parents=True, exist_ok=True)
        return path

    def _note(self, msg: str, level: int = logging.INFO) -> None:
        """Log to the logger and to logs/<backend>-cluster.log in the run dir."""
        log.log(level, "%s cluster: %s", self.backend, msg)
        if self.run_dir is not None:
            try:
                with open(self.run_dir / "logs" / f"{self.backend}-cluster.log", "a") as fh:
                    fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
            except OSError:
                pass

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "SPARK_CONF_DIR", INFO_ENV["ray"], INFO_ENV["spark"]):
            env.pop(k, None)
        return env

    def _launch(self, plan: ClusterPlan) -> None:
        mod = self._mod
        t0 = time.monotonic()
        deadline = t0 + float(self.cfg.site.ready_timeout)
        self._note(f"nodes: {describe_addresses(plan.hosts, plan.addresses)}; head on {plan.hosts[0]}")
        self._note(plan.ports.describe())
        self.roots.append(plan.root)
        if plan.scheduler == "local":
            make_root(plan.root)
            for d in [plan.node_dir(i) for i in range(plan.n_nodes)] + ([plan.master_dir] if self.backend == "spark" else []):
                os.makedirs(d, mode=0o700, exist_ok=True)
        else:  # the script's node is the head node: the driver side lives here too
            os.makedirs(plan.root, mode=0o700, exist_ok=True)
            os.chmod(plan.root, 0o700)
        if self.backend == "ray":
            write_private(plan.secret_file, plan.secret)
        else:
            mod.write_driver_conf(plan)
        daemons = mod.daemons(plan)
        head, workers = daemons[0], daemons[1:]
        env = self._base_env()
        self.daemons = []

        def spawn(d: Daemon) -> None:
            self._note(f"start {d.label}: {_display(d.argv)} (log {d.log_path})")
            d.spawn(env)
            self.daemons.append(d)
            assert d.proc is not None
            self.started_pids.append(d.proc.pid)

        spawn(head)
        workers_started = not mod.WORKERS_WAIT_FOR_HEAD
        if workers_started:
            for d in workers:
                spawn(d)
        probe = mod.Probe(plan, expected=len(workers) if self.backend == "spark" else plan.n_nodes)
        head_up = None
        try:
            while True:
                if self._stopping:
                    raise ClusterError(f"{self.backend} cluster start interrupted (stop requested)")
                for d in self.daemons:
                    rc = d.returncode()
                    if rc is not None:
                        raise StartError(
                            d.failure(f"exited with code {rc} {time.monotonic() - d.started_at:.1f} s after its start"),
                            port_conflict=d.looks_like_port_conflict() or rc == 75,
                        )
                    if plan.scheduler != "local" and d.step_id is None:
                        _read_wrapper_line(d)
                ready = probe.poll()
                now = time.monotonic()
                if head_up is None and probe.head_up:
                    head_up = now - t0
                    self.timings["head_up"] = head_up
                    self._note(f"head up after {head_up:.2f} s")
                if not workers_started and probe.workers_go:
                    self.timings["workers_started"] = now - t0
                    self._note(f"starting {len(workers)} workers")
                    for d in workers:
                        spawn(d)
                    workers_started = True
                if ready:
                    break
                if now > deadline:
                    raise StartError(self._timeout_message(plan, probe, head_up))
                time.sleep(0.05)
        finally:
            probe.close()
        total = time.monotonic() - t0
        self.timings["ready"] = total
        self.address = mod.address(plan)
        self.num_cpus = probe.cpus
        self.node_addresses = self._observed_addresses(plan, probe.ips)
        self._note(
            f"ready: {plan.n_nodes} nodes, {self.num_cpus} CPUs, at {self.address}; head up "
            f"{self.timings.get('head_up', 0):.2f} s, all workers registered {total:.2f} s; "
            f"node addresses: {', '.join(f'{h}={a}' for h, a in zip(plan.hosts, self.node_addresses))}"
        )
        self._write_info()

    def _observed_addresses(self, plan: ClusterPlan, seen: list[str]) -> list[str]:
        """Planned addresses, with the ones only the nodes knew filled in from what registered."""
        out = []
        unknown = [ip for ip in seen if ip not in plan.addresses]
        for i, addr in enumerate(plan.addresses):
            d = next((d for d in self.daemons if d.index == i and d.address), None)
            if addr:
                out.append(addr)
            elif d is not None:
                out.append(d.address)
            else:
                out.append(unknown.pop(0) if unknown else "")
        return out

    def _timeout_message(self, plan: ClusterPlan, probe: Any, head_up: Optional[float]) -> str:
        limit = float(self.cfg.site.ready_timeout)
        if head_up is None:
            return self.daemons[0].failure(f"did not come up within site.ready_timeout={limit:g} s")
        seen = set(probe.ips)
        missing = [d for d in self.daemons[1:] if not (d.address and d.address in seen)]
        parts = [f"{len(probe.alive)} of {probe.expected} {'workers' if self.backend == 'spark' else 'nodes'} "
                 f"registered within site.ready_timeout={limit:g} s; not registered:"]
        parts += [d.failure("never registered") for d in missing] or ["(unknown nodes)"]
        return "\n".join(parts)

    def _write_info(self) -> None:
        assert self.plan is not None and self.run_dir is not None
        path = self.run_dir / f"cluster-{self.backend}-{os.getpid()}.json"
        info = {
            "backend": self.backend,
            "address": self.address,
            "num_cpus": self.num_cpus,
            "node_addresses": self.node_addresses,
            "client_env": self._mod.client_env(self.plan),
            "run_dir": str(self.run_dir),
            "pid": os.getpid(),
        }
        write_private(str(path), json.dumps(info, indent=1))
        self._info_path = path

    def _disconnect(self) -> None:
        session, self._session = self._session, None
        try:
            if session is None:
                return
            if self.backend == "ray":
                self._mod.disconnect()
            else:
                self._mod.disconnect(session)
        except Exception as exc:  # never let a driver problem block the teardown
            self._note(f"disconnect: {exc}", logging.WARNING)
        finally:
            self._restore_env()

    def _restore_env(self) -> None:
        """Give this process back the environment it had before connect() (auth paths, addresses):
        a later local ray.init() or SparkSession must not look for this cluster's removed secrets."""
        saved, self._saved_env = self._saved_env, None
        if saved is None:
            return
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if self.backend == "ray" and "ray" in sys.modules:
            self._mod._refresh_auth_config()

    def _teardown(self, quiet: bool) -> None:
        """Stop daemons, remove dirs; a SIGTERM arriving meanwhile waits until this is done."""
        _teardown_depth[0] += 1
        try:
            self._teardown_now(quiet)
        finally:
            _teardown_depth[0] -= 1
            if _teardown_depth[0] == 0 and _pending_signals:
                _on_signal(_pending_signals.pop(0), None)

    def _teardown_now(self, quiet: bool) -> None:
        plan = self.plan
        daemons, self.daemons = self.daemons, []
        t0 = time.monotonic()
        markers = [plan.root] if plan is not None else []
        try:
            if daemons:
                self.leftovers = terminate(
                    daemons, markers=markers, grace=STOP_GRACE, kill_wait=STOP_KILL_WAIT,
                    head_last=self.backend == "ray", send_term=_send_term, on_stuck=_cancel_step,
                )
                if self.leftovers:
                    self._note(f"processes still running after stop: {self.leftovers}", logging.ERROR)
                elif not quiet:
                    self._note(f"stopped {len(daemons)} daemons in {time.monotonic() - t0:.2f} s; nothing left")
                if plan is not None and plan.scheduler != "local":
                    for d in daemons:
                        if d.started_at and "nothing left" not in d.tail(3):
                            self._note(f"{d.label}: the step wrapper did not confirm a clean stop; "
                                       f"see {d.log_path}", logging.WARNING)
        finally:
            if plan is not None:
                shutil.rmtree(plan.root, ignore_errors=True)
                if not plan.dry_run:
                    release_block(plan.ports.base)
            if self._info_path is not None:
                try:
                    self._info_path.unlink()
                except OSError:
                    pass
                self._info_path = None
            self.timings["stop"] = time.monotonic() - t0


def _display(argv: list[str]) -> str:
    from .procs import display

    return display(argv)


def _read_wrapper_line(d: Daemon) -> None:
    """SLURM: the step wrapper's first line gives the node address and the step id."""
    try:
        text = d.log_path.read_text(errors="replace")
    except OSError:
        return
    mark = text.rfind("==== toksearch ")
    for line in text[mark:].splitlines():
        if line.startswith("toksearch-node: host="):
            fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
            if fields.get("address", "?") != "?":
                d.address = fields["address"]
            d.step_id = fields.get("step")
            return


def _send_term(daemons: list[Daemon]) -> None:
    """Ask each daemon to stop: SIGTERM; on SLURM SIGUSR1 to its local ``srun``.

    srun forwards SIGUSR1 to the step's task (the node wrapper, which stops its
    daemon's session, removes its dir and exits; then srun exits).  SIGTERM to
    srun would instead force the step's termination: the wrapper is killed before
    it can clean up (measured on Slurm 22.05).
    """
    for d in daemons:
        if d.proc is None or d.proc.poll() is not None:
            continue
        sig = signal.SIGUSR1 if d.argv and d.argv[0] == "srun" else signal.SIGTERM
        try:
            d.proc.send_signal(sig)
        except ProcessLookupError:
            pass


def _cancel_step(d: Daemon) -> None:
    """SLURM: a daemon's srun still running after the grace period: SIGKILL its step."""
    if d.step_id is None:
        _read_wrapper_line(d)
    if d.step_id and "-" not in d.step_id and shutil.which("scancel"):
        subprocess.run(["scancel", "--signal=KILL", d.step_id], capture_output=True, timeout=5)


# ---------------------------------------------------------------- job-level hooks

_job_clusters: dict[str, Cluster] = {}
_job_lock = threading.RLock()  # two threads asking at once get one cluster
_teardown_depth = [0]
_pending_signals: list[int] = []
_hooks = {"atexit": False}
_prev_handlers: dict[int, Any] = {}
_HOOK_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


#: Clusters of this process that are starting or running (stopped at exit / SIGTERM).
_live: "set[Cluster]" = set()


def _register(cluster: "Cluster") -> None:
    """Exit hook once per process; SIGTERM/SIGHUP hooks (main thread only)."""
    _live.add(cluster)
    if not _hooks["atexit"]:
        import atexit

        atexit.register(stop_all)
        _hooks["atexit"] = True
    if cluster.signal_hooks:
        _install_signal_hooks()


def stop_all() -> None:
    """Stop every cluster this process started and still runs."""
    _job_clusters.clear()
    for c in list(_live):
        try:
            c.stop()
        except Exception as exc:  # pragma: no cover - best effort at exit
            log.error("stopping the %s cluster: %s", c.backend, exc)


def _on_signal(signum: int, frame: Any) -> None:
    """SIGTERM/SIGHUP: stop the job's clusters, then do what the signal would have done."""
    if _teardown_depth[0]:
        _pending_signals.append(signum)  # a teardown is running below us: let it finish first
        return
    stop_all()
    prev = _prev_handlers.get(signum, signal.SIG_DFL)
    if callable(prev):
        prev(signum, frame)
    elif prev == signal.SIG_IGN:
        return
    else:  # default action: die by the same signal, as if we had not been here
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


def _install_signal_hooks() -> None:
    if threading.current_thread() is not threading.main_thread():
        log.warning("job_cluster() called outside the main thread: no SIGTERM teardown hook")
        return
    for sig in _HOOK_SIGNALS:
        current = signal.getsignal(sig)
        if current is _on_signal:
            continue
        if sig == signal.SIGHUP and current == signal.SIG_IGN:
            continue  # nohup: keep ignoring hangups
        _prev_handlers[sig] = current
        signal.signal(sig, _on_signal)


def _reinstall_signal_hooks() -> None:
    """ray.init replaces the SIGTERM handler: chain ours in front again."""
    if _live:
        _install_signal_hooks()


def job_cluster(backend: str) -> Optional[Cluster]:
    """Inside a toksearch job (env TOKSEARCH_CONFIG set): the job's cluster for ``backend``.

    Started on first call and stopped at process exit / SIGTERM / SIGHUP (SIGINT
    raises KeyboardInterrupt, then the exit hook stops it); or attached to the one
    the eager wrapper started.  Outside a job, or inside a daemon's own process
    (a Ray task, a Spark executor): None.
    """
    _backend_module(backend)
    from .plan import DAEMON_ENV

    if not os.environ.get(CONFIG_ENV) or os.environ.get(DAEMON_ENV):
        return None
    with _job_lock:
        return _job_cluster_locked(backend)


def _job_cluster_locked(backend: str) -> Optional[Cluster]:
    existing = _job_clusters.get(backend)
    if existing is not None and (existing._started or not existing._owner):
        return existing
    info = os.environ.get(INFO_ENV[backend])
    if info and os.path.exists(info):
        cluster = Cluster.attach(backend, info)
        _job_clusters[backend] = cluster
        return cluster
    cfg = load_job_config()
    cluster = Cluster(backend, cfg)
    _job_clusters[backend] = cluster
    try:
        cluster.start()
    except BaseException:
        _job_clusters.pop(backend, None)
        raise
    return cluster


# ---------------------------------------------------------------- dry run


def plan_commands(backend: str, cfg: Any, hosts: list[str]) -> list[list[str]]:
    """Pure: the argv of every daemon the job would start on ``hosts`` (head first).

    No address is resolved, no port checked, nothing imported from ray/pyspark;
    values only the running job knows read as placeholders (``<IP:tsn1>``,
    ``<port:gcs>``, ``/tmp/tsl-XXXXXX``).  Secrets are never on a command line.
    """
    from .procs import redact

    mod = _backend_module(backend)
    if not hosts:
        raise ClusterError("plan_commands needs at least one host")
    plan = make_plan(backend, cfg, list(hosts), Path(cfg.site.get("tmp_base", "/tmp")) / "run", dry_run=True)
    return [redact(d.argv) for d in mod.daemons(plan)]
