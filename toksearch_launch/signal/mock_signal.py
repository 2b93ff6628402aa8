"""TokSearch's ``toksearch.signal.mock_signal``: a signal that returns fixed arrays (for tests)."""

from toksearch_launch.signals.local import MockSignal

__all__ = ["MockSignal"]
