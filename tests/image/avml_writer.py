"""AVML files for tests, written from the format's description rather than by the reader's code.

AVML (src/image.rs): per range a 32-byte LiME-style header with magic ``AVML`` and version 2,
the range as a snappy framed stream (framing_format.txt), then the stream's length as a
u64. Snappy blocks here are either literal-only (valid snappy that any decoder must read)
or cramjam's compressor's output; CRC-32C is computed here, bit by bit from the polynomial.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import BinaryIO

AVML_HEADER = struct.Struct("<IIQQQ")
AVML_MAGIC = 0x4C4D5641
LIME_MAGIC = 0x4C694D45
STREAM_ID = b"\xff\x06\x00\x00sNaPpY"


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1  # Castagnoli, reflected
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc(data: bytes) -> int:
    """framing_format.txt section 3: rotate right by 15 bits and add 0xa282ead8."""
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def literal_block(data: bytes) -> bytes:
    """A snappy block made of one literal element: the preamble, a tag, the bytes."""
    n = len(data) - 1
    if n < 60:
        tag = bytes([n << 2])
    elif n < 1 << 8:
        tag = bytes([60 << 2, n])
    elif n < 1 << 16:
        tag = bytes([61 << 2]) + n.to_bytes(2, "little")
    else:
        tag = bytes([62 << 2]) + n.to_bytes(3, "little")
    return varint(len(data)) + tag + data


def chunk(kind: int, body: bytes) -> bytes:
    return bytes([kind]) + len(body).to_bytes(3, "little") + body


def compressed_chunk(data: bytes, block: bytes | None = None) -> bytes:
    return chunk(0x00, struct.pack("<I", masked_crc(data)) + (block or literal_block(data)))


def uncompressed_chunk(data: bytes) -> bytes:
    return chunk(0x01, struct.pack("<I", masked_crc(data)) + data)


def framed(data: bytes, style: str = "literal") -> bytes:
    """``data`` as a framed stream in 64 KiB chunks: ``literal`` blocks, ``plain``
    (uncompressed) chunks, ``mixed`` (alternating, with a padding chunk between), or
    ``cramjam`` (its framed compressor: Rust's snap crate, the one AVML itself uses)."""
    if style == "cramjam":
        import cramjam

        return bytes(cramjam.snappy.compress(data))
    out = bytearray(STREAM_ID)
    for n, at in enumerate(range(0, len(data), 65536)):
        piece = data[at : at + 65536]
        if style == "plain" or (style == "mixed" and n % 2):
            out += uncompressed_chunk(piece)
        else:
            out += compressed_chunk(piece)
        if style == "mixed":
            out += chunk(0xFE, bytes(3))
    return bytes(out)


def header(start: int, end_inclusive: int, version: int = 2) -> bytes:
    magic = AVML_MAGIC if version == 2 else LIME_MAGIC
    return AVML_HEADER.pack(magic, version, start, end_inclusive, 0)


def avml_range(start: int, data: bytes, style: str = "literal") -> bytes:
    stream = framed(data, style)
    return header(start, start + len(data) - 1) + stream + struct.pack("<Q", len(stream))


def avml_file(ranges: dict[int, bytes], style: str = "literal") -> bytes:
    return b"".join(avml_range(start, data, style) for start, data in sorted(ranges.items()))


#: AVML's MAX_BLOCK_SIZE: ranges are cut into blocks of at most this many bytes.
AVML_BLOCK = 0x1000 * 0x1000


def write_avml_like(
    ranges: list[tuple[int, int]], read: Callable[[int, int], bytes], out: BinaryIO
) -> int:
    """Write memory as AVML itself does (src/image.rs copy_block): each range cut into
    16 MiB blocks, each block one framed stream from Rust's snap crate (cramjam's), and a
    block that is all zeros left out. Returns how many blocks were left out.

    :param ranges: ``(start, end)`` with ``end`` exclusive.
    :param read: ``read(paddr, size) -> bytes``.
    """
    import cramjam

    left_out = 0
    for start, end in ranges:
        for at in range(start, end, AVML_BLOCK):
            data = read(at, min(AVML_BLOCK, end - at))
            if not data.strip(b"\0"):
                left_out += 1
                continue
            stream = bytes(cramjam.snappy.compress(data))
            out.write(header(at, at + len(data) - 1) + stream + struct.pack("<Q", len(stream)))
    return left_out
