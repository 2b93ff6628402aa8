"""The driver loop every backend shares: batches, partitions, summary lines, progress, the store.

A backend only provides an executor that runs a list of partitions and reports
each finished one; batching, partition sizes, ordering, statistics, the
TokSearch-style summary and the result store (each finished partition written
at once, records already stored skipped, a clean stop on Slurm's warning
signal) are decided here once, so every backend behaves alike.
"""

from __future__ import annotations

import math
import sys
import time
from itertools import chain
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Protocol, Sequence, Tuple

from toksearch_launch.pipeline.ops import Item, RunStats
from toksearch_launch.pipeline.record import Record
from toksearch_launch.pipeline.results import ResultSet
from toksearch_launch.pipeline.store import item_shot

#: Partitions per CPU when neither the caller nor the job config says otherwise.
DEFAULT_PARTITIONS_PER_CPU = 4

#: (records, stats), or (records, stats, the records as ``store.encode_body`` bytes) from an executor
#: whose workers pickle them anyway to send them: the store then writes those bytes as they are.
PartitionResult = Tuple[Any, ...]
#: Called once per finished partition with (records in, records out with errors, where-errors).
OnDone = Callable[[int, int, int], None]


class Executor(Protocol):
    """Runs partitions somewhere and yields each as it finishes, so the driver stores it at once.

    ``results`` yields ``(index into chunks, result)`` in completion order. It
    submits no new partition once ``stop.requested``; it keeps yielding the running
    ones until ``stop.abandon_now()``, then cancels them and returns.
    """

    def results(self, chunks: List[List[Item]], stop: Any) -> Iterator[Tuple[int, PartitionResult]]: ...


#: Seconds between checks of a stop request while waiting for partitions.
POLL_S = 0.5


def in_flight(
    chunks: Sequence[Any],
    stop: Any,
    window: int,
    submit: Callable[[Any], Any],
    wait_some: Callable[[List[Any], float], Iterable[Any]],
    cancel: Callable[[List[Any]], None],
    watch: Any = None,
) -> Iterator[Tuple[int, Any]]:
    """The submission loop the cluster executors share: at most ``window`` partitions in
    flight, each ``(index, handle)`` handed back as it finishes; on a stop nothing new is
    submitted, and once its grace is gone the running ones are cancelled.

    ``submit(chunk)`` returns a hashable handle (a Ray ref, a Dask or thread future),
    ``wait_some(handles, timeout)`` the finished ones (none on a timeout) and
    ``cancel(handles)`` abandons them. A ``watch``
    (:class:`~toksearch_launch.pipeline.node_loss.NodeWatch`) looks for lost nodes after
    each wait and says what it found when the loop ends."""
    try:
        yield from _in_flight(chunks, stop, window, submit, wait_some, cancel, watch)
    except BaseException:  # a failed or abandoned run: say what was seen, look no more (the engine may hang)
        if watch is not None:
            watch.close(look=False)
        raise
    if watch is not None:
        watch.close()


def _in_flight(chunks: Sequence[Any], stop: Any, window: int, submit: Callable[[Any], Any],
               wait_some: Callable[[List[Any], float], Iterable[Any]], cancel: Callable[[List[Any]], None],
               watch: Any) -> Iterator[Tuple[int, Any]]:
    pending = iter(enumerate(chunks))
    running: Dict[Any, int] = {}
    exhausted = False
    while True:
        while not exhausted and not stop.requested and len(running) < window:
            task = next(pending, None)
            if task is None:
                exhausted = True
                break
            running[submit(task[1])] = task[0]
        if not running:
            return
        finished = list(wait_some(list(running), POLL_S))
        if watch is not None:
            watch.check(running.values())
        if not finished and stop.abandon_now():
            cancel(list(running))
            return
        for handle in finished:
            yield running.pop(handle), handle


def finished_partitions(executor: Executor, chunks: List[List[Item]], stop: Any, on_done: OnDone) -> Iterator[Tuple[int, PartitionResult]]:
    """Each finished partition of ``chunks`` as (index, result), reported to ``on_done`` as it comes."""
    for index, result in executor.results(chunks, stop):
        on_done(result[1].records_in, result[1].records_with_errors, result[1].where_errors)
        yield index, result


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
    store: Any = None,
) -> ResultSet:
    """Run ``records`` through ``executor`` in batches of partitions; results in input order.

    With a ``store`` (:class:`~toksearch_launch.pipeline.store.ResultStore`) every
    finished partition is written before the next is looked at, records stored by
    an earlier attempt are not computed again, and the result holds both.
    """
    from toksearch_launch.pipeline.stopping import STOP

    if numparts is not None and int(numparts) < 1:
        raise ValueError(f"numparts must be 1 or more, got {numparts!r}")
    if batch_size is not None and int(batch_size) < 1:
        raise ValueError(f"batch_size must be 1 or more, got {batch_size!r}")
    todo = list(range(len(records)))
    if store is not None and store.done:
        todo = [i for i in todo if i not in store.done]
        print(f"toksearch: resuming {store.path}: {len(records) - len(todo)} of {len(records)} records already "
              f"stored, skipped; computing {len(todo)}", flush=True)
    nparts = int(numparts) if numparts else default_numparts(num_cpus)
    size = int(batch_size) if batch_size else max(1, len(todo))
    batches = [todo[i : i + size] for i in range(0, len(todo), size)]

    start = time.perf_counter()
    stats = RunStats()
    out: List[Tuple[List[int], List[Record], RunStats]] = []  # (input positions, records, stats)
    part_sizes: List[int] = []
    progress = Progress(len(todo), verbose, backend)
    stop = STOP if store is not None else _NEVER
    stop.active += 1
    try:
        for i, batch in enumerate(batches, 1):
            if stop.requested:
                break
            index_chunks = split_evenly(batch, nparts)
            chunks = [list(map(records.__getitem__, chunk)) for chunk in index_chunks]  # C loops
            shots = [[item_shot(item) for item in chunk] for chunk in chunks] if store is not None else None
            part_sizes.extend(len(c) for c in chunks)
            if verbose:
                print("*" * 80)
                print(f"BATCH {i}/{len(batches)}")
                print(f"NUM CPUS: {num_cpus}")
                print(f"NUM PARTITIONS: {len(chunks)}")
                print(f"MEDIAN PARTITION SIZE: {median_size(chunks)}", flush=True)
            for index, (recs, part_stats, *body) in finished_partitions(executor, chunks, stop, progress.update):
                if store is not None:
                    store.add(index_chunks[index], shots[index], recs, part_stats,  # type: ignore[index]
                              body[0] if body else None)
                out.append((index_chunks[index], recs, part_stats))
    finally:
        stop.active -= 1
        progress.close()
        if store is not None:
            store.flush()  # finished partitions reach the disk even when the run fails

    if store is not None and stop.requested and not store.complete:
        from toksearch_launch.pipeline.stopping import stop_run

        stop_run(store)  # exits
    elapsed = time.perf_counter() - start
    computed = sum(len(p[0]) for p in out)
    earlier: List[Tuple[List[int], List[Record], RunStats, List[int]]] = []
    if store is not None:
        store.write_manifest("complete")  # after every partition file is on disk
        earlier = _stored_parts(store, todo)
        if store.skipped:
            print(f"toksearch: computed {computed} records, {store.skipped} came from the store "
                  f"({store.path})", flush=True)
    merged, stats = _merge(out, earlier, records)
    run_info: Dict[str, Any] = {
        "backend": backend,
        "num_cpus": num_cpus,
        "num_partitions": len(part_sizes),
        "num_batches": len(batches),
        "elapsed_s": elapsed,
        "records_computed": computed,
    }
    if store is not None:
        run_info.update(store=str(store.path), records_skipped=store.skipped)
    run_info.update(info or {})
    result = ResultSet(merged, stats, run_info)
    if verbose:
        rate = computed / elapsed if elapsed > 0 else math.inf
        print(
            f"DONE: {stats.records_out}/{stats.records_in} records in {elapsed:.2f} s "
            f"({rate:,.0f} records/s); records with errors: {stats.records_with_errors}",
            flush=True,
        )
    result.warn_where_errors()
    return result


class _NeverStop:
    """The stop request of a run without a store: nothing to save, so signals keep their usual effect."""

    requested = False
    active = 0

    def abandon_now(self) -> bool:
        return False


_NEVER = _NeverStop()


def _stored_parts(store: Any, todo: Sequence[int]) -> List[Tuple[List[int], List[Record], RunStats, List[int]]]:
    """Partitions an earlier attempt stored, as (input positions, records, stats, output positions)."""
    if not store.skipped:
        return []
    from toksearch_launch.pipeline.store import part_files, read_partition

    fresh = set(todo)
    parts = []
    for path in part_files(store.path):
        header, recs, out_positions, part_stats = read_partition(path)
        if header["positions"] and header["positions"][0] in fresh:
            continue  # written by this attempt: already in memory
        parts.append((header["positions"], recs, part_stats, out_positions))
    return parts


def _merge(
    computed: List[Tuple[List[int], List[Record], RunStats]],
    earlier: List[Tuple[List[int], List[Record], RunStats, List[int]]],
    records: Sequence[Item],
) -> Tuple[List[Record], RunStats]:
    """Every partition's records in input order, and their statistics merged as one run's.

    Without earlier partitions the partitions are contiguous runs of the input,
    so sorting them by their first position is enough; with them, positions of
    two attempts interleave and each record is placed by its own input position.
    """
    from toksearch_launch.pipeline.store import output_positions

    stats = RunStats()
    parts: List[Tuple[List[int], List[Record], RunStats, Optional[List[int]]]] = [(*p, None) for p in computed]
    parts += earlier
    parts.sort(key=lambda part: part[0][0] if part[0] else -1)
    for part in parts:
        stats.merge(part[2])
    if not earlier:
        return list(chain.from_iterable(part[1] for part in parts)), stats  # one C loop over the records
    pairs: List[Tuple[int, Record]] = []
    for positions, recs, _, out_positions in parts:
        if out_positions is None:
            out_positions = output_positions(positions, [item_shot(records[k]) for k in positions], recs)
        pairs.extend(zip(out_positions, recs))
    pairs.sort(key=lambda pair: pair[0])
    return [rec for _, rec in pairs], stats
