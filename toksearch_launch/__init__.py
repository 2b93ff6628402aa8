"""toksearch_launch: run a TokSearch script across a SLURM allocation.

The public names are loaded on first use, so that `toksearch_submit` (which imports
this package) never pays for numpy, Ray or PySpark.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "Pipeline": "toksearch_launch.pipeline",
    "Record": "toksearch_launch.pipeline",
    "MdsSignal": "toksearch_launch.signals",
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
    return getattr(importlib.import_module(module), name)
