"""One (image, analysis) pair of a sweep, as it runs on a worker: open the image, skip it if
its output is already there for the same image and plugin version, run the analysis, and
write the rows to the pair's own Parquet file (or its one-line error to the errors table).

Every file is written under a temporary name beside its final one and renamed into place
when complete, so a worker killed part-way leaves no half file in the dataset (a leftover
``.tmp-*`` file is not matched by ``*.parquet``). Only a small summary goes back to the
scheduler.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from collector.errors import CollectorError, NotApplicable
from collector.fleet import provenance
from collector.fleet.schema import (
    ERROR_FIELDS,
    PROVENANCE,
    arrow_schema,
    column_value,
    parse_time,
    result_schema,
)
from collector.plugin_manager import PluginManager

#: The errors table's folder under OUTDIR (no analysis may take the name).
ERRORS = "errors"

#: Schema metadata key holding what the file was made from (JSON).
META_KEY = "collector.sweep"

#: Rows per Parquet row group: large enough to compress well, small enough that an analysis
#: with millions of rows (pages, kallsyms) never holds them all.
BATCH_ROWS = 65_536

#: Summary statuses.
WRITTEN, SKIPPED, FAILED = "written", "skipped", "failed"

_manager: PluginManager | None = None


def manager() -> PluginManager:
    """This process's plugin manager, loaded once (a worker runs many pairs)."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def stem(image: str) -> str:
    """The file name a pair's outputs share: the image's name and a hash of its full path
    (two hosts' ``mem.lime.zst`` in different folders stay apart)."""
    digest = hashlib.sha256(image.encode("utf-8", "surrogateescape")).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in os.path.basename(image))
    return f"{name}-{digest}"


def output_path(outdir: str, analysis: str, image: str) -> Path:
    return Path(outdir, analysis, stem(image) + ".parquet")


def error_path(outdir: str, analysis: str, image: str) -> Path:
    return Path(outdir, ERRORS, analysis, stem(image) + ".parquet")


def temp_path(final: Path) -> Path:
    return final.with_name(f"{final.name}.tmp-{socket.gethostname()}-{os.getpid()}")


def recorded(path: Path) -> dict[str, Any] | None:
    """What an existing output says it was made from, or None (absent or unreadable)."""
    try:
        # The key-value metadata of the file's footer: read without reading any row.
        meta = pq.ParquetFile(path).metadata.metadata or {}
        return json.loads(meta[META_KEY.encode()])
    except (OSError, KeyError, ValueError, pa.ArrowException):
        return None


def run_pair(image: str, analysis: str, outdir: str, force: bool = False) -> dict[str, Any]:
    """Run ``analysis`` on ``image`` into ``outdir``; never raises for a bad image.

    :returns: ``{"image", "analysis", "status", "records", "error"}``, status one of
        written, skipped, failed (``error`` is set for failed and for rows stopped early).
    """
    from collector.analyze import analyze_kernel
    from collector.image.open import open_image
    from collector.kernel.kernel import Kernel

    pm = manager()
    out = output_path(outdir, analysis, image)
    summary: dict[str, Any] = {
        "image": image,
        "analysis": analysis,
        "status": FAILED,
        "records": 0,
        "error": None,
    }
    try:
        # Checked by the client already; a worker of a shared cluster may lack the plugin.
        registered = pm.analysis(analysis)
    except CollectorError as e:
        return _failed(summary, outdir, None, None, e)
    plugin, version = registered.plugin.name, registered.plugin.version
    try:
        memory = open_image(image)
    except CollectorError as e:
        return _failed(summary, outdir, plugin, version, e)
    try:
        digest = provenance.image_hash(image, memory)
        before = None if force else recorded(out)
        if (
            before is not None
            and digest is not None
            and before.get("image_sha256") == digest
            and before.get("plugin") == plugin
            and before.get("plugin_version") == version
        ):
            summary.update(status=SKIPPED, records=before.get("records", 0))
            return summary
        identity = provenance.header_identity(memory)
        kernel = Kernel(memory)
        provenance.fill_from_kernel(identity, kernel, pm)
        result = analyze_kernel(kernel, analysis, manager=pm, image_path=image, stream=True)
        constants = {
            "image": image,
            "image_sha256": digest,
            **identity,
            "captured_at": parse_time(identity["captured_at"]),
            "plugin": plugin,
            "plugin_version": version,
        }
        meta = {
            "image": image,
            "image_sha256": digest,
            "analysis": analysis,
            "plugin": plugin,
            "plugin_version": version,
        }
        count = _write_rows(out, result.fields, result.records, constants, meta)
        summary["records"] = count
        error = result.final_error()
        if error is not None:
            # As `collect analyze`: the rows before the failure stand, and it exits 1.
            summary["error"] = error
            _write_error(outdir, image, analysis, "stopped early", 1, error, plugin, version)
        else:
            _remove(error_path(outdir, analysis, image))
        summary["status"] = WRITTEN
        return summary
    except CollectorError as e:
        return _failed(summary, outdir, plugin, version, e)
    except Exception as e:
        # A bug (here or in a plugin) outside the analysis' own guard: one line, not a
        # traceback, and the sweep goes on.
        message = f"{type(e).__name__}: {_one_line(e)}"
        return _failed(summary, outdir, plugin, version, CollectorError(message), "error")
    finally:
        memory.close()


def _failed(
    summary: dict[str, Any],
    outdir: str,
    plugin: str | None,
    version: str | None,
    e: CollectorError,
    kind: str | None = None,
) -> dict[str, Any]:
    image, analysis = summary["image"], summary["analysis"]
    message = _one_line(e)
    if kind is None:
        kind = getattr(e, "kind", None) or (
            "not applicable" if isinstance(e, NotApplicable) else "error"
        )
    _write_error(outdir, image, analysis, kind, e.exit_code, message, plugin, version)
    # Rows of an earlier run describe an image that no longer reads: not this one.
    _remove(output_path(outdir, analysis, image))
    summary.update(status=FAILED, error=message)
    return summary


def write_lost(outdir: str, image: str, analysis: str, message: str) -> None:
    """Record a pair whose worker died under it (no worker could write it)."""
    try:
        registered = manager().analysis(analysis)
        plugin, version = registered.plugin.name, registered.plugin.version
    except CollectorError:
        plugin = version = None
    _write_error(outdir, image, analysis, "lost", 1, message, plugin, version)


def _write_error(
    outdir: str,
    image: str,
    analysis: str,
    kind: str,
    exit_code: int,
    message: str,
    plugin: str | None,
    version: str | None,
) -> None:
    row = {
        "image": image,
        "analysis": analysis,
        "kind": kind,
        "exit_code": exit_code,
        "error": message,
        "plugin": plugin,
        "plugin_version": version,
    }
    table = pa.Table.from_pylist([row], schema=arrow_schema(ERROR_FIELDS))
    final = error_path(outdir, analysis, image)
    _atomic(final, lambda tmp: pq.write_table(table, tmp))


def _write_rows(
    out: Path,
    fields: tuple,
    records: Any,
    constants: dict[str, Any],
    meta: dict[str, Any],
) -> int:
    """Stream records into ``out`` in row groups; returns how many were written."""
    count = 0

    def write(tmp: Path) -> None:
        nonlocal count
        schema = result_schema(fields)
        columns = [(f.name, f.type) for f in fields]
        batch: dict[str, list[Any]] = {name: [] for name, _ in columns}
        writer = pq.ParquetWriter(tmp, schema.with_metadata(None))

        def flush() -> None:
            n = len(next(iter(batch.values()))) if batch else 0
            if n == 0:
                return
            data = {**batch, **{p.name: [constants[p.name]] * n for p in PROVENANCE}}
            writer.write_table(pa.Table.from_pydict(data, schema=schema.with_metadata(None)))
            for values in batch.values():
                values.clear()

        try:
            for record in records:
                for name, kind in columns:
                    batch[name].append(column_value(kind, record[name]))
                count += 1
                if count % BATCH_ROWS == 0:
                    flush()
            flush()
            meta["records"] = count
            writer.add_key_value_metadata({META_KEY: json.dumps(meta, sort_keys=True)})
        finally:
            writer.close()

    _atomic(out, write)
    return count


def _atomic(final: Path, write: Any) -> None:
    """Write through a temporary name beside ``final``; rename it into place when complete."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(final)
    try:
        write(tmp)
        os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


def _one_line(e: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__
