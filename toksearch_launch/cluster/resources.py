"""What this machine offers (CPUs, memory, /dev/shm) and what the user's options ask for."""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Optional


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


def gigabytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def allocated_cpus(env: Optional[dict] = None) -> dict[str, int]:
    """CPUs SLURM gave each node of the job: ``SLURM_JOB_CPUS_PER_NODE`` ("4,2(x3)") matched to
    ``SLURM_JOB_NODELIST`` in allocation order; empty outside an allocation."""
    env = os.environ if env is None else env
    counts_text = env.get("SLURM_JOB_CPUS_PER_NODE", "")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not counts_text or not nodelist:
        return {}
    counts: list[int] = []
    for part in counts_text.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            return {}
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    from .placement import expand_nodelist

    hosts = expand_nodelist(nodelist)
    return dict(zip(hosts, counts)) if len(hosts) == len(counts) else {}


# ------------------------------------------------------------------ from the allocation, per node
#
# On SLURM a daemon's CPUs, memory, GPUs and object store are what Slurm gave *its* node,
# which only that node's step knows (SLURM_CPUS_ON_NODE and CUDA_VISIBLE_DEVICES are the
# step's own; /dev/shm is the node's).  The planner puts these placeholders in the command
# (only for options the user did not set) and the step wrapper replaces them on the node,
# as it does for @NODE_IP@.

NODE_CPUS = "@NODE_CPUS@"
NODE_GPUS = "@NODE_GPUS@"
NODE_RAY_MEMORY = "@NODE_RAY_MEMORY@"  # bytes: the node's allocation minus the object store
NODE_OBJECT_STORE = "@NODE_OBJECT_STORE@"  # bytes: bounded by the node's /dev/shm
NODE_SPARK_MEMORY = "@NODE_SPARK_MEMORY@"  # "<MB>m": the allocation minus 1 GiB for the worker JVM
PLACEHOLDERS = {NODE_CPUS: "cpus", NODE_GPUS: "gpus", NODE_RAY_MEMORY: "memory",
                NODE_OBJECT_STORE: "object-store", NODE_SPARK_MEMORY: "memory"}

#: Ray's own defaults: the object store takes 30% of the memory, at least 75 MB
OBJECT_STORE_FRACTION = 0.3
OBJECT_STORE_MIN = 75 * 10 ** 6
#: of /dev/shm's free space (other jobs on the node may use the rest)
SHM_FRACTION = 0.9
SPARK_JVM_RESERVE_MB = 1024
MB = 1 << 20

RAY_ALLOCATION_OPTIONS = (("--num-cpus", NODE_CPUS), ("--num-gpus", NODE_GPUS),
                          ("--memory", NODE_RAY_MEMORY), ("--object-store-memory", NODE_OBJECT_STORE))
SPARK_ALLOCATION_OPTIONS = ((("-c", "--cores"), NODE_CPUS), (("-m", "--memory"), NODE_SPARK_MEMORY))


def _int(text: Optional[str]) -> Optional[int]:
    try:
        return int(str(text).strip())
    except (TypeError, ValueError):
        return None


def cpus_on_node(env: dict, fallback: int) -> int:
    """The step's CPUs on this node (``SLURM_CPUS_ON_NODE``), else the job's for this host
    (``SLURM_JOB_CPUS_PER_NODE`` against the node list), else ``fallback`` (the CPU affinity)."""
    n = _int(env.get("SLURM_CPUS_ON_NODE"))
    if n and n > 0:
        return n
    host = env.get("SLURMD_NODENAME", "")
    return allocated_cpus(env).get(host) or max(1, fallback)


def memory_on_node(env: dict, cpus: int, fallback: int) -> int:
    """Bytes: what :func:`allocated_memory` says, at most ``fallback`` (the node's RAM), which
    is also the answer when Slurm tracks no memory for the job."""
    return min(allocated_memory(env, cpus) or fallback, fallback)


def gpus_on_node(env: dict) -> int:
    """GPUs this step can see: ``CUDA_VISIBLE_DEVICES`` (what Ray itself reads), else
    ``SLURM_GPUS_ON_NODE``, else none (Slurm gave the step no GPU)."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [v for v in visible.split(",") if v.strip() and v.strip() != "NoDevFiles"]
        return len(ids)
    return max(0, _int(env.get("SLURM_GPUS_ON_NODE")) or 0)


def object_store_bytes(memory: int, shm_free: Optional[int]) -> int:
    """Ray's default share of the memory, bounded by the node's free /dev/shm (a larger store
    would spill to disk, or not start)."""
    store = int(memory * OBJECT_STORE_FRACTION)
    if shm_free:
        store = min(store, int(shm_free * SHM_FRACTION))
    return max(OBJECT_STORE_MIN, store)


def node_values(env: dict, *, fallback_cpus: int, ram: int, shm_free: Optional[int]) -> dict[str, str]:
    """Pure: each placeholder's value on a node with this environment, RAM and free /dev/shm."""
    cpus = cpus_on_node(env, fallback_cpus)
    memory = memory_on_node(env, cpus, ram)
    store = object_store_bytes(memory, shm_free)
    return {
        NODE_CPUS: str(cpus),
        NODE_GPUS: str(gpus_on_node(env)),
        NODE_OBJECT_STORE: str(store),
        NODE_RAY_MEMORY: str(max(OBJECT_STORE_MIN, memory - store)),
        NODE_SPARK_MEMORY: f"{max(512, memory // MB - SPARK_JVM_RESERVE_MB)}m",
    }


def shm_free_bytes(path: str = "/dev/shm") -> Optional[int]:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def this_node_values(env: Optional[dict] = None) -> dict[str, str]:
    """The placeholders' values here (the step wrapper calls this on its node)."""
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = os.cpu_count() or 1
    return node_values(dict(os.environ if env is None else env), fallback_cpus=affinity,
                       ram=total_memory(), shm_free=shm_free_bytes())


def fill_node_values(argv: list[str], values: dict[str, str]) -> list[str]:
    """Replace every placeholder in ``argv`` (arguments without one are returned as they are)."""
    out = []
    for arg in argv:
        if "@NODE_" in arg:
            for key, value in values.items():
                arg = arg.replace(key, value)
        out.append(arg)
    return out


def _given(opts: list[str], names: tuple[str, ...]) -> bool:
    return any(option_value(opts, n) is not None for n in names)


def ray_allocation_flags(user_opts: list[str], shown: Callable[[str], str]) -> list[str]:
    """``--num-cpus``/``--num-gpus``/``--memory``/``--object-store-memory`` from the node's
    allocation, for each the user did not set in ``ray.*.start`` (an explicit option wins)."""
    flags: list[str] = []
    for name, placeholder in RAY_ALLOCATION_OPTIONS:
        if not _given(user_opts, (name,)):
            flags += [name, shown(placeholder)]
    return flags


def spark_allocation_flags(user_opts: list[str], shown: Callable[[str], str]) -> list[str]:
    """The worker's ``-c`` and ``-m`` from the node's allocation, unless ``spark.worker.start`` sets them."""
    flags: list[str] = []
    for names, placeholder in SPARK_ALLOCATION_OPTIONS:
        if not _given(user_opts, names):
            flags += [names[0], shown(placeholder)]
    return flags


def dry_run_shown(host: str) -> Callable[[str], str]:
    """In the dry run a per-node value reads ``<cpus:HOST>`` (as an address reads ``<IP:HOST>``)."""
    return lambda placeholder: f"<{PLACEHOLDERS[placeholder]}:{host}>"


def allocated_memory(env: dict, cpus: int) -> Optional[int]:
    """Bytes per node from the script's node (``SLURM_MEM_PER_NODE`` or per CPU x ``cpus``);
    None when Slurm tracks no memory for the job."""
    per_node = _int(env.get("SLURM_MEM_PER_NODE"))
    if per_node and per_node > 0:
        return per_node * MB
    per_cpu = _int(env.get("SLURM_MEM_PER_CPU"))
    return per_cpu * cpus * MB if per_cpu and per_cpu > 0 else None


def node_problems(argv: list[str], shm_total: Optional[int], host: str) -> list[str]:
    """Pre-flight on the daemon's own node: an explicit Ray object store that its /dev/shm
    cannot hold (the allocation's own value is bounded by the free /dev/shm already)."""
    store = parse_bytes(option_value(argv, "--object-store-memory"))
    if store and shm_total and store > shm_total:
        return [f"the Ray object store asked ({gigabytes(store)}) is larger than /dev/shm on {host} "
                f"({gigabytes(shm_total)}): lower --object-store-memory in ray.master.start / ray.worker.start"]
    return []
