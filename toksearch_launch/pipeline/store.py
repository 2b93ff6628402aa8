"""The result store: every finished partition on disk at once, so a kill loses only the running ones.

A store is a directory: one pickle file per finished partition (its input
positions and shots, its output records, its statistics) and ``manifest.json``
(the pipeline's fingerprint, totals, errors, state). Files are written
atomically (an unnamed ``O_TMPFILE`` file linked into place, or a hidden temp
file renamed, once written), so a kill at any instant leaves either a whole
partition file or none; they are synced to disk in groups, at most ``SYNC_S``
seconds after they finish and before compute_* returns, and carry a checksum, so
a machine crash loses at most the last seconds' partitions and never leaves one
that is read as results. Inside a ``toksearch_submit`` job every ``compute_*()``
stores into ``<run dir>/results/compute-<k>`` (k: the k-th compute of the
script); outside one, ``compute_*(store=PATH)``. See docs/durability.md.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pickle
import sys
import time
import zlib
from array import array
from itertools import repeat
from operator import itemgetter
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

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
    if set(map(type, items)) <= {int}:  # shot numbers only (the common case): C loops
        h.update(array("q", items).tobytes())
        return h.hexdigest()
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


#: Directories where an O_TMPFILE file cannot be linked into place (EXDEV through
#: /proc/self/fd in some containers, EOPNOTSUPP on NFS): asked once, then the rename way.
_NO_TMPFILE: set = set()


def _link_tmpfile(path: Path, data: bytes, sync: bool) -> bool:
    """Write ``data`` to an unnamed O_TMPFILE file and link it as ``path``; False where this
    directory cannot (then nothing was created)."""
    directory = path.parent
    tmpfile = getattr(os, "O_TMPFILE", 0)
    if not tmpfile or directory in _NO_TMPFILE or path.exists():
        return False
    try:
        fd = os.open(directory, tmpfile | os.O_WRONLY, 0o644)
    except OSError:
        _NO_TMPFILE.add(directory)
        return False
    try:
        _write_all(fd, data)
        if sync:
            os.fsync(fd)
        os.link(f"/proc/self/fd/{fd}", path, follow_symlinks=True)
    except OSError:
        _NO_TMPFILE.add(directory)
        return False
    finally:
        os.close(fd)
    return True


def _rename_into_place(path: Path, data: bytes, sync: bool) -> None:
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as out:
        out.write(data)
        if sync:
            out.flush()
            os.fsync(out.fileno())
    os.replace(tmp, path)


def write_atomic(path: Path, data: bytes, sync: bool = True) -> None:
    """``path`` holds ``data`` entirely or does not exist, whatever kills the process when.

    Linux: an unnamed O_TMPFILE file linked under its name once written (a kill
    before the link leaves nothing at all). Elsewhere, or where the file system
    cannot: a hidden temp file renamed into place (a kill leaves at most a ``.tmp``
    file, which readers ignore and the next writer removes). Either way the name
    appears only once the data is complete, so a killed process (whose written
    pages the kernel keeps) leaves a whole file or none. ``sync``: fsync the file
    before it gets its name and the directory after, which a machine crash needs;
    the store instead syncs its files in groups (:func:`sync_files`), and
    its files carry a checksum that catches what a crash before that sync leaves.
    """
    if not _link_tmpfile(path, data, sync):
        _rename_into_place(path, data, sync)
    if sync:
        _fsync_dir(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def sync_files(directory: Path, paths: Sequence[Path]) -> None:
    """Make the files ``paths`` of ``directory`` and their names durable (a machine crash keeps them).

    An fdatasync of each file, then one fsync of the directory (for all their names).
    Not ``syncfs``: it would also write out every other process's data on the same
    file system (on a shared node or file system, other jobs' gigabytes), and a process
    (a thread) blocked in it cannot be killed, so a scancel could outlast Slurm's
    UnkillableStepTimeout and drain the node (a job of the syncfs variant did, once, on
    the test cluster under other sessions' heavy writes; docs/durability.md).
    """
    for path in paths:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
    _fsync_dir(directory)


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
    if len(records) == len(positions):
        return list(positions)  # nothing dropped
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


#: numpy scalar types whose ``item()`` is a Python number that gives the same value back
#: exactly (``np.float64(x.item()) == x``, bit for bit but for NaN payloads).
_EXACT_SCALARS = ("float64", "float32", "float16", "complex128", "complex64", "bool_", "int8", "int16", "int32",
                  "int64", "uint8", "uint16", "uint32", "uint64")


@functools.lru_cache(maxsize=1)
def _numpy_scalar_types() -> frozenset:
    """The numpy types of :data:`_EXACT_SCALARS` (numpy must be imported already)."""
    numpy = sys.modules["numpy"]
    return frozenset(getattr(numpy, name) for name in _EXACT_SCALARS)


def _reduce_scalar(value: Any) -> Tuple[Any, Tuple[Any]]:
    return type(value), (value.item(),)


@functools.lru_cache(maxsize=1)
def _dispatch_table() -> Dict[type, Any]:
    """Pickling rules for numpy scalars: ``np.float64(1.5)`` as its type and a float (~0.1 us)
    instead of numpy's own reduce with a dtype and a byte string (~3 us, most of a record of
    TokSearch's example, whose fields are scalars like ``np.max(...)``)."""
    import copyreg

    table = dict(copyreg.dispatch_table)
    if "numpy" in sys.modules:
        table.update(dict.fromkeys(_numpy_scalar_types(), _reduce_scalar))
    return table


def dumps(value: Any) -> bytes:
    """pickle.dumps with :func:`_dispatch_table` (numpy is looked for, never imported, here)."""
    if "numpy" in sys.modules:
        out = io.BytesIO()
        pickler = pickle.Pickler(out, protocol=pickle.HIGHEST_PROTOCOL)
        pickler.dispatch_table = _dispatch_table()
        pickler.dump(value)
        return out.getvalue()
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


#: The records of a partition on the wire and on disk: a list of plain dicts (rows), or,
#: when every record has the same fields in the same order, (fields, one column per field).
WireRecords = Union[List[Dict[str, Any]], Tuple[Tuple[Any, ...], List[Any]]]


def as_columns(records: Sequence[Record]) -> Optional[Tuple[Tuple[Any, ...], List[Any]]]:
    """(fields, columns) when all ``records`` have the same fields in the same order, else None.

    A pipeline's steps give every record the same fields, so this is the usual case. A
    column whose values are all of one numpy scalar type becomes one array: pickled one by
    one, 500 ``np.float64`` cost 0.7 ms, as one array 0.03 ms, and that was most of the
    store's cost on TokSearch's example (fields like ``np.max(...)``). The array keeps their
    bits, and its elements are that type again when read. Other columns stay lists.
    """
    if not records:
        return None
    fields = tuple(records[0])
    if len(set(map(tuple, records))) != 1:
        return None
    scalar_types = _numpy_scalar_types() if "numpy" in sys.modules else frozenset()
    columns: List[Any] = []
    for field in fields:
        column = list(map(itemgetter(field), records))
        kinds = set(map(type, column))
        if len(kinds) == 1 and kinds <= scalar_types:
            column = sys.modules["numpy"].array(column)
        columns.append(column)
    return fields, columns


def wire_records(records: Sequence[Record]) -> WireRecords:
    """The records as :func:`as_columns` gives them, or as plain dicts where it cannot."""
    columns = as_columns(records)
    return columns if columns is not None else list(map(dict, records))


def records_of(wire: WireRecords) -> List[Record]:
    """Records again from :func:`wire_records` (rows or columns), in C loops."""
    if type(wire) is list:
        return records_from_wire(wire)
    fields, columns = wire
    values = [column if type(column) is list else list(column) for column in columns]
    return records_from_wire(list(map(zip, repeat(fields), zip(*values))))


def encode_body(records: Sequence[Record], shots: Sequence[int], stats: RunStats) -> bytes:
    """The records' part of a partition file: (the records as :func:`wire_records`, the offset
    of each in the partition's input, stats), pickled once where the records are. A worker
    process sends it to the driver as it is, and the store writes it as it came, so no record
    is pickled twice."""
    offsets = output_positions(range(len(shots)), shots, records)
    return dumps((wire_records(records), offsets, stats))


def decode_body(body: bytes) -> Tuple[List[Record], RunStats]:
    """The records and stats of :func:`encode_body`'s bytes (what the driver hands to the caller)."""
    wire, _, stats = pickle.loads(body)
    return records_of(wire), stats


def encode_partition(fp: str, positions: Sequence[int], shots: Sequence[int], records: Sequence[Record],
                     stats: RunStats, total: int, body: bytes) -> bytes:
    """Two pickles in one file: a small header (read alone by ``--status``), then the records
    (``body``: :func:`encode_body`'s bytes, made by a worker or by :meth:`ResultStore.add`).

    The header carries the body's length and CRC-32, so a file that a machine crash
    cut short or left unwritten (it had its name, its data was not yet synced) is
    recognised and computed again, never read as results (:func:`check_partition`).
    """
    header = {
        "format": FORMAT,
        "fingerprint": fp,
        "positions": list(positions),
        "shots": list(shots),
        "records_out": len(records),
        "records_with_errors": stats.records_with_errors,
        "where_errors": stats.where_errors,
        "total_records": total,
        "written": time.time(),
        "body": "offsets",  # the body's positions are offsets into "positions"
        "body_bytes": len(body),
        "body_crc32": zlib.crc32(body),
    }
    return pickle.dumps(header, protocol=pickle.HIGHEST_PROTOCOL) + body


class DamagedPartition(ValueError):
    """A partition file that is not whole (a machine crash before it was synced)."""


def _read_header(f: Any, path: Path) -> Dict[str, Any]:
    try:
        header = pickle.load(f)
    except Exception as exc:
        raise DamagedPartition(f"{path.name}: unreadable header ({type(exc).__name__})") from None
    if not isinstance(header, dict) or "positions" not in header:
        raise DamagedPartition(f"{path.name}: not a partition header")
    return header


def read_header(path: Path) -> Dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f)


def check_partition(path: Path) -> Dict[str, Any]:
    """The header of ``path`` once its size matches what the header says (else DamagedPartition)."""
    with open(path, "rb") as f:
        header = _read_header(f, path)
        size = header.get("body_bytes")
        if size is not None and os.fstat(f.fileno()).st_size != f.tell() + size:
            raise DamagedPartition(f"{path.name}: {os.fstat(f.fileno()).st_size - f.tell()} of {size} body bytes")
    return header


def read_partition(path: Path) -> Tuple[Dict[str, Any], List[Record], List[int], RunStats]:
    with open(path, "rb") as f:
        header = _read_header(f, path)
        body = f.read()
    if "body_crc32" in header and (len(body) != header["body_bytes"] or zlib.crc32(body) != header["body_crc32"]):
        raise DamagedPartition(f"{path}: its records do not match their checksum (cut short by a machine crash?); "
                               "delete the file and resume to compute them again")
    wire, positions, stats = pickle.loads(body)
    if header.get("body") == "offsets":
        positions = list(map(header["positions"].__getitem__, positions))
    return header, records_of(wire), positions, stats


def part_files(directory: Path) -> List[Path]:
    return sorted(directory.glob(f"{PART_PREFIX}*{PART_SUFFIX}"))


# --------------------------------------------------------------------------- the store

#: Seconds a written partition may wait for its sync to disk (a machine crash loses at most
#: the partitions written in the last SYNC_S seconds; a killed process loses none of them).
SYNC_S = 2.0


class _GroupSync:
    """A background thread that syncs the partition files written on the driver, in groups.

    The files themselves are written by the driver's thread, at once (0.2 ms for a
    partition of TokSearch's example): a thread that writes them would take the GIL
    for each of a file's system calls back from a busy driver, and on a serial run
    that cost 9% of the run (measured side by side: docs/benchmarks.md), where the
    writing itself costs 0.3%. What may wait is only the sync that a machine crash
    needs: one :func:`sync_files` for every partition written since the last one, at
    most :data:`SYNC_S` seconds after the first of them, and in ``flush``: one
    directory fsync for the group instead of one per file, and none of it on the
    driver's path (a fsync per file and per directory, 7 ms each on a VM disk, cost
    more than the 5% a store may take there). ``flush`` waits until every file
    written so far is synced (before a manifest, and before compute_* returns).
    """

    def __init__(self, directory: Path, sync_s: float = SYNC_S) -> None:
        import threading

        self.directory = directory
        self.sync_s = sync_s
        self._lock = threading.Condition()
        self._unsynced: List[Path] = []
        self._due = 0.0  # when the oldest unsynced file must be synced
        self._flushes = 0  # flushes asked for, and done
        self._flushed = 0
        self._error: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None  # only while there is something to sync

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self._flushes == self._flushed and not (self._unsynced and time.monotonic() >= self._due):
                    self._lock.wait(timeout=max(0.0, self._due - time.monotonic()) if self._unsynced else None)
                paths, self._unsynced = self._unsynced, []
                flushes = self._flushes
            try:
                if paths:
                    sync_files(self.directory, paths)
            except BaseException as exc:  # kept, raised in the driver by the next written/flush
                self._error = exc
            with self._lock:
                self._flushed = flushes
                self._lock.notify_all()
                if not self._unsynced and self._flushed == self._flushes:
                    self._thread = None  # idle: a script's many computes leave no threads behind
                    return

    def _check(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise OSError(f"syncing the result store failed: {error}") from error

    def written(self, path: Path) -> None:
        """``path`` is written (and named): sync it within SYNC_S seconds."""
        import threading

        self._check()
        with self._lock:
            if not self._unsynced:
                self._due = time.monotonic() + self.sync_s
                self._lock.notify_all()
            self._unsynced.append(path)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="toksearch-store-sync", daemon=True)
                self._thread.start()

    def flush(self) -> None:
        with self._lock:
            if self._thread is not None:  # else every written file is synced
                self._flushes += 1
                target = self._flushes
                self._lock.notify_all()
                while self._flushed < target:
                    self._lock.wait()
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
        self._sync: Optional[_GroupSync] = None

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
            try:
                header = check_partition(part)
            except DamagedPartition as exc:
                part.unlink(missing_ok=True)
                print(f"toksearch: result store {path}: removed a damaged partition file ({exc}: a machine "
                      "crash before it was synced); its records are computed again", flush=True)
                continue
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

    def add(self, positions: Sequence[int], shots: Sequence[int], records: Sequence[Record], stats: RunStats,
            body: Optional[bytes] = None) -> None:
        """Write one finished partition (an atomic file, on disk when this returns; synced within SYNC_S);
        ``body``: the records as :func:`encode_body` made them in a worker, if it did."""
        if not positions:
            return
        if self._sync is None:
            self._sync = _GroupSync(self.path)
        if body is None:
            body = encode_body(records, shots, stats)
        path = self.path / part_name(positions, shots)
        write_atomic(path, encode_partition(self.fingerprint, positions, shots, records, stats, self.total, body),
                     sync=False)
        self._sync.written(path)
        self._count({"positions": positions, "records_out": len(records), "where_errors": stats.where_errors,
                     "records_with_errors": stats.records_with_errors})
        if stats.records_with_errors and len(self.errors) < MAX_MANIFEST_ERRORS:
            for rec in records:
                if rec["errors"] and len(self.errors) < MAX_MANIFEST_ERRORS:
                    self.errors.append({"shot": rec["shot"], "errors": rec["errors"]})

    def flush(self) -> None:
        """Wait until every partition written is synced to disk."""
        if self._sync is not None:
            self._sync.flush()

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
    or the new file whole. No fsync: the manifest is a summary (the partition files are the
    truth, and carry the fingerprint and the total themselves), and two fsyncs per manifest would be
    most of the store's cost on a short run."""
    _rename_into_place(path, data, sync=False)


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
        try:
            header, recs, positions, stats = read_partition(part)
        except DamagedPartition as exc:  # a machine crash before its sync: not stored
            print(f"toksearch: skipped {exc}", file=sys.stderr, flush=True)
            continue
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
