"""ResultSet: what every compute_* returns, the same type whatever the backend.

Results always come back to the driver (only the fields kept by the pipeline),
so a ResultSet is a plain list of Records plus run statistics; it needs no
cluster once returned, which lets compute_ray/compute_spark shut down what they
started.
"""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Union, overload

from toksearch_launch.pipeline.ops import RunStats
from toksearch_launch.pipeline.record import Record, error_type_name


class ResultSet(Sequence[Record]):
    """Records in input order, ``stats`` (filtered / where-errors / errors) and ``info`` (backend, nodes, timing)."""

    def __init__(
        self,
        records: List[Record],
        stats: Optional[RunStats] = None,
        info: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.records = records
        self.stats = stats if stats is not None else RunStats(records_in=len(records), records_out=len(records))
        self.info: Dict[str, Any] = dict(info or {})

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> List[Record]: ...

    def __getitem__(self, index: Union[int, slice]) -> Union[Record, List[Record]]:
        """An int gives a Record, a slice a list of Records (as TokSearch's record sets do)."""
        return self.records[index]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __repr__(self) -> str:
        return (
            f"<ResultSet {len(self)} records, {self.num_errors} with errors, "
            f"backend={self.info.get('backend', '?')}>"
        )

    @property
    def num_errors(self) -> int:
        """Records that carry at least one error (where-dropped records are in ``stats.where_errors``)."""
        return sum(1 for r in self.records if r.errors)

    @property
    def records_with_errors(self) -> List[Record]:
        return [r for r in self.records if r.errors]

    @property
    def nodes(self) -> List[str]:
        """Addresses of the cluster nodes that served the run (empty for serial/multiprocessing)."""
        return list(self.info.get("nodes", []))

    def to_list(self) -> List[Dict[str, Any]]:
        """Plain dicts, one per record, in order."""
        return [r.to_dict() for r in self.records]

    def to_dataframe(self):  # -> pandas.DataFrame
        """A pandas DataFrame, one row per record (pandas is optional)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
        return pd.DataFrame.from_records(self.to_list())

    def cleanup(self, **kwargs: Any) -> None:
        """TokSearch's: release the engine behind the results; the records stay usable.

        A Ray or Spark connection that ``compute_*`` made and already closed, or that
        belongs to the job's cluster (closed when the job ends), is left alone; one
        the user opened before computing (``ray.init()``, a SparkContext) is closed
        here, as TokSearch does. Serial and multiprocessing hold nothing.
        """

    def warn_where_errors(self) -> None:
        """Say how many records a raising where() predicate dropped (they are otherwise silent)."""
        st = self.stats
        if not st.where_errors:
            return
        first = ""
        if st.where_error_details:
            shot, info = st.where_error_details[0]
            first = f"; first: shot {shot} in {info.get('step', 'where')}: {error_type_name(info)}: {info['message']}"
        warnings.warn(
            f"{st.where_errors} record(s) dropped because a where() predicate raised "
            f"(see .stats.where_error_shots){first}",
            RuntimeWarning,
            stacklevel=_caller_level(),
        )


#: TokSearch's name of the base class.
RecordSet = ResultSet


class SerialRecordSet(ResultSet):
    """What ``compute_serial()`` returns."""


class MultiprocessingRecordSet(ResultSet):
    """What ``compute_multiprocessing()`` returns."""


class RayRecordSet(ResultSet):
    """What ``compute_ray()`` returns (the records are already on the driver)."""

    def object_ids(self) -> List[Any]:
        """The records put in Ray's object store, one ObjectRef each (TokSearch's; needs a Ray connection)."""
        import ray

        if not ray.is_initialized():
            raise RuntimeError("object_ids() needs a Ray connection; the records themselves are in this result set")
        return [ray.put(rec) for rec in self.records]

    def cleanup(self, **kwargs: Any) -> None:
        if self.info.get("connection") != "user":
            return
        import ray

        if ray.is_initialized():
            ray.shutdown()


class SparkRecordSet(ResultSet):
    """What ``compute_spark()`` returns (the records are already on the driver)."""

    def cache(self) -> None:
        """Accepted for TokSearch compatibility: the records are in memory already."""

    def to_rdd(self, **kwargs: Any) -> Any:
        """The records as an RDD of the active SparkContext (TokSearch's; needs one)."""
        from pyspark import SparkContext

        sc = SparkContext._active_spark_context
        if sc is None:
            raise RuntimeError("to_rdd() needs an active SparkContext; the records themselves are in this result set")
        return sc.parallelize(self.records, max(1, int(self.info.get("num_partitions") or 1)))

    def cleanup(self, immediate: bool = False, **kwargs: Any) -> None:
        if self.info.get("connection") != "user":
            return
        from pyspark import SparkContext

        sc = SparkContext._active_spark_context
        if sc is not None:
            sc.stop()


@dataclass
class MultiprocessingConfig:
    """TokSearch's config object for ``compute(MultiprocessingRecordSet, config)``."""

    num_workers: Optional[int] = None
    batch_size: Union[str, int] = "auto"


@dataclass
class RayConfig:
    """TokSearch's config object for ``compute(RayRecordSet, config)``."""

    numparts: Optional[int] = None
    batch_size: Optional[int] = None
    verbose: bool = True
    placement_group_func: Optional[Callable[[], Any]] = None
    memory_per_task: Optional[int] = None
    ray_init_kwargs: Optional[Dict[str, Any]] = None


@dataclass
class ToksearchSparkConfig:
    """TokSearch's config object for ``compute(SparkRecordSet, config)``."""

    sc: Any = None
    numparts: Optional[int] = None
    cache: bool = False


def as_record_set(result: ResultSet, cls: type) -> ResultSet:
    """The same records, stats and info as an instance of ``cls`` (no copying)."""
    if type(result) is cls:
        return result
    return cls(result.records, result.stats, result.info)


def _caller_level() -> int:
    """warnings.warn stacklevel of the first frame outside this package (the user's compute call)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here + os.sep):
        frame = frame.f_back
        level += 1
    return level
