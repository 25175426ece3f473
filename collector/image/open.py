"""Open any memory image by its first bytes: the collector's own, LiME, or an ELF core."""

from __future__ import annotations

import os
import struct

from collector.elf import ELFMAG
from collector.errors import ImageError
from collector.image.elfcore import ElfCore
from collector.image.lime import LIME_MAGIC_BYTES, LimeImage
from collector.image.raw import RawImage, open_regular
from collector.memory import PhysicalMemory

ZSTD_FRAME_MAGIC = 0xFD2FB528
ZSTD_SKIPPABLE_MIN = 0x184D2A50
ZSTD_SKIPPABLE_MAX = 0x184D2A5F

FORMATS = ("auto", "native", "lime", "elf", "raw")


def sniff(head: bytes) -> str | None:
    """The format whose magic ``head`` starts with: ``native``, ``elf``, ``lime`` or None."""
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
    return None


def sniff_file(path: str | os.PathLike[str]) -> str | None:
    """:func:`sniff` of the file at ``path``, which must be a regular file or block device.

    :raises ImageError: it cannot be opened, or is a FIFO, socket, character device or
        directory (refused at once, without waiting on a writer).
    """
    fd = open_regular(path, allow_block=True)
    try:
        return sniff(os.pread(fd, 4, 0))
    except OSError as e:
        raise ImageError(f"{os.fsdecode(path)}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)


def open_image(path: str | os.PathLike[str], fmt: str = "auto") -> PhysicalMemory:
    """Open the memory image at ``path``, choosing the reader from its first four bytes.

    :param path: the image file.
    :param fmt: ``auto`` (sniff), or force ``native``, ``lime``, ``elf`` or ``raw`` (a
        padded raw file, which has no magic to sniff: the whole file is one range).
    :raises ImageError: one line, when the file cannot be opened or is no known format.
    """
    name = os.fsdecode(path)
    if fmt not in FORMATS:
        raise ImageError(f"{name}: unknown image format {fmt!r} (choose from {', '.join(FORMATS)})")
    if fmt == "auto":
        fd = open_regular(path, allow_block=True)
        try:
            head = os.pread(fd, 4, 0)
        except OSError as e:
            raise ImageError(f"{name}: cannot read: {e.strerror}") from None
        finally:
            os.close(fd)
        found = sniff(head)
        if found is None:
            shown = head.hex(" ") if head else "nothing: the file is empty"
            raise ImageError(
                f"{name}: not a collector image, LiME file or ELF core (starts with {shown})"
            )
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
    return RawImage(path)
