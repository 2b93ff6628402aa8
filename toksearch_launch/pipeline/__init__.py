"""TokSearch-style pipelines: records, lazy steps, result sets and the backends that run them.

``Pipeline(shots)`` records fetch/fetch_dataset/align/map/where/keep/discard steps;
``compute_serial``, ``compute_multiprocessing``, ``compute_ray`` and ``compute_spark``
run them and return a result set whose records are identical, in input order,
whatever the backend. Ray, PySpark and xarray are imported only when used.
"""

from toksearch_launch.pipeline.ops import RunStats
from toksearch_launch.pipeline.pipeline import Pipeline
from toksearch_launch.pipeline.record import (
    InvalidRecordField,
    InvalidShotNumber,
    MissingShotNumber,
    ProtectedFieldError,
    Record,
)
from toksearch_launch.pipeline.results import RecordSet, ResultSet

__all__ = [
    "InvalidRecordField",
    "InvalidShotNumber",
    "MissingShotNumber",
    "Pipeline",
    "ProtectedFieldError",
    "Record",
    "RecordSet",
    "ResultSet",
    "RunStats",
]
