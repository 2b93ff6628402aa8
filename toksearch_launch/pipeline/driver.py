"""The driver loop every backend shares: batches, partitions, summary lines, progress.

A backend only provides an executor that runs a list of partitions and reports
each finished one; batching, partition sizes, ordering, statistics and the
TokSearch-style summary are decided here once, so every backend behaves alike.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

from toksearch_launch.pipeline.ops import Item, RunStats
from toksearch_launch.pipeline.record import Record
from toksearch_launch.pipeline.results import ResultSet

#: Partitions per CPU when neither the caller nor the job config says otherwise.
DEFAULT_PARTITIONS_PER_CPU = 4

PartitionResult = Tuple[List[Record], RunStats]
#: Called once per finished partition with (records in, records out with errors, where-errors).
OnDone = Callable[[int, int, int], None]


class Executor(Protocol):
    """Runs partitions somewhere; returns their results in partition order."""

    def run(self, chunks: List[List[Item]], on_done: OnDone) -> List[PartitionResult]: ...


def partitions_per_cpu() -> int:
    """``backend.partitions_per_cpu`` of the job's config, or the default outside a job."""
    from toksearch_launch.config import load_job_config

    cfg = load_job_config()
    if cfg is None:
        return DEFAULT_PARTITIONS_PER_CPU
    return max(1, int(cfg.backend.partitions_per_cpu))


def default_numparts(num_cpus: int) -> int:
    """Partitions for a cluster of ``num_cpus``: a few per CPU, so load balances without one task per record."""
    return max(1, partitions_per_cpu() * max(1, int(num_cpus)))


def split_evenly(items: Sequence[Item], parts: int) -> List[List[Item]]:
    """``parts`` contiguous chunks whose sizes differ by at most one (keeps input order)."""
    n = len(items)
    parts = max(1, min(parts, n)) if n else 0
    out: List[List[Item]] = []
    base, extra = divmod(n, parts) if parts else (0, 0)
    start = 0
    for i in range(parts):
        size = base + (1 if i < extra else 0)
        out.append(list(items[start : start + size]))
        start += size
    return out


def median_size(chunks: Sequence[Sequence[Any]]) -> int:
    """Median partition size as TokSearch prints it (an int)."""
    sizes = sorted(len(c) for c in chunks)
    if not sizes:
        return 0
    mid = len(sizes) // 2
    return int(sizes[mid] if len(sizes) % 2 else (sizes[mid - 1] + sizes[mid]) / 2)


def progress_wanted(verbose: bool) -> bool:
    """A progress display only when asked for and stderr is a terminal (never in logs)."""
    return bool(verbose) and sys.stderr.isatty()


class Progress:
    """A tqdm bar of records done / total, rate and errors so far; only on a terminal."""

    def __init__(self, total: int, enabled: bool, desc: str) -> None:
        self.errors = 0
        self._bar = None
        if progress_wanted(enabled):
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="rec", file=sys.stderr, dynamic_ncols=True)
            self._bar.set_postfix(errors=0)

    @property
    def active(self) -> bool:
        return self._bar is not None

    def update(self, records: int, with_errors: int, where_errors: int) -> None:
        if self._bar is None:
            return
        self.errors += with_errors + where_errors
        self._bar.set_postfix(errors=self.errors, refresh=False)
        self._bar.update(records)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def drive(
    executor: Executor,
    records: Sequence[Item],
    *,
    backend: str,
    num_cpus: int,
    numparts: Optional[int],
    batch_size: Optional[int],
    verbose: bool,
    info: Optional[Dict[str, Any]] = None,
) -> ResultSet:
    """Run ``records`` through ``executor`` in batches of partitions; results in input order."""
    if numparts is not None and int(numparts) < 1:
        raise ValueError(f"numparts must be 1 or more, got {numparts!r}")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be 1 or more, got {batch_size!r}")
    nparts = int(numparts) if numparts else default_numparts(num_cpus)
    size = int(batch_size) if batch_size else max(1, len(records))
    batches = [records[i : i + size] for i in range(0, len(records), size)]

    start = time.perf_counter()
    stats = RunStats()
    out: List[Record] = []
    part_sizes: List[int] = []
    progress = Progress(len(records), verbose, backend)
    try:
        for i, batch in enumerate(batches, 1):
            chunks = split_evenly(batch, nparts)
            part_sizes.extend(len(c) for c in chunks)
            if verbose:
                print("*" * 80)
                print(f"BATCH {i}/{len(batches)}")
                print(f"NUM CPUS: {num_cpus}")
                print(f"NUM PARTITIONS: {len(chunks)}")
                print(f"MEDIAN PARTITION SIZE: {median_size(chunks)}", flush=True)
            for recs, part_stats in executor.run(chunks, progress.update):
                out.extend(recs)
                stats.merge(part_stats)
    finally:
        progress.close()

    elapsed = time.perf_counter() - start
    run_info: Dict[str, Any] = {
        "backend": backend,
        "num_cpus": num_cpus,
        "num_partitions": len(part_sizes),
        "num_batches": len(batches),
        "elapsed_s": elapsed,
    }
    run_info.update(info or {})
    result = ResultSet(out, stats, run_info)
    if verbose:
        rate = len(records) / elapsed if elapsed > 0 else math.inf
        print(
            f"DONE: {stats.records_out}/{stats.records_in} records in {elapsed:.2f} s "
            f"({rate:,.0f} records/s); records with errors: {stats.records_with_errors}",
            flush=True,
        )
    result.warn_where_errors()
    return result
