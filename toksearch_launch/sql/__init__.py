"""SQL sources for pipelines: ``Pipeline.from_sql(conn, query, *params)`` over any DB-API
connection, and connect helpers that read the server from the site config.

``connect()`` opens the site's database (``site.sql`` of the job's config, or of
``site=NAME``): driver, server, port, database and user come from the config, the
password from a 0600 file or an environment variable, never from the command line.
``toksearch_launch.sql.mssql.connect_d3drdb()`` is TokSearch's D3D helper.
"""

from toksearch_launch.sql.connect import SqlConfigError, connect, read_password, sql_options
from toksearch_launch.sql.query import MissingColumnName, query_rows

__all__ = ["MissingColumnName", "SqlConfigError", "connect", "query_rows", "read_password", "sql_options"]
