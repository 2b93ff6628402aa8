"""The signal contract every fetchable source follows (as TokSearch defines it).

``gather(shot)`` returns ``{"data": array, <dim>: array, ..., "units": {...}}``: the
data, one array per name in ``dims``, and, when ``fetch_units`` is true, a dict of
units keyed by ``"data"`` and each dim name. ``data_order`` names the axes of
``data`` (by default ``dims`` reversed when the source stores them fastest-first,
else ``dims``). ``cleanup_shot(shot)`` releases what one shot held (an open tree);
``cleanup()`` releases everything (connections) when a worker is done.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple


class Signal:
    """Base of all signals. Subclasses implement :meth:`gather`."""

    def __init__(
        self,
        dims: Sequence[str] = ("times",),
        data_order: Optional[Sequence[str]] = None,
        fetch_units: bool = True,
    ) -> None:
        self.dims: Tuple[str, ...] = tuple(dims)
        self.data_order: Tuple[str, ...] = tuple(data_order) if data_order is not None else tuple(dims)
        self.fetch_units = fetch_units

    def gather(self, shot: int) -> Dict[str, Any]:
        raise NotImplementedError

    def cleanup_shot(self, shot: int) -> None:
        """Release what was held for ``shot``; the default holds nothing."""

    def cleanup(self) -> None:
        """Release every resource (connections); the default holds nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dims={self.dims!r})"
