"""Pipeline: TokSearch's lazy, per-shot processing chain.

Steps are recorded, not run, until a ``compute_*`` method picks a backend; the
same step objects then run through :func:`~toksearch_launch.pipeline.ops.run_partition`
on every backend, so serial, multiprocessing, Ray and Spark give identical
records in input order.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Union

from toksearch_launch.pipeline.ops import (
    Align,
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
from toksearch_launch.pipeline.results import (
    MultiprocessingRecordSet,
    RayRecordSet,
    ResultSet,
    SerialRecordSet,
    SparkRecordSet,
    as_record_set,
)

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


#: ``compute(recordset_cls)`` (TokSearch's long form): the compute_* method of each result-set class.
COMPUTE_METHODS: Dict[type, str] = {
    SerialRecordSet: "compute_serial",
    MultiprocessingRecordSet: "compute_multiprocessing",
    RayRecordSet: "compute_ray",
    SparkRecordSet: "compute_spark",
}

#: TokSearch's config field names that differ from the compute_* keyword.
CONFIG_RENAMES = {"memory_per_task": "memory_per_shot"}


class Pipeline:
    """A chain of fetch/map/where/keep/discard/align steps over a list of shots.

    ``source``: shot numbers (a list or range), dicts each with a ``shot``,
    Records, a ResultSet, or another Pipeline (whose steps this one continues).
    """

    @classmethod
    def from_sql(cls, conn: Any, query: str, *query_params: Any) -> "Pipeline":
        """A Pipeline over the rows of ``query`` on a DB-API connection (sqlite3, psycopg, pymssql, ...).

        One record per row; each column becomes a field. The query must return a
        ``shot`` column and no ``key`` or ``errors`` column; every column needs a
        name. ``query_params`` use the driver's placeholders (``?`` for sqlite3,
        ``%s`` for psycopg and pymssql).
        """
        from toksearch_launch.sql.query import query_rows

        return cls(query_rows(conn, query, query_params))

    def __init__(self, source: Source) -> None:
        self._ops: List[Op]
        if isinstance(source, Pipeline):
            self._items = source._items
            self._ops = list(source._ops)
        else:
            items = source.records if isinstance(source, ResultSet) else source
            items = getattr(items, "source_records", items)  # a PipelineSource
            if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
                raise TypeError(
                    "Pipeline source must be a list/range of shots, of dicts with 'shot', of Records, "
                    f"a ResultSet or a Pipeline; got {type(source).__name__}"
                )
            #: Shot numbers (ints) or Records; Records for plain shots are made by
            #: the workers, so only small ints travel to them.
            self._items: List[Item] = (list(items) if isinstance(items, range)  # ints: no call per shot
                                       else [i if type(i) is int else _to_item(i) for i in items])
            self._ops = []

    # ------------------------------------------------------------------ building

    def fetch(self, name: str, signal: Any) -> None:
        """Add ``rec[name] = signal.gather(shot)``; a failure leaves None and an entry in ``errors``."""
        self._ops.append(Fetch(name, signal))

    def fetch_dataset(self, name: str, signals: Mapping[str, Any], append: bool = True) -> None:
        """``rec[name]``: an ``xarray.Dataset`` with one variable per signal, merged on their dims (outer join).

        A failing signal is left out and its error filed under ``name``. With
        ``append`` (default) an existing Dataset in ``name`` is extended.
        """
        self._ops.append(FetchDataset(name, signals, append=append))

    def align(
        self,
        ds_name: str,
        align_with: Any,
        dim: str = "times",
        method: str = "pad",
        extrapolate: bool = True,
        interp_kwargs: Optional[Dict[str, Any]] = None,
    ) -> None:
        """Put every variable of the Dataset ``rec[ds_name]`` on new ``dim`` values.

        ``align_with``: a variable name, a list or array, a callable ``f(ds)`` or a
        sample period; ``method``: ``pad`` (hold), ``linear``, ``cubic``, ... (see
        :mod:`toksearch_launch.pipeline.align`). An unknown method or an unusable
        ``align_with`` is refused here; a record without the dataset gets an error
        under ``align``.
        """
        from toksearch_launch.pipeline.align import XarrayAligner

        aligner = XarrayAligner(align_with, dim=dim, method=method, extrapolate=extrapolate, interp_kwargs=interp_kwargs)
        self._ops.append(Align(ds_name, aligner))

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

    def compute(self, recordset_cls: Optional[type] = None, config: Any = None, **kwargs: Any) -> ResultSet:
        """TokSearch's ``compute(RayRecordSet, RayConfig(...))``, or, with no class, the job's default
        backend (``backend=ray|spark|dask`` of the launcher's config; Ray outside a job) with ``kwargs``."""
        if recordset_cls is not None:
            return self._compute_with(recordset_cls, config, kwargs)
        from toksearch_launch.config import default_config, load_job_config

        cfg = load_job_config() or default_config()
        if cfg.backend.name == "spark":
            return self.compute_spark(**kwargs)
        if cfg.backend.name == "dask":
            return self.compute_dask(**kwargs)
        return self.compute_ray(**kwargs)

    def _compute_with(self, recordset_cls: type, config: Any, kwargs: Dict[str, Any]) -> ResultSet:
        """Run the compute_* method of ``recordset_cls`` with the fields of ``config`` (a TokSearch config)."""
        method = next((m for cls, m in COMPUTE_METHODS.items() if isinstance(recordset_cls, type)
                       and issubclass(recordset_cls, cls)), None)
        if method is None:
            known = ", ".join(cls.__name__ for cls in COMPUTE_METHODS)
            raise TypeError(f"compute: {recordset_cls!r} is not one of {known}")
        options: Dict[str, Any] = {}
        if config is not None:
            if not dataclasses.is_dataclass(config):
                raise TypeError(f"compute: config must be a backend config (e.g. RayConfig), got {type(config).__name__}")
            for f in dataclasses.fields(config):
                options[CONFIG_RENAMES.get(f.name, f.name)] = getattr(config, f.name)
            init = options.pop("ray_init_kwargs", None)
            if init:
                options.update(init)
        options.update(kwargs)
        return getattr(self, method)(**options)

    def compute_serial(self, verbose: bool = False, store: Any = "auto") -> ResultSet:
        """In this process, one record after another: the reference the other backends must match.

        ``store`` (every compute_*): ``"auto"`` saves each finished partition in the run
        directory inside a toksearch_submit job (nothing outside one), a path saves
        there, None saves nothing; see docs/durability.md."""
        from toksearch_launch.pipeline.local_backends import compute_serial

        return as_record_set(compute_serial(self._ops, [_fresh(i) for i in self._items], verbose=verbose, store=store),
                             SerialRecordSet)

    def compute_multiprocessing(
        self,
        num_workers: Optional[int] = None,
        batch_size: Union[int, str] = "auto",
        verbose: bool = False,
        start_method: Optional[str] = None,
        store: Any = "auto",
    ) -> ResultSet:
        """In a pool of ``num_workers`` processes (default: usable CPUs), ``batch_size`` records per task."""
        from toksearch_launch.pipeline.local_backends import compute_multiprocessing

        return as_record_set(compute_multiprocessing(
            self._ops,
            self._items,
            num_workers=num_workers,
            batch_size=batch_size,
            verbose=verbose,
            start_method=start_method,
            store=store,
        ), MultiprocessingRecordSet)

    def compute_ray(
        self,
        numparts: Optional[int] = None,
        batch_size: Optional[int] = None,
        verbose: bool = True,
        placement_group_func: Optional[Callable[[], Any]] = None,
        memory_per_shot: Optional[int] = None,
        store: Any = "auto",
        **ray_init_kwargs: Any,
    ) -> ResultSet:
        """On Ray: the job's cluster inside toksearch_submit, else an existing or a new local Ray.

        ``numparts`` partitions per batch (default ``partitions_per_cpu`` x cluster CPUs),
        ``batch_size`` records per batch (default: all), ``memory_per_shot`` bytes
        reserved per record of a task, ``placement_group_func()`` a placement group
        the tasks run in. ``ray_init_kwargs`` go to ``ray.init`` (also as one dict,
        TokSearch's ``ray_init_kwargs={...}``). Ray is shut down afterwards only if
        started here.
        """
        from toksearch_launch.pipeline.ray_backend import compute_ray

        init_kwargs = dict(ray_init_kwargs.pop("ray_init_kwargs", None) or {})
        init_kwargs.update(ray_init_kwargs)
        return compute_ray(
            self._ops,
            self._items,
            numparts=numparts,
            batch_size=batch_size,
            verbose=verbose,
            memory_per_shot=memory_per_shot,
            ray_init_kwargs=init_kwargs,
            placement_group_func=placement_group_func,
            store=store,
        )

    def compute_spark(
        self,
        sc: Any = None,
        numparts: Optional[int] = None,
        cache: bool = False,
        batch_size: Optional[int] = None,
        verbose: bool = True,
        store: Any = "auto",
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
            store=store,
        )

    def compute_dask(
        self,
        client: Any = None,
        numparts: Optional[int] = None,
        batch_size: Optional[int] = None,
        verbose: bool = True,
        store: Any = "auto",
    ) -> ResultSet:
        """On Dask: ``client`` (a distributed.Client) if given, else the job's cluster inside
        toksearch_submit, the default client, or a new local cluster (closed afterwards)."""
        from toksearch_launch.pipeline.dask_backend import compute_dask

        return compute_dask(self._ops, self._items, client=client, numparts=numparts,
                            batch_size=batch_size, verbose=verbose, store=store)


__all__ = ["Pipeline", "RunStats"]
