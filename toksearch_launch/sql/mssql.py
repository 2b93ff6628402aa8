"""TokSearch's ``toksearch.sql.mssql``: D3D's SQL Server database (pymssql, the ``mssql`` extra).

``connect_d3drdb()`` takes host, port, database and user from ``site.sql`` (saga's
points at d3drdb.gat.com:8001/d3drdb), each overridable by argument; TokSearch's
values are the fallback when the site config has none. The password comes from
``password_file`` (TokSearch's ``~/D3DRDB.sybase_login``: user, then password; mode
0600) or the ``site.sql.password_env`` variable.
"""

from __future__ import annotations

from typing import Any, Optional

from toksearch_launch.sql.connect import connect, sql_options

#: TokSearch's defaults, used where the site config names nothing.
D3DRDB_DEFAULTS = {
    "driver": "pymssql",
    "server": "d3drdb.gat.com",
    "port": 8001,
    "database": "d3drdb",
    "password_file": "~/D3DRDB.sybase_login",
}


def connect_d3drdb(
    username: Optional[str] = None,
    password: Optional[str] = None,
    host: Optional[str] = None,
    db: Optional[str] = None,
    port: Optional[int] = None,
    password_file: Optional[str] = None,
    site: Optional[str] = None,
) -> Any:
    """A DB-API connection to D3D's database (usable as a context manager, like pymssql's)."""
    configured = sql_options(site)
    base = {k: (configured.get(k) or v) for k, v in D3DRDB_DEFAULTS.items()}
    if configured.get("driver") != "pymssql" or not configured.get("server"):
        base = dict(D3DRDB_DEFAULTS, password_env=configured.get("password_env"))
    base.update(
        {k: v for k, v in {"server": host, "database": db, "port": port, "user": username,
                           "password_file": password_file}.items() if v is not None}
    )
    if configured.get("user") and username is None:
        base["user"] = configured["user"]
    base.setdefault("password_env", configured.get("password_env"))
    return connect(site=site, password=password, **base)
