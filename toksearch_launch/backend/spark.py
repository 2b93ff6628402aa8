"""TokSearch's ``toksearch.backend.spark`` (PySpark is imported only when a computation runs)."""

from toksearch_launch.pipeline.results import SparkRecordSet, ToksearchSparkConfig

__all__ = ["SparkRecordSet", "ToksearchSparkConfig"]
