"""ResultSet: what every compute_* returns, the same type whatever the backend.

Results always come back to the driver (only the fields kept by the pipeline),
so a ResultSet is a plain list of Records plus run statistics; it needs no
cluster once returned, which lets compute_ray/compute_spark shut down what they
started.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any, Dict, Iterator, List, Optional, Sequence, Union, overload

from toksearch_launch.pipeline.ops import RunStats
from toksearch_launch.pipeline.record import Record


class ResultSet(Sequence[Record]):
    """Records in input order, ``stats`` (filtered / where-errors / errors) and ``info`` (backend, nodes, timing)."""

    def __init__(
        self,
        records: List[Record],
        stats: Optional[RunStats] = None,
        info: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.records = records
        self.stats = stats if stats is not None else RunStats(records_in=len(records), records_out=len(records))
        self.info: Dict[str, Any] = dict(info or {})

    def __len__(self) -> int:
        return len(self.records)

    @overload
    def __getitem__(self, index: int) -> Record: ...

    @overload
    def __getitem__(self, index: slice) -> "ResultSet": ...

    def __getitem__(self, index: Union[int, slice]) -> Union[Record, "ResultSet"]:
        if isinstance(index, slice):
            return ResultSet(self.records[index], None, self.info)
        return self.records[index]

    def __iter__(self) -> Iterator[Record]:
        return iter(self.records)

    def __repr__(self) -> str:
        return (
            f"<ResultSet {len(self)} records, {self.num_errors} with errors, "
            f"backend={self.info.get('backend', '?')}>"
        )

    @property
    def num_errors(self) -> int:
        """Records that carry at least one error (where-dropped records are in ``stats.where_errors``)."""
        return sum(1 for r in self.records if r.errors)

    @property
    def records_with_errors(self) -> List[Record]:
        return [r for r in self.records if r.errors]

    @property
    def nodes(self) -> List[str]:
        """Addresses of the cluster nodes that served the run (empty for serial/multiprocessing)."""
        return list(self.info.get("nodes", []))

    def to_list(self) -> List[Dict[str, Any]]:
        """Plain dicts, one per record, in order."""
        return [r.to_dict() for r in self.records]

    def to_dataframe(self):  # -> pandas.DataFrame
        """A pandas DataFrame, one row per record (pandas is optional)."""
        try:
            import pandas as pd
        except ImportError as exc:
            raise ImportError("to_dataframe() needs pandas: pip install pandas") from exc
        return pd.DataFrame.from_records(self.to_list())

    def warn_where_errors(self) -> None:
        """Say how many records a raising where() predicate dropped (they are otherwise silent)."""
        st = self.stats
        if not st.where_errors:
            return
        first = ""
        if st.where_error_details:
            shot, info = st.where_error_details[0]
            first = f"; first: shot {shot} in {info.get('step', 'where')}: {info['type']}: {info['message']}"
        warnings.warn(
            f"{st.where_errors} record(s) dropped because a where() predicate raised "
            f"(see .stats.where_error_shots){first}",
            RuntimeWarning,
            stacklevel=_caller_level(),
        )


def _caller_level() -> int:
    """warnings.warn stacklevel of the first frame outside this package (the user's compute call)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame = sys._getframe(1)
    level = 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(here + os.sep):
        frame = frame.f_back
        level += 1
    return level
