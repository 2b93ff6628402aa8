"""TokSearch's ``toksearch.record.record_set``: the type every compute_* returns."""

from toksearch_launch.pipeline.results import RecordSet

__all__ = ["RecordSet"]
