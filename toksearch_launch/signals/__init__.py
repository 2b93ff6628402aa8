"""Signals: where a pipeline's fetched fields come from."""

from toksearch_launch.signals.base import Signal

__all__ = ["Signal"]
