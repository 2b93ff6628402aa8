"""Backends that need no cluster: serial (the reference) and a multiprocessing pool."""

from __future__ import annotations

import importlib
import math
import multiprocessing
import os
import pickle
import queue
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

from toksearch_launch.pipeline.driver import POLL_S, PartitionResult, drive
from toksearch_launch.pipeline.ops import Item, Op, run_partition
from toksearch_launch.pipeline.results import ResultSet
from toksearch_launch.pipeline.store import AUTO, decode_body, encode_body, item_shot, resolve_store

#: A serial run with a store is cut into partitions of this many records, but into at
#: least SERIAL_MIN_PARTS (a stop loses at most 5% of the work) and at most SERIAL_MAX_PARTS
#: (each costs a file and its pickling); without a store it is a single partition. Partitions
#: only change how finely work is saved: the records and statistics are the same.
SERIAL_STORE_PART_RECORDS = 500
SERIAL_MIN_PARTS = 20
SERIAL_MAX_PARTS = 100

#: Upper bound of the automatic multiprocessing batch size (bounds a task's memory).
MAX_AUTO_BATCH = 2000


class SerialExecutor:
    """Runs partitions one after another in this process."""

    def __init__(self, ops: Sequence[Op]) -> None:
        self.ops = ops

    def results(self, chunks: List[List[Item]], stop: Any) -> Iterator[Tuple[int, PartitionResult]]:
        """One partition after another; a stop takes effect between partitions."""
        for index, chunk in enumerate(chunks):
            if stop.requested:
                return
            yield index, run_partition(self.ops, chunk)


def compute_serial(ops: Sequence[Op], records: List[Item], verbose: bool = False, store: Any = AUTO) -> ResultSet:
    """All records as one partition in this process (``records`` are consumed: pass copies);
    with a store, partitions of :data:`SERIAL_STORE_PART_RECORDS`, each saved as it finishes."""
    opened = resolve_store(store, ops, records)
    return drive(
        SerialExecutor(ops),
        records,
        backend="serial",
        num_cpus=1,
        numparts=1 if opened is None else serial_parts(len(records)),
        batch_size=None,
        verbose=verbose,
        store=opened,
    )


def serial_parts(n_records: int) -> int:
    return max(1, min(n_records, SERIAL_MAX_PARTS, max(SERIAL_MIN_PARTS, -(-n_records // SERIAL_STORE_PART_RECORDS))))


def usable_cpus() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def dumps_ops(ops: Sequence[Op]) -> bytes:
    """Pickle the steps; closures and functions of ``__main__`` need cloudpickle (Ray's or Spark's copy)."""
    try:
        return pickle.dumps(list(ops), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as first:
        for name in ("cloudpickle", "pyspark.cloudpickle", "ray.cloudpickle"):
            try:
                module = importlib.import_module(name)
            except ImportError:
                continue
            return module.dumps(list(ops), protocol=pickle.HIGHEST_PROTOCOL)
        raise TypeError(
            f"the pipeline's steps cannot be pickled ({first}); define functions at module level "
            "or install cloudpickle"
        ) from first


_WORKER_OPS: Optional[List[Op]] = None


def _mp_init(payload: bytes) -> None:
    """Pool initializer: unpickle the steps once per worker process, not once per task."""
    global _WORKER_OPS
    _WORKER_OPS = pickle.loads(payload)


def _mp_run(task: Any) -> Tuple[int, bytes]:
    """One partition in a worker, its records pickled once: for the driver and for the store alike."""
    index, chunk = task
    assert _WORKER_OPS is not None
    shots = [item_shot(item) for item in chunk]  # the input shots: where each output record came from
    records, stats = run_partition(_WORKER_OPS, chunk)
    return index, encode_body(records, shots, stats)


class PoolExecutor:
    """Runs partitions as tasks of a multiprocessing pool, handing back each as it finishes."""

    def __init__(self, pool: Any, workers: int = 1) -> None:
        self.pool = pool
        self.workers = max(1, workers)

    def results(self, chunks: List[List[Item]], stop: Any) -> Iterator[Tuple[int, PartitionResult]]:
        """At most one queued task per worker beyond the running ones, so a stop leaves little
        queued; each result as it finishes. Abandoning terminates the pool."""
        done: "queue.Queue[Any]" = queue.Queue()
        window = 2 * self.workers
        pending = iter(enumerate(chunks))
        running = 0
        exhausted = False
        while True:
            while not exhausted and not stop.requested and running < window:
                task = next(pending, None)
                if task is None:
                    exhausted = True
                    break
                self.pool.apply_async(_mp_run, (task,), callback=done.put, error_callback=done.put)
                running += 1
            if running == 0:
                return
            try:
                item = done.get(timeout=POLL_S)
            except queue.Empty:
                if stop.abandon_now():
                    self.pool.terminate()
                    return
                continue
            running -= 1
            if isinstance(item, BaseException):
                raise item
            index, body = item
            yield index, (*decode_body(body), body)


def auto_batch_size(n_records: int, num_workers: int) -> int:
    """About four tasks per worker (load balance) but never huge tasks (memory)."""
    return max(1, min(MAX_AUTO_BATCH, math.ceil(n_records / (4 * num_workers))))


def compute_multiprocessing(
    ops: Sequence[Op],
    records: List[Item],
    num_workers: Optional[int] = None,
    batch_size: Union[int, str] = "auto",
    verbose: bool = False,
    start_method: Optional[str] = None,
    store: Any = AUTO,
) -> ResultSet:
    """A pool of ``num_workers`` processes, ``batch_size`` records per task."""
    workers = usable_cpus() if num_workers is None else int(num_workers)
    if workers < 1:
        raise ValueError(f"num_workers must be 1 or more, got {num_workers!r}")
    if not records:
        return ResultSet([], None, {"backend": "multiprocessing", "num_cpus": workers})
    if batch_size == "auto" or batch_size is None:
        size = auto_batch_size(len(records), workers)
    elif isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1:
        size = batch_size
    else:
        raise ValueError(f"batch_size must be 'auto' or a positive int, got {batch_size!r}")
    opened = resolve_store(store, ops, records)
    payload = dumps_ops(ops)
    ctx = multiprocessing.get_context(start_method)
    pool = ctx.Pool(processes=workers, initializer=_mp_init, initargs=(payload,))
    try:
        result = drive(
            PoolExecutor(pool, workers),
            records,
            backend="multiprocessing",
            num_cpus=workers,
            numparts=math.ceil(len(records) / size),
            batch_size=None,
            verbose=verbose,
            info={"batch_size": size},
            store=opened,
        )
        pool.close()
    except BaseException:
        pool.terminate()
        raise
    finally:
        pool.join()
    return result
