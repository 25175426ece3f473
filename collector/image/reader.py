"""Reads native images: random access through the index, or a frame scan when cut short.

A complete image ends with an INDEX record and the zstd seekable-format seek table, so any
page is found without reading the RAM before it. The index is trusted only once it agrees
with the seek table (and, chunk by chunk, with the descriptor it points to); an image cut
short, or one whose END, INDEX or seek table is damaged, is scanned frame by frame from the
start instead, which needs only the frame headers because each DESC gives the size of the
DATA frame after it. No chunk is served unless its descriptor, its DATA frame's checksum, its
size and its position all agree.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import itertools
import os
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import zstandard

from collector.errors import (
    ImageCorrupted,
    ImageError,
    ImageTruncated,
    NotAnImage,
    UnsupportedImage,
)
from collector.image import format as fmt
from collector.image.lime import LIME_HEADER, LIME_HEADER_SIZE, LIME_MAGIC, LIME_VERSION
from collector.image.raw import open_regular
from collector.memory import Fate, FateRun, PageFate, PageNotCaptured

_CACHE_CHUNKS = 8
#: The buffer :meth:`NativeImage.stream` decompresses into: small enough to stay in the CPU's
#: cache between decompressing and writing (zstd's own output buffer is 128 KiB).
STREAM_BUFFER = 128 << 10
#: zstd's largest block (128 KiB) means a DATA frame of a 64 MiB chunk has about 512 blocks.
_MAX_BLOCKS = 1 << 10
_ZSTD_MAX_BLOCK = 128 << 10
_MAX_DESC_PAYLOAD = 64 + 11 * fmt.MAX_RUNS_PER_CHUNK
#: Damage listed one by one; beyond this it is only counted.
MAX_REPORTED = 100

#: What version 1 images lack, as `collect verify` says it.
V1_LACKS = (
    "records carry no checksum of their own: damage to HEADER, DESC, END or INDEX bytes "
    "may pass unnoticed",
    "a DESC does not record its DATA frame's checksum: two DATA frames of equal size can "
    "be swapped unnoticed",
    "END holds no hash of the metadata records: a deleted or altered record may pass",
)

P = ParamSpec("P")
T = TypeVar("T")


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


@dataclass
class _Record:
    """One frame found by a walk: a record, or a DATA frame met without a usable DESC."""

    offset: int
    magic: int
    size: int
    desc: fmt.Desc | None = None
    error: str | None = None  # why a DESC could not be decoded

    @property
    def data_size(self) -> int:
        return self.desc.data_size if self.desc is not None else 0


class _IndexMismatch(ImageError):
    """An INDEX row disagrees with the record it points to."""


class _NotAFrame(ImageError):
    """Bytes where a frame should start are something else."""


def _index_checked(method: Callable[P, T]) -> Callable[P, T]:
    """Run ``method``; if the index turns out to disagree with a record, rebuild by a scan
    and run it again."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return method(*args, **kwargs)
        except _IndexMismatch as e:
            self = args[0]
            assert isinstance(self, NativeImage)
            self._rebuild(str(e))
            return method(*args, **kwargs)

    return wrapper


class NativeImage:
    """A native ``.lime.zst`` image as :class:`~collector.memory.PhysicalMemory`.

    :attr:`problems` says why an image is incomplete (cut short); :attr:`damage` lists the
    records found damaged while opening it (the reader then worked around them).

    :param path: the image file.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fsdecode(path)
        fd = open_regular(self.path)
        self._fd: int | None = fd
        try:
            self.size = os.fstat(fd).st_size
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self.chunks: list[ChunkRef] = []
        self.blobs: dict[str, BlobRef] = {}
        self.end: dict | None = None
        self.problems: list[str] = []
        self.damage: list[str] = []
        self.indexed = False
        self._layout: dict[int, int] = {}  # frame offset -> size, from a seek table that adds up
        head = self._frame_head(0)
        if head is not None and head[0] == fmt.HEADER and head[1] > fmt.MAX_SKIPPABLE_PAYLOAD:
            raise ImageCorrupted(self.path, f"the HEADER record claims {head[1]} bytes")
        if head is not None and head[0] == fmt.HEADER and fmt.FRAME_HEAD.size + head[1] > self.size:
            raise ImageTruncated(
                self.path,
                f"the file ends at byte {self.size} inside its HEADER record "
                f"({fmt.FRAME_HEAD.size + head[1]} bytes)",
            )
        if head is None or head[0] != fmt.HEADER:
            if self.size >= 16 and self._read_at(8, 8) == fmt.MAGIC:
                raise ImageCorrupted(
                    self.path,
                    "the HEADER record's frame header is wrong; "
                    "the records after it cannot be located",
                )
            if self.size < fmt.FRAME_HEAD.size:
                raise ImageTruncated(
                    self.path, f"the file ends at byte {self.size}, inside the first frame header"
                )
            raise NotAnImage(
                self.path,
                "zstd data without a collector HEADER record (a file compressed with zstd: "
                "`zstd -d` it, then open what that gives)",
            )
        self._header_size = fmt.FRAME_HEAD.size + head[1]
        try:
            self.header = fmt.Header.decode(self._read_at(8, head[1]), strict=False)
        except ImageError as e:
            if "not supported" in str(e):
                raise UnsupportedImage(self.path, str(e)) from None
            raise ImageCorrupted(self.path, str(e)) from None
        if self.header.damage:
            self.damage.append(self.header.damage)
        self.version = self.header.version
        self.page_size = self.header.page_size
        self.metadata = self.header.metadata
        try:
            self._planned = _planned_ranges(self.metadata.get("ranges", []))
        except ImageError as e:
            raise ImageCorrupted(self.path, str(e)) from None
        if not self._load_index():
            self._scan()
        self._settle()

    # -- file access ---------------------------------------------------------------------------

    def _read_at(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            raise ImageError(f"{self.path}: read after close")
        if offset < 0 or size < 0 or offset + size > self.size:
            raise ImageError(f"{self.path}: record at {offset} runs past the end of the file")
        try:
            data = os.pread(self._fd, size, offset)
        except OSError as e:
            raise ImageError(f"{self.path}: read failed at {offset}: {e.strerror}") from None
        if len(data) != size:
            raise ImageError(f"{self.path}: short read at {offset}")
        return data

    def _frame_head(self, offset: int) -> tuple[int, int] | None:
        if offset + fmt.FRAME_HEAD.size > self.size:
            return None
        return fmt.FRAME_HEAD.unpack(self._read_at(offset, fmt.FRAME_HEAD.size))

    def _payload(self, offset: int, size: int, magic: int, what: str) -> bytes:
        """The payload of the ``size``-byte record at ``offset``, after checking its head."""
        if size < fmt.FRAME_HEAD.size or size - 8 > fmt.MAX_SKIPPABLE_PAYLOAD:
            raise ImageError(f"the {what} at byte {offset} has an impossible size ({size})")
        if self._frame_head(offset) != (magic, size - fmt.FRAME_HEAD.size):
            raise ImageError(f"the {what} at byte {offset} has a damaged frame header")
        return self._read_at(offset + fmt.FRAME_HEAD.size, size - fmt.FRAME_HEAD.size)

    # -- locating records ----------------------------------------------------------------------

    def _load_index(self) -> bool:
        """Use the seek table and INDEX at the end of the file once they check out; False
        when they are absent (cut short) or damaged (then :attr:`damage` says so)."""
        if self.size < self._header_size + 17:
            return False
        try:
            fmt.decode_seek_footer(self._read_at(self.size - 9, 9))
        except ImageError:
            return False  # no seek table: a cut image (the scan tells damage from a cut)
        try:
            frames, rows, end = self._end_records()
            self._check_rows(rows, frames, end)
        except ImageError as e:
            self.damage.append(f"{e}; the image was read by a frame scan instead")
            return False
        for r in rows:
            if r.kind == fmt.INDEX_CHUNK:
                self.chunks.append(
                    ChunkRef(r.seq, r.paddr, r.ram_bytes, r.offset, r.frame_size, r.data_size)
                )
            else:
                self.blobs[r.name] = BlobRef(r.name, r.offset, r.frame_size)
        self.end = end
        self.indexed = True
        return True

    def _end_records(self) -> tuple[list[tuple[int, int]], list[fmt.IndexRow], dict]:
        """Read and check the seek table, the INDEX and the END, in that order."""
        _, table_size = fmt.decode_seek_footer(self._read_at(self.size - 9, 9))
        if table_size > self.size - self._header_size:
            raise ImageError(f"the seek table claims {table_size} bytes, more than the file has")
        table_start = self.size - table_size
        payload = self._payload(table_start, table_size, fmt.SEEK_TABLE, "seek table")
        try:
            frames = fmt.decode_seek_table(payload)
        except ImageError as e:
            raise ImageError(f"the seek table is damaged: {e}") from None
        if len(frames) < 3 or sum(c for c, _ in frames) != table_start:
            raise ImageError("the seek table is damaged: its frame sizes do not add up")
        # The table's sizes add up: a frame walk may use them past a damaged frame header.
        self._layout = dict(
            zip(
                itertools.accumulate((c for c, _ in frames), initial=0),
                (c for c, _ in frames),
                strict=False,
            )
        )
        self._layout[table_start] = table_size
        index_offset = table_start - frames[-1][0]
        try:
            payload = self._payload(index_offset, frames[-1][0], fmt.INDEX, "INDEX record")
            rows = fmt.decode_index(payload, self.version)
        except ImageError as e:
            raise ImageError(f"the INDEX record at byte {index_offset}: {e}") from None
        end_offset = index_offset - frames[-2][0]
        try:
            payload = self._payload(end_offset, frames[-2][0], fmt.END, "END record")
            return frames, rows, fmt.decode_end(payload, self.version)
        except ImageError as e:
            raise ImageError(f"the END record at byte {end_offset}: {e}") from None

    def _check_rows(self, rows: list[fmt.IndexRow], frames: list[tuple[int, int]], end: dict):
        """The INDEX must describe exactly the frames the seek table lists, in file order:
        every entry of either is checked against the other."""
        if frames[0] != (self._header_size, 0):
            raise ImageError("the seek table's first frame is not the HEADER")
        i, pos, seq = 1, self._header_size, 0
        for n, r in enumerate(rows):
            where = f"INDEX row {n}"
            if i >= len(frames) - 2 or r.offset != pos:
                raise ImageError(f"{where} does not point at the next frame the seek table lists")
            if r.kind == fmt.INDEX_BLOB:
                if frames[i] != (r.frame_size, 0):
                    raise ImageError(f"{where} and the seek table disagree on a blob's size")
                i, pos = i + 1, pos + r.frame_size
            elif r.kind == fmt.INDEX_CHUNK:
                if i + 1 >= len(frames) - 2 or frames[i] != (r.frame_size, 0):
                    raise ImageError(f"{where} and the seek table disagree on a DESC's size")
                size, content = frames[i + 1]
                if size != r.data_size or content not in (r.ram_bytes, r.ram_bytes + 32):
                    raise ImageError(f"{where} and the seek table disagree on a DATA frame")
                if r.seq != seq:
                    raise ImageError(f"{where} names chunk {r.seq} where chunk {seq} belongs")
                i, pos, seq = i + 2, pos + r.frame_size + r.data_size, seq + 1
            else:
                raise ImageError(f"{where} has unknown kind {r.kind}")
        if i != len(frames) - 2:
            raise ImageError("the seek table lists frames the INDEX does not")
        self._check_tiling([r for r in rows if r.kind == fmt.INDEX_CHUNK])
        if "chunks" in end and end["chunks"] != seq:
            raise ImageError(f"the END record counts {end['chunks']} chunks, the INDEX {seq}")

    def _check_tiling(self, rows: list[fmt.IndexRow]) -> None:
        """Chunks, in file order, must tile the planned ranges as the writer lays them out:
        each range from its start, chunk after chunk, ending on multiples of the chunk size
        or at the range's end, and a range finished before the next begins (the last may stop
        early: a capture that was stopped)."""
        if not self._planned:
            return
        size = self.header.chunk_size
        k = -1  # the planned range being tiled
        pos = 0
        for r in rows:
            if k >= 0 and pos == self._planned[k][1]:
                k += 1
                pos = self._planned[k][0] if k < len(self._planned) else -1
            elif k < 0:
                k, pos = 0, self._planned[0][0]
            if k >= len(self._planned) or r.paddr != pos:
                raise ImageError(f"INDEX row of chunk {r.seq} names {r.paddr:#x}, not {pos:#x}")
            end = min(self._planned[k][1], (pos // size + 1) * size)
            if r.ram_bytes != end - pos:
                raise ImageError(f"INDEX row of chunk {r.seq} names {r.ram_bytes} bytes")
            pos = end

    def _frames(self, stops: list[str]) -> Iterator[_Record]:
        """Every frame from the start of the file, bounds-checked, a DESC with its DATA frame.

        Where the file is cut short the walk ends and the reason is appended to ``stops``;
        bytes that are no frame raise :class:`_NotAFrame`. A DESC that cannot be decoded is
        yielded with its ``error``; the DATA frame after it is then found by walking its zstd
        block headers and yielded on its own, so one damaged DESC does not hide the rest.
        """
        offset = 0
        after_bad_desc = False
        while offset < self.size:
            head = self._frame_head(offset)
            if head is None:
                stops.append(f"image ends inside a frame header at byte {offset}")
                return
            magic, length = head
            known = self._layout.get(offset)
            if known is not None and not self._head_fits(offset, magic, length, known):
                # The seek table (whose sizes add up) knows where the next frame starts.
                yield _Record(offset, magic, known, error="its frame header is damaged")
                after_bad_desc = True  # it may have been a DESC, and a DATA frame may follow
                offset += known
                continue
            if magic == fmt.ZSTD_MAGIC:
                # Only where a DESC that could not be decoded leaves its DATA frame unsized;
                # a DATA frame anywhere else has no place in the layout.
                if not after_bad_desc:
                    raise _NotAFrame(f"a DATA frame at byte {offset} follows no DESC")
                after_bad_desc = False
                size = self._zstd_frame_size(offset, stops)
                if size is None:
                    return
                yield _Record(offset, magic, size)
                offset += size
                continue
            if magic & 0xFFFFFFF0 != fmt.SKIPPABLE_BASE:
                raise _NotAFrame(f"bytes at {offset} are not a frame ({magic:#010x})")
            rec = _Record(offset, magic, fmt.FRAME_HEAD.size + length)
            if offset + rec.size > self.size:
                stops.append(f"image is cut short inside a record at byte {offset}")
                return
            if magic == fmt.DESC:
                try:
                    if length > _MAX_DESC_PAYLOAD:
                        raise ImageError(f"impossible size ({length} bytes)")
                    rec.desc = fmt.Desc.decode(self._read_at(offset + 8, length), self.version)
                except ImageError as e:
                    rec.error = str(e)
                if offset + rec.size + rec.data_size > self.size:
                    assert rec.desc is not None
                    stops.append(
                        f"image is cut short inside chunk {rec.desc.seq} at {rec.desc.paddr:#x}"
                    )
                    return
            after_bad_desc = magic == fmt.DESC and rec.desc is None
            yield rec
            offset += rec.size + rec.data_size

    def _head_fits(self, offset: int, magic: int, length: int, known: int) -> bool:
        """Whether a frame header agrees with the size the seek table gives its frame."""
        if magic == fmt.ZSTD_MAGIC:
            return True  # its size is not in its header; the DESC before it gives it
        if magic & 0xFFFFFFF0 != fmt.SKIPPABLE_BASE:
            return False
        if magic != fmt.DESC:
            return fmt.FRAME_HEAD.size + length == known
        # A DESC's entry covers the DESC alone; its DATA frame has an entry of its own.
        return fmt.FRAME_HEAD.size + length == known and offset + known in self._layout

    def _zstd_frame_size(self, offset: int, stops: list[str]) -> int | None:
        """The size of the zstd frame at ``offset``, from its header and block headers."""
        head = self._read_at(offset, min(18, self.size - offset))
        if len(head) < 6:
            stops.append(f"image ends inside a DATA frame at byte {offset}")
            return None
        fhd = head[4]
        single = fhd >> 5 & 1
        if fhd & 0x08:
            raise _NotAFrame(f"the zstd frame at byte {offset} has reserved bits set")
        pos = 5 + (0 if single else 1) + (0, 1, 2, 4)[fhd & 3]
        pos += ((1 if single else 0), 2, 4, 8)[fhd >> 6]
        window, base = b"", 0  # block headers are read 64 KiB at a time
        for _ in range(_MAX_BLOCKS):
            if offset + pos + 3 > self.size:
                stops.append(f"image ends inside a DATA frame at byte {offset}")
                return None
            if not base <= pos <= base + len(window) - 3:
                base = pos
                window = self._read_at(offset + pos, min(64 << 10, self.size - offset - pos))
            block = int.from_bytes(window[pos - base : pos - base + 3], "little")
            kind, size = block >> 1 & 3, block >> 3
            if kind == 3 or size > _ZSTD_MAX_BLOCK:
                raise _NotAFrame(f"the zstd frame at byte {offset} has a damaged block header")
            pos += 3 + (1 if kind == 1 else size)
            if block & 1:
                pos += 4 if fhd & 0x04 else 0
                if offset + pos > self.size:
                    stops.append(f"image ends inside a DATA frame at byte {offset}")
                    return None
                return pos
        raise _NotAFrame(f"the zstd frame at byte {offset} has more than {_MAX_BLOCKS} blocks")

    def _scan(self) -> None:
        """Walk every frame from the start: the way to read an image that was cut short, or
        one whose end records cannot be trusted."""
        end_seen = False
        stops: list[str] = []
        try:
            for rec in self._frames(stops):
                if rec.error and rec.magic != fmt.DESC:
                    self._damaged(f"the record at byte {rec.offset}: {rec.error}")
                elif rec.magic == fmt.DESC:
                    if rec.desc is None:
                        self._damaged(f"the DESC at byte {rec.offset}: {rec.error}")
                        continue
                    d = rec.desc
                    self.chunks.append(
                        ChunkRef(d.seq, d.paddr, d.ram_bytes, rec.offset, rec.size, d.data_size, d)
                    )
                elif rec.magic == fmt.BLOB:
                    try:
                        prefix = self._read_at(rec.offset + 8, min(rec.size - 8, 1024))
                        name = fmt.Blob.name_of(prefix)
                    except ImageError as e:
                        self._damaged(f"the blob record at byte {rec.offset}: {e}")
                        continue
                    self.blobs.setdefault(name, BlobRef(name, rec.offset, rec.size))
                elif rec.magic == fmt.END:
                    end_seen = True
                    try:
                        payload = self._payload(rec.offset, rec.size, fmt.END, "END record")
                        self.end = fmt.decode_end(payload, self.version)
                    except ImageError as e:
                        message = f"the END record at byte {rec.offset}: {e}"
                        if not any(d.startswith(message) for d in self.damage):
                            self._damaged(message)
                elif rec.magic in (fmt.INDEX, fmt.SEEK_TABLE):
                    end_seen = True
        except ImageError as e:
            self._damaged(str(e))
        if stops:
            if end_seen:
                self._damaged(f"the records after END are damaged: {stops[0]}")
            else:
                self.problems.extend(stops)

    def _damaged(self, message: str) -> None:
        if len(self.damage) < MAX_REPORTED:
            self.damage.append(message)

    def _settle(self) -> None:
        """Order the chunks by address; a chunk overlapping one before it is left out."""
        self.chunks.sort(key=lambda c: (c.paddr, c.desc_offset))
        kept: list[ChunkRef] = []
        for c in self.chunks:
            if kept and c.paddr < kept[-1].end:
                self._damaged(f"chunk {c.seq} at {c.paddr:#x} overlaps chunk {kept[-1].seq}")
                continue
            kept.append(c)
        self.chunks = kept
        self._starts = [c.paddr for c in self.chunks]

    def _rebuild(self, reason: str) -> None:
        """The index disagreed with a record: forget it and read the image by a scan."""
        self._damaged(f"{reason}; the image was read by a frame scan instead")
        self.chunks, self.blobs, self.indexed = [], {}, False
        self._cache.clear()
        end = self.end
        self._scan()
        self.end = self.end or end
        self._settle()

    # -- chunks ---------------------------------------------------------------------------------

    def _desc(self, chunk: ChunkRef) -> fmt.Desc:
        if chunk.desc is None:
            try:
                payload = self._payload(chunk.desc_offset, chunk.desc_size, fmt.DESC, "DESC")
            except ImageError as e:
                raise _IndexMismatch(f"INDEX row of chunk {chunk.seq}: {e}") from None
            try:
                desc = fmt.Desc.decode(payload, self.version)
            except ImageError as e:
                raise _IndexMismatch(f"the DESC of chunk {chunk.seq}: {e}") from None
            if (desc.seq, desc.paddr, desc.ram_bytes, desc.data_size) != (
                chunk.seq,
                chunk.paddr,
                chunk.ram_bytes,
                chunk.data_size,
            ):
                raise _IndexMismatch(f"the INDEX and the DESC of chunk {chunk.seq} disagree")
            chunk.desc = desc
        return chunk.desc

    def _chunk_data(self, desc: fmt.Desc, data_offset: int) -> bytes:
        """The DATA frame after ``desc``, checked against it: CRC (version 2), declared and
        real sizes, zstd's checksum, and the LiME header's address. The LiME header is kept.

        :raises ImageError: what does not match.
        """
        frame = self._read_at(data_offset, desc.data_size)
        if desc.data_hash is not None and fmt.data_hash(frame) != desc.data_hash:
            raise ImageError("its DATA frame does not match the hash its DESC records")
        data = self._decompress(frame, desc.stream_bytes)
        if desc.has_lime_header:
            magic, version, start, end, _ = LIME_HEADER.unpack_from(data)
            if (magic, version) != (LIME_MAGIC, LIME_VERSION) or start != desc.paddr:
                raise ImageError("its LiME header does not name the chunk's address")
            if end < desc.paddr + desc.ram_bytes - 1:
                raise ImageError("its LiME header's range ends inside the chunk")
        return data

    def _decompress(self, frame: bytes, expected: int) -> bytes:
        """Decompress one frame that must hold ``expected`` bytes, refusing before allocating
        anything when its header claims another size."""
        try:
            claimed = zstandard.frame_content_size(frame)
            if claimed != expected:
                shown = "no size" if claimed < 0 else f"{claimed} bytes"
                raise ImageError(f"its frame header claims {shown}, not {expected}")
            data = self._dctx.decompress(frame, max_output_size=expected)
        except zstandard.ZstdError as e:
            raise ImageError(f"corrupt zstd frame: {e}") from None
        if len(data) != expected:
            raise ImageError(f"it decompresses to {len(data)} bytes, not {expected}")
        return data

    def _chunk_bytes(self, chunk: ChunkRef) -> bytes:
        cached = self._cache.get(chunk.desc_offset)
        if cached is not None:
            self._cache.move_to_end(chunk.desc_offset)
            return cached
        desc = self._desc(chunk)
        try:
            data = self._chunk_data(desc, chunk.data_offset)
        except ImageError as e:
            raise ImageError(f"{self.path}: chunk {chunk.seq} at {chunk.paddr:#x}: {e}") from None
        if desc.has_lime_header:
            data = data[LIME_HEADER_SIZE:]
        self._cache[chunk.desc_offset] = data
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

    @_index_checked
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

    @_index_checked
    def readable_ranges(self) -> list[tuple[int, int]]:
        """The parts of the captured ranges whose pages were read (fate READ or READ_ZERO)."""
        holes = [
            (r.start, r.start + r.count * self.page_size)
            for r in self.fate_runs()  # already in physical order
            if not r.fate.is_data
        ]
        return _subtract(self.captured_ranges(), holes)

    @_index_checked
    def fate(self, paddr: int) -> PageFate:
        chunk = self._chunk_at(paddr)
        if chunk is not None:
            return self._run_fate(chunk, paddr)
        if any(s <= paddr < e for s, e in self.ranges()):
            return PageFate(Fate.MISSING)
        return PageFate(Fate.OUTSIDE)

    def _first_unread(self, chunk: ChunkRef, start: int, end: int) -> int | None:
        """The address of the first page of ``[start, end)`` in ``chunk`` that was not read
        (READ_ZERO pages were read: their zeros are data)."""
        base = chunk.paddr // self.page_size
        lo = start // self.page_size - base
        hi = -(-end // self.page_size) - base
        first = None
        for run in self._desc(chunk).unread_runs:
            if run.start < hi and run.start + run.count > lo:
                page = max(run.start, lo)
                first = page if first is None else min(first, page)
        return None if first is None else (base + first) * self.page_size

    @_index_checked
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

    def stream(self, start: int, end: int) -> Iterator[tuple[int, memoryview]]:
        """The stored bytes of ``[start, end)`` in order, for one pass over the image
        (exports): each chunk decompressed once, a piece at a time, into one small buffer
        that is reused, so the bytes are still in the CPU's cache when the caller writes
        them, as with ``zstd -dc``. Each view is valid until the next one is taken.

        A chunk is checked as :meth:`read` checks it before any of its bytes is given
        out (its DESC, its DATA frame's hash, the size its frame header claims, its LiME
        header); zstd's content checksum and the decompressed size are checked at the end
        of the frame. Pages recorded as not read are served as their DATA frame holds them
        (zeros, as the writer pads them): the caller zero-fills what :meth:`fate_runs` lists
        as not data.

        :raises PageNotCaptured: at the first address no chunk holds.
        :raises ImageError: a chunk that does not check.
        """
        self.fate_runs()  # every DESC read and checked first (a mismatch rebuilds by a scan)
        buf = memoryview(bytearray(STREAM_BUFFER))
        addr = start
        for chunk in itertools.islice(
            self.chunks, max(0, bisect.bisect_right(self._starts, start) - 1), None
        ):
            if addr >= end or chunk.paddr > addr:
                break
            if chunk.end <= addr:
                continue
            stop = min(end, chunk.end)
            try:
                yield from self._stream_chunk(chunk, addr, stop, buf)
            except ImageError as e:
                raise ImageError(
                    f"{self.path}: chunk {chunk.seq} at {chunk.paddr:#x}: {e}"
                ) from None
            addr = stop
        if addr < end:
            raise PageNotCaptured(addr, self.fate(addr).fate)

    def _stream_chunk(
        self, chunk: ChunkRef, lo: int, hi: int, buf: memoryview
    ) -> Iterator[tuple[int, memoryview]]:
        """``[lo, hi)`` of one chunk, decompressed piece by piece into ``buf``."""
        desc = self._desc(chunk)
        frame = self._read_at(chunk.data_offset, desc.data_size)
        if desc.data_hash is not None and fmt.data_hash(frame) != desc.data_hash:
            raise ImageError("its DATA frame does not match the hash its DESC records")
        claimed = zstandard.frame_content_size(frame)
        if claimed != desc.stream_bytes:
            shown = "no size" if claimed < 0 else f"{claimed} bytes"
            raise ImageError(f"its frame header claims {shown}, not {desc.stream_bytes}")
        try:
            with self._dctx.stream_reader(frame, read_across_frames=False) as reader:
                if desc.has_lime_header:
                    head = reader.read(LIME_HEADER_SIZE)
                    if len(head) != LIME_HEADER_SIZE:
                        raise ImageError("its LiME header is cut short")
                    magic, version, first, last, _ = LIME_HEADER.unpack(head)
                    if (magic, version) != (LIME_MAGIC, LIME_VERSION) or first != desc.paddr:
                        raise ImageError("its LiME header does not name the chunk's address")
                    if last < desc.paddr + desc.ram_bytes - 1:
                        raise ImageError("its LiME header's range ends inside the chunk")
                at = chunk.paddr
                while at < chunk.end:
                    n = reader.readinto(buf[: min(len(buf), chunk.end - at)])
                    if n <= 0:
                        raise ImageError(
                            f"it decompresses to {at - chunk.paddr} RAM bytes, "
                            f"not {chunk.ram_bytes}"
                        )
                    a, b = max(lo, at), min(hi, at + n)
                    if a < b:
                        yield a, buf[a - at : b - at]
                    at += n
                if reader.read(1):
                    raise ImageError(f"it decompresses to more than {desc.stream_bytes} bytes")
        except zstandard.ZstdError as e:
            raise ImageError(f"corrupt zstd frame: {e}") from None

    @_index_checked
    def blob(self, name: str) -> bytes | None:
        ref = self.blobs.get(name)
        if ref is None:
            return None
        try:
            payload = self._payload(ref.offset, ref.frame_size, fmt.BLOB, "blob record")
        except ImageError as e:
            if self.indexed:
                raise _IndexMismatch(f"INDEX row of blob {name!r}: {e}") from None
            raise
        blob = fmt.Blob.decode(payload, self.version)
        if blob.name != name:
            if self.indexed:
                raise _IndexMismatch(f"the INDEX row of blob {name!r} points at {blob.name!r}")
            raise ImageError(f"{self.path}: the blob record of {name!r} names {blob.name!r}")
        return self._blob_data(blob)

    def _blob_data(self, blob: fmt.Blob) -> bytes:
        if blob.raw_length > fmt.MAX_BLOB_BYTES:
            raise ImageError(
                f"{self.path}: blob {blob.name!r} claims {blob.raw_length} bytes, more than "
                f"{fmt.MAX_BLOB_BYTES}"
            )
        try:
            data = self._decompress(blob.frame, blob.raw_length)
        except ImageError as e:
            raise ImageError(f"{self.path}: blob {blob.name!r} is corrupt: {e}") from None
        if hashlib.sha256(data).digest() != blob.sha256:
            raise ImageError(f"{self.path}: blob {blob.name!r} does not match its SHA-256")
        return data

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> NativeImage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- whole-image views ---------------------------------------------------------------------

    @_index_checked
    def fate_runs(self) -> Iterator[FateRun]:
        """Every run of pages whose fate is not READ, in physical order, with absolute
        addresses: READ_ZERO runs too (data; :attr:`Fate.is_data` tells them apart)."""
        return iter(list(self._fate_runs()))

    def _fate_runs(self) -> Iterator[FateRun]:
        for chunk in self.chunks:
            base = chunk.paddr - chunk.paddr % self.page_size
            for r in self._desc(chunk).runs:
                yield FateRun(base + r.start * self.page_size, r.count, r.fate, r.errno)

    def verify(self) -> VerifyReport:
        """Walk every frame from the start and check every byte: each record's checksum, each
        DATA frame against its DESC, the order of the chunks, the blobs the header
        announces, the END's hashes, and the INDEX and seek table against what the walk
        found. Works on any image the reader opened, whatever its damage."""
        return _Verifier(self).run()


@dataclass
class VerifyReport:
    """What `collect verify` found.

    :param ram_errors: damage to RAM or to what places it (DESC, DATA, chunk order).
    :param metadata_errors: damage to HEADER, BLOB, END, INDEX or seek table: the RAM the
        image holds is intact if :attr:`ram_errors` is empty.
    :param incomplete: why RAM the image announced is not all there (cut short, stopped).
    :param missing: the announced ranges it does not hold.
    :param lacks: guarantees the image's format version does not give.
    """

    version: int
    complete: bool
    chunks: int = 0
    stream_bytes: int = 0
    #: the whole-stream hash the image records (``sha256`` or ``blake3``) and its digest of
    #: the stream as walked; ``stream_sha256`` is that digest for SHA-256 images.
    stream_hash: str = "sha256"
    stream_digest: str = ""
    stream_sha256: str = ""
    blobs: list[str] = field(default_factory=list)
    ram_errors: list[str] = field(default_factory=list)
    metadata_errors: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    missing: list[tuple[int, int]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    lacks: list[str] = field(default_factory=list)

    @property
    def errors(self) -> list[str]:
        return self.ram_errors + self.metadata_errors

    @property
    def ok(self) -> bool:
        return not self.errors

    @property
    def status(self) -> int:
        """`collect verify`'s exit status: 0 intact, 1 RAM damaged, 3 incomplete, 4 metadata
        damaged with the RAM intact. The first that applies, in the order 1, 4, 3."""
        if self.ram_errors:
            return 1
        if self.metadata_errors:
            return 4
        return 3 if self.incomplete else 0


STATUS_WORDS = {0: "intact", 1: "damaged", 3: "incomplete", 4: "damaged metadata, RAM intact"}


class _Verifier:
    """One walk of an image for :meth:`NativeImage.verify`."""

    def __init__(self, img: NativeImage) -> None:
        self.img = img
        self.r = VerifyReport(img.version, complete=img.end is not None and not img.problems)
        self.r.stream_hash = _stream_hash_name(img)
        self.stream = fmt.stream_hasher(self.r.stream_hash)
        self.meta = hashlib.sha256()
        self.walked: list[tuple[int, int]] = [(img._header_size, 0)]
        self.rows: list[fmt.IndexRow] = []
        self.seq = 0
        self.last_end = -1
        self.end: dict | None = None
        self.after_end = False
        #: DESCs that could not be decoded: the walk then lacks their chunks, and comparing
        #: the INDEX, seek table and END hashes with it would only repeat that damage.
        self.lost = 0
        self.table_seen = False

    def ram(self, message: str) -> None:
        if len(self.r.ram_errors) < MAX_REPORTED:
            self.r.ram_errors.append(message)

    def metadata(self, message: str) -> None:
        if len(self.r.metadata_errors) < MAX_REPORTED:
            self.r.metadata_errors.append(message)

    def run(self) -> VerifyReport:
        img, r = self.img, self.r
        if img.header.damage:
            self.metadata(img.header.damage)
        self.meta.update(img._read_at(0, img._header_size))
        stops: list[str] = []
        try:
            for rec in img._frames(stops):
                if rec.offset == 0:
                    continue
                if self.table_seen:
                    self.metadata(f"bytes after the seek table, from byte {rec.offset}")
                    break
                self.record(rec)
        except ImageError as e:
            message = f"{e}; nothing after it can be checked"
            self.metadata(message) if self.after_end else self.ram(message)
        if stops:
            if self.after_end:
                self.metadata(f"the records after END are damaged: {stops[0]}")
            else:
                r.problems = list(stops)
                r.incomplete.append(f"the image is cut short ({stops[0]})")
        elif not self.after_end and not r.ram_errors:
            r.incomplete.append("the image ends without its END record (cut short)")
        if self.after_end and not self.table_seen and not stops:
            self.metadata("the image ends without its seek table")
        self.check_end()
        self.check_blobs()
        r.stream_digest = self.stream.hexdigest()
        if r.stream_hash == "sha256":
            r.stream_sha256 = r.stream_digest
        try:
            r.missing = img.missing_ranges()
        except ImageError as e:
            self.ram(str(e))
        if r.missing:
            why = self.end.get("stopped_by") if self.end else None
            if why:
                r.incomplete.append(f"the capture was {why}")
            elif r.ram_errors and not r.incomplete:
                r.incomplete.append("ranges whose chunks are damaged are missing")
            elif not r.incomplete:
                r.incomplete.append("the image does not hold every range its header announces")
        elif self.end is not None and self.end.get("clean") is False:
            r.incomplete.append(f"the capture did not finish ({self.end.get('stopped_by')})")
        if img.version < 2:
            r.lacks = list(V1_LACKS)
        return r

    def record(self, rec: _Record) -> None:
        img = self.img
        if rec.magic == fmt.ZSTD_MAGIC:  # after a DESC that could not be decoded
            self.walked.append((rec.size, -1))
            return
        if rec.magic == fmt.DESC:
            self.chunk(rec)
            return
        self.walked.append((rec.size, 0))
        if rec.error:
            self.metadata(f"the record at byte {rec.offset}: {rec.error}")
            return
        what = {fmt.BLOB: "blob record", fmt.END: "END record", fmt.INDEX: "INDEX record"}
        what[fmt.SEEK_TABLE] = "seek table"
        if rec.magic not in what:
            kind = "a second HEADER" if rec.magic == fmt.HEADER else f"{rec.magic:#010x}"
            self.metadata(f"unexpected record ({kind}) at byte {rec.offset}")
            return
        if rec.magic != fmt.BLOB:
            self.after_end = True
        try:
            payload = img._payload(rec.offset, rec.size, rec.magic, what[rec.magic])
        except ImageError as e:
            self.metadata(str(e))
            return
        if rec.magic == fmt.BLOB:
            self.meta.update(img._read_at(rec.offset, fmt.FRAME_HEAD.size) + payload)
            self.blob(rec, payload)
        elif rec.magic == fmt.END:
            try:
                self.end = fmt.decode_end(payload, img.version)
            except ImageError as e:
                self.metadata(f"the END record at byte {rec.offset}: {e}")
        elif rec.magic == fmt.INDEX:
            self.index(rec, payload)
        else:
            self.seek_table(rec, payload)

    def chunk(self, rec: _Record) -> None:
        self.walked.append((rec.size, 0))
        self.meta.update(self.img._read_at(rec.offset, rec.size))
        d = rec.desc
        if d is None:
            self.ram(f"the DESC at byte {rec.offset}: {rec.error}")
            self.lost += 1
            self.seq += 1  # the chunk it described; the next one follows it
            return
        where = f"chunk {d.seq} at {d.paddr:#x}"
        if d.seq != self.seq:
            self.ram(f"chunk {d.seq} found where chunk {self.seq} belongs")
        self.seq = d.seq + 1
        if d.paddr < self.last_end:
            self.ram(f"{where} overlaps the chunk before it")
        elif self.img._planned and not any(
            s <= d.paddr and d.paddr + d.ram_bytes <= e for s, e in self.img._planned
        ):
            self.ram(f"{where} lies outside the ranges the header plans")
        self.last_end = max(self.last_end, d.paddr + d.ram_bytes)
        data = b""
        try:
            data = self.img._chunk_data(d, rec.offset + rec.size)
        except ImageError as e:
            self.ram(f"{where}: {e}")
        if data:
            self._check_read_zero(d, data, where)
        self.stream.update(data)
        self.r.chunks += 1
        self.r.stream_bytes += len(data)
        self.walked.append((d.data_size, d.stream_bytes))
        self.rows.append(
            fmt.IndexRow(
                fmt.INDEX_CHUNK, d.paddr, d.ram_bytes, rec.offset, rec.size, d.data_size, d.seq
            )
        )

    def _check_read_zero(self, d: fmt.Desc, data: bytes, where: str) -> None:
        """A page recorded read-zero is served as data: its bytes must be the zeros the
        record promises."""
        page = self.img.page_size
        head = LIME_HEADER_SIZE if d.has_lime_header else 0
        lead = d.paddr % page
        for r in d.runs:
            if r.fate != Fate.READ_ZERO:
                continue
            lo = head + max(0, r.start * page - lead)
            hi = head + min(d.ram_bytes, (r.start + r.count) * page - lead)
            if lo < hi and data.count(0, lo, hi) != hi - lo:
                self.ram(f"{where}: pages recorded read-zero from page {r.start} hold other bytes")

    def blob(self, rec: _Record, payload: bytes) -> None:
        try:
            blob = fmt.Blob.decode(payload, self.img.version)
            self.img._blob_data(blob)
        except ImageError as e:
            self.metadata(f"the blob record at byte {rec.offset}: {e}")
            return
        if blob.name in self.r.blobs:
            self.metadata(f"blob {blob.name!r} appears twice")
        self.r.blobs.append(blob.name)
        self.rows.append(
            fmt.IndexRow(fmt.INDEX_BLOB, 0, blob.raw_length, rec.offset, rec.size, 0, 0, blob.name)
        )

    def index(self, rec: _Record, payload: bytes) -> None:
        try:
            rows = fmt.decode_index(payload, self.img.version)
        except ImageError as e:
            self.metadata(f"the INDEX record at byte {rec.offset}: {e}")
            return
        if rows != self.rows and not self.lost:
            n = next(
                (i for i, (a, b) in enumerate(zip(rows, self.rows, strict=False)) if a != b),
                min(len(rows), len(self.rows)),
            )
            self.metadata(
                f"the INDEX record disagrees with the records from row {n} on "
                f"({len(rows)} rows for {len(self.rows)} records)"
            )

    def seek_table(self, rec: _Record, payload: bytes) -> None:
        img = self.img
        self.table_seen = True
        self.walked.pop()  # the table lists the frames before it
        try:
            entries = fmt.decode_seek_table(payload)
        except ImageError as e:
            self.metadata(f"the seek table at byte {rec.offset}: {e}")
            return
        if entries != self.walked and not self.lost:
            n = next(
                (i for i, (a, b) in enumerate(zip(entries, self.walked, strict=False)) if a != b),
                min(len(entries), len(self.walked)),
            )
            self.metadata(f"the seek table disagrees with the frames from entry {n} on")
        if rec.offset + rec.size != img.size:
            self.metadata(f"{img.size - rec.offset - rec.size} bytes follow the seek table")

    def check_end(self) -> None:
        end, r = self.end, self.r
        if end is None or self.lost:
            return
        if end.get("chunks") != r.chunks:
            self.ram(
                f"the END record counts {end.get('chunks')} chunks but the image holds {r.chunks}"
            )
        name, recorded = fmt.end_stream_hash(end)
        if name not in fmt.STREAM_HASHES:
            self.metadata(f"the END record names a stream hash this reader does not know: {name}")
        elif name != self.r.stream_hash:
            self.metadata(
                f"the END record names stream hash {name!r}, the header {self.r.stream_hash!r}"
            )
        elif recorded != self.stream.hexdigest():
            what = {"sha256": "SHA-256", "blake3": "BLAKE3"}[name]
            self.ram(
                f"whole-stream {what} does not match the one the image records "
                f"({self.stream.hexdigest()} != {recorded})"
            )
        if self.img.version >= 2 and end.get("metadata_sha256") != self.meta.hexdigest():
            self.metadata("the metadata records are not those the END record's hash covers")

    def check_blobs(self) -> None:
        announced = self.img.metadata.get("blobs")
        if not isinstance(announced, list):
            return
        for name in announced:
            if name not in self.r.blobs:
                self.metadata(f"blob {name!r} announced by the header is absent or damaged")
        for name in self.r.blobs:
            if name not in announced:
                self.metadata(f"blob {name!r} is not among those the header announces")


def _stream_hash_name(img: NativeImage) -> str:
    """The stream hash to compute: the END record's, else the header's, else SHA-256 (every
    image before version 3). A name this reader does not know is checked as SHA-256 and will
    not match, which the report then says."""
    name = fmt.end_stream_hash(img.end)[0] if img.end else img.metadata.get("stream_hash")
    return name if name in fmt.STREAM_HASHES else "sha256"


def _planned_ranges(value: object) -> list[tuple[int, int]]:
    """The header's planned ranges, checked: the header is as untrusted as the rest."""
    ok = isinstance(value, list) and all(
        isinstance(r, list)
        and len(r) == 2
        and all(type(x) is int for x in r)
        and 0 <= r[0] < r[1] <= 1 << 64
        for r in value
    )
    if not ok:
        raise ImageError("image header lists its ranges wrongly")
    spans = sorted((r[0], r[1]) for r in value)
    if any(b[0] < a[1] for a, b in itertools.pairwise(spans)):
        raise ImageError("image header lists overlapping ranges")
    return spans


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in ranges:
        if out and out[-1][1] >= start:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _subtract(ranges: list[tuple[int, int]], holes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` without ``holes``; both sorted; linear in their lengths."""
    out = []
    i = 0
    for start, end in ranges:
        pos = start
        while i < len(holes) and holes[i][1] <= pos:
            i += 1
        j = i
        while j < len(holes) and holes[j][0] < end:
            hs, he = holes[j]
            if hs > pos:
                out.append((pos, hs))
            pos = max(pos, he)
            j += 1
        if pos < end:
            out.append((pos, end))
    return out
