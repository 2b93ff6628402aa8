"""TokSearch's ``toksearch.signal.signal``: the base class and the per-process registry."""

from toksearch_launch.signals.base import Signal, SignalRegistry

__all__ = ["Signal", "SignalRegistry"]
