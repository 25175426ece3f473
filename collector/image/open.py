"""Open any memory image by its first bytes (the collector's own, LiME, an ELF core, a
kdump-compressed dump), or a raw file by request; every way opening fails is one of the
kinds in :mod:`collector.errors`."""

from __future__ import annotations

import os
import struct

from collector.elf import ELFMAG
from collector.errors import CannotOpenImage, NotAnImage, UsageError
from collector.image.elfcore import ElfCore
from collector.image.kdump import (
    DISKDUMP_SIGNATURE,
    FLATTENED_SIGNATURE,
    KDUMP_SIGNATURE,
    KdumpImage,
)
from collector.image.lime import LIME_MAGIC_BYTES, LimeImage
from collector.image.raw import RawImage, open_regular
from collector.memory import PhysicalMemory

ZSTD_FRAME_MAGIC = 0xFD2FB528
ZSTD_SKIPPABLE_MIN = 0x184D2A50
ZSTD_SKIPPABLE_MAX = 0x184D2A5F

FORMATS = ("auto", "native", "lime", "avml", "elf", "kdump", "raw")
#: What each format is called in messages.
FORMAT_NAMES = {
    "native": "a collector image",
    "lime": "a LiME file",
    "avml": "an AVML file",
    "elf": "an ELF core",
    "kdump": "a kdump-compressed dump",
    "raw": "a raw memory file",
}
#: Bytes :func:`sniff` looks at.
SNIFF_BYTES = 16


def sniff(head: bytes) -> str | None:
    """The format whose magic ``head`` starts with: ``native``, ``elf``, ``lime``, ``avml``, ``kdump``
    (makedumpfile's dumps, including the kinds its reader refuses by name) or None."""
    if len(head) < 4:
        return None
    (magic,) = struct.unpack_from("<I", head)
    # A native image is nothing but zstd frames; it starts with a skippable frame (HEADER),
    # but a bare zstd frame is accepted here and judged by the native reader.
    if magic == ZSTD_FRAME_MAGIC or ZSTD_SKIPPABLE_MIN <= magic <= ZSTD_SKIPPABLE_MAX:
        return "native"
    if head[:4] == ELFMAG:
        return "elf"
    if head[:4] == LIME_MAGIC_BYTES:
        return "lime"
    if head[:4] == b"AVML":  # AVML's compressed LiME (collector.image.avml)
        return "avml"
    if head[:8] in (KDUMP_SIGNATURE, DISKDUMP_SIGNATURE) or head.startswith(FLATTENED_SIGNATURE):
        return "kdump"
    return None


def read_head(path: str | os.PathLike[str]) -> bytes:
    """The first :data:`SNIFF_BYTES` bytes of the file at ``path`` (fewer if it is shorter).

    :raises CannotOpenImage: it cannot be opened, or is no regular file or block device.
    """
    fd = open_regular(path, allow_block=True)
    try:
        return os.pread(fd, SNIFF_BYTES, 0)
    except OSError as e:
        raise CannotOpenImage(os.fsdecode(path), e.strerror or str(e)) from None
    finally:
        os.close(fd)


def sniff_file(path: str | os.PathLike[str]) -> str | None:
    """:func:`sniff` of the file at ``path``, which must be a regular file or block device.

    :raises CannotOpenImage: it cannot be opened, or is a FIFO, socket, character device or
        directory (refused at once, without waiting on a writer).
    """
    return sniff(read_head(path))


def not_an_image(path: str | os.PathLike[str], head: bytes) -> NotAnImage:
    """The one error for a file that is no format read here, saying what it starts with."""
    if not head:
        return NotAnImage(os.fsdecode(path), "the file is empty")
    return NotAnImage(
        os.fsdecode(path),
        f"it starts with {head[:8].hex(' ')}, the magic of no format read here (collector "
        "image, LiME, AVML, ELF core, kdump-compressed); a raw memory file needs --image-format raw",
    )


def open_image(
    path: str | os.PathLike[str],
    fmt: str = "auto",
    memory_map: list[tuple[int, int]] | None = None,
) -> PhysicalMemory:
    """Open the memory image at ``path``, choosing the reader from its first bytes.

    :param path: the image file.
    :param fmt: ``auto`` (sniff), or force ``native``, ``lime``, ``avml``, ``elf``, ``kdump`` or
        ``raw``: a raw file has no magic to sniff, so it is read only when asked for.
    :param memory_map: for ``raw`` only, the ``(start, end)`` ranges (end exclusive) the file
        holds at the offsets of their physical addresses; without it, the whole file from
        address 0 (holes then read as the zeros they were padded with).
    :raises UsageError: ``fmt`` is no format, or a map is given for a format with its own.
    :raises ImageError: one line of one of the kinds in :mod:`collector.errors`.
    """
    name = os.fsdecode(path)
    if fmt not in FORMATS:
        raise UsageError(f"unknown image format {fmt!r} (choose from {', '.join(FORMATS)})")
    if memory_map is not None and fmt != "raw":
        raise UsageError("a memory map is for raw files only (--image-format raw)")
    head = read_head(path)
    if fmt == "auto":
        found = sniff(head)
        if found is None:
            raise not_an_image(name, head)
        fmt = found
    if fmt == "native":
        from collector.image.reader import NativeImage  # imported late: zstd and the index

        return NativeImage(path)
    if fmt == "elf":
        return ElfCore(path)
    if fmt == "lime":
        return LimeImage(path)
    if fmt == "avml":
        from collector.image.avml import AvmlImage

        return AvmlImage(path)
    if fmt == "kdump":
        return KdumpImage(path)
    return RawImage(path, ranges=memory_map)
