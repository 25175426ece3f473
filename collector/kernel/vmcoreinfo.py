"""VMCOREINFO: the kernel's own KEY=VALUE description of itself, as kept in RAM and ELF notes.

The text is produced by ``crash_save_vmcoreinfo_init()`` (kernel/vmcore_info.c, formerly
kernel/crash_core.c) and ``arch_crash_save_vmcoreinfo()`` (arch/x86/kernel/crash_core_64.c)
with the ``VMCOREINFO_*`` macros of include/linux/vmcore_info.h.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Mapping
from typing import NoReturn

from collector.elf import VMCOREINFO_NOTE_NAME, Elf64_Nhdr, find_note, iter_notes
from collector.errors import ImageError
from collector.memory import PageNotCaptured, PhysicalMemory

#: VMCOREINFO_BYTES: the kernel keeps the text in one page-sized buffer.
VMCOREINFO_BYTES = 4096
#: Hostile input bound: no real VMCOREINFO comes near this.
MAX_TEXT = 64 * 1024
MAX_LINE = 1024
NOTE_NAME = VMCOREINFO_NOTE_NAME.encode()

# KEY=VALUE with KEY either a bare word (OSRELEASE, BUILD-ID, CONFIG_X86_PAE) or
# KIND(name) where name may carry one dot (OFFSET(page.flags)).
_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}(\([A-Za-z0-9_.$]{1,128}\))?")
_HEX = re.compile(r"(0x)?[0-9a-fA-F]{1,16}")
_DEC = re.compile(r"-?[0-9]{1,20}")
_SIGNED_HEX = re.compile(r"-?0x[0-9a-fA-F]{1,16}")


def _parse_int(key: str, value: str, kind: str) -> int:
    """Parse one value by the printf format the kernel used for its kind of key."""
    if kind == "hex":
        if not _HEX.fullmatch(value):
            raise ImageError(f"VMCOREINFO {key}: {value[:40]!r} is not a hex address")
        return int(value, 16)
    # NUMBER() is "%ld", but some architectures print hex NUMBER()s ("0x%llx").
    if _SIGNED_HEX.fullmatch(value):
        return int(value, 16)
    if not _DEC.fullmatch(value):
        raise ImageError(f"VMCOREINFO {key}: {value[:40]!r} is not a number")
    number = int(value)
    if not -(1 << 63) <= number < (1 << 64):
        raise ImageError(f"VMCOREINFO {key}: {value[:40]!r} does not fit in 64 bits")
    return number


# Which keys hold which kind of value, by their printf format in vmcore_info.h.
_KINDS = {
    "SYMBOL": "hex",  # "SYMBOL(%s)=%lx"
    "OFFSET": "dec",  # "OFFSET(%s.%s)=%lu"
    "SIZE": "dec",  # "SIZE(%s)=%lu"
    "LENGTH": "dec",  # "LENGTH(%s)=%lu"
    "NUMBER": "dec",  # "NUMBER(%s)=%ld"
    "KERNELOFFSET": "hex",  # "KERNELOFFSET=%lx"
    "PAGESIZE": "dec",  # "PAGESIZE=%ld"
    "CRASHTIME": "dec",  # "CRASHTIME=%lld"
}


class VmcoreInfo:
    """Parsed VMCOREINFO text.

    Accessors return None for a key the text does not carry; :meth:`require` raises a
    one-line :class:`ImageError` naming the key instead.
    """

    def __init__(
        self, entries: Mapping[str, str], values: Mapping[str, int], text: str | None = None
    ) -> None:
        self._entries = dict(entries)
        self._values = dict(values)
        #: Where in physical memory the text was found, when it was found there.
        self.paddr: int | None = None
        #: The text as the kernel wrote it, up to its NUL (rebuilt from the entries when the
        #: object was made from entries).
        self.text = (
            text if text is not None else "".join(f"{k}={v}\n" for k, v in self._entries.items())
        )

    # -- construction -------------------------------------------------------------------

    @classmethod
    def parse(cls, text: str | bytes) -> VmcoreInfo:
        """Parse VMCOREINFO text (``KEY=VALUE`` lines; lines starting with ``#`` are skipped).

        :raises ImageError: the text is too long, has a malformed line, or holds no entry.
        """
        if isinstance(text, bytes | bytearray | memoryview):
            raw = bytes(text)
            if len(raw) > MAX_TEXT:
                raise ImageError(f"VMCOREINFO text is {len(raw)} bytes, more than {MAX_TEXT}")
            # The note's descriptor is NUL-padded; a NUL ends the text as it does in C.
            raw = raw.split(b"\0", 1)[0]
            try:
                text = raw.decode("ascii")
            except UnicodeDecodeError as exc:
                raise ImageError(f"VMCOREINFO text has a non-ASCII byte at {exc.start}") from None
        else:
            if len(text) > MAX_TEXT:
                raise ImageError(f"VMCOREINFO text is {len(text)} characters, more than {MAX_TEXT}")
            text = text.split("\0", 1)[0]
        entries: dict[str, str] = {}
        values: dict[str, int] = {}
        for lineno, line in enumerate(text.splitlines(), 1):
            if len(line) > MAX_LINE:
                raise ImageError(f"VMCOREINFO line {lineno} is longer than {MAX_LINE} characters")
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            key, sep, value = line.partition("=")
            if not sep or not _KEY.fullmatch(key):
                raise ImageError(f"VMCOREINFO line {lineno} is not KEY=VALUE: {line[:60]!r}")
            if not value.isprintable():
                raise ImageError(f"VMCOREINFO line {lineno} has unprintable characters")
            kind = _KINDS.get(key.split("(", 1)[0])
            if kind is not None:
                values[key] = _parse_int(key, value, kind)
            entries[key] = value
        if not entries:
            raise ImageError("VMCOREINFO text holds no KEY=VALUE entry")
        page_size = values.get("PAGESIZE")
        if page_size is not None and (page_size <= 0 or page_size & (page_size - 1)):
            raise ImageError(f"VMCOREINFO PAGESIZE={page_size} is not a power of two")
        return cls(entries, values, text)

    @classmethod
    def from_elf_notes(cls, notes: bytes) -> VmcoreInfo:
        """Find the ``VMCOREINFO`` note in the bytes of an ELF core's PT_NOTE segment.

        :raises ImageError: no such note, or the notes are malformed.
        """
        desc = find_vmcoreinfo_note(notes)
        if desc is None:
            raise ImageError("the ELF notes carry no VMCOREINFO note")
        return cls.parse(desc)

    @classmethod
    def from_blob(cls, data: bytes) -> VmcoreInfo:
        """Parse a ``vmcoreinfo`` image blob: either the bare text or the whole ELF note."""
        if len(data) >= 24 and data[12:23] == NOTE_NAME + b"\0":
            return cls.from_elf_notes(data)
        return cls.parse(data)

    # -- accessors ------------------------------------------------------------------------

    def entries(self) -> dict[str, int | str]:
        """Every entry keyed by its raw key (``SIZE(page)``, ``OSRELEASE``).

        Values of numeric keys (SYMBOL, OFFSET, SIZE, LENGTH, NUMBER, PAGESIZE, KERNELOFFSET,
        CRASHTIME) are ints, the others the text after ``=``.
        """
        return {k: self._values.get(k, v) for k, v in self._entries.items()}

    def raw_entries(self) -> dict[str, str]:
        """Every entry as the text after ``=``, keyed by the raw key."""
        return dict(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def _get(self, key: str) -> int | None:
        return self._values.get(key)

    def symbol(self, name: str) -> int | None:
        """``SYMBOL(name)``: the run-time virtual address of a kernel symbol."""
        return self._get(f"SYMBOL({name})")

    def offset(self, name: str) -> int | None:
        """``OFFSET(struct.member)``, e.g. ``offset("page.flags")``."""
        return self._get(f"OFFSET({name})")

    def size(self, name: str) -> int | None:
        """``SIZE(name)``, e.g. ``size("page")``."""
        return self._get(f"SIZE({name})")

    def length(self, name: str) -> int | None:
        """``LENGTH(name)``, e.g. ``length("mem_section")``."""
        return self._get(f"LENGTH({name})")

    def number(self, name: str) -> int | None:
        """``NUMBER(name)`` (may be negative), e.g. ``number("PG_lru")``."""
        return self._get(f"NUMBER({name})")

    def require(self, kind: str, name: str | None = None) -> int:
        """Like the accessor for ``kind`` (``"SYMBOL"``, ``"NUMBER"``...), but raise if absent.

        :raises ImageError: naming the missing key.
        """
        key = f"{kind}({name})" if name is not None else kind
        value = self._get(key)
        if value is None:
            raise ImageError(f"VMCOREINFO has no {key}")
        return value

    def symbols(self) -> dict[str, int]:
        """Every ``SYMBOL(name)`` entry as ``{name: address}``."""
        return {k[7:-1]: v for k, v in self._values.items() if k.startswith("SYMBOL(")}

    @property
    def osrelease(self) -> str | None:
        return self._entries.get("OSRELEASE")

    @property
    def build_id(self) -> str | None:
        return self._entries.get("BUILD-ID")

    @property
    def page_size(self) -> int | None:
        return self._get("PAGESIZE")

    @property
    def kerneloffset(self) -> int | None:
        """``KERNELOFFSET``: the KASLR displacement of the kernel image (``kaslr_offset()``)."""
        return self._get("KERNELOFFSET")

    @property
    def phys_base(self) -> int | None:
        """``NUMBER(phys_base)``, signed: negative when KASLR moved the image up in virtual."""
        return self.number("phys_base")

    @property
    def pgtable_l5_enabled(self) -> bool | None:
        value = self.number("pgtable_l5_enabled")
        return None if value is None else bool(value)

    @property
    def sme_mask(self) -> int | None:
        return self.number("sme_mask")

    @property
    def crashtime(self) -> int | None:
        return self._get("CRASHTIME")

    def __repr__(self) -> str:
        return f"VmcoreInfo(osrelease={self.osrelease!r}, entries={len(self._entries)})"


def find_vmcoreinfo_note(notes: bytes) -> bytes | None:
    """Return the descriptor of the first ``VMCOREINFO`` note in a run of ELF64 notes.

    :raises ImageError: a note before it points past the end of the bytes.
    """

    def overrun(message: str) -> NoReturn:
        raise ImageError(f"ELF {message}")

    note = find_note(iter_notes(notes, problem=overrun), VMCOREINFO_NOTE_NAME)
    return None if note is None else note.desc


def _metadata_paddr(metadata: Mapping) -> int | None:
    """The note's address as the capture recorded it: ``vmcoreinfo_paddr``, or the first
    element of ``vmcoreinfo_location`` (``[paddr, size]``)."""
    value = metadata.get("vmcoreinfo_paddr")
    if value is None:
        location = metadata.get("vmcoreinfo_location")
        if isinstance(location, list | tuple) and location:
            value = location[0]
    if isinstance(value, str):
        try:
            value = int(value, 0)
        except ValueError:
            return None
    return value if isinstance(value, int) and value >= 0 else None


def _read_upto(memory: PhysicalMemory, paddr: int, size: int) -> bytes:
    """Read up to ``size`` bytes, stopping short where the image's data ends."""
    try:
        return memory.read(paddr, size)
    except PageNotCaptured:
        pass
    page = memory.page_size
    out = bytearray()
    while len(out) < size:
        at = paddr + len(out)
        step = min(size - len(out), page - at % page)
        try:
            out += memory.read(at, step)
        except PageNotCaptured:
            # A range may end inside a page: take what it holds, then stop.
            end = next((e for s, e in memory.ranges() if s <= at < e), at)
            if at < end < at + step:
                with contextlib.suppress(PageNotCaptured):
                    out += memory.read(at, end - at)
            break
    return bytes(out)


def _candidate(memory: PhysicalMemory, paddr: int) -> VmcoreInfo | None:
    """Parse the text starting at ``paddr`` if it is a real VMCOREINFO (not a format string)."""
    data = _read_upto(memory, paddr, VMCOREINFO_BYTES)
    text = data.split(b"\0", 1)[0]
    # The kernel's own rodata holds "OSRELEASE=%s\n"; reject it and other look-alikes.
    if b"\nPAGESIZE=" not in text or b"%" in text:
        return None
    try:
        info = VmcoreInfo.parse(text)
    except ImageError:
        return None
    if info.osrelease is None or info.page_size is None:
        return None
    info.paddr = paddr
    return info


def _from_note_at(memory: PhysicalMemory, paddr: int) -> VmcoreInfo | None:
    header = _read_upto(memory, paddr, 24)
    if len(header) < 24 or header[12:23] != NOTE_NAME + b"\0":
        return None
    _namesz, descsz, _type = Elf64_Nhdr.unpack_from(header)
    if descsz > VMCOREINFO_BYTES:
        return None
    return _candidate(memory, paddr + 24)


def _readable_ranges(memory: PhysicalMemory) -> list[tuple[int, int]]:
    """The ranges whose bytes the image holds, when its reader can tell (every reader of
    this project can); else all its ranges. A cut file's missing tail, or a range a hostile
    header claims to be 2^63 bytes long, is skipped whole instead of page by page."""
    readable = getattr(memory, "readable_ranges", None)
    return readable() if callable(readable) else memory.ranges()


def scan_for_vmcoreinfo(
    memory: PhysicalMemory, chunk: int = 1 << 20, limit: int | None = None
) -> VmcoreInfo | None:
    """Find VMCOREINFO in captured physical memory, or return None.

    First the note at ``metadata["vmcoreinfo_paddr"]`` or ``metadata["vmcoreinfo_location"]``
    (what ``/sys/kernel/vmcoreinfo`` printed on the live machine), then a scan of every
    range the image holds for ``OSRELEASE=`` (ranges it announces but lacks are skipped).
    The kernel's buffers (``vmcoreinfo_data``, and the note ``vmcoreinfo_note`` whose text
    starts 24 bytes in) are page-allocated, so a page-aligned copy wins; any other copy is
    used only when no aligned one exists.

    :param chunk: bytes read at a time; memory use is bounded by it.
    :param limit: stop after scanning this many bytes (None: every captured byte).
    """
    paddr = _metadata_paddr(memory.metadata)
    if paddr is not None:
        info = _from_note_at(memory, paddr) or _candidate(memory, paddr)
        if info is not None:
            return info
    needle = b"OSRELEASE="
    page = memory.page_size
    fallback: VmcoreInfo | None = None
    # Memory full of "OSRELEASE=" must not cost a 4 KiB parse per hit: unaligned hits are
    # tried a bounded number of times, aligned ones at most twice per page.
    unaligned_tries = 64
    scanned = 0
    for start, end in _readable_ranges(memory):
        at = start
        while at < end:
            if limit is not None and scanned >= limit:
                return fallback
            size = min(chunk, end - at)
            data = _read_upto(memory, at, size)
            if not data:
                # A page inside a readable range that still was not read (its fate is in
                # the image's page records): skip it and go on with the next one.
                at += page - at % page
                continue
            pos = data.find(needle)
            while pos != -1:
                hit = at + pos
                offset = hit % page
                aligned = offset == 0 or (
                    offset == 24 and _read_upto(memory, hit - 12, 11) == NOTE_NAME + b"\0"
                )
                if not aligned and fallback is None:
                    unaligned_tries -= 1
                if aligned or (fallback is None and unaligned_tries >= 0):
                    info = _candidate(memory, hit)
                    if info is not None:
                        if aligned:
                            return info
                        fallback = info
                pos = data.find(needle, pos + 1)
            scanned += len(data)
            # Overlap by the needle's length so a match across two chunks is not missed.
            at += max(len(data) - (len(needle) - 1), 1) if len(data) == size else len(data)
    return fallback
