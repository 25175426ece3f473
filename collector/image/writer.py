"""Writes a native image in one pass: chunks compressed in parallel, frames written in order.

Memory stays bounded by the in-flight window (a few chunks per worker), whatever the RAM
size. Nothing is ever sought back, so the output can be a pipe or a socket. Every record is
sealed with a CRC-32, each DESC carries the XXH3-64 hash of its DATA frame (computed by the
worker that compressed it, while the frame is still in its cache), and END holds a SHA-256 of every
record before it that is not RAM, so each byte of the image is covered by some check.

The whole decompressed stream is hashed in order, with SHA-256 (one core: about 0.6
core-seconds per GiB here, so on many cores the one stage that does not scale) or with BLAKE3,
a tree hash whose every update of a chunk is spread over all cores.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid as uuidlib
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO

import zstandard

from collector.image import format as fmt
from collector.image.lime import write_lime_header
from collector.memory import Fate, FateRun


class OutputError(OSError):
    """Writing the image failed (disk full, broken pipe); what was written stays readable."""


@dataclass
class _Pending:
    desc: fmt.Desc
    compressed: Future[tuple[bytes, int]]  # the DATA frame and its hash
    hashed: Future[None]


class ImageWriter:
    """Stream an image to ``out``.

    :param out: a binary file object opened for writing; only ``write`` and ``flush`` are used.
    :param page_size: the page size fates are accounted in.
    :param chunk_size: RAM bytes per chunk (chunks are aligned to physical addresses).
    :param metadata: the header's JSON metadata (identity, plan, iomem...).
    :param level: zstd compression level.
    :param threads: compression workers (one compressor each).
    :param stream_hash: the whole-stream hash END records (a key of :data:`STREAM_HASHES`);
        anything but SHA-256 makes the image format version 3, which older readers refuse
        rather than report its hash as wrong.
    """

    def __init__(
        self,
        out: BinaryIO,
        *,
        page_size: int,
        chunk_size: int,
        metadata: dict,
        level: int = 1,
        threads: int | None = None,
        capture_uuid: bytes | None = None,
        stream_hash: str = "sha256",
        version: int | None = None,
    ) -> None:
        self.out = out
        self.page_size = page_size
        self.chunk_size = chunk_size
        self.level = level
        self.threads = max(1, threads or os.cpu_count() or 1)
        self.uuid = capture_uuid or uuidlib.uuid4().bytes
        self.position = 0
        self.frames: list[tuple[int, int]] = []
        self.index: list[fmt.IndexRow] = []
        self.stream_hash_name = stream_hash
        self.stream_hash = fmt.stream_hasher(stream_hash)
        self.version = version or (fmt.FORMAT_VERSION if stream_hash == "sha256" else 3)
        self.metadata_hash = hashlib.sha256()
        self.stream_bytes = 0
        self.seq = 0
        self.fate_pages: dict[str, int] = {f.label: 0 for f in Fate if f < Fate.OUTSIDE}
        if self.version >= fmt.READ_ZERO_VERSION:
            # Counted even when none is found: the image says they were looked for.
            self.fate_pages[Fate.READ_ZERO.label] = 0
        self.unreadable_errnos: dict[int, int] = {}
        self.broken: OutputError | None = None
        self._t0 = time.monotonic_ns()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="zstd")
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix=stream_hash)
        self._io = ThreadPoolExecutor(1, thread_name_prefix="write")
        self._written: deque[Future[None]] = deque()
        self._window: deque[_Pending] = deque()
        self._zero_frames: dict[int, tuple[bytes, int]] = {}
        self._zeros = b""
        self._write_record(
            fmt.Header(page_size, chunk_size, self.uuid, metadata, self.version).encode()
        )

    # -- low level -------------------------------------------------------------------------

    def _compressor(self) -> zstandard.ZstdCompressor:
        c = getattr(self._local, "c", None)
        if c is None:
            c = zstandard.ZstdCompressor(
                level=self.level, write_checksum=True, write_content_size=True
            )
            self._local.c = c
        return c

    def _compress(self, data: bytes) -> bytes:
        return self._compressor().compress(data)

    def _compress_data(self, data: bytes) -> tuple[bytes, int]:
        frame = self._compressor().compress(data)
        return frame, fmt.data_hash(frame)

    def _write_record(self, frame: bytes) -> int:
        """Write a record that END's metadata hash covers (HEADER, BLOB, DESC)."""
        self.metadata_hash.update(frame)
        return self._write(frame, 0)

    def _write(self, frame: bytes, decompressed: int) -> int:
        """Queue one whole frame for the output thread; returns its file offset.

        Writing happens on its own thread, in order, so a slow disk or pipe does not stall
        reading. A failed write surfaces here, on a later call, or in :meth:`flush`.
        """
        if self.broken:
            raise self.broken
        offset = self.position
        self.position += len(frame)
        self.frames.append((len(frame), decompressed))
        self._written.append(self._io.submit(self._write_all, frame))
        while len(self._written) > 2 * self.threads:
            self._written.popleft().result()
        return offset

    def _write_all(self, data: bytes) -> None:
        if self.broken:
            raise self.broken
        # Raw files and pipes may take part of a write (a disk filling up does this first).
        view = memoryview(data)
        try:
            while view:
                n = self.out.write(view)
                view = view[len(view) if n is None else n :]
        except OSError as e:
            self.broken = OutputError(e.errno, e.strerror)
            raise self.broken from e

    def _wait_written(self) -> None:
        while self._written:
            self._written.popleft().result()

    # -- records -----------------------------------------------------------------------------

    def add_blob(self, name: str, data: bytes) -> None:
        """Write a metadata blob now (before the RAM, so an early cut keeps it)."""
        blob = fmt.Blob(name, len(data), hashlib.sha256(data).digest(), self._compress(data))
        frame = blob.encode(self.version)
        offset = self._write_record(frame)
        self.index.append(
            fmt.IndexRow(fmt.INDEX_BLOB, 0, len(data), offset, len(frame), 0, 0, name)
        )

    def add_chunk(
        self,
        paddr: int,
        data: bytes | bytearray,
        runs: list[FateRun],
        range_start: int | None = None,
        range_end: int | None = None,
    ) -> None:
        """Queue one chunk of RAM starting at ``paddr``.

        :param data: the chunk's bytes; pages that were not read must already be zero.
        :param runs: the pages whose fate is not READ (page indexes within the chunk).
        :param range_start: when this chunk opens a range, the range's start and (exclusive)
            end: a LiME header for the whole range leads the chunk's DATA frame.
        """
        flags = 0
        payload = data
        if range_start is not None and range_end is not None:
            payload = write_lime_header(range_start, range_end - 1) + data
            flags |= fmt.DESC_FLAG_LIME_HEADER
        unread = self._account(paddr, len(data), runs)
        desc = fmt.Desc(self.seq, paddr, len(data), 0, flags, time.monotonic_ns() - self._t0, runs)
        self.seq += 1
        # A chunk none of whose pages was read is zeros (the caller's promise): comparing
        # it costs a pass over its bytes, which a --skip capture would pay for most chunks.
        if not flags and (unread or self._is_zero(payload)):
            compressed: Future[tuple[bytes, int]] = Future()
            compressed.set_result(self._zero_frame(len(payload)))
        else:
            compressed = self._pool.submit(self._compress_data, payload)
        hashed = self._hasher.submit(self._hash, payload)
        self._window.append(_Pending(desc, compressed, hashed))
        while len(self._window) > 2 * self.threads:
            self._drain_one()

    def _is_zero(self, payload: bytes) -> bool:
        if len(self._zeros) < len(payload):
            self._zeros = bytes(len(payload))
        return payload == self._zeros[: len(payload)]

    def _zero_frame(self, size: int) -> tuple[bytes, int]:
        frame = self._zero_frames.get(size)
        if frame is None:
            frame = self._zero_frames[size] = self._compress_data(bytes(size))
        return frame

    def _hash(self, payload: bytes) -> None:
        self.stream_hash.update(payload)
        self.stream_bytes += len(payload)

    def _account(self, paddr: int, size: int, runs: list[FateRun]) -> bool:
        """Count the chunk's pages by fate; True when every page has a fate whose bytes are
        zeros (not read, or read and found all zeros)."""
        pages = (paddr % self.page_size + size + self.page_size - 1) // self.page_size
        not_read = 0
        for r in runs:
            if r.fate == Fate.READ_ZERO and self.version < fmt.READ_ZERO_VERSION:
                raise ValueError(f"read-zero pages need image format version 4, not {self.version}")
            # Fates after OUTSIDE (skipped pages) are listed only when a capture has them.
            self.fate_pages[r.fate.label] = self.fate_pages.get(r.fate.label, 0) + r.count
            not_read += r.count
            if r.fate == Fate.UNREADABLE:
                self.unreadable_errnos[r.errno] = self.unreadable_errnos.get(r.errno, 0) + r.count
        self.fate_pages[Fate.READ.label] += pages - not_read
        return not_read >= pages

    def _drain_one(self) -> None:
        p = self._window.popleft()
        frame, digest = p.compressed.result()
        p.hashed.result()
        p.desc.data_size = len(frame)
        p.desc.data_hash = digest
        desc_frame = p.desc.encode(self.version)
        offset = self._write_record(desc_frame)
        self._write(frame, p.desc.stream_bytes)
        self.index.append(
            fmt.IndexRow(
                fmt.INDEX_CHUNK,
                p.desc.paddr,
                p.desc.ram_bytes,
                offset,
                len(desc_frame),
                len(frame),
                p.desc.seq,
            )
        )

    def flush(self) -> None:
        """Write every queued chunk."""
        while self._window:
            self._drain_one()
        self._wait_written()
        try:
            self.out.flush()
        except OSError as e:
            self.broken = OutputError(e.errno, e.strerror)
            raise self.broken from e

    def finish(self, end: dict, clean: bool = True) -> dict:
        """Write the END, INDEX and seek-table records; returns the END record's JSON.

        :param end: extra fields for the END record (end time, reason for stopping...).
        :param clean: False when the capture was interrupted: the image is complete and
            valid, but did not cover everything the plan asked for.
        """
        self.flush()
        record = dict(end)
        record.update(
            {
                "clean": clean,
                "chunks": self.seq,
                "stream_bytes": self.stream_bytes,
                **fmt.stream_hash_fields(self.stream_hash_name, self.stream_hash.hexdigest()),
                "metadata_sha256": self.metadata_hash.hexdigest(),
                "pages": dict(self.fate_pages),
                "unreadable_errnos": {str(k): v for k, v in sorted(self.unreadable_errnos.items())},
            }
        )
        self._write(fmt.encode_end(record, self.version), 0)
        self._write(fmt.encode_index(self.index, self.version), 0)
        table = fmt.encode_seek_table(self.frames)
        self._wait_written()
        self._write_all(table)
        self.position += len(table)
        self.flush()
        self.close()
        return record

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._hasher.shutdown(wait=True, cancel_futures=True)
        self._io.shutdown(wait=True, cancel_futures=True)
