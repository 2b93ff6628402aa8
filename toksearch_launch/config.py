"""Dataclass schemas of the composed configuration.

The composed OmegaConf tree is the single source of truth: the launcher plans its
salloc/sbatch/srun commands from it, writes it (resolved) into the run directory,
and code inside the job reads the same tree back with :func:`load_job_config`.

This module imports only omegaconf, so in-job code (cluster starters, pipeline)
can use it without Hydra. :func:`register_configs` puts the schemas in Hydra's
ConfigStore; only the CLI calls it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from omegaconf import DictConfig, OmegaConf

#: Environment variable that points a job at its resolved config file.
CONFIG_ENV = "TOKSEARCH_CONFIG"
#: Environment variable naming the job's run directory (logs, output, config).
RUN_DIR_ENV = "TOKSEARCH_RUN_DIR"
#: File name of the resolved config inside the run directory.
CONFIG_FILE = "toksearch.yaml"


#: Suffix of the keys whose options are appended to the site's list of the same name
#: (``interactive.salloc_extra=[--account=x]`` adds to ``interactive.salloc``): see :func:`merge_extra_options`.
EXTRA = "_extra"


@dataclass
class StepOptions:
    """Options of one daemon kind: extra `srun` options for its step, extra options for its start command."""

    srun: List[str] = field(default_factory=list)
    start: List[str] = field(default_factory=list)
    srun_extra: List[str] = field(default_factory=list)
    start_extra: List[str] = field(default_factory=list)


@dataclass
class DaemonOptions:
    """A backend's daemons: the head/master on the script's node, workers on the others."""

    master: StepOptions = field(default_factory=StepOptions)
    worker: StepOptions = field(default_factory=StepOptions)


def _dask_daemons() -> DaemonOptions:
    """Dask has no entry in the site profiles: its steps get ``--overlap`` here (without it a
    daemon step waits forever beside the job's main step)."""
    return DaemonOptions(StepOptions(srun=["--overlap"]), StepOptions(srun=["--overlap"]))


@dataclass
class InteractiveOptions:
    """`salloc ... srun ... COMMAND`: options for the allocation and for the step that runs COMMAND."""

    salloc: List[str] = field(default_factory=list)
    srun: List[str] = field(default_factory=list)
    salloc_extra: List[str] = field(default_factory=list)
    srun_extra: List[str] = field(default_factory=list)


@dataclass
class BatchOptions:
    """`sbatch job.sbatch`: options written as `#SBATCH` lines."""

    sbatch: List[str] = field(default_factory=list)
    job_name: str = "toksearch"
    #: A job stopped by its time limit requeues itself (same job id) and resumes, until done.
    requeue: bool = False
    #: At most this many requeues after a time limit (preemptions do not count).
    max_requeues: int = 3
    sbatch_extra: List[str] = field(default_factory=list)


@dataclass
class AddressRule:
    """How a node name becomes the address its daemons bind to.

    method: ``dns`` (resolve the node name), ``suffix`` (the exact ``<node><suffix>``
    entry of ``hosts_file``, e.g. saga's ``-ib`` hosts), ``interface`` (the IPv4
    address of ``interface`` on the node, e.g. ``ib0``), or ``loopback`` (site=local:
    node K gets 127.0.0.K+1).
    """

    method: str = "dns"
    suffix: str = ""
    interface: str = ""
    hosts_file: str = "/etc/hosts"


@dataclass
class PortPolicy:
    """``auto``: each job picks free ports, so jobs sharing a node never collide.
    ``fixed``: a block of consecutive ports starting at ``base`` (for firewalled sites)."""

    policy: str = "auto"
    base: int = 0


@dataclass
class SqlOptions:
    """The site's SQL database, for ``toksearch_launch.sql.connect()`` / ``connect_d3drdb()``.

    No password here, ever (this tree is printed by ``--cfg`` and written to the run
    directory): it is read from ``password_file`` (mode 0600; TokSearch's format,
    user on the first line and password on the second, or the password alone) or,
    if that file does not exist, from the environment variable ``password_env``.
    """

    #: DB-API module: ``pymssql`` (SQL Server, TokSearch's d3drdb), ``psycopg`` (PostgreSQL), ``sqlite3``.
    driver: str = "pymssql"
    #: Host name (psycopg: also a unix-socket directory; sqlite3: the database file).
    server: Optional[str] = None
    port: Optional[int] = None
    database: Optional[str] = None
    #: None: the user in password_file, else the login name.
    user: Optional[str] = None
    password_file: Optional[str] = None
    password_env: str = "TOKSEARCH_SQL_PASSWORD"


@dataclass
class SiteOptions:
    """What the in-job starters need to know about a cluster."""

    name: str = "default"
    #: ``slurm``: salloc/sbatch/srun; ``local``: run on this machine, daemons as local processes.
    scheduler: str = "slurm"
    address: AddressRule = field(default_factory=AddressRule)
    #: Base directory for per-job temp dirs (Ray's session dir must stay short: Unix sockets).
    tmp_base: str = "/tmp"
    #: MDSplus server (``host[:port]``) used when a signal has no location.
    mds_server: Optional[str] = None
    ports: PortPolicy = field(default_factory=PortPolicy)
    #: Seconds a cluster may take from start to all nodes registered.
    ready_timeout: float = 120.0
    #: Slurm version the plan adapts to; None: read once from `srun --version` when running.
    slurm_version: Optional[str] = None
    #: Run COMMAND as an exclusive allocation (`--exclusive` on salloc/sbatch).
    exclusive: bool = True
    #: SLURM: the other nodes' step wrappers watch the owner (the script) through its beacon, a
    #: TCP port the kernel picks on the owner's node; false for a site whose firewall rejects it
    #: between compute nodes (those nodes' daemons then end with the job).
    owner_beacon: bool = True
    #: site=local: CPUs each local node offers (None: this machine's CPUs / nodes).
    local_cpus_per_node: Optional[int] = None
    #: The site's SQL database (Pipeline.from_sql connect helpers).
    sql: SqlOptions = field(default_factory=SqlOptions)
    #: Seconds before the time limit Slurm warns the job (SIGUSR1) so it stops cleanly and
    #: keeps its results; at most half the time limit; 0: no warning.
    stop_grace: float = 120.0


@dataclass
class BackendOptions:
    """Which cluster the job uses by default and when it is started.

    start: ``lazy`` (TokSearch's behaviour: ``compute_ray()`` / ``compute_spark()``
    start the job's cluster when first called), ``eager`` (the launcher starts it
    before COMMAND, exports ``RAY_ADDRESS`` / ``SPARK_MASTER_URL``, stops it after)
    or ``background`` (the in-job wrapper starts it while COMMAND already runs;
    ``compute_*()`` waits for what remains; nothing exported; stopped after COMMAND).
    """

    name: str = "ray"
    start: str = "lazy"
    #: Default partitions per cluster CPU when the caller gives no ``numparts``.
    partitions_per_cpu: int = 4


@dataclass
class ToksearchConfig:
    """The whole composed tree (`toksearch_submit --cfg job` prints it)."""

    nodes: int = 1
    mode: str = "interactive"
    interactive: InteractiveOptions = field(default_factory=InteractiveOptions)
    batch: BatchOptions = field(default_factory=BatchOptions)
    ray: DaemonOptions = field(default_factory=DaemonOptions)
    spark: DaemonOptions = field(default_factory=DaemonOptions)
    dask: DaemonOptions = field(default_factory=_dask_daemons)  # master = the scheduler
    site: SiteOptions = field(default_factory=SiteOptions)
    backend: BackendOptions = field(default_factory=BackendOptions)


MODES = ("interactive", "batch")
SCHEDULERS = ("slurm", "local")
ADDRESS_METHODS = ("dns", "suffix", "interface", "loopback")
PORT_POLICIES = ("auto", "fixed")
BACKENDS = ("ray", "spark", "dask")
BACKEND_STARTS = ("lazy", "eager", "background")
#: The starts the in-job wrapper (``toksearch_launch.cluster.eager``) runs around COMMAND.
WRAPPED_STARTS = ("eager", "background")
SQL_DRIVERS = ("pymssql", "psycopg", "sqlite3")


class ConfigError(ValueError):
    """A composed config that cannot be planned; the message is one line for the user."""


def _one_of(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is not one of: {', '.join(allowed)}")


def validate(cfg: DictConfig | ToksearchConfig) -> None:
    """Check what the schema's types cannot: ranges and enumerations."""
    if isinstance(cfg.nodes, bool) or not isinstance(cfg.nodes, int) or cfg.nodes < 1:
        raise ConfigError(f"nodes={cfg.nodes!r}: need a whole number of nodes, 1 or more")
    _one_of("mode", cfg.mode, MODES)
    _one_of("site.scheduler", cfg.site.scheduler, SCHEDULERS)
    _one_of("site.address.method", cfg.site.address.method, ADDRESS_METHODS)
    if cfg.site.address.method == "suffix" and not cfg.site.address.suffix:
        raise ConfigError("site.address.method=suffix needs site.address.suffix (e.g. -ib)")
    if cfg.site.address.method == "interface" and not cfg.site.address.interface:
        raise ConfigError("site.address.method=interface needs site.address.interface (e.g. ib0)")
    _one_of("site.ports.policy", cfg.site.ports.policy, PORT_POLICIES)
    if cfg.site.ports.policy == "fixed" and not 1024 <= cfg.site.ports.base <= 65000:
        raise ConfigError("site.ports.policy=fixed needs site.ports.base between 1024 and 65000")
    if cfg.site.ready_timeout <= 0:
        raise ConfigError("site.ready_timeout must be positive (seconds)")
    _one_of("site.sql.driver", cfg.site.sql.driver, SQL_DRIVERS)
    _one_of("backend.name", cfg.backend.name, BACKENDS)
    _one_of("backend.start", cfg.backend.start, BACKEND_STARTS)
    if cfg.backend.partitions_per_cpu < 1:
        raise ConfigError("backend.partitions_per_cpu must be 1 or more")
    if cfg.site.stop_grace < 0:
        raise ConfigError("site.stop_grace must be 0 (no warning) or more seconds")
    if cfg.batch.max_requeues < 0:
        raise ConfigError("batch.max_requeues must be 0 or more")


def option_list_keys(node: Any = ToksearchConfig, prefix: str = "") -> List[str]:
    """Dotted keys of every option list that has an ``_extra`` companion (``interactive.salloc``, ...)."""
    import dataclasses

    keys: List[str] = []
    names = {f.name for f in dataclasses.fields(node)}
    for f in dataclasses.fields(node):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            keys += option_list_keys(type(default), f"{prefix}{f.name}.")
        elif f.name + EXTRA in names:
            keys.append(prefix + f.name)
    return keys


def merge_extra_options(cfg: DictConfig) -> DictConfig:
    """A copy of ``cfg`` where each ``<list>_extra`` is appended to ``<list>`` and emptied.

    Lets a user add options to a site's list without restating it; the job's config
    then holds the merged lists only, so in-job code reads one list per option kind."""
    import copy

    merged = copy.deepcopy(cfg)
    for key in option_list_keys():
        extra = OmegaConf.select(merged, key + EXTRA)
        if extra:
            OmegaConf.update(merged, key, [*OmegaConf.select(merged, key), *extra], merge=False)
            OmegaConf.update(merged, key + EXTRA, [], merge=False)
    return merged


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (the primary config extends it)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="toksearch_schema", node=ToksearchConfig)


def as_typed(tree: Any) -> DictConfig:
    """Merge a plain tree onto the schema: typed, struct mode, option lists as strings."""
    typed = OmegaConf.merge(OmegaConf.structured(ToksearchConfig), tree)
    OmegaConf.set_struct(typed, True)
    return typed


def load_job_config(path: str | os.PathLike | None = None) -> Optional[DictConfig]:
    """The config the launcher handed to this job, or None when not inside a toksearch job."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        return None
    return as_typed(OmegaConf.load(Path(path)))


def default_config() -> DictConfig:
    """The schema's defaults (site=default semantics without SLURM options), for code outside a job."""
    return as_typed({})
