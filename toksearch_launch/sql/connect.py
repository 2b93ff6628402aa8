"""Open the site's SQL database: where from the site config, the password from a private file or the environment.

The password never appears in the config (which ``--cfg`` prints and the run
directory keeps), on a command line, or in an error message.
"""

from __future__ import annotations

import getpass
import importlib
import os
import stat
from typing import Any, Dict, Optional, Tuple

#: The keys of ``site.sql`` a caller may override.
OPTION_KEYS = ("driver", "server", "port", "database", "user", "password_file", "password_env")


class SqlConfigError(ValueError):
    """The site's SQL settings cannot open a connection; the message is one line and says what to do."""


def _site_tree(site: str) -> Any:
    """The typed config of ``conf/site/<site>.yaml`` (for use outside a job)."""
    from importlib import resources

    from omegaconf import OmegaConf

    from toksearch_launch.config import as_typed

    path = resources.files("toksearch_launch.conf.site") / f"{site}.yaml"
    if not path.is_file():
        raise SqlConfigError(f"no site {site!r} (conf/site/{site}.yaml does not exist)")
    return as_typed(OmegaConf.load(str(path)))


def sql_options(site: Optional[str] = None, **overrides: Any) -> Dict[str, Any]:
    """``site.sql`` of the named site, else of the job's config, else the schema defaults; then ``overrides``."""
    from omegaconf import OmegaConf

    from toksearch_launch.config import default_config, load_job_config

    cfg = _site_tree(site) if site else (load_job_config() or default_config())
    opts = OmegaConf.to_container(cfg.site.sql, resolve=True)
    unknown = sorted(set(overrides) - set(OPTION_KEYS))
    if unknown:
        raise TypeError(f"unknown SQL option(s): {', '.join(unknown)} (known: {', '.join(OPTION_KEYS)})")
    opts.update({k: v for k, v in overrides.items() if v is not None})
    return opts


def _private_file_text(path: str) -> str:
    """The text of a secrets file that only its owner can read (else a one-line refusal)."""
    info = os.stat(path)
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SqlConfigError(
            f"password file {path} is readable by others (mode {stat.S_IMODE(info.st_mode):04o}); run: chmod 600 {path}"
        )
    with open(path, encoding="utf-8") as f:
        return f.read()


def read_password(opts: Dict[str, Any]) -> Tuple[Optional[str], Optional[str]]:
    """(user, password) from ``password_file`` (TokSearch: user then password; or the password alone),
    else (None, the ``password_env`` variable); (None, None) when neither is set."""
    path = opts.get("password_file")
    if path:
        path = os.path.expanduser(str(path))
        if os.path.exists(path):
            lines = [line.strip() for line in _private_file_text(path).splitlines() if line.strip()]
            if len(lines) == 1:
                return None, lines[0]
            if len(lines) == 2:
                return lines[0], lines[1]
            raise SqlConfigError(
                f"password file {path}: expected the password, or the user then the password, on their own lines; "
                f"found {len(lines)} lines"
            )
    env = opts.get("password_env")
    if env and os.environ.get(env):
        return None, os.environ[env]
    return None, None


def _redact(text: str, secret: Optional[str]) -> str:
    return text.replace(secret, "***") if secret else text


def _where(opts: Dict[str, Any], user: Optional[str]) -> str:
    port = f":{opts['port']}" if opts.get("port") else ""
    db = f"/{opts['database']}" if opts.get("database") else ""
    who = f"{user}@" if user else ""
    return f"{opts['driver']} {who}{opts.get('server')}{port}{db}"


def _driver(name: str) -> Any:
    extra = {"pymssql": "mssql", "psycopg": "test"}.get(name)
    try:
        return importlib.import_module(name)
    except ImportError:
        if name == "psycopg":
            try:
                return importlib.import_module("psycopg2")
            except ImportError:
                pass
        hint = f"pip install 'toksearch_launch[{extra}]'" if extra == "mssql" else f"pip install {name}"
        raise SqlConfigError(f"site.sql.driver={name} but {name} is not installed: {hint}") from None


def connect(site: Optional[str] = None, password: Optional[str] = None, **overrides: Any) -> Any:
    """A DB-API connection to the site's database (``site.sql``; keyword arguments override it).

    ``site``: a site name (``saga``) to use outside a job; inside a job the job's
    config is used. ``password``: only for callers that hold it already; otherwise
    it is read by :func:`read_password`.
    """
    opts = sql_options(site, **overrides)
    driver_name = opts["driver"]
    if not opts.get("server"):
        raise SqlConfigError(
            f"no SQL server configured: set site.sql.server (and site.sql.driver, now {driver_name}) in the site "
            "config, or pass server=..."
        )
    if driver_name == "sqlite3":
        import sqlite3

        return sqlite3.connect(str(opts["server"]))

    file_user, secret = (None, password) if password is not None else read_password(opts)
    user = opts.get("user") or file_user or _login_name()
    if secret is None:
        file_hint = f"write it to {opts['password_file']} (chmod 600) or " if opts.get("password_file") else ""
        raise SqlConfigError(f"no password for {_where(opts, user)}: {file_hint}set ${opts['password_env']}")
    module = _driver(driver_name)
    try:
        if driver_name == "pymssql":
            return module.connect(
                server=str(opts["server"]), user=user, password=secret, database=opts.get("database") or "",
                port=str(opts.get("port") or 1433),
            )
        params = {"host": str(opts["server"]), "user": user, "password": secret}
        if opts.get("port"):
            params["port"] = int(opts["port"])
        if opts.get("database"):
            params["dbname"] = opts["database"]
        return module.connect(**params)
    except Exception as exc:
        first = _redact(str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__, secret)
        raise SqlConfigError(f"cannot connect to {_where(opts, user)}: {first}") from None


def _login_name() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "toksearch"
