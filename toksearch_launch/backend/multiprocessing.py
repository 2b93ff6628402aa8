"""TokSearch's ``toksearch.backend.multiprocessing``."""

from toksearch_launch.pipeline.results import MultiprocessingConfig, MultiprocessingRecordSet

__all__ = ["MultiprocessingConfig", "MultiprocessingRecordSet"]
