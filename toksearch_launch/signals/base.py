"""The signal contract every fetchable source follows (as TokSearch defines it).

``gather(shot)`` returns ``{"data": array, <dim>: array, ..., "units": {...}}``: the
data, one array per name in ``dims``, and, when ``with_units`` (alias
``fetch_units``) is true, a dict of units keyed by ``"data"`` and each dim name.
``data_order`` names the axes of ``data`` (default: ``dims``). ``cleanup_shot(shot)``
releases what one shot held (an open tree); ``cleanup()`` releases everything
(connections) when a worker is done.

Users call :meth:`Signal.fetch` (gather, then the callback set with
:meth:`Signal.set_callback`) or :meth:`Signal.fetch_as_xarray`; the pipeline calls
``fetch`` too. Every fetched signal is registered in this process's
:class:`SignalRegistry`, so signals fetched inside a user's ``map`` are cleaned up
like the pipeline's own.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

DimNames = Optional[Sequence[str]]


def _dims_tuple(dims: DimNames) -> Tuple[str, ...]:
    """``dims=None`` (TokSearch: a signal without dimensions) is the empty tuple; a bare string is one dim."""
    if dims is None:
        return ()
    if isinstance(dims, str):
        return (dims,)
    return tuple(dims)


def resolve_data_order(dims: Tuple[str, ...], data_order: Optional[Sequence[Union[str, int]]]) -> Tuple[str, ...]:
    """``data_order`` as dim names; TokSearch also accepts indices into ``dims`` (``(1, 0)``)."""
    if data_order is None:
        return dims
    out = []
    for entry in data_order:
        if isinstance(entry, int) and not isinstance(entry, bool):
            if not 0 <= entry < len(dims):
                raise ValueError(f"data_order index {entry} does not refer to one of dims {dims}")
            out.append(dims[entry])
        elif entry is None:
            raise ValueError("data_order entries must be dim names or indices into dims, not None")
        else:
            out.append(str(entry))
    if sorted(out) != sorted(dims):
        raise ValueError(f"data_order {tuple(out)} must name the same dims as {dims}")
    return tuple(out)


class Signal:
    """Base of all signals. Subclasses implement :meth:`gather` (and, if they hold
    resources, :meth:`cleanup_shot` / :meth:`cleanup`).

    TokSearch's subclasses call ``super().__init__()`` with no arguments and then set
    ``self.dims`` / ``self.with_units`` or call :meth:`set_dims`; both styles work.
    """

    def __init__(
        self,
        dims: DimNames = ("times",),
        data_order: Optional[Sequence[Union[str, int]]] = None,
        fetch_units: bool = True,
    ) -> None:
        self._callback: Optional[Callable[[Dict[str, Any]], Any]] = None
        self.dims = _dims_tuple(dims)
        self.data_order = resolve_data_order(self.dims, data_order)
        self.fetch_units = bool(fetch_units)

    # TokSearch calls the units flag ``with_units``; ZarrSignal and ours ``fetch_units``.
    @property
    def with_units(self) -> bool:
        return self.fetch_units

    @with_units.setter
    def with_units(self, value: bool) -> None:
        self.fetch_units = bool(value)

    def set_dims(self, dims: DimNames, data_order: Optional[Sequence[Union[str, int]]] = None) -> "Signal":
        """Name the dims (``None``: none) and, if stored differently, the axes of the data; returns self."""
        names = _dims_tuple(dims)
        order = resolve_data_order(names, data_order)
        self.dims, self.data_order = names, order
        return self

    def set_callback(self, func: Callable[[Dict[str, Any]], Any]) -> "Signal":
        """Run ``func(result)`` on every fetched result; its return value replaces the result. Returns self."""
        if not callable(func):
            raise TypeError(f"set_callback needs a callable, got {func!r}")
        self._callback = func
        return self

    def fetch(self, shot: int) -> Dict[str, Any]:
        """``gather(shot)``, then the callback (if any and the result is not empty)."""
        SignalRegistry().register(self)
        result = self.gather(shot)
        callback = getattr(self, "_callback", None)
        if result and callback is not None:
            result = callback(result)
        return result

    def fetch_as_xarray(self, shot: int) -> Any:
        """:meth:`fetch` as an ``xarray.DataArray``: axes named by ``data_order``, a coordinate per dim,
        units as ``attrs["units"]`` of the data and of each coordinate."""
        return as_data_array(self.fetch(shot), tuple(getattr(self, "data_order", None) or ()))

    def gather(self, shot: int) -> Dict[str, Any]:
        raise NotImplementedError(f"{type(self).__name__} must implement gather(shot)")

    def cleanup_shot(self, shot: int) -> None:
        """Release what was held for ``shot``; the default holds nothing."""

    def cleanup(self) -> None:
        """Release every resource (connections); the default holds nothing."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dims={self.dims!r})"


def as_data_array(result: Dict[str, Any], data_order: Tuple[str, ...]) -> Any:
    """A fetched dict as a DataArray (dims without values in ``result`` get no coordinate)."""
    import numpy as np
    import xarray as xr

    if not isinstance(result, dict) or "data" not in result:
        raise TypeError(f"a signal result must be a dict with 'data', got {type(result).__name__}")
    data = np.asarray(result["data"])
    if data_order and data.ndim != len(data_order):
        raise ValueError(f"data has {data.ndim} axes but data_order names {len(data_order)}: {data_order}")
    coords = {d: np.asarray(result[d]) for d in data_order if d in result}
    array = xr.DataArray(data, dims=data_order or None, coords=coords)
    units = result.get("units") or {}
    if "data" in units:
        array.attrs["units"] = units["data"]
    for d in coords:
        if d in units:
            array[d].attrs["units"] = units[d]
    return array


class SignalRegistry:
    """Every signal fetched in this process (one registry per process, as in TokSearch).

    The pipeline runs ``cleanup_shot(shot)`` of each registered signal after a record
    and ``cleanup()`` (then forgets them) after a partition. Signals are kept by
    identity, so signals that define ``__eq__`` without ``__hash__`` work too.
    """

    _instance: Optional["SignalRegistry"] = None
    _pid: Optional[int] = None

    def __new__(cls) -> "SignalRegistry":
        pid = os.getpid()
        if cls._instance is None or cls._pid != pid:  # a forked child starts empty
            instance = super().__new__(cls)
            instance._signals = {}
            cls._instance, cls._pid = instance, pid
        return cls._instance

    _signals: Dict[int, Any]

    @property
    def signals(self) -> List[Any]:
        return list(self._signals.values())

    def register(self, signal: Any) -> None:
        self._signals[id(signal)] = signal

    def __contains__(self, signal: Any) -> bool:
        return id(signal) in self._signals

    def __len__(self) -> int:
        return len(self._signals)

    def cleanup_shot(self, shot: int) -> None:
        """``cleanup_shot(shot)`` of every registered signal; a failing one is reported, never raised."""
        for sig in self.signals:
            _quietly(sig.cleanup_shot, shot, what=f"cleanup_shot({shot}) of {sig!r}")

    def cleanup(self) -> None:
        """``cleanup()`` of every registered signal, then forget them."""
        for sig in self.signals:
            _quietly(sig.cleanup, what=f"cleanup() of {sig!r}")
        self.reset()

    def reset(self) -> None:
        self._signals = {}


def _quietly(func: Callable[..., Any], *args: Any, what: str) -> None:
    """A release that fails must not lose records: log it and go on."""
    try:
        func(*args)
    except Exception as exc:
        import logging

        logging.getLogger(__name__).warning("%s failed: %s: %s", what, type(exc).__name__, exc)
