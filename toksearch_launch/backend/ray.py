"""TokSearch's ``toksearch.backend.ray`` (Ray itself is imported only when a computation runs)."""

from toksearch_launch.pipeline.results import RayConfig, RayRecordSet

__all__ = ["RayConfig", "RayRecordSet"]
