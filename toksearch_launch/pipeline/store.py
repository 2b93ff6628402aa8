"""The result store: every finished partition on disk at once, so a kill loses only the running ones.

A store is a directory: one pickle file per finished partition (its input
positions and shots, its output records, its statistics) and ``manifest.json``
(the pipeline's fingerprint, totals, errors, state). Files are written
atomically (an unnamed ``O_TMPFILE`` file linked into place, or a hidden temp
file renamed, after fsync), so a kill at any instant leaves either a whole
partition file or none. Inside a ``toksearch_submit`` job every ``compute_*()``
stores into ``<run dir>/results/compute-<k>`` (k: the k-th compute of the
script); outside one, ``compute_*(store=PATH)``. See docs/durability.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pickle
import time
from array import array
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

from toksearch_launch.pipeline.ops import Item, Op, RunStats, records_from_wire
from toksearch_launch.pipeline.record import Record
from toksearch_launch.pipeline.results import ResultSet

#: ``store=AUTO`` (the default of every compute_*): the run directory's store inside a job, none outside.
AUTO = "auto"
STORE_DIR = "results"
MANIFEST = "manifest.json"
FORMAT = "toksearch_launch-results-1"
PART_PREFIX = "part-"
PART_SUFFIX = ".pkl"
#: Errors kept in full in the manifest (the counts are always exact).
MAX_MANIFEST_ERRORS = 20

StoreArg = Union[None, str, os.PathLike]


class StoreMismatch(ValueError):
    """The store holds results of another pipeline; the message is one line."""


# --------------------------------------------------------------------------- fingerprint


def _code_digest(code: Any, h: "hashlib._Hash") -> None:
    """Bytecode, constants (nested code objects recursively) and names of a code object."""
    h.update(code.co_code)
    h.update(repr(code.co_names).encode())
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            _code_digest(const, h)
        else:
            h.update(repr(const).encode())


def _short_repr(value: Any, limit: int = 200) -> str:
    try:
        text = repr(value)
    except Exception:
        text = type(value).__qualname__
    return text[:limit]


def describe_callable(func: Any, h: "hashlib._Hash") -> None:
    """What makes a user function what it is: qualified name, bytecode, defaults, closure values."""
    while isinstance(func, functools.partial):
        h.update(_short_repr(func.args).encode() + _short_repr(func.keywords).encode())
        func = func.func
    h.update(f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', type(func).__qualname__)}".encode())
    code = getattr(func, "__code__", None) or getattr(getattr(func, "__call__", None), "__code__", None)
    if code is not None:
        _code_digest(code, h)
    for value in getattr(func, "__defaults__", None) or ():
        h.update(_short_repr(value).encode())
    for cell in getattr(func, "__closure__", None) or ():
        try:
            h.update(_short_repr(cell.cell_contents).encode())
        except ValueError:  # an empty cell
            pass


def item_shot(item: Item) -> int:
    return item if type(item) is int else item.shot  # type: ignore[union-attr]


def fingerprint(ops: Sequence[Op], items: Sequence[Item]) -> str:
    """A stable hash of the steps (kinds, reprs, functions) and of the source (its shots).

    Stable across processes and runs of the same script; a changed function body,
    signal, field list or shot list changes it. (A new Python version changes the
    bytecode, hence the fingerprint: resume then refuses, ``--fresh`` starts over.)
    """
    h = hashlib.sha256(FORMAT.encode())
    for op in ops:
        h.update(type(op).__qualname__.encode())
        h.update(_short_repr(op, 10_000).encode())
        func = getattr(op, "func", None)
        if func is not None:
            describe_callable(func, h)
    h.update(array("q", (item_shot(i) for i in items)).tobytes())
    for item in items:
        if type(item) is not int:
            h.update(repr(sorted(map(str, item))).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- atomic files


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` entirely or does not exist, whatever kills us when.

    Linux: an unnamed O_TMPFILE file, fsynced, then linked under its name (a kill
    before the link leaves nothing at all). Elsewhere, or when the file system has
    no O_TMPFILE: a hidden temp file renamed into place (a kill leaves at most a
    ``.tmp`` file, which readers ignore and the next writer removes).
    """
    directory = path.parent
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if tmpfile and not path.exists():
        try:
            fd = os.open(directory, tmpfile | os.O_WRONLY, 0o644)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                os.write(fd, data) if len(data) < 1 << 30 else _write_all(fd, data)
                os.fsync(fd)
                os.link(f"/proc/self/fd/{fd}", path, follow_symlinks=True)
            except OSError:
                os.close(fd)
                fd = -1
            else:
                os.close(fd)
                _fsync_dir(directory)
                return
    tmp = directory / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as out:
        out.write(data)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)
    _fsync_dir(directory)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def remove_stale_temps(directory: Path) -> int:
    """Temp files of writers that were killed (never read; safe to delete)."""
    removed = 0
    for tmp in directory.glob(".*.tmp-*"):
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


# --------------------------------------------------------------------------- partitions


def output_positions(positions: Sequence[int], shots: Sequence[int], records: Sequence[Record]) -> List[int]:
    """Input position of each output record (outputs are the inputs, in order, minus dropped ones)."""
    out: List[int] = []
    k = 0
    for rec in records:
        shot = rec["shot"]
        while k < len(shots) and shots[k] != shot:
            k += 1
        out.append(positions[k] if k < len(shots) else positions[-1])
        k += 1
    return out


def part_name(positions: Sequence[int], shots: Sequence[int]) -> str:
    """``part-<first position>-<count>-<hash of the shots>.pkl``: keyed by the partition's shots."""
    digest = hashlib.sha1(array("q", shots).tobytes() + array("q", positions).tobytes()).hexdigest()[:12]
    return f"{PART_PREFIX}{positions[0]:09d}-{len(positions)}-{digest}{PART_SUFFIX}"


def encode_partition(fp: str, positions: Sequence[int], shots: Sequence[int], records: Sequence[Record],
                     stats: RunStats, total: int = 0) -> bytes:
    """Two pickles in one file: a small header (read alone by ``--status``), then the records."""
    header = {
        "format": FORMAT,
        "fingerprint": fp,
        "positions": list(positions),
        "shots": list(shots),
        "records_out": len(records),
        "records_with_errors": sum(1 for r in records if r["errors"]),
        "where_errors": stats.where_errors,
        "total_records": total,
        "written": time.time(),
    }
    body = ([dict(r) for r in records], output_positions(positions, shots, records), stats)
    return pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL) + pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)


def read_header(path: Path) -> Dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f)


def read_partition(path: Path) -> Tuple[Dict[str, Any], List[Record], List[int], RunStats]:
    with open(path, "rb") as f:
        header = pickle.load(f)
        rows, positions, stats = pickle.load(f)
    return header, records_from_wire(rows), positions, stats


def part_files(directory: Path) -> List[Path]:
    return sorted(directory.glob(f"{PART_PREFIX}*{PART_SUFFIX}"))


# --------------------------------------------------------------------------- the store


class _Writer:
    """One background thread that pickles, writes and fsyncs partition files in the order given.

    The driver hands a finished partition over at once; pickling and the fsync
    (milliseconds on a real disk) then overlap with the driver's wait for the next
    partitions instead of stalling it. A partition is on disk one pickle + write +
    fsync after it finished; ``flush`` waits for every handed-over file (before a
    manifest, and before compute_* returns the records to the caller, who may
    change them).
    """

    def __init__(self) -> None:
        import queue
        import threading

        self._queue: "queue.Queue[Optional[Tuple[Path, Callable[[], bytes]]]]" = queue.Queue()
        self._error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._loop, name="toksearch-store-writer", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    path, encode = job
                    write_atomic(path, encode())
            except BaseException as exc:  # kept, raised in the driver by the next put/flush
                self._error = exc
            finally:
                self._queue.task_done()

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(f"writing the result store failed: {error}") from error

    def put(self, path: Path, encode: "Callable[[], bytes]") -> None:
        self._check()
        self._queue.put((path, encode))

    def flush(self) -> None:
        self._queue.join()
        self._check()


class ResultStore:
    """One pipeline's store: open (checks the fingerprint), add partitions, write the manifest."""

    def __init__(self, path: Path, fp: str, total: int, steps: str) -> None:
        self.path = path
        self.fingerprint = fp
        self.total = total
        self.steps = steps
        self.done: set = set()
        self.records_out = 0
        self.records_with_errors = 0
        self.where_errors = 0
        self.partitions = 0
        self.errors: List[Dict[str, Any]] = []
        self.skipped = 0
        self._writer: Optional[_Writer] = None

    @classmethod
    def open(cls, path: StoreArg, ops: Sequence[Op], items: Sequence[Item]) -> "ResultStore":
        """Create the store, or continue the one there if it holds this same pipeline."""
        path = Path(path)  # type: ignore[arg-type]
        fp = fingerprint(ops, items)
        steps = ", ".join(_short_repr(op) for op in ops)
        store = cls(path, fp, len(items), steps)
        manifest = path / MANIFEST
        if manifest.exists():
            old = json.loads(manifest.read_text())
            if old.get("fingerprint") != fp:
                raise StoreMismatch(
                    f"result store {path} holds another pipeline (its steps or shots changed since it was "
                    f"written: {old.get('steps', '?')!s:.80}); resume with --fresh to start over, or use another store"
                )
        path.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(path)
        for part in part_files(path):
            header = read_header(part)
            if header.get("fingerprint") != fp:
                raise StoreMismatch(f"result store {path}: {part.name} belongs to another pipeline; use --fresh")
            store._count(header)
        store.skipped = len(store.done)
        store.write_manifest("complete" if store.complete else "running")
        return store

    @property
    def complete(self) -> bool:
        return len(self.done) >= self.total

    def _count(self, header: Dict[str, Any]) -> None:
        self.done.update(header["positions"])
        self.records_out += header["records_out"]
        self.records_with_errors += header["records_with_errors"]
        self.where_errors += header["where_errors"]
        self.partitions += 1

    def add(self, positions: Sequence[int], shots: Sequence[int], records: Sequence[Record], stats: RunStats) -> None:
        """Hand one finished partition to the writer (an atomic file, written and fsynced next)."""
        if not positions:
            return
        if self._writer is None:
            self._writer = _Writer()
        encode = functools.partial(encode_partition, self.fingerprint, list(positions), list(shots), list(records),
                                   stats, self.total)
        self._writer.put(self.path / part_name(positions, shots), encode)
        self._count({"positions": positions, "records_out": len(records), "where_errors": stats.where_errors,
                     "records_with_errors": sum(1 for r in records if r["errors"])})
        for rec in records:
            if rec["errors"] and len(self.errors) < MAX_MANIFEST_ERRORS:
                self.errors.append({"shot": rec["shot"], "errors": rec["errors"]})

    def flush(self) -> None:
        """Wait until every partition handed over is on disk."""
        if self._writer is not None:
            self._writer.flush()

    def write_manifest(self, state: str) -> None:
        """``state``: running, stopped (a signal or a deadline), complete. Flushes the partitions first."""
        self.flush()
        manifest = {
            "format": FORMAT,
            "fingerprint": self.fingerprint,
            "steps": self.steps,
            "state": state,
            "total_records": self.total,
            "records_stored": len(self.done),
            "records_out": self.records_out,
            "records_with_errors": self.records_with_errors,
            "where_errors": self.where_errors,
            "partitions": self.partitions,
            "first_errors": self.errors,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_atomic_replace(self.path / MANIFEST, json.dumps(manifest, indent=1, default=str).encode())


def write_atomic_replace(path: Path, data: bytes) -> None:
    """For a file rewritten in place (the manifest): temp file + rename, so a reader sees the old
    or the new file whole. No fsync: the manifest is a summary (the fsynced partition files are the
    truth, and carry the fingerprint and the total themselves), and two fsyncs per manifest would be
    most of the store's cost on a short run."""
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as out:
        out.write(data)
    os.replace(tmp, path)


_compute_count = [0]


def job_store_path() -> Optional[Path]:
    """``<run dir>/results/compute-<k>`` for the k-th compute of this job's script; None outside a job."""
    from toksearch_launch.config import RUN_DIR_ENV

    run_dir = os.environ.get(RUN_DIR_ENV)
    if not run_dir:
        return None
    _compute_count[0] += 1
    return Path(run_dir) / STORE_DIR / f"compute-{_compute_count[0]}"


def resolve_store(store: Any, ops: Sequence[Op], items: Sequence[Item]) -> Optional[ResultStore]:
    """``store`` of a compute_* call as an open ResultStore (or None: no store)."""
    if store is None or store is False:
        return None
    if isinstance(store, ResultStore):
        return store
    if isinstance(store, str) and store == AUTO:
        path = job_store_path()
        if path is None:
            return None
        from toksearch_launch.pipeline import stopping

        from toksearch_launch import resume

        stopping.install_job_handlers()
        try:
            opened = ResultStore.open(path, ops, items)
        except StoreMismatch as exc:
            stopping.refuse(str(exc))
        resume.log_event(None, "compute", store=path.name, stored=len(opened.done), total=opened.total)
        return opened
    return ResultStore.open(store, ops, items)


# --------------------------------------------------------------------------- reading


def find_store(path: Union[str, os.PathLike], compute: Optional[int] = None) -> Path:
    """A store directory from a store, a ``results/`` directory or a run directory."""
    path = Path(path)
    if (path / MANIFEST).exists() or part_files(path):
        return path
    base = path / STORE_DIR if (path / STORE_DIR).is_dir() else path
    stores = sorted((p for p in base.glob("compute-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    if not stores:
        raise FileNotFoundError(f"no stored results under {path}")
    if compute is None:
        return stores[-1]
    for store in stores:
        if store.name == f"compute-{compute}":
            return store
    raise FileNotFoundError(f"{path} has no results of compute {compute} (has: {', '.join(s.name for s in stores)})")


def store_dirs(run_dir: Union[str, os.PathLike]) -> List[Path]:
    """Every compute's store of a run, in the order the script ran them."""
    base = Path(run_dir) / STORE_DIR
    return sorted((p for p in base.glob("compute-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))


def merge_parts(parts: Iterable[Tuple[List[Record], List[int], RunStats]]) -> Tuple[List[Record], RunStats]:
    """Records of every partition in input order and their statistics merged as one run's."""
    pairs: List[Tuple[int, Record]] = []
    pieces = sorted(parts, key=lambda p: p[1][0] if p[1] else -1)
    stats = RunStats()
    for recs, positions, part_stats in pieces:
        pairs.extend(zip(positions, recs))
        stats.merge(part_stats)
    pairs.sort(key=lambda pair: pair[0])
    return [rec for _, rec in pairs], stats


def load_results(path: Union[str, os.PathLike], compute: Optional[int] = None) -> ResultSet:
    """The stored records of a run (or of one store), in input order, without any cluster.

    ``path``: a run directory (its last compute, or ``compute=k``), its ``results/``
    directory, or a store given as ``store=PATH``. Works on an unfinished run: it
    returns what is stored (``info['complete']`` says whether that is everything).
    """
    directory = find_store(path, compute)
    manifest_path = directory / MANIFEST
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    parts = []
    stored = 0
    for part in part_files(directory):
        header, recs, positions, stats = read_partition(part)
        stored += len(header["positions"])
        parts.append((recs, positions, stats))
    records, stats = merge_parts(parts)
    total = manifest.get("total_records", stored)
    info = {"backend": "store", "store": str(directory), "records_stored": stored, "total_records": total,
            "complete": stored >= total, "state": manifest.get("state", "unknown")}
    return ResultSet(records, stats, info)


def scalar_dataframe(results: ResultSet):  # -> pandas.DataFrame
    """One row per record, one column per scalar field (numbers, strings, bools, None); pandas is optional."""
    try:
        import pandas as pd
    except ImportError as exc:
        raise ImportError("load_dataframe() needs pandas: pip install pandas") from exc
    rows = []
    for rec in results:
        row = {"shot": rec["shot"], "num_errors": len(rec["errors"])}
        for key, value in rec.items():
            if key in ("shot", "errors"):
                continue
            if value is None or isinstance(value, (bool, int, float, str)):
                row[key] = value
            elif getattr(value, "ndim", None) == 0 and hasattr(value, "item"):
                row[key] = value.item()
        rows.append(row)
    return pd.DataFrame.from_records(rows).set_index("shot") if rows else pd.DataFrame()


def load_dataframe(path: Union[str, os.PathLike], compute: Optional[int] = None):
    """:func:`load_results` as a pandas DataFrame of the scalar fields, indexed by shot."""
    return scalar_dataframe(load_results(path, compute))
