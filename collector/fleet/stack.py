"""`collect stack`: least frequency of occurrence over a sweep's Parquet dataset, in DuckDB.

For each distinct value of the chosen fields, on how many hosts it appears and which,
rarest first: the process, module or mapping only one machine of the fleet has comes out on
top. DuckDB reads only the columns asked for from the Parquet files; nothing is loaded into
Python but the answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from collector.errors import CollectorError, UsageError
from collector.hookspecs import Field

#: How a row names its host: the host name, unless the capture did not know it (null, or the
#: kernel's default "(none)" of a machine whose name was never set): then the image's path,
#: so unnamed machines are not all counted as one.
HOST = "CASE WHEN hostname IS NULL OR hostname = '(none)' THEN image ELSE hostname END"

#: Arrow/DuckDB column types to the field types tables are shown with.
_DISPLAY = {"UBIGINT": "hex", "BIGINT": "int", "BOOLEAN": "bool"}


def dataset_glob(outdir: str, analysis: str) -> str:
    """The Parquet files of one analysis (what DuckDB's ``read_parquet`` takes)."""
    folder = Path(outdir, analysis)
    if not any(folder.glob("*.parquet")):
        raise CollectorError(f"stack: no {analysis} results under {outdir} (run `collect sweep`)")
    return str(folder / "*.parquet")


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def stack(
    outdir: str, analysis: str, fields: Sequence[str], max_hosts: int | None = None
) -> tuple[list[dict[str, Any]], list[Field], int]:
    """The stacked values of ``fields``, rarest first.

    :param max_hosts: keep only values seen on at most this many hosts.
    :returns: the records (the fields, ``hosts`` and ``host_names``), their fields for
        display, and the number of hosts in the dataset.
    :raises CollectorError: no results for the analysis, or a field it does not have.
    """
    import duckdb

    source = dataset_glob(outdir, analysis)
    con = duckdb.connect()
    try:
        described = con.execute(
            "DESCRIBE SELECT * FROM read_parquet(?, union_by_name = true)", [source]
        ).fetchall()
        columns = {row[0]: row[1] for row in described}  # name -> DuckDB type
        for name in fields:
            if name not in columns:
                raise UsageError(
                    f"stack: {analysis} has no field {name!r} (fields: {', '.join(columns)})"
                )
        chosen = ", ".join(_quote(f) for f in fields)
        having = "" if max_hosts is None else f"HAVING count(DISTINCT host) <= {int(max_hosts)}"
        query = f"""
            WITH rows AS (
                SELECT {chosen}, {HOST} AS host
                FROM read_parquet(?, union_by_name = true)
            )
            SELECT {chosen}, count(DISTINCT host) AS hosts,
                   string_agg(DISTINCT host, ',' ORDER BY host) AS host_names
            FROM rows
            GROUP BY ALL
            {having}
            ORDER BY hosts, {", ".join(f"{_quote(f)} NULLS FIRST" for f in fields)}
        """
        cursor = con.execute(query, [source])
        names = [d[0] for d in cursor.description]
        records = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        (total,) = con.execute(
            f"SELECT count(DISTINCT {HOST}) FROM read_parquet(?, union_by_name = true)", [source]
        ).fetchone()
    finally:
        con.close()
    shown = [Field(f, _DISPLAY.get(columns[f], "str"), f) for f in fields]
    shown += [
        Field("hosts", "int", "hosts the value appears on"),
        Field("host_names", "str", "those hosts"),
    ]
    return records, shown, total
