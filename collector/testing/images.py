"""Write test memory out as a native image file, as a capture would: blobs first, then RAM.

For tests of commands that take image files (``collect analyze``, ``collect sweep``)::

    write_native_image(sk.memory(), tmp_path / "host.lime.zst", host={"hostname": "web-1"})
"""

from __future__ import annotations

import os
from typing import Any

from collector.image.sparse import SparseMemory
from collector.image.writer import ImageWriter

#: Chunk size of the images written here (pages are written one chunk each).
CHUNK = 1 << 16


def write_native_image(
    memory: SparseMemory,
    path: str | os.PathLike[str],
    *,
    host: dict[str, Any] | None = None,
    start_time: str | None = None,
    end: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``memory``'s blobs and every page of its ranges to a new native image.

    Each page is its own range and chunk, as sparse test memory is. Pages of a fate other
    than read are not supported (the writer would need their fate runs).

    :param host: the header's ``host`` record (``hostname``, ``boot_id``, ``uname``...).
    :param start_time: the header's capture start (ISO 8601).
    :param end: extra fields of the END record.
    :returns: the END record, with the stream's SHA-256 the reader checks against.
    """
    if any(True for _ in memory.fate_runs()):
        raise ValueError("write_native_image: pages not read are not supported")
    metadata: dict[str, Any] = {"profile": "x86_64", **memory.metadata}
    if host is not None:
        metadata["host"] = host
    if start_time is not None:
        metadata["start_time"] = start_time
    with open(path, "wb") as out:
        writer = ImageWriter(
            out, page_size=memory.page_size, chunk_size=CHUNK, metadata=metadata, threads=1
        )
        try:
            for name in memory.blob_names():
                writer.add_blob(name, memory.blob(name) or b"")
            for start, stop in memory.ranges():
                for page in range(start, stop, memory.page_size):
                    data = memory.read(page, memory.page_size)
                    writer.add_chunk(page, data, [], page, page + memory.page_size)
            return writer.finish(dict(end or {}))
        finally:
            writer.close()
