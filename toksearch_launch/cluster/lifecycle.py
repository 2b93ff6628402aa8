"""The Cluster: spawn the head, await it, spawn the workers, await ready, connect, stop.

It only orchestrates.  What to run and how to probe it comes from the
:class:`~.backend.Backend`; how a role runs on its nodes (processes here or
SLURM steps) from the :class:`~.launcher.Launcher`; planning from :mod:`.plan`;
the checks before a start from :mod:`.preflight`; the process-wide exit and
signal hooks from :mod:`.hooks`.  Nothing here knows which engine or which
launcher it holds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from ..config import RUN_DIR_ENV, load_job_config, validate
from . import hooks
from .backend import Role, foreign_env, get_backend, info_env
from .deaths import DAEMONS_ENV, EXITS_ENV, DaemonExit, DeathWatch, write_daemons_file
from .dirs import TMP_PREFIX, make_private_dir, make_root, write_private
from .errors import ClusterError, StartError
from .launcher import Launcher, launcher_for
from .owner import sweep_stale_roots, write_owner_file
from .placement import describe_addresses, job_hosts
from .plan import ClusterPlan, make_plan
from .ports import release_block
from .preflight import preflight
from .procs import Daemon, display, terminate
from .site import default_local_config

log = logging.getLogger("toksearch_launch.cluster")

#: Extra starts after a start that failed on a taken port (policy auto only).
PORT_RETRIES = 2
STOP_GRACE = 6.0
STOP_KILL_WAIT = 3.0
#: The step wrapper's exit code for "a port of the job is busy on this node".
EXIT_PORTS_BUSY = 75


class Cluster:
    """A Ray, Spark or Dask cluster across the job's nodes; a context manager.

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
        self.engine = get_backend(backend)
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
        self.launcher: Optional[Launcher] = None
        self.timings: dict[str, float] = {}
        self.leftovers: list[int] = []
        #: daemons that exited while the job ran (before the stop), as their wrappers reported them
        self.exits: list[DaemonExit] = []
        #: the last teardown's summary line (what died before it, what was left after it)
        self.summary: str = ""
        self._watch: Optional[DeathWatch] = None
        self._daemons_map: dict[str, dict[str, str]] = {}
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
        self._session: Any = None  # what connect() returned
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
        hooks.register(self, signal_hooks=self.signal_hooks)  # from here on, exit and SIGTERM/SIGHUP stop it
        failed_bases: list[int] = []
        attempt = 0
        while True:
            plan = make_plan(self.backend, self.cfg, hosts, self.run_dir, avoid_bases=tuple(failed_bases))
            self.plan = plan
            try:
                preflight(self.backend, self.cfg, plan)
                self._launch(plan)
                self._watch_exits(plan)
                break
            except StartError as exc:
                self._teardown(quiet=True)
                retry = (exc.port_conflict and self.cfg.site.ports.policy == "auto"
                         and attempt < PORT_RETRIES and not self._stopping)
                if not retry:
                    self._stopped = True
                    hooks.unregister(self)
                    raise
                self._note(f"port conflict on block {plan.ports.base}: retrying with another block")
                failed_bases.append(plan.ports.base)
                attempt += 1
            except BaseException:
                self._teardown(quiet=True)
                self._stopped = True
                hooks.unregister(self)
                raise
        self._started = True
        return self

    def stop(self) -> None:
        """Stop every daemon this cluster started and remove its temp dir; idempotent."""
        hooks.unregister(self)
        if self._stopped and not self.daemons:
            return
        self._stopping = True
        self._disconnect()
        if self._owner:
            self._teardown(quiet=False)
        self._stopped = True
        self._started = False

    def interrupt_start(self) -> None:
        """A start running in another thread gives up at its next poll, stopping what it started."""
        self._stopping = True

    def client_env(self) -> dict[str, str]:
        """Env another driver needs (address + auth by file path); never a secret value."""
        if not self._owner:
            return dict(self._attached_env)
        if self.plan is None:
            raise ClusterError("the cluster is not started")
        env = self.engine.client_env(self.plan)
        if self._info_path is not None:
            env[info_env(self.backend)] = str(self._info_path)
        return env

    def connect(self, **kwargs: Any) -> Any:
        """A client in this process: Ray's context, a SparkSession, a distributed.Client.

        Idempotent: while connected, the same client is returned (the cluster owns it
        and closes it at stop)."""
        if not (self._started or not self._owner):
            raise ClusterError("the cluster is not started")
        if self._session is not None:
            return self._session
        if self._saved_env is None:  # connect() points this process at the cluster; stop() undoes it
            keys = [*self.client_env(), *self.engine.env_to_drop]
            self._saved_env = {k: os.environ.get(k) for k in keys}
        self._session = self.engine.connect(self, **kwargs)
        hooks.reinstall_signal_hooks()
        return self._session

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
        self._attached_env[info_env(backend)] = str(info_path)
        self.run_dir = Path(info.get("run_dir", "."))
        return self

    # ------------------------------------------------------------ start

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
        """This process's environment less any cluster's client settings (ours or another's)."""
        drop = foreign_env()
        return {k: v for k, v in os.environ.items() if k not in drop}

    def _make_dirs(self, plan: ClusterPlan) -> None:
        """site=local: every daemon dir here. SLURM: the script's node is the head node, so the
        driver side lives here too; each step wrapper makes its own dir on its node."""
        self.roots.append(plan.root)
        sweep_stale_roots(os.path.dirname(plan.root), TMP_PREFIX)  # dirs of owners killed before their stop
        if plan.scheduler == "local":
            make_root(plan.root)
            for d in plan.local_dirs():
                make_private_dir(d)
        else:
            make_private_dir(plan.root)
        write_owner_file(plan.root)

    def _spawn(self, role: Any, env: dict[str, str]) -> list[Daemon]:
        assert self.launcher is not None
        started = self.launcher.spawn(role, env)
        for d in started:
            self._note(f"start {d.label}: {display(d.argv)} (log {d.log_path})")
            self.daemons.append(d)
            assert d.proc is not None
            self.started_pids.append(d.proc.pid)
        return started

    def _launch(self, plan: ClusterPlan) -> None:
        """Spawn the head; once the probe says so, spawn the workers; wait until ready.

        Workers start when the head is up, not with it: a Ray worker started early
        misses the head node and sleeps 2 s before asking again, a Spark worker
        waits ~10 s for its registration retry (measured; docs/cluster.md).
        """
        t0 = time.monotonic()
        deadline = t0 + float(self.cfg.site.ready_timeout)
        self._note(f"nodes: {describe_addresses(plan.hosts, plan.addresses)}; head on {plan.hosts[0]}")
        self._note(plan.ports.describe())
        self._make_dirs(plan)
        self.engine.prepare(plan)
        self.launcher = launcher = launcher_for(plan)
        head_role, worker_role = self.engine.roles(plan)
        env = {**self._base_env(), **self._exit_reporting(plan, [head_role, worker_role])}
        self.daemons = []
        self._spawn(head_role, env)
        workers: list[Daemon] = []
        probe = self.engine.probe(plan)
        head_up: Optional[float] = None
        try:
            while True:
                if self._stopping:
                    raise ClusterError(f"{self.backend} cluster start interrupted (stop requested)")
                for d in self.daemons:
                    rc = launcher.exit_code(d)
                    if rc is not None:
                        raise StartError(
                            d.failure(f"exited with code {rc} {time.monotonic() - d.started_at:.1f} s after its start"),
                            port_conflict=d.looks_like_port_conflict() or rc == EXIT_PORTS_BUSY,
                        )
                    launcher.watch(d)
                ready = probe.poll()
                now = time.monotonic()
                if head_up is None and probe.head_up:
                    head_up = self.timings["head_up"] = now - t0
                    self._note(f"head up after {head_up:.2f} s")
                if not workers and worker_role.nodes and probe.workers_go:
                    self.timings["workers_started"] = now - t0
                    self._note(f"starting {len(worker_role.nodes)} workers")
                    workers = self._spawn(worker_role, env)
                if ready:
                    break
                if now > deadline:
                    raise StartError(self._timeout_message(probe, head_up, workers))
                time.sleep(0.05)
        finally:
            probe.close()
        total = self.timings["ready"] = time.monotonic() - t0
        self.address = self.engine.address(plan)
        self.num_cpus = probe.cpus
        self.node_addresses = self._observed_addresses(plan, probe.ips)
        self._note(
            f"ready: {plan.n_nodes} nodes, {self.num_cpus} CPUs, at {self.address}; head up "
            f"{self.timings.get('head_up', 0):.2f} s, all workers registered {total:.2f} s; "
            f"node addresses: {', '.join(f'{h}={a}' for h, a in zip(plan.hosts, self.node_addresses))}"
        )
        self._write_info()

    @staticmethod
    def _exits_file(plan: ClusterPlan) -> Path:
        return plan.log_dir / f"{plan.backend}-{os.path.basename(plan.root)}-exits.jsonl"

    def _exit_reporting(self, plan: ClusterPlan, roles: list[Role]) -> dict[str, str]:
        """Where the step wrappers record a daemon that exits unasked, and the file that tells
        each wrapper (by its daemon's dir) its role, node and log: the env every node shares."""
        self._daemons_map = {n.node_dir: {"role": r.name, "node": n.host, "log": str(n.log_path)}
                             for r in roles for n in r.nodes}
        if not plan.dry_run:
            write_daemons_file(str(self._daemons_file(plan)), self._daemons_map, ready=False)
        return {EXITS_ENV: str(self._exits_file(plan)), DAEMONS_ENV: str(self._daemons_file(plan))}

    @staticmethod
    def _daemons_file(plan: ClusterPlan) -> Path:
        return plan.log_dir / f"{plan.backend}-{os.path.basename(plan.root)}-daemons.json"

    def _watch_exits(self, plan: ClusterPlan) -> None:
        """From ready on, each daemon that exits is shown at once on this process's stderr."""
        write_daemons_file(str(self._daemons_file(plan)), self._daemons_map, ready=True)
        root = plan.root.rstrip("/") + "/"
        self._watch = DeathWatch(self._exits_file(plan), keep=lambda ex: ex.dir.startswith(root))

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

    def _timeout_message(self, probe: Any, head_up: Optional[float], workers: list[Daemon]) -> str:
        limit = float(self.cfg.site.ready_timeout)
        if head_up is None:
            return self.daemons[0].failure(f"did not come up within site.ready_timeout={limit:g} s")
        seen = set(probe.ips)
        missing = [d for d in workers if not (d.address and d.address in seen)]
        parts = [f"{len(probe.alive)} of {probe.expected} {probe.unit} "
                 f"registered within site.ready_timeout={limit:g} s; not registered:"]
        parts += [d.failure("never registered") for d in missing] or ["(unknown nodes)"]
        if probe.error:
            parts.append(f"  the readiness probe's last error: {probe.error}")
        return "\n".join(parts)

    def _write_info(self) -> None:
        assert self.plan is not None and self.run_dir is not None
        path = self.run_dir / f"cluster-{self.backend}-{os.getpid()}.json"
        info = {
            "backend": self.backend,
            "address": self.address,
            "num_cpus": self.num_cpus,
            "node_addresses": self.node_addresses,
            "client_env": self.engine.client_env(self.plan),
            "run_dir": str(self.run_dir),
            "pid": os.getpid(),
        }
        write_private(str(path), json.dumps(info, indent=1))
        self._info_path = path

    # ------------------------------------------------------------ stop

    def _disconnect(self) -> None:
        session, self._session = self._session, None
        try:
            if session is not None:
                self.engine.disconnect(session)
        except Exception as exc:  # never let a driver problem block the teardown
            self._note(f"disconnect: {exc}", logging.WARNING)
        finally:
            self._restore_env()

    def _restore_env(self) -> None:
        """Give this process back the environment it had before connect() (auth paths, addresses):
        a later local client must not look for this cluster's removed secrets."""
        saved, self._saved_env = self._saved_env, None
        if saved is None:
            return
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self.engine.forget_client()

    def _teardown(self, quiet: bool) -> None:
        """Stop daemons, remove dirs; a SIGTERM arriving meanwhile waits until this is done."""
        with hooks.signals_deferred():
            self._teardown_now(quiet)

    def _exited_before_stop(self, daemons: list[Daemon]) -> list[DaemonExit]:
        """What the wrappers reported, plus any daemon whose step already ended without a record."""
        watch, self._watch = self._watch, None
        exits = watch.stop() if watch is not None else []
        reported = {ex.dir for ex in exits}
        if self.launcher is not None:
            for d in daemons:
                rc = self.launcher.exit_code(d)
                if rc is not None and d.node_dir not in reported:
                    exits.append(DaemonExit(d.role, d.host, rc, str(d.log_path), d.node_dir))
        return exits

    def _teardown_now(self, quiet: bool) -> None:
        plan, launcher = self.plan, self.launcher
        daemons, self.daemons = self.daemons, []
        t0 = time.monotonic()
        try:
            self.exits = self._exited_before_stop(daemons)  # before any stop signal: these died by themselves
            if daemons and launcher is not None:
                self.leftovers = terminate(
                    daemons, markers=[plan.root] if plan is not None else [], grace=STOP_GRACE,
                    kill_wait=STOP_KILL_WAIT, head_last=self.engine.head_last,
                    send_term=launcher.signal_stop, on_stuck=launcher.cancel,
                )
                warnings = launcher.stop_warnings(daemons)
                dead = {ex.dir for ex in self.exits}
                stopped = sum(1 for d in daemons if d.node_dir not in dead)
                self.summary = teardown_summary(stopped, time.monotonic() - t0, self.exits, self.leftovers, warnings)
                if self.leftovers:
                    self._note(self.summary, logging.ERROR)
                elif not quiet:  # a failed start (quiet) has already said which daemon exited
                    self._note(self.summary, logging.WARNING if self.exits or warnings else logging.INFO)
                for warning in warnings:
                    self._note(warning, logging.WARNING)
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


def teardown_summary(stopped: int, seconds: float, exits: list[DaemonExit], leftovers: list[int],
                     unconfirmed: list[str]) -> str:
    """One line: how many daemons the stop stopped, which had died before it, what was left.

    ``leftovers`` is what the stop found still running here (by session and temp-dir
    marker); ``unconfirmed`` the nodes whose wrapper did not confirm a clean stop."""
    parts = [f"stopped {stopped} daemon{'' if stopped == 1 else 's'} in {seconds:.2f} s"]
    if exits:
        parts.append(f"{len(exits)} had exited before the stop: " + ", ".join(ex.brief() for ex in exits))
    if leftovers:
        parts.append(f"processes still running after the stop: {sorted(leftovers)}")
    elif unconfirmed:
        parts.append(f"nothing left here; {len(unconfirmed)} nodes did not confirm a clean stop")
    else:
        parts.append("nothing left")
    return "; ".join(parts)
