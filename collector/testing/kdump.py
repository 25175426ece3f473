"""Write small kdump-compressed files the way makedumpfile lays them out, for tests.

Follows makedumpfile's diskdump_mod.h (x86-64): the header block, the sub header block with
the notes and VMCOREINFO after it, the two bitmaps, a descriptor per dumped page and the
pages' data. Written independently of the reader (plain ``struct`` packing, no shared code).
"""

from __future__ import annotations

import os
import struct
import zlib

import zstandard

FLAGS = {"none": 0, "zlib": 0x1, "lzo": 0x2, "snappy": 0x4, "zstd": 0x20}
INCOMPLETE = 0x8


def _note(name: bytes, desc: bytes, n_type: int = 0) -> bytes:
    name0 = name + b"\0"
    return (
        struct.pack("<III", len(name0), len(desc), n_type)
        + name0.ljust((len(name0) + 3) // 4 * 4, b"\0")
        + desc.ljust((len(desc) + 3) // 4 * 4, b"\0")
    )


def write_kdump(
    path: str | os.PathLike[str],
    pages: dict[int, bytes],
    ram: list[tuple[int, int]],
    *,
    compression: str = "zlib",
    vmcoreinfo: bytes | None = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\n",
    block_size: int = 4096,
    header_version: int = 6,
    dump_level: int = 31,
    status: int | None = None,
    split: bool = False,
    max_mapnr: int | None = None,
    release: bytes = b"6.1.0-test",
) -> int:
    """Write a kdump-compressed file and return its size.

    :param pages: page frame number -> its ``block_size`` bytes: the pages the dump keeps (in
        the 2nd bitmap). Pages that are all zeros share one stored copy, as makedumpfile's
        ``pd_zero`` does.
    :param ram: ``(first_pfn, end_pfn)`` runs of the 1st bitmap: the memory the kernel had.
    :param compression: ``none``, ``zlib``, ``zstd``, or a flag name written as-is (``lzo``,
        ``snappy``) to test a reader's refusal; stored pages that compress no smaller are
        written whole with no flag, as makedumpfile does.
    :param status: ``disk_dump_header.status`` (default: the compression's flag).
    """
    bs = block_size
    if max_mapnr is None:
        max_mapnr = max([e for _, e in ram] + [p + 1 for p in pages] + [1])
    flag = FLAGS[compression]
    notes = b""
    vi_off = vi_size = 0
    note_off = 2 * bs  # after the sub header in block 1 (kept simple: its own block)
    if vmcoreinfo is not None:
        notes = _note(b"VMCOREINFO", vmcoreinfo)
        name_len = (len(b"VMCOREINFO\0") + 3) // 4 * 4
        vi_off, vi_size = note_off + 12 + name_len, len(vmcoreinfo)
    sub_hdr_size = 1 + (len(notes) + bs - 1) // bs
    half = max(1, ((max_mapnr + 7) // 8 + bs - 1) // bs)
    bitmap_blocks = 2 * half
    bitmap1 = bytearray(half * bs)
    bitmap2 = bytearray(half * bs)
    for first, end in ram:
        for pfn in range(first, end):
            bitmap1[pfn >> 3] |= 1 << (pfn & 7)
    for pfn in pages:
        bitmap2[pfn >> 3] |= 1 << (pfn & 7)
    desc_off = (1 + sub_hdr_size + bitmap_blocks) * bs
    data_off = desc_off + 24 * len(pages)
    descs = bytearray()
    data = bytearray()
    zero_at: int | None = None
    for pfn in sorted(pages):
        page = pages[pfn]
        assert len(page) == bs
        if page == bytes(bs) and zero_at is not None:
            descs += struct.pack("<qIIQ", zero_at, bs, 0, 0)
            continue
        if compression == "zlib":
            packed, used = zlib.compress(page), flag
        elif compression == "zstd":
            packed, used = zstandard.ZstdCompressor().compress(page), flag
        elif compression == "none":
            packed, used = page, 0
        else:
            packed, used = b"\xaa" * 100, flag  # never decompressed by a reader that refuses
        if len(packed) >= bs:
            packed, used = page, 0
        at = data_off + len(data)
        if page == bytes(bs):
            zero_at = at
            packed, used = page, 0
        descs += struct.pack("<qIIQ", at, len(packed), used, 0)
        data += packed
    uts = b"".join(
        s.ljust(65, b"\0")
        for s in (b"Linux", b"testhost", release, b"#1 SMP", b"x86_64", b"(none)")
    )
    header = struct.pack(
        "<8si390s6xqqIiiIIIIIIi",
        b"KDUMP   ", header_version, uts, 0, 0, flag if status is None else status, bs,
        sub_hdr_size, bitmap_blocks, min(max_mapnr, 0xFFFFFFFF), len(pages), 0, 0, 0, 1,
    )  # fmt: skip
    sub = struct.pack(
        "<QiiQQqQqQqQQQQ",
        0, dump_level, int(split), 0, max_mapnr, vi_off, vi_size, note_off if notes else 0,
        len(notes), 0, 0, 0, max_mapnr, max_mapnr,
    )  # fmt: skip
    with open(path, "wb") as f:
        f.write(header.ljust(bs, b"\0"))
        f.write(sub.ljust(bs, b"\0"))
        f.write(notes.ljust((sub_hdr_size - 1) * bs, b"\0"))
        f.write(bitmap1)
        f.write(bitmap2)
        f.write(descs)
        f.write(data)
        return f.tell()
