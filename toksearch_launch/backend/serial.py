"""TokSearch's ``toksearch.backend.serial``."""

from toksearch_launch.pipeline.results import SerialRecordSet

__all__ = ["SerialRecordSet"]
