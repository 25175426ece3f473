"""The native image format: record layouts, shared by the writer and the reader.

An image is nothing but zstd frames. DATA frames decompress, in order, to a LiME file;
everything else travels in skippable frames that `zstd -d` ignores. docs/image-format.md
describes the layout byte by byte; this module is its single definition in code.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field

from collector.errors import ImageError
from collector.image.lime import LIME_HEADER_SIZE
from collector.memory import Fate, FateRun

FORMAT_VERSION = 1
MAGIC = b"COLLECT\0"

ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_BASE = 0x184D2A50
HEADER = 0x184D2A50
DESC = 0x184D2A51
BLOB = 0x184D2A52
END = 0x184D2A53
INDEX = 0x184D2A54
SEEK_TABLE = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1

DESC_FLAG_LIME_HEADER = 1

FRAME_HEAD = struct.Struct("<II")  # skippable magic, payload length
_HEADER_FIXED = struct.Struct("<8sHHII16s")
_DESC_FIXED = struct.Struct("<IQIIBQI")
_RUN = struct.Struct("<IIBh")
_BLOB_FIXED = struct.Struct("<H")
_BLOB_AFTER_NAME = struct.Struct("<Q32s")
_INDEX_ROW = struct.Struct("<BQIQIII")
_SEEK_ENTRY = struct.Struct("<II")
_SEEK_FOOTER = struct.Struct("<IBI")

INDEX_CHUNK = 1
INDEX_BLOB = 2

#: Upper bounds that keep a hostile image from asking for unbounded memory.
MAX_SKIPPABLE_PAYLOAD = 256 << 20
MAX_CHUNK_SIZE = 64 << 20
MAX_RUNS_PER_CHUNK = MAX_CHUNK_SIZE // 512


def skippable(magic: int, payload: bytes) -> bytes:
    """Wrap ``payload`` in a skippable frame with ``magic``."""
    return FRAME_HEAD.pack(magic, len(payload)) + payload


@dataclass
class Header:
    """The first record: format version, geometry, capture UUID and the metadata JSON."""

    page_size: int
    chunk_size: int
    uuid: bytes
    metadata: dict
    version: int = FORMAT_VERSION
    flags: int = 0

    def encode(self) -> bytes:
        fixed = _HEADER_FIXED.pack(
            MAGIC, self.version, self.flags, self.page_size, self.chunk_size, self.uuid
        )
        text = json.dumps(self.metadata, sort_keys=True, default=str).encode()
        return skippable(HEADER, fixed + text)

    @classmethod
    def decode(cls, payload: bytes) -> Header:
        if len(payload) < _HEADER_FIXED.size:
            raise ImageError("image header is truncated")
        magic, version, flags, page_size, chunk_size, uuid = _HEADER_FIXED.unpack_from(payload)
        if magic != MAGIC:
            raise ImageError("not a collector image: header magic is wrong")
        if version != FORMAT_VERSION:
            raise ImageError(
                f"image format version {version} is not supported (this is {FORMAT_VERSION})"
            )
        if page_size not in (4096, 8192, 16384, 65536) or not 0 < chunk_size <= MAX_CHUNK_SIZE:
            raise ImageError(
                f"image header has impossible geometry: page {page_size}, chunk {chunk_size}"
            )
        try:
            metadata = json.loads(payload[_HEADER_FIXED.size :].decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ImageError(f"image header metadata is not valid JSON: {e}") from None
        if not isinstance(metadata, dict):
            raise ImageError("image header metadata is not a JSON object")
        return cls(page_size, chunk_size, uuid, metadata, version, flags)


@dataclass
class Desc:
    """Describes the DATA frame that follows it: where its RAM lives and each page's fate.

    ``runs`` lists only pages whose fate is not READ; ``FateRun.start`` is a page index
    within the chunk (page 0 holds ``paddr``).
    """

    seq: int
    paddr: int
    ram_bytes: int
    data_size: int
    flags: int
    time_ns: int
    runs: list[FateRun] = field(default_factory=list)

    @property
    def has_lime_header(self) -> bool:
        return bool(self.flags & DESC_FLAG_LIME_HEADER)

    @property
    def stream_bytes(self) -> int:
        """How many bytes the DATA frame decompresses to."""
        return self.ram_bytes + (LIME_HEADER_SIZE if self.has_lime_header else 0)

    def encode(self) -> bytes:
        parts = [
            _DESC_FIXED.pack(
                self.seq,
                self.paddr,
                self.ram_bytes,
                self.data_size,
                self.flags,
                self.time_ns,
                len(self.runs),
            )
        ]
        parts += [_RUN.pack(r.start, r.count, int(r.fate), r.errno) for r in self.runs]
        return skippable(DESC, b"".join(parts))

    @classmethod
    def decode(cls, payload: bytes) -> Desc:
        if len(payload) < _DESC_FIXED.size:
            raise ImageError("chunk descriptor is truncated")
        seq, paddr, ram_bytes, data_size, flags, time_ns, nruns = _DESC_FIXED.unpack_from(payload)
        if ram_bytes > MAX_CHUNK_SIZE or nruns > MAX_RUNS_PER_CHUNK:
            raise ImageError(
                f"chunk descriptor {seq} is impossible ({ram_bytes} bytes, {nruns} runs)"
            )
        if len(payload) != _DESC_FIXED.size + nruns * _RUN.size:
            raise ImageError(f"chunk descriptor {seq} has the wrong length")
        runs = []
        for i in range(nruns):
            start, count, fate, errno = _RUN.unpack_from(payload, _DESC_FIXED.size + i * _RUN.size)
            try:
                fate = Fate(fate)
            except ValueError:
                raise ImageError(f"chunk descriptor {seq} names unknown page fate {fate}") from None
            runs.append(FateRun(start, count, fate, errno))
        return cls(seq, paddr, ram_bytes, data_size, flags, time_ns, runs)


@dataclass
class Blob:
    """A named piece of metadata (VMCOREINFO, BTF, kallsyms...), zstd-compressed inside."""

    name: str
    raw_length: int
    sha256: bytes
    frame: bytes  # the zstd frame holding the raw bytes

    def encode(self) -> bytes:
        name = self.name.encode()
        return skippable(
            BLOB,
            _BLOB_FIXED.pack(len(name))
            + name
            + _BLOB_AFTER_NAME.pack(self.raw_length, self.sha256)
            + self.frame,
        )

    @classmethod
    def decode(cls, payload: bytes) -> Blob:
        if len(payload) < _BLOB_FIXED.size:
            raise ImageError("blob record is truncated")
        (name_len,) = _BLOB_FIXED.unpack_from(payload)
        body = _BLOB_FIXED.size + name_len
        if len(payload) < body + _BLOB_AFTER_NAME.size:
            raise ImageError("blob record is truncated")
        try:
            name = payload[_BLOB_FIXED.size : body].decode()
        except UnicodeDecodeError:
            raise ImageError("blob record has a name that is not UTF-8") from None
        raw_length, digest = _BLOB_AFTER_NAME.unpack_from(payload, body)
        return cls(name, raw_length, digest, payload[body + _BLOB_AFTER_NAME.size :])


@dataclass
class IndexRow:
    """One row of the INDEX record: where a chunk's DESC or a BLOB frame starts in the file."""

    kind: int
    paddr: int
    ram_bytes: int
    offset: int
    frame_size: int  # DESC frame or BLOB frame, header included
    data_size: int  # DATA frame following a DESC, 0 for blobs
    seq: int
    name: str = ""


def encode_index(rows: list[IndexRow]) -> bytes:
    parts = [struct.pack("<I", len(rows))]
    for r in rows:
        name = r.name.encode()
        parts.append(
            _INDEX_ROW.pack(
                r.kind, r.paddr, r.ram_bytes, r.offset, r.frame_size, r.data_size, r.seq
            )
            + struct.pack("<H", len(name))
            + name
        )
    return skippable(INDEX, b"".join(parts))


def decode_index(payload: bytes) -> list[IndexRow]:
    if len(payload) < 4:
        raise ImageError("index record is truncated")
    (count,) = struct.unpack_from("<I", payload)
    if count > len(payload) // (_INDEX_ROW.size + 2):
        raise ImageError("index record claims more rows than it holds")
    rows, pos = [], 4
    for _ in range(count):
        if pos + _INDEX_ROW.size + 2 > len(payload):
            raise ImageError("index record is truncated")
        kind, paddr, ram, offset, fsize, dsize, seq = _INDEX_ROW.unpack_from(payload, pos)
        pos += _INDEX_ROW.size
        (name_len,) = struct.unpack_from("<H", payload, pos)
        pos += 2
        name = payload[pos : pos + name_len].decode(errors="replace")
        pos += name_len
        rows.append(IndexRow(kind, paddr, ram, offset, fsize, dsize, seq, name))
    return rows


def encode_seek_table(frames: list[tuple[int, int]]) -> bytes:
    """The zstd seekable format's seek table for ``(compressed, decompressed)`` frame sizes.

    Skippable frames are listed with a decompressed size of 0, so every entry's compressed
    offset is the sum of the ones before it, as the seekable format requires.
    """
    entries = b"".join(_SEEK_ENTRY.pack(c, d) for c, d in frames)
    return skippable(SEEK_TABLE, entries + _SEEK_FOOTER.pack(len(frames), 0, SEEKABLE_MAGIC))


def decode_seek_footer(tail: bytes) -> tuple[int, int]:
    """Return ``(number of frames, seek table frame size)`` from the file's last 9 bytes."""
    count, descriptor, magic = _SEEK_FOOTER.unpack(tail[-_SEEK_FOOTER.size :])
    if magic != SEEKABLE_MAGIC:
        raise ImageError("no seek table at the end of the image")
    entry = _SEEK_ENTRY.size + (4 if descriptor & 0x80 else 0)
    return count, FRAME_HEAD.size + count * entry + _SEEK_FOOTER.size


def decode_seek_table(payload: bytes) -> list[tuple[int, int]]:
    count, descriptor, magic = _SEEK_FOOTER.unpack_from(payload, len(payload) - _SEEK_FOOTER.size)
    if magic != SEEKABLE_MAGIC:
        raise ImageError("seek table is damaged")
    entry = _SEEK_ENTRY.size + (4 if descriptor & 0x80 else 0)
    if count * entry + _SEEK_FOOTER.size != len(payload):
        raise ImageError("seek table has the wrong length")
    return [_SEEK_ENTRY.unpack_from(payload, i * entry) for i in range(count)]
