"""Pipeline steps and the function every backend runs on one partition.

Each step is a small picklable object applied to one Record; it returns the
Record, or None to drop it. Steps never raise: a failure becomes an entry in
``record.errors`` (fetch, map) or a counted drop (where), so one bad shot never
kills a run. All backends call :func:`run_partition`, which is what makes them
give identical results.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from toksearch_launch.pipeline.record import PROTECTED_FIELDS, Record, _as_field_list, error_info

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
        if not hasattr(signal, "gather"):
            raise TypeError(f"fetch({name!r}, ...): {signal!r} has no gather(shot) method")
        self.name = name
        self.signal = signal
        self.signals = (signal,)

    def __call__(self, rec: Record, stats: RunStats) -> Optional[Record]:
        try:
            rec[self.name] = self.signal.gather(rec.shot)
        except Exception as exc:
            rec[self.name] = None
            rec.set_error(self.name, exc)
        return rec

    def __repr__(self) -> str:
        return f"fetch({self.name!r}, {self.signal!r})"


class FetchDataset(Op):
    """Several signals as one structure aligned on their shared dims (see :func:`align_signals`).

    A signal that fails is left out and its error filed under ``name.field``; if
    all fail the field is None. With ``append`` an existing dataset in the field
    is extended.
    """

    def __init__(self, name: str, signals: Mapping[str, Any], append: bool = True) -> None:
        if not signals:
            raise ValueError(f"fetch_dataset({name!r}, ...) needs at least one signal")
        for key, sig in signals.items():
            if not hasattr(sig, "gather"):
                raise TypeError(f"fetch_dataset({name!r}): {key!r} -> {sig!r} has no gather(shot) method")
        self.name = name
        self.fields = dict(signals)
        self.append = append
        self.signals = tuple(self.fields.values())

    def __call__(self, rec: Record, stats: RunStats) -> Optional[Record]:
        gathered: Dict[str, Tuple[Dict[str, Any], Sequence[str]]] = {}
        for key, sig in self.fields.items():
            try:
                gathered[key] = (sig.gather(rec.shot), tuple(getattr(sig, "data_order", sig.dims)))
            except Exception as exc:
                rec.set_error(f"{self.name}.{key}", exc)
        previous = rec.get(self.name) if self.append else None
        if not gathered:
            if not isinstance(previous, dict):
                rec[self.name] = None
            return rec
        try:
            rec[self.name] = align_signals(gathered, previous if isinstance(previous, dict) else None)
        except Exception as exc:
            rec[self.name] = None
            rec.set_error(self.name, exc)
        return rec

    def __repr__(self) -> str:
        return f"fetch_dataset({self.name!r}, {self.fields!r})"


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
            if signals:
                _cleanup_shot(signals, rec["shot"])
            if current is not None:
                append(current)
    finally:
        for sig in signals:
            try:
                sig.cleanup()
            except Exception:
                pass
    stats.records_in = count
    stats.records_out = len(out)
    stats.records_with_errors = sum(1 for r in out if r["errors"])
    return out, stats


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
    return [dict(r) for r in recs], stats


def records_from_wire(rows: List[dict]) -> List[Record]:
    """Plain dicts from :func:`run_partition_wire` as Records (no copying of values)."""
    new, update = dict.__new__, dict.update
    out = []
    append = out.append
    for row in rows:
        rec = new(Record)
        update(rec, row)
        append(rec)
    return out


# --------------------------------------------------------------------------- datasets


def align_signals(
    gathered: Mapping[str, Tuple[Mapping[str, Any], Sequence[str]]],
    previous: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """Put several gathered signals on common coordinates (an outer join, like xarray.merge).

    ``gathered`` maps a field to ``(gather() result, data_order)``. The result is
    ``{"dims": {field: axis names}, <dim>: union of that dim's values, <field>:
    data reindexed onto those values (NaN where a signal has no sample),
    "units": {...}}``. Values are matched exactly, not interpolated.
    """
    axes: Dict[str, Tuple[str, ...]] = {}
    coords: Dict[str, np.ndarray] = {}
    units: Dict[str, Any] = {}
    pieces: Dict[str, Tuple[np.ndarray, Dict[str, np.ndarray]]] = {}

    if previous:
        for key, names in previous.get("dims", {}).items():
            axes[key] = tuple(names)
            pieces[key] = (np.asarray(previous[key]), {d: np.asarray(previous[d]) for d in names})
        units.update(previous.get("units") or {})

    for key, (result, order) in gathered.items():
        data = np.asarray(result["data"])
        order = tuple(order)
        if data.ndim != len(order):
            raise ValueError(f"{key}: data has {data.ndim} axes but data_order names {len(order)}: {order}")
        axes[key] = order
        pieces[key] = (data, {d: np.asarray(result[d]) for d in order})
        sig_units = result.get("units") or {}
        if "data" in sig_units:
            units[key] = sig_units["data"]
        for d in order:
            if d in sig_units:
                units.setdefault(d, sig_units[d])

    for key, (data, dim_values) in pieces.items():
        for d, values in dim_values.items():
            coords[d] = values if d not in coords else np.union1d(coords[d], values)

    out: Dict[str, Any] = {"dims": {k: list(v) for k, v in axes.items()}}
    out.update(coords)
    for key, (data, dim_values) in pieces.items():
        out[key] = _reindex(data, [dim_values[d] for d in axes[key]], [coords[d] for d in axes[key]])
    out["units"] = units
    return out


def _reindex(data: np.ndarray, own: List[np.ndarray], target: List[np.ndarray]) -> np.ndarray:
    """``data`` placed on ``target`` coordinates; positions it lacks are NaN."""
    if all(o.shape == t.shape and np.array_equal(o, t) for o, t in zip(own, target)):
        return data
    dtype = np.result_type(data.dtype, np.float64) if data.dtype.kind in "biuf" else object
    fill = np.nan if dtype != object else None
    out = np.full(tuple(len(t) for t in target), fill, dtype=dtype)
    index = []
    for o, t in zip(own, target):
        pos = np.searchsorted(t, o)
        index.append(pos)
    out[np.ix_(*index)] = data
    return out
