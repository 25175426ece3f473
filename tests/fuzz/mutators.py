"""Hostile inputs built from good ones: native images, LiME files, ELF cores and
kdump-compressed dumps, mutated.

Each mutator takes the good file's bytes and a hypothesis ``draw`` and returns new bytes.
Records of a native image are found through its seek table by hand (the zstd seekable
format), so the mutators do not depend on the reader they attack. Resealing a record after
changing it (a fresh CRC-32 of magic and body) lets a mutation past the checksum to the
checks behind it, as a forger would.
"""

from __future__ import annotations

import json
import random
import re
import struct
import tempfile
import zlib
from collections.abc import Callable
from io import BytesIO
from typing import Any

from hypothesis import strategies as st

from collector.image.export import export_elf, export_lime
from collector.image.sparse import SparseMemory
from collector.image.writer import ImageWriter
from collector.memory import Fate, FateRun, PageFate
from collector.testing.kdump import write_kdump

Draw = Callable[[st.SearchStrategy[Any]], Any]

PAGE = 4096
CHUNK = 16 << 10
HEADER, DESC, BLOB, END, INDEX, SEEK = (
    0x184D2A50,
    0x184D2A51,
    0x184D2A52,
    0x184D2A53,
    0x184D2A54,
    0x184D2A5E,
)
ZSTD = 0xFD2FB528
VMCOREINFO = (
    b"OSRELEASE=6.1.0-fuzz\nPAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffff82a11000\n"
    b"SYMBOL(init_top_pgt)=ffffffff82a0a000\nKERNELOFFSET=0\nNUMBER(phys_base)=0\n"
)
ABSURD = (0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, 1 << 62, (1 << 63) - 1, 1 << 63, (1 << 64) - 1)


def ram() -> dict[int, bytes]:
    """Small RAM: low pages ending in a partial page, and RAM above 1 MiB, one chunk zero."""
    rng = random.Random(7)
    low = rng.randbytes(3 * PAGE + 0x800)
    high = bytearray(rng.randbytes(4 * CHUNK))
    high[CHUNK : 2 * CHUNK] = bytes(CHUNK)
    return {0x1000: low, 0x100000: bytes(high)}


def native_image() -> bytes:
    memory = ram()
    meta = {
        "ranges": [[s, s + len(d)] for s, d in memory.items()],
        "blobs": ["btf", "vmcoreinfo"],
        "host": {"hostname": "fuzz", "uname": {"release": "6.1.0-fuzz"}},
        "plan": {"entries": [{"start": 0x1000, "end": 0x4800, "source": "/dev/mem"}]},
    }
    out = BytesIO()
    # Version 4, with the all-zero chunk recorded read-zero (as `--skip zero` records it):
    # a mutated image must serve those pages as written (zeros) or not at all.
    w = ImageWriter(out, page_size=PAGE, chunk_size=CHUNK, metadata=meta, threads=1, version=4)
    w.add_blob("btf", bytes(range(256)) * 4)
    w.add_blob("vmcoreinfo", VMCOREINFO)
    for start, data in memory.items():
        pos = start
        while pos < start + len(data):
            end = min(start + len(data), (pos // CHUNK + 1) * CHUNK)
            runs = [FateRun(1, 1, Fate.UNREADABLE, 5)] if pos == 0x100000 else []
            if pos == 0x100000 + CHUNK:
                runs = [FateRun(0, CHUNK // PAGE, Fate.READ_ZERO)]
            bounds = (start, start + len(data)) if pos == start else (None, None)
            chunk = bytearray(data[pos - start : end - start])
            if runs:
                chunk[PAGE : 2 * PAGE] = bytes(PAGE)
            w.add_chunk(pos, bytes(chunk), runs, *bounds)
            pos = end
    w.finish({"stopped_by": None})
    return out.getvalue()


def expected_page(paddr: int) -> bytes | None:
    """The page at ``paddr`` as written (None for the unreadable one)."""
    if paddr == 0x100000 + PAGE:
        return None
    for start, data in ram().items():
        if start <= paddr < start + len(data):
            return data[paddr - start : paddr - start + PAGE]
    return None


def lime_file() -> bytes:
    out = BytesIO()
    fates = {0x100000 + PAGE: PageFate(Fate.UNREADABLE, 5)}
    export_lime(SparseMemory(ram(), fates=fates), out)
    return out.getvalue()


def avml_file() -> bytes:
    """The RAM as AVML writes it (the unreadable page as zeros, as AVML's reads give)."""
    from tests.image.avml_writer import avml_file as write_avml

    memory = ram()
    high = bytearray(memory[0x100000])
    high[PAGE : 2 * PAGE] = bytes(PAGE)
    memory[0x100000] = bytes(high)
    return write_avml(memory, "mixed")


def elf_core() -> bytes:
    out = BytesIO()
    export_elf(SparseMemory(ram()), out, VMCOREINFO, 0xFFFF888000000000)
    return out.getvalue()


def kdump_file() -> bytes:
    """The RAM as makedumpfile would keep it, zlib-compressed; the unreadable page excluded,
    the partial low page padded with zeros."""
    pages, ram_pfns = {}, []
    for start, data in ram().items():
        ram_pfns.append((start // PAGE, (start + len(data) + PAGE - 1) // PAGE))
        for off in range(0, len(data), PAGE):
            if start + off != 0x100000 + PAGE:
                pages[(start + off) // PAGE] = data[off : off + PAGE].ljust(PAGE, b"\0")
    with tempfile.NamedTemporaryFile() as f:
        write_kdump(f.name, pages, ram_pfns, vmcoreinfo=VMCOREINFO)
        return f.read()


# -- native records ---------------------------------------------------------------------------


def frames(data: bytes) -> list[tuple[int, int, int]]:
    """``(offset, magic, size)`` of every frame of a good image, from its seek table."""
    count = struct.unpack_from("<I", data, len(data) - 9)[0]
    table = len(data) - (8 + 8 * count + 9)
    out, pos = [], 0
    for i in range(count):
        size = struct.unpack_from("<I", data, table + 8 + 8 * i)[0]
        out.append((pos, struct.unpack_from("<I", data, pos)[0], size))
        pos += size
    out.append((table, SEEK, len(data) - table))
    return out


def reseal(data: bytearray, offset: int, size: int) -> None:
    """Give the record at ``offset`` a CRC that matches its (changed) body."""
    magic = struct.unpack_from("<I", data, offset)[0]
    if magic == SEEK or magic & 0xFFFFFFF0 != HEADER or size < 12:
        return
    body = bytes(data[offset + 8 : offset + size - 4])
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<I", magic)))
    struct.pack_into("<I", data, offset + size - 4, crc)


def flip_bits(data: bytes, draw: Draw) -> bytes:
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        out[draw(st.integers(0, len(out) - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(out)


def flip_in_record(data: bytes, draw: Draw) -> bytes:
    """One bit in one record that is not RAM."""
    records = [f for f in frames(data) if f[1] != ZSTD]
    offset, _, size = draw(st.sampled_from(records))
    out = bytearray(data)
    out[offset + draw(st.integers(0, size - 1))] ^= 1 << draw(st.integers(0, 7))
    return bytes(out)


def forge_record(data: bytes, draw: Draw) -> bytes:
    """One bit in one record that is not RAM, resealed: a forgery past the record's CRC."""
    records = [f for f in frames(data) if f[1] != ZSTD]
    offset, _, size = draw(st.sampled_from(records))
    out = bytearray(data)
    out[offset + 8 + draw(st.integers(0, max(0, size - 13)))] ^= 1 << draw(st.integers(0, 7))
    reseal(out, offset, size)
    return bytes(out)


def truncate(data: bytes, draw: Draw) -> bytes:
    return data[: draw(st.integers(0, len(data) - 1))]


def rearrange_frames(data: bytes, draw: Draw) -> bytes:
    """Swap, duplicate or drop frames (a DESC with or without its DATA frame)."""
    parts = [data[o : o + s] for o, _, s in frames(data)]
    i = draw(st.integers(1, len(parts) - 1))
    j = draw(st.integers(1, len(parts) - 1))
    how = draw(st.sampled_from(["swap", "duplicate", "drop", "swap pairs"]))
    if how == "swap":
        parts[i], parts[j] = parts[j], parts[i]
    elif how == "duplicate":
        parts.insert(j, parts[i])
    elif how == "drop":
        del parts[i]
    else:
        i, j = min(i, len(parts) - 2), min(j, len(parts) - 2)
        a, b = parts[i : i + 2], parts[j : j + 2]
        parts[i : i + 2], parts[j : j + 2] = b, a
    return b"".join(parts)


def absurd_field(data: bytes, draw: Draw) -> bytes:
    """An extreme value in a size or address field: a frame length, a DESC's sizes and
    address, an INDEX row, a seek-table entry, a zstd frame's content size; resealed."""
    layout = frames(data)
    offset, magic, size = draw(st.sampled_from(layout))
    value = draw(st.sampled_from(ABSURD))
    out = bytearray(data)
    if magic == ZSTD:
        # Frame header: magic, descriptor, [window], content size of 1, 2, 4 or 8 bytes.
        fhd = out[offset + 4]
        width = (1 if fhd & 0x20 else 0, 2, 4, 8)[fhd >> 6]
        at = offset + 5 + (0 if fhd & 0x20 else 1)
        if width:
            out[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        return bytes(out)
    fields = {  # (offset in payload, width) of the sizes and addresses of each record
        DESC: [(4, 8), (12, 4), (16, 4), (29, 4)],
        INDEX: [(0, 4), (5, 8), (13, 4), (17, 8), (25, 4), (29, 4), (33, 4)],
        BLOB: [(0, 2), (2 + 3, 8)],
        SEEK: [(0, 4), (4, 4), (size - 8 - 9, 4)],
        HEADER: [(12, 4), (16, 4)],
        END: [],
    }.get(magic, [])
    choice = draw(st.sampled_from([(-8 + 4, 4), *fields]))  # the frame length, or a field
    at, width = offset + 8 + choice[0], choice[1]
    if at + width <= offset + size:
        out[at : at + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
        reseal(out, offset, size)
    return bytes(out)


def _json_payload(draw: Draw) -> object:
    deep = draw(st.integers(17, 200_000))
    return draw(
        st.sampled_from(
            [
                "[" * deep + "]" * deep,
                '{"a":' + "[" * deep + "]" * deep + "}",
                "[]",
                '"text"',
                "1" * 5000,
                '{"ranges": "all", "host": [], "plan": {"entries": 7}, "blobs": {}}',
                '{"pages": [], "chunks": "9", "stream_sha256": 5, "clean": "yes"}',
                '{"host": {"hostname": "\\u001b]0;x\\u0007\\u001b[2J", "uname": 5}}',
                '{"ranges": [[0, 18446744073709551616]], "chunks": 1e999}',
                "{" + '"k": 1,' * 2000 + '"k": NaN}',
            ]
        )
    )


def hostile_json(data: bytes, draw: Draw) -> bytes:
    """Replace the JSON of HEADER or END with hostile JSON, under a valid CRC."""
    layout = frames(data)
    magic = draw(st.sampled_from([HEADER, END]))
    offset, _, size = next(f for f in layout if f[1] == magic)
    keep = 36 if magic == HEADER else 0  # HEADER's fixed fields before its JSON
    text = _json_payload(draw)
    if not isinstance(text, str):
        text = json.dumps(text)
    body = data[offset + 8 : offset + 8 + keep] + text.encode()
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<I", magic)))
    record = struct.pack("<II", magic, len(body) + 4) + body + struct.pack("<I", crc)
    return data[:offset] + record + data[offset + size :]


NATIVE_MUTATORS = [
    flip_bits,
    flip_in_record,
    truncate,
    rearrange_frames,
    forge_record,
    absurd_field,
    hostile_json,
]
#: Mutators that reseal what they change. Checksums find damage, not forgery: a forged DESC
#: can claim another fate for a page and still pass its CRC (only END's metadata hash, which
#: verify checks, then tells). For these, every command must still end in a report or one
#: clear line, but the pages served are not compared with the RAM written.
FORGERIES = (forge_record, absurd_field, hostile_json)


# -- LiME and ELF --------------------------------------------------------------------------------


def lime_absurd(data: bytes, draw: Draw) -> bytes:
    """An extreme start or end in one of the LiME range headers."""
    out = bytearray(data)
    starts, pos = [], 0
    while pos + 32 <= len(out):
        starts.append(pos)
        s, e = struct.unpack_from("<QQ", out, pos + 8)
        pos += 32 + e - s + 1
    at = draw(st.sampled_from(starts)) + draw(st.sampled_from([8, 16]))
    struct.pack_into("<Q", out, at, draw(st.sampled_from(ABSURD)))
    return bytes(out)


def lime_many_ranges(data: bytes, draw: Draw) -> bytes:
    n = draw(st.sampled_from([2, 1000, 20_000]))
    one = struct.pack("<IIQQ8x", 0x4C694D45, 1, 0, 0) + b"\x01"
    heads = [struct.pack("<IIQQ8x", 0x4C694D45, 1, 2 * i, 2 * i) + b"\x01" for i in range(n)]
    return one[:0] + b"".join(heads)


def elf_absurd(data: bytes, draw: Draw) -> bytes:
    """An extreme value in the ELF header's table fields or in a program header."""
    out = bytearray(data)
    phoff, phnum = struct.unpack_from("<Q", out, 32)[0], struct.unpack_from("<H", out, 56)[0]
    value = draw(st.sampled_from(ABSURD))
    where = draw(st.sampled_from(["e_phoff", "e_phnum", "e_phentsize", "e_shoff", "phdr"]))
    if where == "e_phoff":
        struct.pack_into("<Q", out, 32, value)
    elif where == "e_shoff":
        struct.pack_into("<Q", out, 40, value)
    elif where == "e_phnum":
        struct.pack_into("<H", out, 56, value & 0xFFFF)
    elif where == "e_phentsize":
        struct.pack_into("<H", out, 54, value & 0xFFFF)
    else:
        i = draw(st.integers(0, max(0, phnum - 1)))
        # p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align
        at = phoff + 56 * i + draw(st.sampled_from([8, 16, 24, 32, 40, 48]))
        if at + 8 <= len(out):
            struct.pack_into("<Q", out, at, value)
    return bytes(out)


def elf_many_segments(data: bytes, draw: Draw) -> bytes:
    """A core whose program header table claims (or holds) very many segments."""
    n = draw(st.sampled_from([0xFFFF, 70_000, 1_000_000]))
    out = bytearray(data)
    struct.pack_into("<H", out, 56, 0xFFFF)  # PN_XNUM: the count is in section header 0
    struct.pack_into("<Q", out, 40, len(out))  # e_shoff
    struct.pack_into("<H", out, 58, 64)  # e_shentsize
    return bytes(out) + struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, n, 0, 0)


def avml_absurd(data: bytes, draw: Draw) -> bytes:
    """An extreme start or end in an AVML header, or an extreme length in the first chunk of
    its stream: the chunk's three-byte length or the snappy preamble (the declared size)."""
    out = bytearray(data)
    heads = [m.start() for m in re.finditer(rb"AVML\x02\x00\x00\x00", data)]
    at = draw(st.sampled_from(heads))
    value = draw(st.sampled_from(ABSURD))
    chunk = at + 32 + 10  # the first chunk follows the header and the stream identifier
    where = draw(st.sampled_from(["start", "end", "length", "preamble"]))
    if where in ("start", "end"):
        struct.pack_into("<Q", out, at + (8 if where == "start" else 16), value)
    elif where == "length":
        out[chunk + 1 : chunk + 4] = (value % (1 << 24)).to_bytes(3, "little")
    else:
        preamble = bytearray()
        for i in range(5):  # a base-128 varint cut at five bytes
            preamble.append((value >> (7 * i)) & 0x7F | (0x80 if i < 4 else 0))
        out[chunk + 8 : chunk + 13] = preamble
    return bytes(out)


def kdump_absurd(data: bytes, draw: Draw) -> bytes:
    """An extreme value in a field of disk_dump_header, kdump_sub_header or a page_desc."""
    out = bytearray(data)
    value = draw(st.sampled_from(ABSURD))
    # (offset, size): header_version, block_size, sub_hdr_size, bitmap_blocks, max_mapnr;
    # the sub header's offset_vmcoreinfo, size_vmcoreinfo, offset_note, size_note and
    # max_mapnr_64; the first page_desc's offset, size and flags (after 1 + 2 + 2 blocks).
    fields = [(8, 4), (428, 4), (432, 4), (436, 4), (440, 4)]
    fields += [(PAGE + at, 8) for at in (32, 40, 48, 56, 96)]
    fields += [(5 * PAGE, 8), (5 * PAGE + 8, 4), (5 * PAGE + 12, 4)]
    at, size = draw(st.sampled_from(fields))
    out[at : at + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
    return bytes(out)


def kdump_bitmaps(data: bytes, draw: Draw) -> bytes:
    """Bytes of the bitmaps set or cleared: pages claimed or dropped without descriptors."""
    out = bytearray(data)
    at = 3 * PAGE + draw(st.integers(0, 2 * PAGE - 1))  # the two bitmap blocks
    out[at] = draw(st.sampled_from([0, 0xFF, 0x0F, 0x80]))
    return bytes(out)


LIME_MUTATORS = [flip_bits, truncate, lime_absurd, lime_many_ranges]
AVML_MUTATORS = [flip_bits, truncate, avml_absurd]
KDUMP_MUTATORS = [flip_bits, truncate, kdump_absurd, kdump_bitmaps]
ELF_MUTATORS = [flip_bits, truncate, elf_absurd, elf_many_segments]
