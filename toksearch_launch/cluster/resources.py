"""What this machine offers (CPUs, memory, /dev/shm) and what the user's options ask for."""

from __future__ import annotations

import os
import re
from typing import Any, Optional


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
