"""TokSearch-style pipelines: records, lazy steps, result sets and the backends that run them.

``Pipeline(shots)`` records fetch/map/where/keep/discard steps; ``compute_serial``,
``compute_multiprocessing``, ``compute_ray`` and ``compute_spark`` run them and
return a :class:`ResultSet` whose records are identical, in input order, whatever
the backend. Ray and PySpark are imported only by their compute method.
"""

from toksearch_launch.pipeline.ops import RunStats
from toksearch_launch.pipeline.pipeline import Pipeline
from toksearch_launch.pipeline.record import (
    InvalidShotNumber,
    MissingShotNumber,
    ProtectedFieldError,
    Record,
)
from toksearch_launch.pipeline.results import ResultSet

__all__ = [
    "InvalidShotNumber",
    "MissingShotNumber",
    "Pipeline",
    "ProtectedFieldError",
    "Record",
    "ResultSet",
    "RunStats",
]
