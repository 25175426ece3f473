"""Reads native images: random access through the index, or a frame scan when cut short.

A complete image ends with an INDEX record and the zstd seekable-format seek table, so any
page is found without reading the RAM before it. An image cut short (killed, disk full) has
neither; it is then scanned frame by frame from the start, which needs only the skippable
frame headers because each DESC gives the size of the DATA frame after it.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import struct
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

import zstandard

from collector.errors import ImageError
from collector.image import format as fmt
from collector.image.lime import LIME_HEADER_SIZE
from collector.memory import Fate, FateRun, PageFate, PageNotCaptured

_CACHE_CHUNKS = 8


@dataclass
class ChunkRef:
    """Where one chunk lives in the file; its DESC is read when first needed."""

    seq: int
    paddr: int
    ram_bytes: int
    desc_offset: int
    desc_size: int
    data_size: int
    desc: fmt.Desc | None = None

    @property
    def end(self) -> int:
        return self.paddr + self.ram_bytes

    @property
    def data_offset(self) -> int:
        return self.desc_offset + self.desc_size


@dataclass
class BlobRef:
    name: str
    offset: int
    frame_size: int


class NativeImage:
    """A native ``.lime.zst`` image as :class:`~collector.memory.PhysicalMemory`.

    :param path: the image file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        try:
            self._f = open(self.path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise ImageError(f"{self.path}: cannot open: {e.strerror}") from None
        self.size = os.fstat(self._f.fileno()).st_size
        self._dctx = zstandard.ZstdDecompressor()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self.chunks: list[ChunkRef] = []
        self.blobs: dict[str, BlobRef] = {}
        self.end: dict | None = None
        self.problems: list[str] = []
        self.indexed = False
        head = self._frame_head(0)
        if head is None or head[0] != fmt.HEADER:
            raise ImageError(f"{self.path}: not a collector image (no header record)")
        self.header = fmt.Header.decode(self._read_at(fmt.FRAME_HEAD.size, head[1]))
        self.page_size = self.header.page_size
        self.metadata = self.header.metadata
        if not self._load_index():
            self._scan()
        self.chunks.sort(key=lambda c: c.paddr)
        self._starts = [c.paddr for c in self.chunks]
        self._planned = _planned_ranges(self.metadata.get("ranges", []))

    # -- file access ---------------------------------------------------------------------------

    def _read_at(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ImageError(f"{self.path}: record at {offset} runs past the end of the file")
        data = os.pread(self._f.fileno(), size, offset)
        if len(data) != size:
            raise ImageError(f"{self.path}: short read at {offset}")
        return data

    def _frame_head(self, offset: int) -> tuple[int, int] | None:
        if offset + fmt.FRAME_HEAD.size > self.size:
            return None
        return fmt.FRAME_HEAD.unpack(self._read_at(offset, fmt.FRAME_HEAD.size))

    # -- locating records ----------------------------------------------------------------------

    def _load_index(self) -> bool:
        """Use the seek table and INDEX at the end of the file; False when they are absent."""
        if self.size < 17:
            return False
        try:
            _, table_size = fmt.decode_seek_footer(self._read_at(self.size - 9, 9))
            if table_size > self.size:
                return False
            table_start = self.size - table_size
            head = self._frame_head(table_start)
            if head != (fmt.SEEK_TABLE, table_size - fmt.FRAME_HEAD.size):
                return False
            frames = fmt.decode_seek_table(self._read_at(table_start + 8, table_size - 8))
            if not frames or sum(c for c, _ in frames) != table_start:
                return False
            index_size = frames[-1][0]
            index_offset = table_start - index_size
            head = self._frame_head(index_offset)
            if head != (fmt.INDEX, index_size - 8):
                return False
            rows = fmt.decode_index(self._read_at(index_offset + 8, index_size - 8))
            end_size = frames[-2][0] if len(frames) > 1 else 0
            head = self._frame_head(index_offset - end_size)
            if head is None or head[0] != fmt.END:
                return False
            self.end = self._json(self._read_at(index_offset - end_size + 8, head[1]), "end")
        except (ImageError, struct.error):
            return False
        for r in rows:
            if r.kind == fmt.INDEX_CHUNK:
                self.chunks.append(
                    ChunkRef(r.seq, r.paddr, r.ram_bytes, r.offset, r.frame_size, r.data_size)
                )
            elif r.kind == fmt.INDEX_BLOB:
                self.blobs[r.name] = BlobRef(r.name, r.offset, r.frame_size)
        self.indexed = True
        return True

    def _frames(self, stops: list[str]) -> Iterator[tuple[int, int, int, fmt.Desc | None]]:
        """Every complete record from the start of the file, bounds-checked:
        ``(offset, magic, frame size, Desc for a DESC record else None)``.

        Where the file is cut short the walk ends and the reason is appended to ``stops``;
        a frame that is not a skippable one raises :class:`_NotAFrame`, and a damaged DESC
        raises :class:`ImageError`. A DESC is yielded only when its DATA frame is whole.
        """
        offset = 0
        while offset < self.size:
            head = self._frame_head(offset)
            if head is None:
                stops.append(f"image ends inside a frame header at byte {offset}")
                return
            magic, length = head
            if magic & 0xFFFFFFF0 != fmt.SKIPPABLE_BASE:
                raise _NotAFrame(f"unexpected frame {magic:#x} at byte {offset}")
            frame_size = fmt.FRAME_HEAD.size + length
            if offset + frame_size > self.size:
                stops.append(f"image is cut short inside a record at byte {offset}")
                return
            desc = None
            if magic == fmt.DESC:
                desc = fmt.Desc.decode(self._read_at(offset + 8, length))
                if offset + frame_size + desc.data_size > self.size:
                    stops.append(f"image is cut short inside chunk {desc.seq} at {desc.paddr:#x}")
                    return
            yield offset, magic, frame_size, desc
            offset += frame_size + (desc.data_size if desc else 0)

    def _scan(self) -> None:
        """Walk every frame from the start: the way to read an image that was cut short."""
        try:
            for offset, magic, frame_size, desc in self._frames(self.problems):
                if desc is not None:
                    self.chunks.append(
                        ChunkRef(
                            desc.seq,
                            desc.paddr,
                            desc.ram_bytes,
                            offset,
                            frame_size,
                            desc.data_size,
                            desc,
                        )
                    )
                elif magic == fmt.BLOB:
                    payload = self._read_at(offset + 8, min(frame_size - 8, 1024))
                    name = fmt.Blob.decode(payload).name
                    self.blobs[name] = BlobRef(name, offset, frame_size)
                elif magic == fmt.END:
                    self.end = self._json(self._read_at(offset + 8, frame_size - 8), "end")
        except _NotAFrame as e:
            self.problems.append(str(e))

    def _json(self, payload: bytes, what: str) -> dict:
        try:
            value = json.loads(payload.decode())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ImageError(f"{self.path}: the {what} record is not valid JSON") from None
        if not isinstance(value, dict):
            raise ImageError(f"{self.path}: the {what} record is not a JSON object")
        return value

    # -- chunks ---------------------------------------------------------------------------------

    def _desc(self, chunk: ChunkRef) -> fmt.Desc:
        if chunk.desc is None:
            payload = self._read_at(chunk.desc_offset + 8, chunk.desc_size - 8)
            chunk.desc = fmt.Desc.decode(payload)
            if chunk.desc.paddr != chunk.paddr or chunk.desc.ram_bytes != chunk.ram_bytes:
                raise ImageError(f"{self.path}: index and descriptor of chunk {chunk.seq} disagree")
        return chunk.desc

    def _chunk_bytes(self, chunk: ChunkRef) -> bytes:
        cached = self._cache.get(chunk.seq)
        if cached is not None:
            self._cache.move_to_end(chunk.seq)
            return cached
        desc = self._desc(chunk)
        frame = self._read_at(chunk.data_offset, chunk.data_size)
        expected = desc.stream_bytes
        try:
            data = self._dctx.decompress(frame, max_output_size=expected)
        except zstandard.ZstdError as e:
            raise ImageError(
                f"{self.path}: chunk {chunk.seq} at {chunk.paddr:#x} is corrupt: {e}"
            ) from None
        if len(data) != expected:
            raise ImageError(
                f"{self.path}: chunk {chunk.seq} at {chunk.paddr:#x} has the wrong size"
            )
        if desc.has_lime_header:
            data = data[LIME_HEADER_SIZE:]
        self._cache[chunk.seq] = data
        if len(self._cache) > _CACHE_CHUNKS:
            self._cache.popitem(last=False)
        return data

    def _chunk_at(self, paddr: int) -> ChunkRef | None:
        i = bisect.bisect_right(self._starts, paddr) - 1
        if i >= 0 and paddr < self.chunks[i].end:
            return self.chunks[i]
        return None

    def _run_fate(self, chunk: ChunkRef, paddr: int) -> PageFate:
        page = paddr // self.page_size - chunk.paddr // self.page_size
        for run in self._desc(chunk).runs:
            if run.start <= page < run.start + run.count:
                return PageFate(run.fate, run.errno)
        return PageFate(Fate.READ)

    # -- PhysicalMemory -----------------------------------------------------------------------

    def ranges(self) -> list[tuple[int, int]]:
        """The planned ranges (the LiME ranges); pages of them absent from a cut image are MISSING."""
        return list(self._planned) if self._planned else self.captured_ranges()

    def captured_ranges(self) -> list[tuple[int, int]]:
        """The ranges the image's chunks really hold, adjacent chunks merged."""
        out: list[tuple[int, int]] = []
        for c in self.chunks:
            if out and out[-1][1] == c.paddr:
                out[-1] = (out[-1][0], c.end)
            else:
                out.append((c.paddr, c.end))
        return out

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Parts of the planned ranges the capture did not reach: held by no chunk (a cut
        image), or held as zero padding recorded MISSING (a capture stopped by a signal)."""
        holes = _subtract(self.ranges(), self.captured_ranges())
        for chunk in self.chunks:
            base = chunk.paddr - chunk.paddr % self.page_size
            for r in self._desc(chunk).runs:
                if r.fate == Fate.MISSING:
                    lo = max(chunk.paddr, base + r.start * self.page_size)
                    holes.append((lo, min(chunk.end, base + (r.start + r.count) * self.page_size)))
        return _merge(sorted(holes))

    def fate(self, paddr: int) -> PageFate:
        chunk = self._chunk_at(paddr)
        if chunk is not None:
            return self._run_fate(chunk, paddr)
        if any(s <= paddr < e for s, e in self.ranges()):
            return PageFate(Fate.MISSING)
        return PageFate(Fate.OUTSIDE)

    def _first_unread(self, chunk: ChunkRef, start: int, end: int) -> int | None:
        """The address of the first page of ``[start, end)`` in ``chunk`` that was not read."""
        base = chunk.paddr // self.page_size
        lo = start // self.page_size - base
        hi = -(-end // self.page_size) - base
        first = None
        for run in self._desc(chunk).runs:
            if run.fate != Fate.READ and run.start < hi and run.start + run.count > lo:
                page = max(run.start, lo)
                first = page if first is None else min(first, page)
        return None if first is None else (base + first) * self.page_size

    def read(self, paddr: int, size: int) -> bytes:
        out = bytearray()
        while size > 0:
            chunk = self._chunk_at(paddr)
            if chunk is None:
                raise PageNotCaptured(paddr, self.fate(paddr).fate)
            end = min(chunk.end, paddr + size)
            # Whole runs of read pages are copied at once (the memory map is read megabytes
            # at a time); the first page that was not read ends the run, or the read.
            unread = self._first_unread(chunk, paddr, end)
            if unread is not None:
                if unread <= paddr:
                    fate = self._run_fate(chunk, paddr)
                    raise PageNotCaptured(paddr - paddr % self.page_size, fate.fate, fate.errno)
                end = unread
            data = self._chunk_bytes(chunk)
            if not out and end - paddr == size:  # all in one piece: one copy
                return data[paddr - chunk.paddr : end - chunk.paddr]
            out += memoryview(data)[paddr - chunk.paddr : end - chunk.paddr]
            size -= end - paddr
            paddr = end
        return bytes(out)

    def blob(self, name: str) -> bytes | None:
        ref = self.blobs.get(name)
        if ref is None:
            return None
        return self._blob_data(fmt.Blob.decode(self._read_at(ref.offset + 8, ref.frame_size - 8)))

    def _blob_data(self, blob: fmt.Blob) -> bytes:
        try:
            data = self._dctx.decompress(blob.frame, max_output_size=blob.raw_length)
        except zstandard.ZstdError as e:
            raise ImageError(f"{self.path}: blob {blob.name!r} is corrupt: {e}") from None
        if len(data) != blob.raw_length or hashlib.sha256(data).digest() != blob.sha256:
            raise ImageError(f"{self.path}: blob {blob.name!r} does not match its SHA-256")
        return data

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> NativeImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- whole-image views ---------------------------------------------------------------------

    def fate_runs(self) -> Iterator[FateRun]:
        """Every run of pages whose fate is not READ, in physical order, with absolute addresses."""
        for chunk in self.chunks:
            base = chunk.paddr - chunk.paddr % self.page_size
            for r in self._desc(chunk).runs:
                yield FateRun(base + r.start * self.page_size, r.count, r.fate, r.errno)

    def verify(self) -> VerifyReport:
        """Decompress every frame in file order, checking each checksum and the stream hash."""
        report = VerifyReport(complete=self.end is not None and not self.problems)
        stream = hashlib.sha256()
        expected_seq = 0
        try:
            # A cut-short tail is already in self.problems; the walk just ends there.
            for offset, magic, frame_size, desc in self._frames([]):
                if desc is not None:
                    if desc.seq != expected_seq:
                        report.errors.append(
                            f"chunk {desc.seq} found where chunk {expected_seq} belongs"
                        )
                    expected_seq = desc.seq + 1
                    frame = self._read_at(offset + frame_size, desc.data_size)
                    expected = desc.stream_bytes
                    try:
                        data = self._dctx.decompress(frame, max_output_size=expected)
                        if len(data) != expected:
                            raise zstandard.ZstdError("wrong decompressed size")
                    except zstandard.ZstdError as e:
                        report.errors.append(f"chunk {desc.seq} at {desc.paddr:#x}: {e}")
                        data = b""
                    stream.update(data)
                    report.chunks += 1
                    report.stream_bytes += len(data)
                elif magic == fmt.BLOB:
                    try:
                        blob = fmt.Blob.decode(self._read_at(offset + 8, frame_size - 8))
                        self._blob_data(blob)
                        report.blobs.append(blob.name)
                    except ImageError as e:
                        report.errors.append(str(e))
        except ImageError as e:  # a foreign frame or a damaged DESC ends the walk
            report.errors.append(str(e))
        report.stream_sha256 = stream.hexdigest()
        if self.end is not None:
            if self.end.get("stream_sha256") != report.stream_sha256:
                report.errors.append(
                    "whole-stream SHA-256 does not match the one the image records "
                    f"({report.stream_sha256} != {self.end.get('stream_sha256')})"
                )
            if self.end.get("chunks") != report.chunks:
                report.errors.append(
                    f"image records {self.end.get('chunks')} chunks but holds {report.chunks}"
                )
        report.missing = self.missing_ranges()
        report.problems = list(self.problems)
        return report


@dataclass
class VerifyReport:
    """What `collect verify` found."""

    complete: bool
    chunks: int = 0
    stream_bytes: int = 0
    stream_sha256: str = ""
    blobs: list[str] = None  # type: ignore[assignment]
    errors: list[str] = None  # type: ignore[assignment]
    missing: list[tuple[int, int]] = None  # type: ignore[assignment]
    problems: list[str] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self.blobs = self.blobs or []
        self.errors = self.errors or []
        self.missing = self.missing or []
        self.problems = self.problems or []

    @property
    def ok(self) -> bool:
        return not self.errors


class _NotAFrame(ImageError):
    """Bytes where a skippable frame should start are something else."""


def _planned_ranges(value: object) -> list[tuple[int, int]]:
    """The header's planned ranges, checked: the header is as untrusted as the rest."""
    ok = isinstance(value, list) and all(
        isinstance(r, list) and len(r) == 2 and all(type(x) is int for x in r) and 0 <= r[0] < r[1]
        for r in value
    )
    if not ok:
        raise ImageError("image header lists its ranges wrongly")
    return sorted((r[0], r[1]) for r in value)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if out and out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    for start, end in ranges:
        pos = start
        for hs, he in holes:
            if he <= pos or hs >= end:
                continue
            if hs > pos:
                out.append((pos, hs))
            pos = max(pos, he)
        if pos < end:
            out.append((pos, end))
    return out
