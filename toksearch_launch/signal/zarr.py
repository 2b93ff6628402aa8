"""TokSearch's ``toksearch.signal.zarr``: one signal of per-shot zarr stores."""

from toksearch_launch.signals.zarr_signal import ZarrSignal

__all__ = ["ZarrSignal"]
