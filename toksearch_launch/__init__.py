"""toksearch_launch: run a TokSearch script across a SLURM allocation.

The public names are loaded on first use, so that `toksearch_submit` (which imports
this package) never pays for numpy, Ray or PySpark.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # TokSearch's top level: `from toksearch import ...` becomes `from toksearch_launch import ...`.
    "Pipeline": "toksearch_launch.pipeline",
    "Record": "toksearch_launch.pipeline",
    "Signal": "toksearch_launch.signals",
    "SignalRegistry": "toksearch_launch.signals",
    "MdsSignal": "toksearch_launch.signals",
    "MdsTreePath": "toksearch_launch.signals",
    "ZarrSignal": "toksearch_launch.signals",
    "XarrayAligner": "toksearch_launch.pipeline.align",
    "InvalidShotNumber": "toksearch_launch.pipeline",
    "InvalidRecordField": "toksearch_launch.pipeline",
    "MissingShotNumber": "toksearch_launch.pipeline",
    "MissingColumnName": "toksearch_launch.sql.query",
    "RecordSet": "toksearch_launch.pipeline",
    # This package's own.
    "ResultSet": "toksearch_launch.pipeline",
    "FileSignal": "toksearch_launch.signals",
    "SyntheticSignal": "toksearch_launch.signals",
    "Cluster": "toksearch_launch.cluster",
    "load_job_config": "toksearch_launch.config",
    "load_results": "toksearch_launch.pipeline.store",
    "load_dataframe": "toksearch_launch.pipeline.store",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'toksearch_launch' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
