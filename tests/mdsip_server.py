"""A small mdsip server for tests: the MDSplus message protocol that ``mdsthin`` speaks.

Written from the protocol, not from mdsthin's classes (it imports neither mdsthin nor
MDSplus), so the client under test talks to an independent peer:

* every message is a 48-byte little-endian header (``msglen, status, length, nargs,
  descriptor_idx, message_id, dtype, client_type, ndims, dims[8]``) and a body;
* login: the client sends its user name (``DTYPE_T``, ``dims[0]`` = protocol version); the
  server answers with a bare header, ``status = 1 | compression << 1`` (0: refused) and
  ``dims[0]`` = its protocol version;
* a request is ``nargs`` messages with one ``message_id``: the TDI expression
  (``descriptor_idx`` 0), then its ``$`` arguments; after the last one the server evaluates
  and answers with one message: the status (an MDSplus condition code such as TreeNNF) and
  the value (for an error, the error text, as the real server sends);
* doubles go out as ``DTYPE_DOUBLE`` (11) and floats as ``DTYPE_FLOAT`` (10), as the real
  server converts them for an IEEE client.

The TDI subset: ``TreeOpen($,$)`` / ``TreeClose($,$)`` / ``TreeClose()`` (returning the
status as a Long, as the real TDI functions do), ``data(x)``, ``dim_of(x[, i])``,
``units_of(x)``, ``units(x)``, ``$`` / ``$n``, integer and string literals, and any
expression stored in the open tree of the in-memory database (looked up case-insensitively,
e.g. ``\\IPMHD``). A missing node answers TreeNNF, an entry without data TreeNODATA, an
unknown tree or shot TreeFOPENR, a node reference with no tree open TreeNOT_OPEN.

Modes (``server.mode``, may change while running): ``ok``; ``stall`` (accepts the TCP
connection, never answers, not even the login); ``hang`` (logs in, reads requests, never
answers them); ``deny`` (refuses the login). A server that is down: :func:`closed_port`.

Run standalone: ``python tests/mdsip_server.py [--port 0] [--mode ok]`` serves
:func:`demo_trees` and prints ``LISTENING <host>:<port>`` once it accepts connections.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import selectors
import signal
import socket
import struct
import sys
import threading
import zlib
from dataclasses import dataclass, field
from collections.abc import Mapping
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

HEADER = struct.Struct("<iihBBBBbB8i")  # 48 bytes, the C MsgHdr
MDSIP_VERSION = 3
IEEE_CLIENT = 2
COMPRESSED = 0x20
DTYPE_T = 14

#: MDSplus condition codes the server answers with: name -> (status, message text).
STATUS: Dict[str, Tuple[int, str]] = {
    "TreeNORMAL": (265388041, "%TREE-S-NORMAL, Normal successful completion"),
    "TreeALREADY_OPEN": (265388091, "%TREE-I-ALREADY_OPEN, Tree is already OPEN"),
    "TreeNNF": (265388144, "%TREE-W-NNF, Node Not Found"),
    "TreeNOT_OPEN": (265388200, "%TREE-W-NOT_OPEN, Tree not currently open"),
    "TreeNODATA": (265388258, "%TREE-E-NODATA, No data available for this node"),
    "TreeFOPENR": (265392154, "%TREE-E-FOPENR, Error opening file read-only"),
    "TdiBAD_INDEX": (265519162, "%TDI-E-BAD_INDEX, Index or subscript is too small or too big"),
    "TdiSYNTAX": (265519322, "%TDI-E-SYNTAX, Bad punctuation or misspelled word or number"),
    "TdiINVDTYDSC": (265519194, "%TDI-E-INVDTYDSC, Storage data type is not valid"),
}

# Wire dtype codes <-> numpy. Incoming: both the IEEE codes (FS=52, FT=53) and the legacy
# FLOAT/DOUBLE codes (10, 11). Outgoing floats use 10/11, as the real server does.
_IN_DTYPES = {2: "<u1", 3: "<u2", 4: "<u4", 5: "<u8", 6: "<i1", 7: "<i2", 8: "<i4", 9: "<i8",
              10: "<f4", 11: "<f8", 52: "<f4", 53: "<f8"}
_OUT_DTYPES = {"u1": 2, "u2": 3, "u4": 4, "u8": 5, "i1": 6, "i2": 7, "i4": 8, "i8": 9,
               "f4": 10, "f8": 11, "b1": 2}  # numpy kind + itemsize -> wire dtype


@dataclass
class Entry:
    """One stored expression of a tree/shot: data (None: no data), units, dims and their units."""

    data: Any
    units: str = ""
    dims: Sequence[Any] = ()
    dim_units: Sequence[str] = ()


#: trees[tree name (lower case)][shot][expression (upper case, no blanks)] -> Entry
Trees = Dict[str, Dict[int, Dict[str, Entry]]]


def node_key(expression: str) -> str:
    """How the database keys an expression: upper case, blanks removed."""
    return re.sub(r"\s+", "", expression).upper()


def make_trees(raw: Dict[str, Dict[int, Dict[str, Entry]]]) -> Trees:
    """Normalize a hand-written database (tree names lower case, expression keys via :func:`node_key`)."""
    return {tree.lower(): {int(shot): {node_key(k): v for k, v in nodes.items()} for shot, nodes in shots.items()}
            for tree, shots in raw.items()}


def demo_trees() -> Trees:
    """A small database: efit01 shots 1001/1002 (1-D \\IPMHD, 2-D \\PSIN profile, empty \\EMPTY)."""
    trees: Dict[str, Dict[int, Dict[str, Entry]]] = {"efit01": {}}
    for shot in (1001, 1002):
        times = np.linspace(0.0, 1.0, 11)
        rho = np.linspace(0.0, 1.0, 4)
        trees["efit01"][shot] = {
            r"\IPMHD": Entry(np.sin(times) * shot, "A", [times], ["s"]),
            # numpy shape (times, rho): MDSplus dim_of(0) is rho (fastest), dim_of(1) is times
            r"\PSIN": Entry(np.add.outer(times, rho) + shot, "", [rho, times], ["", "ms"]),
            r"\EMPTY": Entry(None),
        }
    return make_trees(trees)


class GeneratedShots(Mapping):
    """A tree's shots made on demand: ``\\IPMHD`` for every shot in ``shots``, deterministic per shot.

    Lets end-to-end tests run TokSearch's example (10,000 shots of efit01) against
    this server without building the whole archive in memory.
    """

    def __init__(self, shots: range, samples: int = 200) -> None:
        self.shots = shots
        self.times = np.linspace(0.0, 5.0, samples)

    def __getitem__(self, shot: int) -> Dict[str, Entry]:
        if shot not in self.shots:
            raise KeyError(shot)
        ip = 1.0e6 * np.sin(np.pi * self.times / 5.0) * (1.0 + (shot % 97) / 97.0)
        return {node_key(r"\ipmhd"): Entry(ip, "A", [self.times], ["s"])}

    def __iter__(self) -> Iterator[int]:
        return iter(self.shots)

    def __len__(self) -> int:
        return len(self.shots)


def example_trees(first: int = 165920, count: int = 10000) -> Trees:
    """What TokSearch's example fetches: efit01 ``\\ipmhd`` for ``count`` shots from ``first``."""
    return {"efit01": GeneratedShots(range(first, first + count))}  # type: ignore[dict-item]


class TdiError(Exception):
    """An evaluation failure the server answers with an MDSplus status code."""

    def __init__(self, name: str) -> None:
        super().__init__(STATUS[name][1])
        self.name = name
        self.status = STATUS[name][0]


@dataclass
class _Value:
    """An evaluated TDI value: data plus what ``dim_of`` / ``units_of`` need."""

    data: Any
    units: str = ""
    dims: Optional[List["_Value"]] = None


@dataclass
class _Session:
    """Per-connection TDI state: open trees (most recent last)."""

    open_trees: List[Tuple[str, int]] = field(default_factory=list)


def _split_call(expr: str) -> Optional[Tuple[str, List[str]]]:
    """``name(a, b)`` -> ("name", ["a", "b"]) when the whole expression is one call, else None."""
    m = re.match(r"\s*([A-Za-z_][A-Za-z0-9_]*)\s*\(", expr)
    if not m:
        return None
    depth, start, quote, args = 0, m.end(), "", []
    for i in range(m.end() - 1, len(expr)):
        c = expr[i]
        if quote:
            if c == quote:
                quote = ""
        elif c in "\"'":
            quote = c
        elif c == "(":
            depth += 1
        elif c == ")":
            depth -= 1
            if depth == 0:
                if expr[i + 1:].strip():
                    return None
                last = expr[start:i].strip()
                if last or args:
                    args.append(last)
                return m.group(1), [a.strip() for a in args]
        elif c == "," and depth == 1:
            args.append(expr[start:i])
            start = i + 1
    raise TdiError("TdiSYNTAX")


class _Evaluator:
    """Evaluates one request: an expression with its ``$`` arguments against the database."""

    def __init__(self, trees: Trees, session: _Session, args: List[Any]) -> None:
        self.trees, self.session, self.args, self.next_arg = trees, session, args, 0

    def run(self, expr: str) -> Any:
        """Evaluate and reduce to plain data, as the server's TdiData does."""
        return self.eval(expr).data

    def eval(self, expr: str) -> _Value:
        e = expr.strip()
        if e == "$" or re.fullmatch(r"\$\d+", e):
            index = int(e[1:]) - 1 if len(e) > 1 else self.next_arg
            self.next_arg = index + 1
            if index >= len(self.args):
                raise TdiError("TdiSYNTAX")
            return _Value(self.args[index])
        if re.fullmatch(r"[+-]?\d+", e):
            return _Value(np.int32(int(e)))
        if len(e) >= 2 and e[0] == e[-1] and e[0] in "\"'":
            return _Value(e[1:-1])
        call = _split_call(e)
        if call is not None:
            return self.call(call[0].lower(), call[1])
        return self.node(e)

    def call(self, name: str, args: List[str]) -> _Value:
        if name == "treeopen" and len(args) >= 2:
            return _Value(np.int32(self.tree_open(str(self.eval(args[0]).data), int(self.eval(args[1]).data))))
        if name == "treeclose":
            if not args:
                return _Value(np.int32(self.tree_close(None)))
            return _Value(np.int32(self.tree_close((str(self.eval(args[0]).data).lower(), int(self.eval(args[1]).data)))))
        if name == "data" and len(args) == 1:
            return _Value(self.eval(args[0]).data)
        if name == "dim_of" and len(args) in (1, 2):
            value = self.eval(args[0])
            index = int(self.eval(args[1]).data) if len(args) == 2 else 0
            if value.dims is None:  # a plain array: dim_of is its index
                if index != 0:
                    raise TdiError("TdiBAD_INDEX")
                return _Value(np.arange(np.size(value.data), dtype=np.int32))
            if not 0 <= index < len(value.dims):
                raise TdiError("TdiBAD_INDEX")
            return value.dims[index]
        if name in ("units_of", "units") and len(args) == 1:
            units = self.eval(args[0]).units
            return _Value(units if units or name == "units_of" else " ")
        raise TdiError("TdiSYNTAX")

    def tree_open(self, tree: str, shot: int) -> int:
        key = (tree.lower(), shot)
        if shot not in self.trees.get(key[0], {}):
            return STATUS["TreeFOPENR"][0]
        opened = self.session.open_trees
        already = key in opened
        if already:
            opened.remove(key)
        opened.append(key)
        return STATUS["TreeALREADY_OPEN" if already else "TreeNORMAL"][0]

    def tree_close(self, key: Optional[Tuple[str, int]]) -> int:
        opened = self.session.open_trees
        if key is None and opened:
            key = opened[-1]
        if key not in opened:
            return STATUS["TreeNOT_OPEN"][0]
        opened.remove(key)
        return STATUS["TreeNORMAL"][0]

    def node(self, expr: str) -> _Value:
        if not self.session.open_trees:
            raise TdiError("TreeNOT_OPEN")
        tree, shot = self.session.open_trees[-1]
        entry = self.trees[tree][shot].get(node_key(expr))
        if entry is None:
            raise TdiError("TreeNNF" if re.fullmatch(r"[\\A-Za-z0-9_.:\-]+", expr) else "TdiSYNTAX")
        if entry.data is None:
            raise TdiError("TreeNODATA")
        dim_units = list(entry.dim_units) + [""] * len(entry.dims)
        dims = [_Value(np.asarray(d), dim_units[i]) for i, d in enumerate(entry.dims)]
        return _Value(entry.data, entry.units, dims or None)


def _decode(dtype: int, length: int, dims: Sequence[int], body: bytes) -> Any:
    """A request argument (CLASS_S or CLASS_A) as a Python/numpy value."""
    if dtype == DTYPE_T:
        if not dims:
            return body.decode("ascii")
        return np.frombuffer(body, dtype=f"S{length}").astype(str).reshape(tuple(dims)[::-1])
    if dtype not in _IN_DTYPES:
        raise TdiError("TdiINVDTYDSC")
    if not dims:
        return np.frombuffer(body, dtype=_IN_DTYPES[dtype], count=1)[0]
    return np.frombuffer(body, dtype=_IN_DTYPES[dtype]).reshape(tuple(dims)[::-1]).copy()


def _encode(value: Any) -> Tuple[int, int, List[int], bytes]:
    """An answer value as (dtype, length, dims, body); None is the empty answer."""
    if value is None:
        return 0, 0, [], b""
    if isinstance(value, str):
        raw = value.encode("ascii")
        return DTYPE_T, len(raw), [], raw
    if isinstance(value, bool):
        value = np.uint8(value)
    elif isinstance(value, int):
        value = np.int32(value) if -2**31 <= value < 2**31 else np.int64(value)
    elif isinstance(value, float):
        value = np.float64(value)
    arr = np.asarray(value)
    if arr.dtype.kind in "US":
        raw_arr = arr.astype("S")
        length = raw_arr.dtype.itemsize
        return DTYPE_T, length, list(arr.shape[::-1]), raw_arr.tobytes(order="C")
    code = _OUT_DTYPES.get(f"{arr.dtype.kind}{arr.dtype.itemsize}")
    if code is None:
        raise TdiError("TdiINVDTYDSC")
    arr = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return code, arr.dtype.itemsize, list(arr.shape[::-1]), arr.tobytes(order="C")


def _pack(status: int, dtype: int = 0, length: int = 0, dims: Sequence[int] = (), body: bytes = b"",
          message_id: int = 0, nargs: int = 0) -> bytes:
    dims8 = list(dims) + [0] * (8 - len(dims))
    header = HEADER.pack(HEADER.size + len(body), status, length, nargs, 0, message_id & 0xFF, dtype,
                         IEEE_CLIENT, len(dims), *dims8)
    return header + body


def _recv_exact(sock: socket.socket, n: int) -> Optional[bytes]:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _recv_message(sock: socket.socket) -> Optional[Tuple[tuple, bytes]]:
    """One message: (header fields, body), or None when the peer closed."""
    raw = _recv_exact(sock, HEADER.size)
    if raw is None:
        return None
    h = HEADER.unpack(raw)
    body = _recv_exact(sock, h[0] - HEADER.size) if h[0] > HEADER.size else b""
    if body is None:
        return None
    if h[7] & COMPRESSED and body:  # 4-byte original length, then zlib
        body = zlib.decompress(body[4:])
    return h, body


@contextlib.contextmanager
def closed_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A port on ``host`` that refuses connections (a server that is down).

    The port stays bound but never listens while the context lasts, so nothing else can
    take it and every connect gets a reset.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        yield s.getsockname()[1]


class MdsipServer:
    """An mdsip server on a background thread (one more thread per client connection)."""

    MODES = ("ok", "stall", "hang", "deny")

    def __init__(self, trees: Optional[Trees] = None, mode: str = "ok", host: str = "127.0.0.1", port: int = 0) -> None:
        if mode not in self.MODES:
            raise ValueError(f"mode {mode!r} not in {self.MODES}")
        self.trees: Trees = trees if trees is not None else demo_trees()
        self.mode = mode
        self.host, self.port = host, port
        self.connections_accepted = 0
        self.requests: List[str] = []  # expressions evaluated, in order
        self._lock = threading.Lock()
        self._clients: Dict[socket.socket, threading.Thread] = {}
        self._stopping = threading.Event()
        self._listener: Optional[socket.socket] = None
        self._accept_thread: Optional[threading.Thread] = None
        self._wake_r, self._wake_w = socket.socketpair()

    @property
    def address(self) -> str:
        """``host:port`` as clients name it."""
        return f"{self.host}:{self.port}"

    def start(self) -> "MdsipServer":
        """Bind and listen (connections are accepted once this returns), then serve on a thread."""
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        listener.listen(16)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name="mdsip-accept", daemon=True)
        self._accept_thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, close every client connection, join every thread."""
        self._stopping.set()
        self._wake_w.send(b"x")
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        if self._listener is not None:
            self._listener.close()
        threads = list(self._clients.values())
        self.drop_clients()
        for t in threads:
            t.join(timeout=5)
        self._wake_r.close()
        self._wake_w.close()

    def drop_clients(self) -> int:
        """Break every open client connection (as a server restart would); returns how many."""
        with self._lock:
            socks = list(self._clients)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        return len(socks)

    def count(self, prefix: str) -> int:
        """How many evaluated requests started with ``prefix`` (case-insensitive)."""
        with self._lock:
            return sum(1 for r in self.requests if r.lower().startswith(prefix.lower()))

    def __enter__(self) -> "MdsipServer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def _accept_loop(self) -> None:
        assert self._listener is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._listener, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r or self._stopping.is_set():
                        return
                    conn, _ = self._listener.accept()
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    t = threading.Thread(target=self._serve_client, args=(conn,), name="mdsip-client", daemon=True)
                    with self._lock:
                        self.connections_accepted += 1
                        self._clients[conn] = t
                    t.start()

    def _serve_client(self, sock: socket.socket) -> None:
        try:
            if self.mode == "stall":
                self._stopping.wait()  # never read, never answer (the login included) until stop()
                return
            login = _recv_message(sock)
            if login is None:
                return
            ok = self.mode != "deny"
            h = login[0]
            sock.sendall(HEADER.pack(HEADER.size, 1 if ok else 0, h[2], h[3], h[4], h[5], h[6], IEEE_CLIENT, 1,
                                     MDSIP_VERSION, 0, 0, 0, 0, 0, 0, 0))
            if not ok:
                return
            session, pending = _Session(), {}
            while True:
                msg = _recv_message(sock)
                if msg is None:
                    return
                h, body = msg
                nargs, idx, message_id = h[3], h[4], h[5]
                pending[idx] = _decode(h[6], h[2], h[9:9 + h[8]], body)
                if idx < nargs - 1:
                    continue
                if self.mode == "hang":
                    pending.clear()
                    continue
                expr = str(pending.get(0, ""))
                args = [pending[i] for i in range(1, nargs)]
                pending.clear()
                with self._lock:
                    self.requests.append(expr)
                try:
                    status, answer = 1, _Evaluator(self.trees, session, args).run(expr)
                except TdiError as e:
                    status, answer = e.status, str(e)
                try:
                    dtype, length, dims, out = _encode(answer)
                except TdiError as e:
                    status, (dtype, length, dims, out) = e.status, _encode(str(e))
                sock.sendall(_pack(status, dtype, length, dims, out, message_id=message_id))
        except OSError:
            return
        finally:
            with self._lock:
                self._clients.pop(sock, None)
            sock.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Serve :func:`demo_trees` until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: an ephemeral port")
    parser.add_argument("--mode", default="ok", choices=MdsipServer.MODES)
    parser.add_argument("--trees", default="demo", choices=("demo", "example"),
                        help="demo: a few hand-made shots; example: efit01 \\ipmhd for TokSearch's 10,000 example shots")
    args = parser.parse_args(argv)
    stop_signals = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)  # threads inherit the mask; main waits below
    trees = example_trees() if args.trees == "example" else demo_trees()
    server = MdsipServer(trees, mode=args.mode, host=args.host, port=args.port).start()
    print(f"LISTENING {server.address}", flush=True)
    try:
        signal.sigwait(stop_signals)
    finally:
        server.stop()
    print(f"STOPPED after {server.connections_accepted} connection(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
