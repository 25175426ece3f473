"""The columns of the sweep's Parquet files: an analysis' fields typed from their declaration,
provenance on every row, and the errors table.

Field types map to Arrow types one to one: ``str`` to string, ``int`` to int64, ``bool`` to
bool, and ``hex`` (addresses, offsets, masks) to uint64, the width of the kernel's unsigned
long. A negative ``hex`` value is stored as the unsigned long the kernel holds (its 64-bit
two's complement), so every address sorts and compares as the CPU sees it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from collector.hookspecs import Field

ARROW_TYPES = {"str": pa.string(), "int": pa.int64(), "hex": pa.uint64(), "bool": pa.bool_()}

_U64 = (1 << 64) - 1


@dataclass(frozen=True)
class Column:
    """A column the sweep adds, described like a :class:`Field` (whose names it may take:
    ``plugin`` is reserved to fields for exactly this use)."""

    name: str
    type: str
    description: str


#: Columns added to every row, after the analysis' own: which image, machine and plugin.
PROVENANCE = (
    Column("image", "str", "the image's path as the sweep was given it, made absolute"),
    Column(
        "image_sha256",
        "str",
        "SHA-256 of the image's memory stream: a collector image's END record"
        " (what `zstd -dc IMAGE | sha256sum` prints), the whole file for other formats;"
        " null for a collector image cut before its END",
    ),
    Column("hostname", "str", "the captured machine's host name"),
    Column("kernel_release", "str", "the captured kernel's release (uname -r)"),
    Column("boot_id", "str", "the captured boot's /proc/sys/kernel/random/boot_id"),
    Column("captured_at", "timestamp", "when the capture started (UTC)"),
    Column("plugin", "str", "the plugin that produced the row"),
    Column("plugin_version", "str", "that plugin's version"),
)
PROVENANCE_NAMES = tuple(f.name for f in PROVENANCE)

#: The errors table: one row per (image, analysis) pair that failed or stopped early.
ERROR_FIELDS = (
    Column("image", "str", "the image's absolute path"),
    Column("analysis", "str", "the analysis"),
    Column(
        "kind",
        "str",
        "cannot open, not a memory image, truncated, corrupted, unsupported, not applicable,"
        " stopped early (the rows before the failure are kept), error, or lost (the task's"
        " worker died)",
    ),
    Column("exit_code", "int32", "the exit status `collect analyze` ends with on this pair"),
    Column("error", "str", "the one line `collect analyze` prints (after `collect: `)"),
    Column("plugin", "str", "the plugin declaring the analysis"),
    Column("plugin_version", "str", "its version"),
)


def arrow_type(field: Field | Column) -> pa.DataType:
    """The Arrow type a field is stored as."""
    if field.type == "timestamp":
        return pa.timestamp("us", tz="UTC")
    if field.type == "int32":
        return pa.int32()
    return ARROW_TYPES[field.type]


def arrow_schema(
    fields: Sequence[Field | Column], metadata: dict[str, str] | None = None
) -> pa.Schema:
    """A schema of ``fields`` in order, with each field's description kept on its column."""
    return pa.schema(
        [pa.field(f.name, arrow_type(f), metadata={"description": f.description}) for f in fields],
        metadata=metadata,
    )


def result_schema(fields: Sequence[Field], metadata: dict[str, str] | None = None) -> pa.Schema:
    """An analysis' columns followed by the provenance columns."""
    return arrow_schema([*fields, *PROVENANCE], metadata)


def column_value(field_type: str, value: Any) -> Any:
    """A record's value as its column stores it (see the module docstring for ``hex``)."""
    if field_type == "hex" and isinstance(value, int) and value < 0:
        return value & _U64
    return value


def parse_time(text: Any) -> dt.datetime | None:
    """An ISO 8601 time from an image header, in UTC; None when it is not one."""
    if not isinstance(text, str):
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        return None
    return when.astimezone(dt.UTC)
