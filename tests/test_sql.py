"""Pipeline.from_sql over DB-API connections (sqlite3, and a real PostgreSQL server), and the
site-config connect helpers (password from a 0600 file or the environment, never printed)."""

from __future__ import annotations

import decimal
import os
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from toksearch_launch import InvalidRecordField, MissingColumnName, MissingShotNumber, Pipeline
from toksearch_launch.sql import SqlConfigError, connect, read_password, sql_options
from toksearch_launch.sql.query import column_names

SHOTS = [(165920, 1.25e6, "plasma"), (165921, 0.0, "test"), (165922, 1.5e6, "plasma"), (165923, 0.9e6, "plasma")]


def peak(rec):
    rec["double"] = rec["ip_max"] * 2


def sqlite_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path))
    conn.execute("create table shots (shot integer, ip_max real, shot_type text)")
    conn.executemany("insert into shots values (?, ?, ?)", SHOTS)
    conn.commit()
    return conn


# --------------------------------------------------------------------------- sqlite3


def test_from_sql_sqlite_rows_become_records(tmp_path):
    conn = sqlite_db(tmp_path / "shots.db")
    p = Pipeline.from_sql(conn, "select shot, ip_max, shot_type from shots where shot_type = ? order by shot", "plasma")
    p.map(peak)
    got = p.compute_serial()
    assert [r.shot for r in got] == [165920, 165922, 165923]
    assert [r["double"] for r in got] == [2.5e6, 3e6, 1.8e6]
    assert got[0]["shot_type"] == "plasma" and got[0].errors == {}


def test_from_sql_without_params_allows_percent(tmp_path):
    conn = sqlite_db(tmp_path / "shots.db")
    p = Pipeline.from_sql(conn, "select shot from shots where shot_type like 'pla%' order by shot")
    assert [r.shot for r in p.compute_serial()] == [165920, 165922, 165923]


def test_from_sql_refuses_reserved_and_shotless_queries(tmp_path):
    conn = sqlite_db(tmp_path / "shots.db")
    for column in ("key", "errors"):
        with pytest.raises(InvalidRecordField, match=f"'{column}'.*reserved"):
            Pipeline.from_sql(conn, f"select shot, shot_type as {column} from shots")
    with pytest.raises(MissingShotNumber) as info:
        Pipeline.from_sql(conn, "select ip_max, shot_type from shots")
    message = str(info.value)
    assert message == ("from_sql: the query returns no 'shot' column (columns: ip_max, shot_type); "
                       "select the shot number AS shot")
    with pytest.raises(ValueError, match="more than once"):
        Pipeline.from_sql(conn, "select shot, ip_max as shot from shots")
    assert len(Pipeline.from_sql(conn, "select shot from shots where shot < 0")) == 0


def test_column_names_unnamed_columns():
    # What SQL Server (pymssql) and PostgreSQL call a column the query did not name.
    for unnamed in ("", "?column?", None):
        with pytest.raises(MissingColumnName, match="column 2 of the query has no name"):
            column_names([("shot",), (unnamed,)])
    assert column_names([("shot",), ("a",)]) == ["shot", "a"]


def test_sqlite_connect_from_site_config(tmp_path, monkeypatch):
    db = tmp_path / "shots.db"
    sqlite_db(db).close()
    job = tmp_path / "toksearch.yaml"
    job.write_text(f"site:\n  sql:\n    driver: sqlite3\n    server: {db}\n")
    monkeypatch.setenv("TOKSEARCH_CONFIG", str(job))
    conn = connect()
    assert [r.shot for r in Pipeline.from_sql(conn, "select shot from shots order by shot").compute_serial()] == [
        s for s, _, _ in SHOTS]


# --------------------------------------------------------------------------- passwords and config


def test_password_file_must_be_private(tmp_path, monkeypatch):
    secret = tmp_path / "login"
    secret.write_text("alice\nhunter2\n")
    os.chmod(secret, 0o644)
    with pytest.raises(SqlConfigError) as info:
        read_password({"password_file": str(secret), "password_env": "X"})
    assert str(info.value) == f"password file {secret} is readable by others (mode 0644); run: chmod 600 {secret}"
    assert "hunter2" not in str(info.value)
    os.chmod(secret, 0o600)
    assert read_password({"password_file": str(secret)}) == ("alice", "hunter2")  # TokSearch's format
    secret.write_text("only-the-password\n")
    assert read_password({"password_file": str(secret)}) == (None, "only-the-password")
    monkeypatch.setenv("MY_DB_PW", "from-env")
    assert read_password({"password_file": str(tmp_path / "absent"), "password_env": "MY_DB_PW"}) == (None, "from-env")
    assert read_password({"password_file": None, "password_env": "UNSET_VAR_XYZ"}) == (None, None)


def test_site_sql_options_saga_points_at_d3drdb(monkeypatch):
    monkeypatch.delenv("TOKSEARCH_CONFIG", raising=False)
    opts = sql_options("saga")
    assert (opts["driver"], opts["server"], opts["port"], opts["database"]) == ("pymssql", "d3drdb.gat.com", 8001, "d3drdb")
    assert opts["password_file"] == "~/D3DRDB.sybase_login" and "password" not in opts
    assert sql_options("saga", port=9000)["port"] == 9000
    with pytest.raises(SqlConfigError, match="no site 'nowhere'"):
        sql_options("nowhere")


def test_connect_without_password_or_driver_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.delenv("TOKSEARCH_SQL_PASSWORD", raising=False)
    with pytest.raises(SqlConfigError) as info:
        connect(driver="psycopg", server="/nowhere", password_file=str(tmp_path / "absent"))
    assert str(info.value).startswith("no password for psycopg ") and "$TOKSEARCH_SQL_PASSWORD" in str(info.value)
    with pytest.raises(SqlConfigError, match="no SQL server configured"):
        connect(driver="psycopg")
    from toksearch_launch.sql.mssql import connect_d3drdb

    try:
        import pymssql  # noqa: F401
    except ImportError:
        monkeypatch.setenv("TOKSEARCH_SQL_PASSWORD", "pw")
        with pytest.raises(SqlConfigError, match=r"pip install 'toksearch_launch\[mssql\]'"):
            connect_d3drdb(site="saga", password_file=str(tmp_path / "absent"))


def test_cfg_output_never_shows_the_password(tmp_path):
    secret = "s3cr3t-never-print"
    result = run_cli(["--cfg", "job", "site=saga"], tmp_path, env={"TOKSEARCH_SQL_PASSWORD": secret})
    assert result.returncode == 0, result.stderr
    assert "d3drdb.gat.com" in result.stdout and "password_env: TOKSEARCH_SQL_PASSWORD" in result.stdout
    assert secret not in result.stdout + result.stderr


# --------------------------------------------------------------------------- a real PostgreSQL server


@pytest.fixture(scope="module")
def postgres():
    sys.path.insert(0, str(Path(__file__).parent))
    from pg_server import PrivatePostgres, find_bindir

    if find_bindir() is None:
        if os.environ.get("TOKSEARCH_REQUIRE_SQL") == "1":
            pytest.fail("PostgreSQL required (TOKSEARCH_REQUIRE_SQL=1) but not installed: bash scripts/bootstrap.sh --tests")
        pytest.skip("PostgreSQL is not installed (bash scripts/bootstrap.sh --tests installs it)")
    server = PrivatePostgres().start()
    import psycopg

    with psycopg.connect(**server.params, autocommit=True) as conn:
        conn.execute("create table shots (shot integer, ip_max double precision, shot_type text, t_flat numeric(6,1))")
        with conn.cursor() as cur:
            cur.executemany("insert into shots values (%s, %s, %s, %s)",
                            [(s, ip, kind, decimal.Decimal("1180.5")) for s, ip, kind in SHOTS])
        conn.execute("create table big (shot numeric(10,0), v integer)")
        conn.execute("insert into big values (165930, 1), (165931, 2)")
    yield server
    server.stop()


@pytest.mark.sql
def test_from_sql_postgres(postgres):
    import psycopg

    with psycopg.connect(**postgres.params) as conn:
        p = Pipeline.from_sql(conn, "select shot, ip_max, t_flat from shots where shot_type = %s and shot > %s order by shot",
                              "plasma", 165920)
        p.map(peak)
        for got in (p.compute_serial(), p.compute_multiprocessing(num_workers=2)):
            assert [r.shot for r in got] == [165922, 165923]
            assert [r["double"] for r in got] == [3e6, 1.8e6]
            assert got[0]["t_flat"] == decimal.Decimal("1180.5")
        # A NUMERIC shot column still gives int shots.
        assert [r.shot for r in Pipeline.from_sql(conn, "select shot, v from big order by shot").compute_serial()] == [165930, 165931]
        with pytest.raises(MissingColumnName):  # PostgreSQL names it ?column?
            Pipeline.from_sql(conn, "select shot, 7 from shots")
        with pytest.raises(InvalidRecordField):
            Pipeline.from_sql(conn, "select shot, shot_type as key from shots")
        with pytest.raises(MissingShotNumber, match="no 'shot' column"):
            Pipeline.from_sql(conn, "select ip_max from shots")


@pytest.mark.sql
def test_connect_postgres_from_job_config_and_password_file(postgres, tmp_path, monkeypatch):
    from pg_server import PASSWORD

    secret = tmp_path / "pg_login"
    secret.write_text(f"tsl\n{PASSWORD}\n")
    os.chmod(secret, 0o600)
    job = tmp_path / "toksearch.yaml"
    job.write_text(
        "site:\n  sql:\n    driver: psycopg\n"
        f"    server: {postgres.socket_dir}\n    port: {postgres.params['port']}\n    database: postgres\n"
        f"    password_file: {secret}\n"
    )
    monkeypatch.setenv("TOKSEARCH_CONFIG", str(job))
    monkeypatch.delenv("TOKSEARCH_SQL_PASSWORD", raising=False)
    with connect() as conn:
        got = Pipeline.from_sql(conn, "select shot from shots order by shot").compute_serial()
    assert [r.shot for r in got] == [s for s, _, _ in SHOTS]

    # The environment variable, when the file is absent.
    secret.unlink()
    monkeypatch.setenv("TOKSEARCH_SQL_PASSWORD", PASSWORD)
    with connect(user="tsl") as conn:
        assert conn.execute("select count(*) from shots").fetchone()[0] == len(SHOTS)

    # A wrong password: one line, which never contains the password tried.
    monkeypatch.setenv("TOKSEARCH_SQL_PASSWORD", "wrong-pw-123")
    with pytest.raises(SqlConfigError) as info:
        connect(user="tsl")
    line = str(info.value)
    assert "\n" not in line and line.startswith(f"cannot connect to psycopg tsl@{postgres.socket_dir}")
    assert "wrong-pw-123" not in line and "password authentication failed" in line


@pytest.mark.sql
def test_from_sql_postgres_feeds_a_dataset_pipeline(postgres):
    """from_sql then fetch_dataset + align: the SQL columns and the signals land in one record."""
    import psycopg

    from toksearch_launch.signals import SyntheticSignal

    with psycopg.connect(**postgres.params) as conn:
        p = Pipeline.from_sql(conn, "select shot, ip_max from shots order by shot")
    p.fetch_dataset("ds", {"ip": SyntheticSignal("ip", n=50)})
    p.align("ds", np.linspace(0, 4000, 5), method="linear")
    got = p.compute_serial()
    assert [r.shot for r in got] == [s for s, _, _ in SHOTS]
    assert all(r["ds"]["ip"].shape == (5,) and r.errors == {} for r in got)
