"""The native image format: record layouts, shared by the writer and the reader.

An image is nothing but zstd frames. DATA frames decompress, in order, to a LiME file;
everything else travels in skippable frames that `zstd -d` ignores. docs/image-format.md
describes the layout byte by byte; this module is its single definition in code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
import zlib
from dataclasses import dataclass, field

import xxhash

from collector.errors import ImageError
from collector.image.lime import LIME_HEADER_SIZE
from collector.memory import Fate, FateRun

FORMAT_VERSION = 2
#: Versions this reader opens. Version 1 records carry no checksum of their own. Version 3 is
#: version 2 for images that use what older readers would misreport: a whole-stream hash
#: other than SHA-256, or page fates they do not know; the writer uses it only then. Version
#: 4 is version 3 plus the READ_ZERO fate (``--skip zero``), which a version 3 reader would
#: take for a damaged chunk descriptor.
READABLE_VERSIONS = (1, 2, 3, 4)
#: The first version whose chunk descriptors may record READ_ZERO pages.
READ_ZERO_VERSION = 4
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
_DESC_FIXED_V1 = struct.Struct("<IQIIBQI")
_DESC_FIXED_V2 = struct.Struct("<IQIIBQIQ")  # version 1's fields, then the DATA frame's hash
_CRC = struct.Struct("<I")
_MAGIC = struct.Struct("<I")
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
MAX_INDEX_ROWS = 1 << 24
#: A DATA frame holds at most a chunk and a LiME header; stored uncompressed it grows by a
#: 3-byte header per 128 KiB block plus the frame header and checksum.
MAX_DATA_FRAME = MAX_CHUNK_SIZE + (1 << 20)
#: Blobs are kernel metadata (BTF, kallsyms: a few MiB); more is damage or hostility.
MAX_BLOB_BYTES = 256 << 20
#: JSON in HEADER and END is a few levels deep; deeper nesting is damage or hostility.
MAX_JSON_DEPTH = 16


class RecordDamaged(ImageError):
    """A record's checksum does not match its bytes."""


def skippable(magic: int, payload: bytes) -> bytes:
    """Wrap ``payload`` in a skippable frame with ``magic``."""
    return FRAME_HEAD.pack(magic, len(payload)) + payload


def record_crc(magic: int, body: bytes | memoryview) -> int:
    """CRC-32 (zlib's) of a record's magic (u32 LE) followed by its body.

    Folding the magic in means a record whose magic is damaged into another record's magic
    fails its check too.
    """
    return zlib.crc32(body, zlib.crc32(_MAGIC.pack(magic)))


def sealed(magic: int, body: bytes) -> bytes:
    """A version 2 record: ``body`` followed by its :func:`record_crc`, in a skippable frame."""
    return skippable(magic, body + _CRC.pack(record_crc(magic, body)))


def unseal(magic: int, payload: bytes, what: str) -> bytes:
    """The body of a version 2 record after checking its trailing CRC.

    :raises RecordDamaged: the payload is too short or its CRC does not match.
    """
    if len(payload) < _CRC.size:
        raise RecordDamaged(f"{what} is too short to hold its checksum")
    body = payload[: -_CRC.size]
    (stored,) = _CRC.unpack_from(payload, len(body))
    if record_crc(magic, body) != stored:
        raise RecordDamaged(f"{what} does not match its checksum")
    return body


def _encode(magic: int, body: bytes, version: int) -> bytes:
    return sealed(magic, body) if version >= 2 else skippable(magic, body)


def _decode(magic: int, payload: bytes, version: int, what: str) -> bytes:
    return unseal(magic, payload, what) if version >= 2 else payload


def data_hash(frame: bytes | memoryview) -> int:
    """The hash a version 2 DESC records for its DATA frame: XXH3-64 of the frame's bytes.

    XXH3 rather than CRC-32 because it covers every compressed byte of the RAM: at about
    20 GB/s against zlib's 3.5 here, it costs the capture a few tenths of a percent where
    CRC-32 cost about 3 %. ``xxhsum -H3`` computes it too.
    """
    return xxhash.xxh3_64_intdigest(frame)


def load_json(data: bytes, what: str) -> dict:
    """Parse a record's JSON object, bounded: no traceback on any input.

    :raises ImageError: not UTF-8 JSON, not an object, or nested deeper than
        :data:`MAX_JSON_DEPTH`.
    """
    try:
        value = json.loads(data.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        detail = "nested too deeply" if isinstance(e, RecursionError) else str(e)[:80]
        raise ImageError(f"the {what} is not valid JSON ({detail})") from None
    if not isinstance(value, dict):
        raise ImageError(f"the {what} is not a JSON object")
    # Iterative: a deep structure must not exhaust the stack of whoever walks it later.
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise ImageError(f"the {what} nests JSON deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return value


@dataclass
class Header:
    """The first record: format version, geometry, capture UUID and the metadata JSON."""

    page_size: int
    chunk_size: int
    uuid: bytes
    metadata: dict
    version: int = FORMAT_VERSION
    flags: int = 0

    #: Why the header's checksum failed, when it was decoded with ``strict=False``.
    damage: str | None = None

    def encode(self) -> bytes:
        fixed = _HEADER_FIXED.pack(
            MAGIC, self.version, self.flags, self.page_size, self.chunk_size, self.uuid
        )
        text = json.dumps(self.metadata, sort_keys=True, default=str).encode()
        return _encode(HEADER, fixed + text, self.version)

    @classmethod
    def decode(cls, payload: bytes, strict: bool = True) -> Header:
        """Decode the HEADER record's payload.

        :param strict: raise :class:`RecordDamaged` on a checksum mismatch; when False, decode
            what is there and say why in :attr:`damage` (the rest of the image has its own
            checks, so a damaged header need not hide intact RAM).
        """
        if len(payload) < _HEADER_FIXED.size:
            raise ImageError("image header is truncated")
        magic, version, flags, page_size, chunk_size, uuid = _HEADER_FIXED.unpack_from(payload)
        if magic != MAGIC:
            raise ImageError("not a collector image: header magic is wrong")
        if version not in READABLE_VERSIONS:
            raise ImageError(
                f"image format version {version} is not supported (this reader opens "
                f"{', '.join(map(str, READABLE_VERSIONS))})"
            )
        damage = None
        body = payload
        if version >= 2:
            try:
                body = unseal(HEADER, payload, "the HEADER record")
            except RecordDamaged as e:
                if strict:
                    raise
                damage, body = str(e), payload[: -_CRC.size]
        try:
            if page_size not in (4096, 8192, 16384, 65536) or not 0 < chunk_size <= MAX_CHUNK_SIZE:
                raise ImageError(
                    f"image header has impossible geometry: page {page_size}, chunk {chunk_size}"
                )
            metadata = load_json(body[_HEADER_FIXED.size :], "HEADER metadata")
        except ImageError as e:
            if damage:
                raise RecordDamaged(f"{damage}, and cannot be read: {e}") from None
            raise
        return cls(page_size, chunk_size, uuid, metadata, version, flags, damage)


@dataclass
class Desc:
    """Describes the DATA frame that follows it: where its RAM lives and each page's fate.

    ``runs`` lists only pages whose fate is not READ; ``FateRun.start`` is a page index
    within the chunk (page 0 holds ``paddr``). ``data_hash`` (version 2) is the
    :func:`data_hash` of the DATA frame, which ties the frame to this position.
    """

    seq: int
    paddr: int
    ram_bytes: int
    data_size: int
    flags: int
    time_ns: int
    runs: list[FateRun] = field(default_factory=list)
    data_hash: int | None = None

    @property
    def has_lime_header(self) -> bool:
        return bool(self.flags & DESC_FLAG_LIME_HEADER)

    @functools.cached_property
    def unread_runs(self) -> list[FateRun]:
        """The runs of pages whose bytes are not RAM's (``runs`` less READ_ZERO's): what a
        read must stop at. Kept apart because RAM with scattered zero pages can give a chunk
        hundreds of READ_ZERO runs that every read would otherwise step over."""
        return [r for r in self.runs if not r.fate.is_data]

    @property
    def stream_bytes(self) -> int:
        """How many bytes the DATA frame decompresses to."""
        return self.ram_bytes + (LIME_HEADER_SIZE if self.has_lime_header else 0)

    def encode(self, version: int = FORMAT_VERSION) -> bytes:
        fields = (
            self.seq,
            self.paddr,
            self.ram_bytes,
            self.data_size,
            self.flags,
            self.time_ns,
            len(self.runs),
        )
        if version >= 2:
            fixed = _DESC_FIXED_V2.pack(*fields, self.data_hash or 0)
        else:
            fixed = _DESC_FIXED_V1.pack(*fields)
        parts = [fixed]
        parts += [_RUN.pack(r.start, r.count, int(r.fate), r.errno) for r in self.runs]
        return _encode(DESC, b"".join(parts), version)

    @classmethod
    def decode(cls, payload: bytes, version: int = FORMAT_VERSION) -> Desc:
        payload = _decode(DESC, payload, version, "chunk descriptor")
        fixed = _DESC_FIXED_V2 if version >= 2 else _DESC_FIXED_V1
        if len(payload) < fixed.size:
            raise ImageError("chunk descriptor is truncated")
        seq, paddr, ram_bytes, data_size, flags, time_ns, nruns, *crc = fixed.unpack_from(payload)
        if ram_bytes > MAX_CHUNK_SIZE or nruns > MAX_RUNS_PER_CHUNK or data_size > MAX_DATA_FRAME:
            raise ImageError(
                f"chunk descriptor {seq} is impossible ({ram_bytes} bytes, {nruns} runs)"
            )
        if len(payload) != fixed.size + nruns * _RUN.size:
            raise ImageError(f"chunk descriptor {seq} has the wrong length")
        runs = []
        for start, count, fate, errno in _RUN.iter_unpack(payload[fixed.size :]):
            try:
                fate = Fate(fate)
            except ValueError:
                raise ImageError(f"chunk descriptor {seq} names unknown page fate {fate}") from None
            if fate == Fate.READ_ZERO and version < READ_ZERO_VERSION:
                # Such a page is served as data: a fate this version cannot hold is damage.
                raise ImageError(
                    f"chunk descriptor {seq} names page fate {int(fate)} ({fate.label}), "
                    f"which version {version} images do not have"
                )
            runs.append(FateRun(start, count, fate, errno))
        return cls(seq, paddr, ram_bytes, data_size, flags, time_ns, runs, *crc)


@dataclass
class Blob:
    """A named piece of metadata (VMCOREINFO, BTF, kallsyms...), zstd-compressed inside."""

    name: str
    raw_length: int
    sha256: bytes
    frame: bytes  # the zstd frame holding the raw bytes

    def encode(self, version: int = FORMAT_VERSION) -> bytes:
        name = self.name.encode()
        body = (
            _BLOB_FIXED.pack(len(name))
            + name
            + _BLOB_AFTER_NAME.pack(self.raw_length, self.sha256)
            + self.frame
        )
        return _encode(BLOB, body, version)

    @classmethod
    def decode(cls, payload: bytes, version: int = FORMAT_VERSION) -> Blob:
        payload = _decode(BLOB, payload, version, "blob record")
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

    @staticmethod
    def name_of(prefix: bytes) -> str:
        """The name of a blob from the first bytes of its payload (no checksum checked)."""
        if len(prefix) < _BLOB_FIXED.size:
            raise ImageError("blob record is truncated")
        (name_len,) = _BLOB_FIXED.unpack_from(prefix)
        raw = prefix[_BLOB_FIXED.size : _BLOB_FIXED.size + name_len]
        if len(raw) != name_len:
            raise ImageError("blob record is truncated")
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise ImageError("blob record has a name that is not UTF-8") from None


def encode_end(record: dict, version: int = FORMAT_VERSION) -> bytes:
    """The END record holding ``record`` as JSON."""
    return _encode(END, json.dumps(record, sort_keys=True).encode(), version)


def decode_end(payload: bytes, version: int = FORMAT_VERSION) -> dict:
    """The END record's JSON, checked (checksum in version 2, then types of known fields).

    :raises ImageError: damaged, not JSON, or a known field of the wrong type.
    """
    end = load_json(_decode(END, payload, version, "END record"), "END record")
    for key, types in _END_TYPES.items():
        if key in end and not isinstance(end[key], types):
            raise ImageError(f"the END record's {key!r} is {type(end[key]).__name__}")
        if key in end and isinstance(end[key], bool) and bool not in types:
            raise ImageError(f"the END record's {key!r} is bool")
    for key in ("pages", "unreadable_errnos"):
        if any(type(v) is not int for v in end.get(key, {}).values()):
            raise ImageError(f"the END record's {key!r} holds a value that is not a count")
    return end


#: Whole-stream hashes an image can record: the name `collect verify` and the END record use,
#: and the command that checks it from outside (`zstd -dc IMAGE | COMMAND`).
STREAM_HASHES = {"sha256": "sha256sum", "blake3": "b3sum"}


def stream_hasher(name: str):
    """A fresh hasher for the whole-stream hash ``name`` (see :data:`STREAM_HASHES`).

    BLAKE3 hashes 1 KiB chunks as leaves of a binary tree; the ``blake3`` package splits each
    large update into power-of-two subtrees hashed on every core (``max_threads=AUTO``) and
    releases the GIL while it does, so one ordered feeder thread is not a serial stage: a
    4 MiB chunk is 4,096 leaves.
    """
    if name == "sha256":
        return hashlib.sha256()
    if name == "blake3":
        import blake3  # only images hashed with it pay for the import

        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    raise ValueError(f"unknown stream hash {name!r} (known: {', '.join(STREAM_HASHES)})")


def stream_hash_fields(name: str, hexdigest: str) -> dict:
    """The END record's fields for a whole-stream hash: ``stream_sha256`` as every version
    writes it, or ``stream_hash`` naming the algorithm and ``stream_<name>`` its digest."""
    if name == "sha256":
        return {"stream_sha256": hexdigest}
    return {"stream_hash": name, f"stream_{name}": hexdigest}


def end_stream_hash(end: dict) -> tuple[str, str | None]:
    """The whole-stream hash an END record holds: ``(algorithm, hex digest or None)``.

    Images before version 3 name no algorithm: theirs is SHA-256.
    """
    name = end.get("stream_hash", "sha256")
    return name, end.get(f"stream_{name}")


_END_TYPES: dict[str, tuple[type, ...]] = {
    "clean": (bool,),
    "stopped_by": (str, type(None)),
    "chunks": (int,),
    "stream_bytes": (int,),
    "stream_sha256": (str,),
    "stream_hash": (str,),
    "stream_blake3": (str,),
    "metadata_sha256": (str,),
    "pages": (dict,),
    "unreadable_errnos": (dict,),
    "end_time": (str,),
}


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


def encode_index(rows: list[IndexRow], version: int = FORMAT_VERSION) -> bytes:
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
    return _encode(INDEX, b"".join(parts), version)


def decode_index(payload: bytes, version: int = FORMAT_VERSION) -> list[IndexRow]:
    payload = _decode(INDEX, payload, version, "INDEX record")
    if len(payload) < 4:
        raise ImageError("index record is truncated")
    (count,) = struct.unpack_from("<I", payload)
    if count > len(payload) // (_INDEX_ROW.size + 2) or count > MAX_INDEX_ROWS:
        raise ImageError("index record claims more rows than it holds")
    rows, pos = [], 4
    for _ in range(count):
        if pos + _INDEX_ROW.size + 2 > len(payload):
            raise ImageError("index record is truncated")
        kind, paddr, ram, offset, fsize, dsize, seq = _INDEX_ROW.unpack_from(payload, pos)
        pos += _INDEX_ROW.size
        (name_len,) = struct.unpack_from("<H", payload, pos)
        pos += 2
        if pos + name_len > len(payload):
            raise ImageError("index record is truncated")
        name = payload[pos : pos + name_len].decode(errors="replace")
        pos += name_len
        rows.append(IndexRow(kind, paddr, ram, offset, fsize, dsize, seq, name))
    if pos != len(payload):
        raise ImageError("index record has bytes after its last row")
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
    if len(payload) < _SEEK_FOOTER.size:
        raise ImageError("seek table is truncated")
    count, descriptor, magic = _SEEK_FOOTER.unpack_from(payload, len(payload) - _SEEK_FOOTER.size)
    if magic != SEEKABLE_MAGIC:
        raise ImageError("seek table is damaged")
    entry = _SEEK_ENTRY.size + (4 if descriptor & 0x80 else 0)
    if count * entry + _SEEK_FOOTER.size != len(payload):
        raise ImageError("seek table has the wrong length")
    if descriptor:
        raise ImageError(f"seek table descriptor is {descriptor:#x}; this format writes 0")
    return list(_SEEK_ENTRY.iter_unpack(payload[: count * entry]))
