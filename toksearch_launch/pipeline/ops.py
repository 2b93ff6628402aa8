"""Pipeline steps and the function every backend runs on one partition.

Each step is a small picklable object applied to one Record; it returns the
Record, or None to drop it. Steps never raise: a failure becomes an entry in
``record.errors`` (fetch, map) or a counted drop (where), so one bad shot never
kills a run. All backends call :func:`run_partition`, which is what makes them
give identical results.
"""

from __future__ import annotations

import functools
import operator
from collections import deque
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from toksearch_launch.pipeline.record import PROTECTED_FIELDS, Record, _as_field_list, error_info
from toksearch_launch.signals.base import SignalRegistry

#: A source item as it travels to a worker: a bare shot number, or a Record with data.
Item = Union[int, Record]

#: How many where-errors a run keeps in full (the count is always exact).
MAX_WHERE_ERROR_DETAILS = 10


@dataclass
class RunStats:
    """What happened to the records of a partition, a batch or a whole run."""

    #: Records given to the pipeline.
    records_in: int = 0
    #: Records that came out (after every where()).
    records_out: int = 0
    #: Records whose where() predicate returned false.
    filtered: int = 0
    #: Records dropped because a where() predicate raised.
    where_errors: int = 0
    #: Shots of those records, in input order.
    where_error_shots: List[int] = field(default_factory=list)
    #: (shot, error info) of the first few of them.
    where_error_details: List[Tuple[int, Dict[str, str]]] = field(default_factory=list)
    #: Records that came out with at least one entry in ``errors``.
    records_with_errors: int = 0

    def to_wire(self) -> List[Any]:
        """The stats as a list of ints and lists, which Ray sends with msgpack: a RunStats itself
        would go through cloudpickle, once per partition on each side."""
        details = [[shot, info] for shot, info in self.where_error_details]
        return [self.records_in, self.records_out, self.filtered, self.where_errors,
                list(self.where_error_shots), details, self.records_with_errors]

    @classmethod
    def from_wire(cls, wire: Sequence[Any]) -> "RunStats":
        """The RunStats :meth:`to_wire` described."""
        records_in, records_out, filtered, where_errors, shots, details, with_errors = wire
        return cls(records_in, records_out, filtered, where_errors, list(shots),
                   [(shot, info) for shot, info in details], with_errors)

    def merge(self, other: "RunStats") -> None:
        """Add another partition's stats (partitions are merged in input order)."""
        self.records_in += other.records_in
        self.records_out += other.records_out
        self.filtered += other.filtered
        self.where_errors += other.where_errors
        self.where_error_shots.extend(other.where_error_shots)
        room = MAX_WHERE_ERROR_DETAILS - len(self.where_error_details)
        if room > 0:
            self.where_error_details.extend(other.where_error_details[:room])
        self.records_with_errors += other.records_with_errors


def _func_name(func: Callable) -> str:
    """The name an error of ``func`` is filed under (TokSearch uses the function's name)."""
    while isinstance(func, functools.partial):
        func = func.func
    return getattr(func, "__name__", None) or type(func).__name__


class Op:
    """One pipeline step. ``signals`` lists what it fetches, for cleanup."""

    signals: Tuple[Any, ...] = ()

    def __call__(self, rec: Record, stats: RunStats) -> Optional[Record]:
        raise NotImplementedError


class Fetch(Op):
    """``rec[name] = signal.gather(shot)``; on failure the field is None and the error is filed under ``name``."""

    def __init__(self, name: str, signal: Any) -> None:
        if not (hasattr(signal, "gather") or hasattr(signal, "fetch")):
            raise TypeError(f"fetch({name!r}, ...): {signal!r} has no gather(shot) method")
        self.name = name
        self.signal = signal
        self.signals = (signal,)

    def __call__(self, rec: Record, stats: RunStats) -> Optional[Record]:
        try:
            rec[self.name] = _fetch(self.signal, rec.shot)
        except Exception as exc:
            rec[self.name] = None
            rec.set_error(self.name, exc)
        return rec

    def __repr__(self) -> str:
        return f"fetch({self.name!r}, {self.signal!r})"


class FetchDataset(Op):
    """Several signals merged into one ``xarray.Dataset`` (TokSearch's ``fetch_dataset``).

    The dataset starts with a ``shot`` coordinate (length 1); each signal becomes a
    data variable named by its field, its dims coordinates (outer join: NaN where a
    signal has no sample), its units ``attrs["units"]``. A signal that fails is left
    out and its error filed under ``name`` (``name_1``, ... for more), as TokSearch
    does. With ``append`` an existing Dataset in the field is extended; without,
    this step's signals replace it.
    """

    def __init__(self, name: str, signals: Mapping[str, Any], append: bool = True) -> None:
        if not isinstance(signals, Mapping) or not signals:
            raise ValueError(f"fetch_dataset({name!r}, ...) needs a dict of at least one field -> signal")
        for key, sig in signals.items():
            if not (hasattr(sig, "fetch_as_xarray") or hasattr(sig, "gather")):
                raise TypeError(f"fetch_dataset({name!r}): {key!r} -> {sig!r} has no gather(shot) method")
        self.name = name
        self.fields = dict(signals)
        self.append = append
        self.signals = tuple(self.fields.values())

    def __call__(self, rec: Record, stats: RunStats) -> Optional[Record]:
        import xarray as xr

        ds = rec.get(self.name) if self.append else None
        if not isinstance(ds, xr.Dataset):
            ds = xr.Dataset(coords={"shot": ("shot", [rec.shot])})
        for key, sig in self.fields.items():
            try:
                array = _fetch_array(sig, rec.shot)
                ds = xr.merge([ds, array.to_dataset(name=key)], join="outer", compat="no_conflicts",
                              combine_attrs="override")
            except Exception as exc:
                rec.set_error(self.name, exc)
        rec[self.name] = ds
        return rec

    def __repr__(self) -> str:
        return f"fetch_dataset({self.name!r}, {self.fields!r})"


def _fetch_array(signal: Any, shot: int) -> Any:
    """A signal's data for ``shot`` as a DataArray (plain duck-typed signals have only gather())."""
    if hasattr(signal, "fetch_as_xarray"):
        return signal.fetch_as_xarray(shot)
    from toksearch_launch.signals.base import as_data_array

    return as_data_array(signal.gather(shot), tuple(getattr(signal, "data_order", None) or getattr(signal, "dims", ())))


def _fetch(signal: Any, shot: int) -> Any:
    """``signal.fetch(shot)`` (gather plus callback) or, for a duck-typed signal, ``gather``."""
    fetch = getattr(signal, "fetch", None)
    return fetch(shot) if fetch is not None else signal.gather(shot)


class MissingDatasetField(KeyError):
    """align() on a record without the dataset field it names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class Align(Op):
    """``rec[name] = aligner(rec[name])`` (see :mod:`toksearch_launch.pipeline.align`); errors under ``align``."""

    def __init__(self, name: str, aligner: Any) -> None:
        self.name = name
        self.aligner = aligner

    def __call__(self, rec: Record, stats: RunStats) -> Optional[Record]:
        import xarray as xr

        ds = rec.get(self.name)
        try:
            if ds is None:
                raise MissingDatasetField(
                    f"align({self.name!r}): the record has no dataset {self.name!r} "
                    f"(add fetch_dataset({self.name!r}, {{...}}) before align)"
                )
            if not isinstance(ds, xr.Dataset):
                raise TypeError(f"align({self.name!r}): field {self.name!r} is a {type(ds).__name__}, not an xarray.Dataset")
            rec[self.name] = self.aligner(ds)
        except Exception as exc:
            rec.set_error("align", exc)
        return rec

    def __repr__(self) -> str:
        return f"align({self.name!r}, {self.aligner!r})"


class Map(Op):
    """``func(rec)`` mutates the record; on failure the error is filed under the function's name."""

    def __init__(self, func: Callable[[Record], Any]) -> None:
        if not callable(func):
            raise TypeError(f"map needs a callable, got {func!r}")
        self.func = func
        self.name = _func_name(func)

    def __call__(self, rec: Record, stats: RunStats) -> Optional[Record]:
        try:
            self.func(rec)
        except Exception as exc:
            rec.set_error(self.name, exc)
        return rec

    def __repr__(self) -> str:
        return f"map({self.name})"


class Where(Op):
    """Keep the record if ``func(rec)`` is true; a predicate that raises drops it and is counted."""

    def __init__(self, func: Callable[[Record], Any]) -> None:
        if not callable(func):
            raise TypeError(f"where needs a callable, got {func!r}")
        self.func = func
        self.name = _func_name(func)

    def __call__(self, rec: Record, stats: RunStats) -> Optional[Record]:
        try:
            keep = bool(self.func(rec))
        except Exception as exc:
            stats.where_errors += 1
            stats.where_error_shots.append(rec.shot)
            if len(stats.where_error_details) < MAX_WHERE_ERROR_DETAILS:
                info = error_info(exc)
                info["step"] = f"where({self.name})"
                stats.where_error_details.append((rec.shot, info))
            return None
        if not keep:
            stats.filtered += 1
            return None
        return rec

    def __repr__(self) -> str:
        return f"where({self.name})"


class Keep(Op):
    """Keep only ``fields`` (plus ``shot`` and ``errors``)."""

    def __init__(self, fields: Iterable[str]) -> None:
        self.fields = _as_field_list(fields)
        self._wanted = frozenset(self.fields) | PROTECTED_FIELDS  # computed once, not per record

    def __call__(self, rec: Record, stats: RunStats) -> Optional[Record]:
        wanted = self._wanted
        for key in [k for k in rec if k not in wanted]:
            dict.__delitem__(rec, key)
        return rec

    def __repr__(self) -> str:
        return f"keep({self.fields!r})"


class Discard(Op):
    """Remove ``fields`` (``shot`` and ``errors`` stay)."""

    def __init__(self, fields: Iterable[str]) -> None:
        self.fields = _as_field_list(fields)
        self._unwanted = tuple(k for k in dict.fromkeys(self.fields) if k not in PROTECTED_FIELDS)

    def __call__(self, rec: Record, stats: RunStats) -> Optional[Record]:
        for key in self._unwanted:
            dict.pop(rec, key, None)
        return rec

    def __repr__(self) -> str:
        return f"discard({self.fields!r})"


def signals_of(ops: Sequence[Op]) -> List[Any]:
    """Distinct signal objects of a pipeline, in first-use order."""
    seen: Dict[int, Any] = {}
    for op in ops:
        for sig in op.signals:
            seen.setdefault(id(sig), sig)
    return list(seen.values())


def run_partition(ops: Sequence[Op], items: Iterable[Item]) -> Tuple[List[Record], RunStats]:
    """Apply ``ops`` to each record in order; the same code on every backend.

    ``items`` are Records or plain shot numbers (made into Records here, in the
    worker, so only ints travel). After each record every signal's
    ``cleanup_shot(shot)`` runs; after the partition every signal's ``cleanup()``
    (closes per-worker connections). The loop is kept tight: with a trivial map
    its per-record cost is what separates this from hand-written Ray/Spark code.
    """
    stats = RunStats()
    out: List[Record] = []
    append = out.append
    steps = tuple(ops)
    signals = signals_of(steps)
    # Signals fetched outside the pipeline's steps (Signal.fetch inside a map) are in
    # this process's registry; they are cleaned up like the pipeline's own.
    registry = SignalRegistry()
    registered = registry._signals  # its dict: len() of it is no Python call per record
    own = {id(sig) for sig in signals}
    to_clean: List[Any] = list(signals)
    seen_in_registry = -1
    # map() steps are called inline (one Python call less per record and step).
    plan = [(op.func, op.name) if type(op) is Map else (None, op) for op in steps]
    new, update = dict.__new__, dict.update
    count = 0
    try:
        for item in items:
            count += 1
            if type(item) is int:
                rec = new(Record)
                update(rec, shot=item, errors={})
            else:
                rec = item
            current: Optional[Record] = rec
            for func, step in plan:
                if func is not None:
                    try:
                        func(current)
                    except Exception as exc:
                        current.set_error(step, exc)  # type: ignore[union-attr]
                else:
                    current = step(current, stats)
                    if current is None:
                        break
            if len(registered) != seen_in_registry:
                to_clean = signals + [sig for sig in registry.signals if id(sig) not in own]
                seen_in_registry = len(registered)
            if to_clean:
                _cleanup_shot(to_clean, dict.__getitem__(rec, "shot"))
            if current is not None:
                append(current)
    finally:
        for sig in signals + [s for s in registry.signals if id(s) not in own]:
            try:
                sig.cleanup()
            except Exception:
                pass
        registry.reset()
    stats.records_in = count
    stats.records_out = len(out)
    stats.records_with_errors = with_errors_count(out)
    return out, stats


def with_errors_count(records: List[Record]) -> int:
    """How many of ``records`` have an entry in ``errors`` (counted in C loops, after the partition)."""
    return sum(map(bool, map(_ERRORS, records)))


_ERRORS = operator.itemgetter("errors")


def _cleanup_shot(signals: Sequence[Any], shot: int) -> None:
    for sig in signals:
        try:
            sig.cleanup_shot(shot)
        except Exception:
            pass  # a failed release must not lose the record


def run_partition_wire(ops: Sequence[Op], items: Iterable[Item]) -> Tuple[List[dict], RunStats]:
    """:func:`run_partition` for a remote worker: records as plain dicts, which pickle about
    five times faster than a dict subclass; the driver turns them back (:func:`records_from_wire`)."""
    recs, stats = run_partition(ops, items)
    return list(map(dict, recs)), stats


def records_from_wire(rows: Sequence[Any]) -> List[Record]:
    """Plain dicts from :func:`run_partition_wire` as Records (no copying of values); each row
    may also be an iterable of (field, value) pairs (the store's columns, zipped).

    Both loops run in C (``map`` over C functions, drained by a zero-length deque):
    about a fifth faster than a Python loop, and this runs on the driver for every record.
    """
    out = list(map(dict.__new__, repeat(Record, len(rows))))
    deque(map(dict.update, out, rows), maxlen=0)
    return out
