"""Rows of a query as the source dicts of a Pipeline, checked the way TokSearch checks them."""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from toksearch_launch.pipeline.record import RESERVED_SOURCE_FIELDS, InvalidRecordField, MissingShotNumber

#: Names drivers give a column the query did not name (SQL Server: "", PostgreSQL: "?column?").
UNNAMED_COLUMNS = ("", "?column?")


class MissingColumnName(Exception):
    """A query column without a name (TokSearch: "Cannot use anonymous field names")."""


def column_names(description: Sequence[Sequence[Any]]) -> List[str]:
    """The result's column names, refusing unnamed, reserved, duplicate and shot-less results."""
    names = [None if col[0] is None else str(col[0]) for col in description]
    for position, name in enumerate(names, 1):
        if name is None or name in UNNAMED_COLUMNS:
            raise MissingColumnName(
                f"from_sql: column {position} of the query has no name; name it with AS (e.g. select 7 AS seven)"
            )
    for name in RESERVED_SOURCE_FIELDS:
        if name in names:
            raise InvalidRecordField(f"from_sql: the query returns a column {name!r}, which is reserved; rename it with AS")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"from_sql: the query returns column(s) {', '.join(duplicates)} more than once; rename them with AS")
    if "shot" not in names:
        raise MissingShotNumber(
            f"from_sql: the query returns no 'shot' column (columns: {', '.join(names) or 'none'}); "
            "select the shot number AS shot"
        )
    return names


def query_rows(conn: Any, query: str, params: Sequence[Any] = ()) -> List[Dict[str, Any]]:
    """Run ``query`` on a DB-API connection; one dict per row, keyed by column name.

    Parameters are passed to ``cursor.execute`` only when there are some, so a
    query without parameters may contain a literal ``%`` whatever the driver's
    paramstyle.
    """
    cursor = conn.cursor()
    try:
        if params:
            cursor.execute(query, tuple(params))
        else:
            cursor.execute(query)
        if cursor.description is None:
            raise ValueError("from_sql: the statement returned no rows (it is not a query)")
        names = column_names(cursor.description)
        return [dict(zip(names, row)) for row in cursor.fetchall()]
    finally:
        try:
            cursor.close()
        except Exception:
            pass
