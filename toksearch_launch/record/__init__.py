"""TokSearch's ``toksearch.record``: the Record and its exceptions."""

from toksearch_launch.pipeline.record import (
    InvalidRecordField,
    InvalidShotNumber,
    MissingShotNumber,
    ProtectedFieldError,
    Record,
)

__all__ = ["InvalidRecordField", "InvalidShotNumber", "MissingShotNumber", "ProtectedFieldError", "Record"]
