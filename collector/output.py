"""Render flat records as an aligned table for people, or as JSON, JSON lines or CSV for programs.

Tables show ``hex`` fields in hexadecimal and escape control characters (strings come from
untrusted memory); JSON and CSV keep numbers as integers and strings as they are.
"""

from __future__ import annotations

import csv
import itertools
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from collector.errors import CollectorError
from collector.hookspecs import Field
from collector.text import escape_text

if TYPE_CHECKING:
    from collector.analyze import AnalysisResult

FORMATS = ("table", "json", "jsonl", "csv")

#: Longest table cell but the last column's; longer strings end in "…" (machine formats
#: are never cut).
MAX_COLUMN_WIDTH = 60

_GAP = "  "
_NUMERIC = ("int", "hex")


def write_result(stream: TextIO, result: AnalysisResult, fmt: str) -> None:
    """Write an analysis' records, saying which plugin produced them.

    Tables get a title line; machine formats get ``plugin`` and ``plugin_version`` on every
    record, so a saved file still names its producer.
    """
    write_records(
        stream,
        result.records,
        result.fields,
        fmt,
        title=lambda count: result_title(result, count),
        constants={"plugin": result.plugin, "plugin_version": result.plugin_version},
    )


def result_title(result: AnalysisResult, count: int | None = None) -> str:
    """One line: analysis, record count (when known), image, kernel release and plugin version."""
    n = len(result.records) if isinstance(result.records, list) else count
    if n is None:
        text = f"{result.analysis.name}: records"
    else:
        text = f"{result.analysis.name}: {n} record{'' if n == 1 else 's'}"
    if result.image.path is not None:
        text += f" from {result.image.path}"
    if result.image.release is not None:
        text += f" ({result.image.release})"
    return escape_text(f"{text}, plugin {result.plugin} {result.plugin_version}")


#: Records a table holds before it prints; a longer table prints in blocks of this many, each
#: block's columns as wide as the widest cell seen so far.
TABLE_BLOCK = 10_000


def write_records(
    stream: TextIO,
    records: Iterable[Mapping[str, Any]],
    fields: Sequence[Field],
    fmt: str,
    *,
    title: str | Callable[[int | None], str] | None = None,
    constants: Mapping[str, Any] | None = None,
) -> None:
    """Write ``records`` in ``fmt`` (one of :data:`FORMATS`).

    :param fields: the columns, in order; a record's missing key is ``None``.
    :param title: a line above a table (ignored by machine formats), or what makes it from
        the number of records (``None`` when the table is printed before they are all read).
    :param constants: extra columns with the same value on every record, machine formats only.
    :raises CollectorError: an unknown format.
    """
    if fmt == "table":
        iterator = iter(records)
        first = list(itertools.islice(iterator, TABLE_BLOCK))
        whole = len(first) < TABLE_BLOCK
        if callable(title):
            title = title(len(first) if whole else None)
        if title is not None:
            stream.write(title + "\n")
        if whole:
            stream.write(format_table(first, fields))
            return
        widths: list[int] = []
        block = first
        while block:
            text, widths = _table_lines(block, fields, widths, header=not widths)
            stream.write(text)
            block = list(itertools.islice(iterator, TABLE_BLOCK))
        return
    names = [f.name for f in fields]
    constants = dict(constants or {})
    rows = ({**{n: r.get(n) for n in names}, **constants} for r in records)
    if fmt == "json":
        first = True
        for row in rows:
            stream.write(("[\n" if first else ",\n") + json.dumps(row))
            first = False
        stream.write("[]\n" if first else "\n]\n")
    elif fmt == "jsonl":
        for row in rows:
            stream.write(json.dumps(row) + "\n")
    elif fmt == "csv":
        writer = csv.writer(stream, lineterminator="\n")
        writer.writerow([*names, *constants])
        for row in rows:
            writer.writerow([_csv_cell(v) for v in row.values()])
    else:
        raise CollectorError(
            f"unknown output format {fmt!r} (formats: {', '.join(FORMATS)})", exit_code=2
        )


def format_table(records: Sequence[Mapping[str, Any]], fields: Sequence[Field]) -> str:
    """An aligned table; one record is shown as ``field  value`` lines, easier to read."""
    if not records:
        return "(no records)\n"
    if len(records) == 1:
        width = max(len(f.name) for f in fields)
        return "".join(
            f"{f.name:<{width}}{_GAP}{format_cell(records[0].get(f.name), f.type, None)}".rstrip()
            + "\n"
            for f in fields
        )
    return _table_lines(records, fields, [], header=True)[0]


def _table_lines(
    records: Sequence[Mapping[str, Any]],
    fields: Sequence[Field],
    at_least: Sequence[int],
    header: bool,
) -> tuple[str, list[int]]:
    """Aligned lines for ``records``, columns at least ``at_least`` wide; and the widths."""
    last = len(fields) - 1
    columns = [
        [
            format_cell(r.get(f.name), f.type, None if i == last else MAX_COLUMN_WIDTH)
            for r in records
        ]
        for i, f in enumerate(fields)
    ]
    widths = [max(len(f.name), *map(len, col)) for f, col in zip(fields, columns, strict=True)]
    widths = [max([w, *at_least[i : i + 1]]) for i, w in enumerate(widths)]
    right = [f.type in _NUMERIC for f in fields]

    def line(cells: Sequence[str]) -> str:
        parts = [
            c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)
        ]
        return _GAP.join(parts).rstrip() + "\n"

    out = [line([f.name for f in fields]), line(["-" * w for w in widths])] if header else []
    out.extend(line(row) for row in zip(*columns, strict=True))
    return "".join(out), widths


def format_cell(value: Any, field_type: str, limit: int | None = MAX_COLUMN_WIDTH) -> str:
    """How one value reads in a table: ``-`` for unknown, hex for ``hex`` fields.

    :param limit: the longest text returned (``None``: no limit).
    """
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "true" if value else "false"
    if field_type == "hex" and isinstance(value, int):
        return f"{value:#x}" if value >= 0 else f"-{-value:#x}"
    text = escape_text(str(value))
    if limit is not None and len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return value
