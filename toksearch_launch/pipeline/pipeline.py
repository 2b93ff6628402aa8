"""Pipeline: TokSearch's lazy, per-shot processing chain.

Steps are recorded, not run, until a ``compute_*`` method picks a backend; the
same step objects then run through :func:`~toksearch_launch.pipeline.ops.run_partition`
on every backend, so serial, multiprocessing, Ray and Spark give identical
records in input order.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, List, Mapping, Optional, Union

from toksearch_launch.pipeline.ops import (
    Item,
    Discard,
    Fetch,
    FetchDataset,
    Keep,
    Map,
    Op,
    RunStats,
    Where,
    run_partition,
)
from toksearch_launch.pipeline.record import Record, as_shot
from toksearch_launch.pipeline.results import ResultSet

Source = Union[Iterable[Union[int, Mapping[str, Any], Record]], "Pipeline", ResultSet]


def _to_item(item: Any) -> Item:
    """One source element as a shot number (a record is made from it where it is computed) or a Record."""
    if type(item) is int:
        return item
    if isinstance(item, Record):
        return item
    if isinstance(item, Mapping):
        return Record.from_dict(item)
    return as_shot(item)


def _fresh(item: Item) -> Item:
    """A private copy of a source item: maps mutate records in place, the source must not change."""
    if type(item) is int:
        return item
    return copy.deepcopy(item)


class Pipeline:
    """A chain of fetch/map/where/keep/discard steps over a list of shots.

    ``source``: shot numbers (a list or range), dicts each with a ``shot``,
    Records, a ResultSet, or another Pipeline (whose steps this one continues).
    """

    def __init__(self, source: Source) -> None:
        self._ops: List[Op]
        if isinstance(source, Pipeline):
            self._items = source._items
            self._ops = list(source._ops)
        else:
            items = source.records if isinstance(source, ResultSet) else source
            if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
                raise TypeError(
                    "Pipeline source must be a list/range of shots, of dicts with 'shot', of Records, "
                    f"a ResultSet or a Pipeline; got {type(source).__name__}"
                )
            #: Shot numbers (ints) or Records; Records for plain shots are made by
            #: the workers, so only small ints travel to them.
            self._items: List[Item] = list(items) if isinstance(items, range) else [_to_item(i) for i in items]
            self._ops = []

    # ------------------------------------------------------------------ building

    def fetch(self, name: str, signal: Any) -> None:
        """Add ``rec[name] = signal.gather(shot)``; a failure leaves None and an entry in ``errors``."""
        self._ops.append(Fetch(name, signal))

    def fetch_dataset(self, name: str, signals: Mapping[str, Any], append: bool = True) -> None:
        """Fetch several signals into one dict of arrays aligned on their shared dims (outer join)."""
        self._ops.append(FetchDataset(name, signals, append=append))

    def map(self, func: Callable[[Record], Any]) -> Callable[[Record], Any]:
        """Add ``func(rec)``, which mutates the record; usable as a decorator (returns ``func``)."""
        self._ops.append(Map(func))
        return func

    def where(self, func: Callable[[Record], Any]) -> Callable[[Record], Any]:
        """Keep records for which ``func(rec)`` is true; one that raises is dropped and counted."""
        self._ops.append(Where(func))
        return func

    def keep(self, fields: Iterable[str]) -> None:
        """Keep only ``fields`` (``shot`` and ``errors`` always stay)."""
        self._ops.append(Keep(fields))

    def discard(self, fields: Iterable[str]) -> None:
        """Remove ``fields`` (``shot`` and ``errors`` always stay)."""
        self._ops.append(Discard(fields))

    @property
    def operations(self) -> List[Op]:
        return list(self._ops)

    def __len__(self) -> int:
        """Number of input records (before any where())."""
        return len(self._items)

    def __repr__(self) -> str:
        steps = ", ".join(repr(op) for op in self._ops) or "no steps"
        return f"<Pipeline over {len(self._items)} records: {steps}>"

    # ------------------------------------------------------------------ computing

    def compute_record(self, record: Union[Record, Mapping[str, Any], int]) -> Optional[Record]:
        """Run the pipeline on one record here (None if a where() dropped it); handy for debugging."""
        recs, _ = run_partition(self._ops, [_fresh(_to_item(record))])
        return recs[0] if recs else None

    def compute_shot(self, shot: int) -> Optional[Record]:
        """Run the pipeline on one shot here."""
        return self.compute_record(shot)

    def compute(self, **kwargs: Any) -> ResultSet:
        """On the job's default backend (``backend=ray|spark|dask`` of the launcher's config;
        Ray outside a job): ``compute_ray``, ``compute_spark`` or ``compute_dask(**kwargs)``."""
        from toksearch_launch.config import default_config, load_job_config

        cfg = load_job_config() or default_config()
        if cfg.backend.name == "spark":
            return self.compute_spark(**kwargs)
        if cfg.backend.name == "dask":
            return self.compute_dask(**kwargs)
        return self.compute_ray(**kwargs)

    def compute_serial(self, verbose: bool = False) -> ResultSet:
        """In this process, one record after another: the reference the other backends must match."""
        from toksearch_launch.pipeline.local_backends import compute_serial

        return compute_serial(self._ops, [_fresh(i) for i in self._items], verbose=verbose)

    def compute_multiprocessing(
        self,
        num_workers: Optional[int] = None,
        batch_size: Union[int, str] = "auto",
        verbose: bool = False,
        start_method: Optional[str] = None,
    ) -> ResultSet:
        """In a pool of ``num_workers`` processes (default: usable CPUs), ``batch_size`` records per task."""
        from toksearch_launch.pipeline.local_backends import compute_multiprocessing

        return compute_multiprocessing(
            self._ops,
            self._items,
            num_workers=num_workers,
            batch_size=batch_size,
            verbose=verbose,
            start_method=start_method,
        )

    def compute_ray(
        self,
        numparts: Optional[int] = None,
        batch_size: Optional[int] = None,
        verbose: bool = True,
        memory_per_shot: Optional[int] = None,
        **ray_init_kwargs: Any,
    ) -> ResultSet:
        """On Ray: the job's cluster inside toksearch_submit, else an existing or a new local Ray.

        ``numparts`` partitions per batch (default ``partitions_per_cpu`` x cluster CPUs),
        ``batch_size`` records per batch (default: all), ``memory_per_shot`` bytes
        reserved per record of a task. Ray is shut down afterwards only if started here.
        """
        from toksearch_launch.pipeline.ray_backend import compute_ray

        return compute_ray(
            self._ops,
            self._items,
            numparts=numparts,
            batch_size=batch_size,
            verbose=verbose,
            memory_per_shot=memory_per_shot,
            ray_init_kwargs=ray_init_kwargs,
        )

    def compute_spark(
        self,
        sc: Any = None,
        numparts: Optional[int] = None,
        cache: bool = False,
        batch_size: Optional[int] = None,
        verbose: bool = True,
    ) -> ResultSet:
        """On Spark: ``sc`` (SparkContext or SparkSession) if given, else the active one, the job's
        cluster inside toksearch_submit, or a new ``local[N]`` session (stopped afterwards).

        ``cache`` is accepted for TokSearch compatibility; results are collected
        to the driver, so there is nothing to recompute.
        """
        from toksearch_launch.pipeline.spark_backend import compute_spark

        return compute_spark(
            self._ops,
            self._items,
            sc=sc,
            numparts=numparts,
            cache=cache,
            batch_size=batch_size,
            verbose=verbose,
        )

    def compute_dask(
        self,
        client: Any = None,
        numparts: Optional[int] = None,
        batch_size: Optional[int] = None,
        verbose: bool = True,
    ) -> ResultSet:
        """On Dask: ``client`` (a distributed.Client) if given, else the job's cluster inside
        toksearch_submit, the default client, or a new local cluster (closed afterwards)."""
        from toksearch_launch.pipeline.dask_backend import compute_dask

        return compute_dask(self._ops, self._items, client=client, numparts=numparts,
                            batch_size=batch_size, verbose=verbose)


__all__ = ["Pipeline", "RunStats"]
