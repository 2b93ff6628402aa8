"""MDSplus signals fetched over mdsip with the pure-Python ``mdsthin`` client.

:class:`MdsSignal` follows TokSearch's remote ``MdsSignal``: per shot it opens the tree,
evaluates the expression, ``dim_of(expression, i)`` for each dim and, when
``fetch_units``, ``units_of(...)`` of the data and of each dim. ``data_order`` defaults to
``dims`` and only labels the axes of ``data`` (which comes back as the server stores it).

The server is ``location``, else the first ``host::`` entry of the ``<treename>_path``
environment variable, else the job config's ``site.mds_server``; it is resolved on the
worker when first needed. Each worker process keeps one connection per server in a
module-level cache, shared by every signal and shot and never pickled with a signal. A
connection that breaks (server restarted, socket reset, timeout) is dropped from the cache;
a reused connection found broken is replaced once within the same call.

Failures are raised from :meth:`MdsSignal.gather` as :class:`MdsError` (picklable, one-line
message naming tree, shot, expression, server and the MDSplus condition such as
``%TREE-W-NNF``); the original mdsthin exception is the ``__cause__``.
"""

from __future__ import annotations

import getpass
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Set, Tuple

from .base import Signal

log = logging.getLogger(__name__)

#: Seconds to connect and log in to a server.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds any one socket read or write may take once connected.
DEFAULT_READ_TIMEOUT = 60.0
#: The mdsip port when a server names none.
DEFAULT_MDSIP_PORT = 8000

_KEPT_SCHEMES = ("tcp6", "ssh", "sshp")  # passed through to mdsthin as written
_DROPPED_SCHEMES = ("remote", "tcp", "mdsip")  # TokSearch's remote://host, plain tcp


class MdsError(RuntimeError):
    """An MDSplus fetch failed. ``mds_name``: the condition (e.g. ``TreeNNF``) if the server sent one."""

    def __init__(self, message: str, status: Optional[int] = None, mds_name: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.mds_name = mds_name

    def __reduce__(self) -> Tuple[Any, ...]:
        return (type(self), (self.args[0], self.status, self.mds_name))


class MdsConnectionError(MdsError):
    """The server could not be reached, refused the login, stalled past a timeout, or dropped the connection."""


class MdsLocalTreeError(ValueError):
    """A local tree path: mdsthin only talks to mdsip servers."""


def local_tree_message(what: str, where: str, treename: str) -> str:
    """The one line that says what to do instead of a local tree path."""
    return (
        f"{what}: {where} is a local tree path, but MdsSignal reads through mdsthin, which only talks to an mdsip "
        f"server: serve the trees with mdsip on a host that has them and pass location='remote://HOST:PORT' "
        f"(or set {tree_path_variable(treename)}=HOST:PORT::)"
    )


def is_local_path(text: str) -> bool:
    """True for ``/path``, ``./path``, ``~/path``, ``file://...`` (not ``host::`` or ``remote://host``)."""
    s = text.strip()
    return s.startswith(("/", ".", "~", "file://")) and "::" not in s


class MdsTreePath:
    """TokSearch's ``MdsTreePath(treename=path, ...)``: tree locations per tree name.

    Only server entries (``host::`` / ``host:port::``) can be read here; a local
    directory makes MdsSignal refuse with :class:`MdsLocalTreeError`.
    """

    def __init__(self, **paths: str) -> None:
        self.paths = dict(paths)

    @classmethod
    def variable_name(cls, treename: str) -> str:
        return f"{treename}_path"

    def server_for(self, treename: str) -> Optional[str]:
        """The server of ``treename``'s entry, None if it has none; raises for a local path."""
        value = self.paths.get(treename) or self.paths.get(treename.lower())
        if value is None:
            return None
        server = server_from_tree_path(value)
        if server is None:
            raise MdsLocalTreeError(local_tree_message(f"MdsTreePath({treename}=...)", repr(value), treename))
        return server

    def __repr__(self) -> str:
        return f"MdsTreePath({', '.join(f'{k}={v!r}' for k, v in self.paths.items())})"


def parse_server(text: str) -> str:
    """Normalize a server name to ``[user@]host:port`` (or ``scheme://...`` for tcp6/ssh/sshp).

    Accepts ``host``, ``host:port``, ``host::`` / ``host:port::path`` (tree-path form),
    ``remote://host`` (TokSearch) and ``tcp://host:port``.
    """
    s = text.strip()
    scheme = ""
    if "://" in s:
        scheme, s = s.split("://", 1)
        scheme = scheme.lower()
        if scheme not in _KEPT_SCHEMES + _DROPPED_SCHEMES:
            raise ValueError(f"unsupported MDSplus server scheme {scheme!r} in {text!r}")
    if "::" in s:
        s = s.split("::", 1)[0]
    s = s.rstrip("/")
    if not s or "/" in s:
        raise ValueError(f"{text!r} does not name an MDSplus server (host[:port]); local tree paths need the thick MDSplus client")
    hostpart = s.rsplit("@", 1)[-1]
    if ":" not in hostpart:
        s = f"{s}:{DEFAULT_MDSIP_PORT}"
    elif not hostpart.rsplit(":", 1)[1].isdigit() or not hostpart.rsplit(":", 1)[0]:
        raise ValueError(f"{text!r}: expected host[:port] with a numeric port")
    return f"{scheme}://{s}" if scheme in _KEPT_SCHEMES else s


def server_from_tree_path(value: str) -> Optional[str]:
    """The server of the first ``host::`` entry of a ``<tree>_path`` value (``;``-separated), else None."""
    for entry in value.split(";"):
        entry = entry.strip()
        if "::" in entry and entry.split("::", 1)[0].strip():
            return parse_server(entry)
    return None


def tree_path_variable(treename: str) -> str:
    """The environment variable MDSplus reads for a tree's location."""
    return f"{treename.lower()}_path"


# --------------------------------------------------------------------------- connection cache


@dataclass
class _Cached:
    """One live connection and what this process has opened on it."""

    conn: Any  # mdsthin.Connection
    lock: threading.RLock = field(default_factory=threading.RLock)
    open_trees: Set[Tuple[str, int]] = field(default_factory=set)
    current: Optional[Tuple[str, int]] = None  # the tree the server resolves names in


_CONNECTIONS: Dict[str, _Cached] = {}
_CONNECTIONS_LOCK = threading.Lock()


#: A forked child's inherited connections, disarmed and kept alive (see _reset_after_fork).
_INHERITED: list = []


def _disarm(conn: Any) -> Any:
    """Take an inherited connection's transport away so that its destructor has nothing to close.

    mdsthin's ``Connection.__del__`` calls ``disconnect()``, which for ``ssh://``
    terminates the ssh process (the parent's) and for paramiko closes the shared SSH
    session. The transport object is returned, to be kept referenced: dropping it
    could run such code too. File descriptors stay open in the child only.
    """
    transport = getattr(conn, "_socket", None)
    try:
        conn._socket = None
    except Exception:
        pass
    return transport


def _reset_after_fork() -> None:
    """A forked child must never use or close its parent's connections: disarm them, then forget them."""
    global _CONNECTIONS_LOCK
    _CONNECTIONS_LOCK = threading.Lock()
    for cached in list(_CONNECTIONS.values()):
        _INHERITED.append((cached.conn, _disarm(cached.conn)))
    _CONNECTIONS.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def _login_url(server: str) -> str:
    """mdsthin's URL, with an explicit user (mdsthin's getpass default fails without a passwd entry)."""
    scheme, rest = (server.split("://", 1) if "://" in server else ("", server))
    if "@" not in rest:
        try:
            user = getpass.getuser()
        except Exception:
            user = "toksearch"
        rest = f"{user}@{rest}"
    return f"{scheme}://{rest}" if scheme else rest


def _set_timeout(conn: Any, seconds: float) -> None:
    """Apply a per-operation timeout to mdsthin's socket (it exposes one timeout for everything)."""
    sock = getattr(conn, "_socket", None)
    if sock is not None and hasattr(sock, "settimeout"):
        sock.settimeout(seconds)


def _connect(server: str, connect_timeout: float, read_timeout: float) -> _Cached:
    import mdsthin

    try:
        conn = mdsthin.Connection(_login_url(server), timeout=connect_timeout)
    except (OSError, EOFError) as e:
        raise MdsConnectionError(f"cannot connect to MDSplus server {server}: {_describe(e, connect_timeout)}") from e
    except mdsthin.MdsException as e:
        raise MdsConnectionError(f"MDSplus server {server} refused the connection: {e}") from e
    _set_timeout(conn, read_timeout)
    log.debug("connected to MDSplus server %s", server)
    return _Cached(conn)


def _acquire(server: str, connect_timeout: float, read_timeout: float) -> Tuple[_Cached, bool]:
    """The cached connection to ``server`` (True: made now)."""
    with _CONNECTIONS_LOCK:
        cached = _CONNECTIONS.get(server)
        if cached is not None:
            return cached, False
        cached = _connect(server, connect_timeout, read_timeout)
        _CONNECTIONS[server] = cached
        return cached, True


def _drop(server: str, cached: _Cached) -> None:
    """Forget and close one connection (only if it is still the cached one)."""
    with _CONNECTIONS_LOCK:
        if _CONNECTIONS.get(server) is cached:
            del _CONNECTIONS[server]
    try:
        cached.conn.disconnect()
    except Exception:
        pass


def close_connection(server: str) -> bool:
    """Close this process's connection to ``server``; True if there was one."""
    with _CONNECTIONS_LOCK:
        cached = _CONNECTIONS.pop(parse_server(server), None)
    if cached is None:
        return False
    with cached.lock:
        try:
            cached.conn.disconnect()
        except Exception:
            pass
    return True


def close_all_connections() -> int:
    """Close every cached connection of this process; returns how many."""
    with _CONNECTIONS_LOCK:
        servers = list(_CONNECTIONS)
    return sum(close_connection(s) for s in servers)


def cached_servers() -> Tuple[str, ...]:
    """Servers this process holds a connection to."""
    with _CONNECTIONS_LOCK:
        return tuple(_CONNECTIONS)


def _describe(e: BaseException, timeout: Optional[float] = None) -> str:
    if isinstance(e, TimeoutError) or type(e).__name__ == "timeout":
        return f"timed out after {timeout:g} s" if timeout is not None else "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused (server down?)"
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


# --------------------------------------------------------------------------- the signal


class MdsSignal(Signal):
    """A TDI expression of an MDSplus tree, fetched per shot from an mdsip server."""

    def __init__(
        self,
        expression: str,
        treename: str,
        location: Optional[str] = None,
        dims: Sequence[str] = ("times",),
        data_order: Optional[Sequence[str]] = None,
        fetch_units: bool = True,
        *,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> None:
        super().__init__(dims=dims, data_order=data_order, fetch_units=fetch_units)
        if connect_timeout <= 0 or read_timeout <= 0:
            raise ValueError("connect_timeout and read_timeout must be positive (seconds)")
        self.expression = expression
        self.treename = treename
        what = f"MdsSignal({expression!r}, {treename!r})"
        if isinstance(location, MdsTreePath):
            location = location.server_for(treename)  # None: find the server as without a location
        elif isinstance(location, str) and is_local_path(location):
            raise MdsLocalTreeError(local_tree_message(what, f"location={location!r}", treename))
        self.location = location
        self.connect_timeout = float(connect_timeout)
        self.read_timeout = float(read_timeout)
        self._server: Optional[str] = None  # resolved on the worker; never pickled

    # -- pickling: configuration only, no resolved server, no connection

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state["_server"] = None
        return state

    def __repr__(self) -> str:
        return (f"MdsSignal({self.expression!r}, {self.treename!r}, location={self.location!r}, "
                f"dims={self.dims!r})")

    # -- where

    def resolve_server(self) -> str:
        """The ``host:port`` this signal reads from (location, ``<tree>_path``, ``site.mds_server``)."""
        if self._server is None:
            self._server = self._find_server()
        return self._server

    def _find_server(self) -> str:
        what = f"MdsSignal({self.expression!r}, tree {self.treename!r})"
        if self.location:
            try:
                return parse_server(self.location)
            except ValueError as e:
                raise MdsError(f"{what}: location: {e}") from None
        var = tree_path_variable(self.treename)
        local_value = None
        for name in dict.fromkeys((var, f"{self.treename}_path")):
            value = os.environ.get(name)
            if value:
                server = server_from_tree_path(value)
                if server:
                    return server
                local_value = f"{name}={value}"
        default = os.environ.get("TOKSEARCH_MDS_DEFAULT")  # TokSearch's default location
        if default and not is_local_path(default):
            try:
                return parse_server(default)
            except ValueError as e:
                raise MdsError(f"{what}: TOKSEARCH_MDS_DEFAULT: {e}") from None
        from ..config import load_job_config

        try:
            cfg = load_job_config()
        except Exception as e:
            raise MdsError(f"{what}: no location and no {var}=host:: ; reading the job config failed: {e}") from e
        configured = cfg.site.mds_server if cfg is not None else None
        if configured:
            try:
                return parse_server(str(configured))
            except ValueError as e:
                raise MdsError(f"{what}: site.mds_server: {e}") from None
        if local_value:
            raise MdsError(local_tree_message(what, local_value, self.treename))
        raise MdsError(
            f"{what}: no MDSplus server: pass location='host[:port]', set {var}=host:: in the "
            f"environment, or set site.mds_server in the site config"
        )

    # -- fetch

    def gather(self, shot: int) -> Dict[str, Any]:
        """Fetch data, dims and (if ``fetch_units``) units for ``shot``; raises :class:`MdsError`."""
        import mdsthin

        server = self.resolve_server()
        shot = int(shot)
        for attempt in (1, 2):
            cached, fresh = _acquire(server, self.connect_timeout, self.read_timeout)
            step = ["TreeOpen"]  # the operation in progress, for the error message
            with cached.lock:
                try:
                    _set_timeout(cached.conn, self.read_timeout)
                    return self._fetch(cached, shot, step)
                except MdsError:
                    raise
                except mdsthin.MdsException as e:
                    raise self._error(shot, server, step[0], e) from e
                except (OSError, EOFError) as e:
                    _drop(server, cached)
                    if fresh or isinstance(e, TimeoutError) or attempt == 2:
                        raise MdsConnectionError(
                            f"{self._what(shot)} on {server}: {step[0]}: connection lost: "
                            f"{_describe(e, self.read_timeout)}"
                        ) from e
                    log.info("MDSplus connection to %s broke (%s); reconnecting", server, _describe(e))
                except Exception as e:  # an undecodable answer: the stream may be out of step
                    _drop(server, cached)
                    raise MdsError(f"{self._what(shot)} on {server}: {step[0]}: {type(e).__name__}: {e}") from e
        raise AssertionError("unreachable")

    def _fetch(self, cached: _Cached, shot: int, step: list) -> Dict[str, Any]:
        """Open the tree (unless it is the server's current one), then evaluate every query."""
        conn, expr = cached.conn, self.expression
        key = (self.treename.lower(), shot)
        if cached.current != key:
            cached.current = None
            step[0] = f"TreeOpen({self.treename!r}, {shot})"
            conn.openTree(self.treename, shot)
            cached.open_trees.add(key)
            cached.current = key
        queries = [("data", expr)] + [(dim, f"dim_of({expr}, {i})") for i, dim in enumerate(self.dims)]
        result: Dict[str, Any] = {}
        for name, query in queries:
            step[0] = query
            value = conn.get(query).data()
            if value is None:
                raise MdsError(f"{self._what(shot)}: {query} evaluated to no data", mds_name="EMPTY")
            result[name] = value
        if self.fetch_units:
            units: Dict[str, str] = {}
            for name, query in queries:
                step[0] = f"units_of({query})"
                units[name] = _units(conn.get(step[0]))
            result["units"] = units
        return result

    def _what(self, shot: int) -> str:
        return f"MdsSignal({self.expression!r}, tree {self.treename!r}) shot {shot}"

    def _error(self, shot: int, server: str, step: str, e: Exception) -> MdsError:
        status = getattr(e, "status", None)
        name = type(e).__name__ if status is not None else None
        return MdsError(f"{self._what(shot)} on {server}: {step}: {e}", status=status, mds_name=name)

    # -- release

    def cleanup_shot(self, shot: int) -> None:
        """Close this signal's tree for ``shot`` if this process opened it (best effort, never raises)."""
        try:
            server = self.resolve_server()
        except MdsError:
            return
        with _CONNECTIONS_LOCK:
            cached = _CONNECTIONS.get(server)
        if cached is None:
            return
        key = (self.treename.lower(), int(shot))
        with cached.lock:
            if key not in cached.open_trees:
                return
            cached.open_trees.discard(key)
            if cached.current == key:
                cached.current = None
            try:
                _set_timeout(cached.conn, self.read_timeout)
                cached.conn.closeTree(self.treename, int(shot))
            except (OSError, EOFError) as e:
                log.warning("closing %s shot %s on %s: %s; dropping the connection", self.treename, shot, server, _describe(e))
                _drop(server, cached)
            except Exception as e:
                log.warning("closing %s shot %s on %s: %s", self.treename, shot, server, e)

    def cleanup(self) -> None:
        """Close this process's connection to this signal's server (the next gather reconnects)."""
        try:
            server = self.resolve_server()
        except MdsError:
            return
        close_connection(server)


def _units(desc: Any) -> str:
    """A units answer as a string ('' for none: the server answers an empty string as no data)."""
    value = desc.data() if desc is not None else None
    if value is None:
        return ""
    if isinstance(value, bytes):
        value = value.decode("ascii", "replace")
    return str(value).strip()
