"""TokSearch's ``toksearch.pipeline.pipeline_source``: a fixed list of source records."""

from __future__ import annotations

import copy
from typing import Any, Iterable, List

from toksearch_launch.pipeline.record import InvalidShotNumber, Record


def as_record(item: Any) -> Record:
    """A Record from a Record, a shot number or a dict with ``shot``."""
    if isinstance(item, Record):
        return item
    try:
        return Record(item)
    except InvalidShotNumber:
        if isinstance(item, dict):
            return Record.from_dict(item)
        raise


class PipelineSource:
    """Records made once from shots, dicts or Records; ``Pipeline(source)`` starts from copies of them."""

    def __init__(self, input_items: Iterable[Any]) -> None:
        self._records: List[Record] = [as_record(item) for item in input_items]

    @property
    def records(self) -> List[Record]:
        """Deep copies, so a computation never changes the source."""
        return copy.deepcopy(self._records)

    @property
    def source_records(self) -> List[Record]:
        return self.records

    def add_record(self, record: Record) -> None:
        self._records.append(record)

    def __len__(self) -> int:
        return len(self._records)
