"""TokSearch's ``toksearch.pipeline.record_pipeline``: the Pipeline and ``MissingColumnName``."""

from toksearch_launch.pipeline.pipeline import Pipeline
from toksearch_launch.sql.query import MissingColumnName

__all__ = ["MissingColumnName", "Pipeline"]
