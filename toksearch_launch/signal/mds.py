"""TokSearch's ``toksearch.signal.mds``: MDSplus signals (over mdsip, see docs/signals-mds.md)."""

from toksearch_launch.signals.mds import MdsError, MdsLocalTreeError, MdsSignal, MdsTreePath

__all__ = ["MdsError", "MdsLocalTreeError", "MdsSignal", "MdsTreePath"]
