"""Signals: where a pipeline's fetched fields come from.

``Signal`` is the contract (base.py). ``FileSignal`` and ``SyntheticSignal`` (local.py)
need no server; ``MdsSignal`` (mds.py) reads MDSplus; ``ZarrSignal`` (zarr_signal.py)
reads per-shot zarr stores. All but ``Signal`` are loaded
on first use, so importing this package imports neither h5py nor mdsthin, and
``python -m toksearch_launch.signals.local`` runs without a double import.
"""

from __future__ import annotations

import importlib
from typing import Any

from toksearch_launch.signals.base import Signal

_LAZY = {
    "SignalRegistry": "toksearch_launch.signals.base",
    "MockSignal": "toksearch_launch.signals.local",
    "ZarrSignal": "toksearch_launch.signals.zarr_signal",
    "MdsTreePath": "toksearch_launch.signals.mds",
    "FileSignal": "toksearch_launch.signals.local",
    "SyntheticSignal": "toksearch_launch.signals.local",
    "SignalNotFound": "toksearch_launch.signals.local",
    "MdsSignal": "toksearch_launch.signals.mds",
}

__all__ = ["Signal", "SignalRegistry", "FileSignal", "SyntheticSignal", "SignalNotFound", "MockSignal", "MdsSignal",
           "MdsTreePath", "ZarrSignal"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))
