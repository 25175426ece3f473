"""The files physical memory is read from: /dev/mem, /proc/kcore and RHEL's /dev/crash.

Every read is a ``pread`` on an ``O_RDONLY`` descriptor, never ``mmap``: a mapping of device
memory can hang the machine, and a failed ``pread`` returns the kernel's errno instead of
killing the process with SIGBUS.
"""

from __future__ import annotations

import bisect
import errno
import os
from collections import defaultdict
from functools import partial
from typing import TYPE_CHECKING, NoReturn

from collector.acquire.host import as_sysroot, kernel_config, lockdown_state, read_limited
from collector.acquire.iomem import MAX_IOMEM_BYTES, U64_MAX, Range, parse_iomem, system_ram
from collector.elf import (
    ET_CORE,
    PT_LOAD,
    PT_NOTE,
    VMCOREINFO_NOTE_NAME,
    Elf64_Ehdr,
    ElfError,
    ElfNote,
    PhdrLimits,
    find_note,
    iter_notes,
    parse_elf_header,
    parse_program_headers,
)
from collector.errors import CollectorError
from collector.kcore import KcoreSegment, classify_loads
from collector.sysroot import Sysroot

if TYPE_CHECKING:
    from collector.kernel.vmcoreinfo import VmcoreInfo

DEV_MEM = "/dev/mem"
PROC_KCORE = "/proc/kcore"
DEV_CRASH = "/dev/crash"
SOURCE_NAMES = (DEV_MEM, PROC_KCORE, DEV_CRASH)

LOFF_MAX = (1 << 63) - 1
# A real kcore header is a few KiB (one PT_LOAD per RAM range, plus text, vmalloc, modules
# and vmemmap); these bounds only stop a corrupt file from driving huge allocations. The
# table must end within the first 16 MiB, as kcore's file size says nothing about it.
KCORE_LIMITS = PhdrLimits(max_table=16 << 20)
MAX_NOTE_BYTES = 4 << 20
# Before Linux 4.11 kcore has two PT_LOADs per System RAM range (the range and its struct
# pages) and a few more; finding its page_offset_base scores every candidate offset over every
# segment, so both are bounded: a few thousand segments and a few hundred candidates take well
# under a second.
MAX_OLD_LAYOUT_LOADS = 4096
MAX_OFFSET_CANDIDATES = 256


def errno_name(code: int) -> str:
    """``EPERM`` for 1, and so on; ``errno N`` for codes Python does not name."""
    return errno.errorcode.get(code, f"errno {code}")


def pread_exact(fd: int, size: int, offset: int, what: str = "") -> bytes:
    """Read exactly ``size`` bytes at ``offset``, looping over short reads.

    :raises OSError: with the kernel's errno; ``EIO`` when the file ends first.
    """
    if offset < 0 or size < 0 or offset + size - (1 if size else 0) > LOFF_MAX:
        raise OSError(errno.EINVAL, f"offset {offset:#x} is beyond what pread can address")
    first = os.pread(fd, size, offset)
    if len(first) == size:
        return first
    parts = [first]
    got = len(first)
    while got < size:
        if not parts[-1]:
            raise OSError(errno.EIO, f"short read: {what} ends at {offset + got:#x}")
        chunk = os.pread(fd, size - got, offset + got)
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


class Source:
    """A file that serves physical memory.

    :param sysroot: the root the path is looked up under (``/`` on a live machine).
    :raises OSError: when the file cannot be opened (use :func:`open_source` for one-line
        errors).
    """

    #: The absolute path of the file, which is also the source's name in a plan.
    name: str = ""
    #: Whether several threads may ``pread`` it at once: /dev/mem and /proc/kcore serve each
    #: read on its own (read_mem() and read_kcore_iter() keep no state between reads).
    concurrent_reads: bool = True

    def __init__(self, sysroot: Sysroot | str | os.PathLike[str] = "/") -> None:
        self.sysroot = as_sysroot(sysroot)
        self.path = self.sysroot.path(self.name)
        self.page_size = 4096
        self._fd: int | None = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)

    @property
    def fd(self) -> int:
        if self._fd is None:
            raise ValueError(f"{self.name} is closed")
        return self._fd

    def file_offset(self, paddr: int) -> int:
        """The file offset holding physical address ``paddr``."""
        return paddr

    def read(self, paddr: int, size: int) -> bytes:
        """Exactly ``size`` bytes of physical memory from ``paddr``.

        :raises OSError: with the kernel's errno (EPERM, EFAULT, EIO...). One failed page fails
            the whole call; :meth:`read_pages` tells pages apart.
        """
        return pread_exact(self.fd, size, self.file_offset(paddr), self.name)

    def read_pages(self, paddr: int, size: int) -> tuple[bytes, dict[int, int]]:
        """Read ``size`` bytes, falling back to one page at a time when the whole read fails.

        :returns: the bytes (failed pages zero-filled) and ``{page address: errno}`` for every
            page that failed.
        """
        try:
            return self.read(paddr, size), {}
        except OSError:
            pass
        out = bytearray()
        failed: dict[int, int] = {}
        pos, end = paddr, paddr + size
        while pos < end:
            page = pos - pos % self.page_size
            stop = min(page + self.page_size, end)
            try:
                out += self.read(pos, stop - pos)
            except OSError as exc:
                failed[page] = exc.errno or errno.EIO
                out += bytes(stop - pos)
            pos = stop
        return bytes(out), failed

    def coverage(self, start: int, end: int) -> list[Range]:
        """The sub-ranges of ``[start, end)`` this source can serve, in address order."""
        return [Range(start, end)] if start < end else []

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.path}>"


class DevMem(Source):
    """/dev/mem: the file offset is the physical address.

    Every page is "covered": the kernel decides page by page (drivers/char/mem.c
    read_mem()). With CONFIG_STRICT_DEVMEM, x86's devmem_is_allowed() refuses RAM above
    1 MiB (EPERM) and returns zeros for RAM below it. A read that meets one refused page
    fails as a whole, without a partial count.
    """

    name = DEV_MEM


class DevCrash(Source):
    """RHEL's /dev/crash (drivers/char/crash.c): the file offset is the physical address.

    crash_read() serves one page per call (EINVAL if a read crosses a page boundary) and
    answers EFAULT for a page frame without a struct page (pfn_valid() false). It has no
    STRICT_DEVMEM filter: it reads any RAM the kernel has a memmap for.
    """

    name = DEV_CRASH
    # Its driver serves one page per call through one shared mapping on some releases; one
    # reader keeps it as it was tested.
    concurrent_reads = False

    def read(self, paddr: int, size: int) -> bytes:
        out = []
        pos, end = paddr, paddr + size
        while pos < end:
            stop = min(pos - pos % self.page_size + self.page_size, end)
            out.append(pread_exact(self.fd, stop - pos, pos, self.name))
            pos = stop
        return b"".join(out)


class Kcore(Source):
    """/proc/kcore: an ELF core of kernel virtual memory, read here as physical memory.

    The physical address of a direct-map segment comes from ``p_paddr``. Since Linux 4.11
    (commit 464920104bf7, "/proc/kcore: update physical address for kcore ram and text")
    KCORE_RAM and KCORE_TEXT segments carry their physical address and every other segment
    ``p_paddr = -1``. Before it, every ``p_paddr`` was 0; then the direct-map offset
    (page_offset_base) is found from System RAM: kcore's RAM segments are the iomem System RAM
    ranges trimmed to whole pages (walk_system_ram_range()), so the offset is the one that
    maps the most segments exactly onto trimmed System RAM, the lowest on a tie.

    :param ram: System RAM ranges for the old layout; read from the sysroot's /proc/iomem
        when not given.
    :raises CollectorError: for a malformed ELF file.
    """

    name = PROC_KCORE

    def __init__(
        self, sysroot: Sysroot | str | os.PathLike[str] = "/", ram: list[Range] | None = None
    ) -> None:
        super().__init__(sysroot)
        try:
            self._parse(ram)
        except BaseException:
            self.close()
            raise

    # -- parsing ------------------------------------------------------------------------

    def _bad(self, why: str) -> CollectorError:
        return CollectorError(f"{self.name}: malformed ELF core: {why}")

    def _pread(self, size: int, offset: int) -> bytes:
        try:
            return pread_exact(self.fd, size, offset, self.name)
        except OSError as exc:
            raise self._bad(f"cannot read {size} bytes at {offset:#x}: {exc.strerror}") from None

    def _parse(self, ram: list[Range] | None) -> None:
        ehdr = self._pread(Elf64_Ehdr.size, 0)
        self.phdr_bytes = ehdr
        try:
            # kcore is big-endian on big-endian machines (s390x).
            header = parse_elf_header(ehdr, big_endian=True)
            if header.e_type != ET_CORE:
                raise ElfError(f"e_type {header.e_type} is not ET_CORE")
            phdrs = parse_program_headers(self._read_headers, header, KCORE_LIMITS)
        except ElfError as exc:
            raise self._bad(str(exc)) from None
        self.endian = header.endian
        self.e_machine = header.e_machine

        loads: list[tuple[int, ...]] = []
        note_blobs: list[tuple[int, bytes]] = []
        note_bytes = 0
        for i, ph in enumerate(phdrs):
            if ph.p_offset + ph.p_filesz > LOFF_MAX:
                raise self._bad(f"segment {i} runs past the largest file offset")
            if ph.p_type == PT_NOTE:
                note_bytes += ph.p_filesz
                if note_bytes > MAX_NOTE_BYTES:
                    raise self._bad(
                        f"PT_NOTE {i} is {ph.p_filesz} bytes, more than {MAX_NOTE_BYTES}"
                    )
                note_blobs.append((i, self._pread(ph.p_filesz, ph.p_offset)))
            elif ph.p_type == PT_LOAD:
                if ph.p_filesz and ph.p_vaddr + ph.p_filesz - 1 > U64_MAX:
                    raise self._bad(f"segment {i} wraps the address space")
                loads.append((i, ph.p_offset, ph.p_vaddr, ph.p_paddr, ph.p_filesz, ph.p_memsz))
        self.notes = b"".join(blob for _i, blob in note_blobs)
        self.note_list: list[ElfNote] = []
        for i, blob in note_blobs:
            overrun = partial(self._note_overrun, i)
            self.note_list += iter_notes(blob, problem=overrun, endian=self.endian)
        self.vmcoreinfo: str | None = None
        note = find_note(self.note_list, VMCOREINFO_NOTE_NAME)
        if note is not None:
            self.vmcoreinfo = note.desc.rstrip(b"\0").decode("utf-8", "replace")
        if self.vmcoreinfo:
            for line in self.vmcoreinfo.splitlines():
                if line.startswith("PAGESIZE="):
                    value = line[len("PAGESIZE=") :]
                    if value.isdigit() and int(value) in (4096, 16384, 65536):
                        self.page_size = int(value)
        self.layout, self.page_offset_base, self.segments = self._classify(loads, ram)
        self._phys = sorted(
            (s for s in self.segments if s.paddr is not None and s.p_filesz),
            key=lambda s: s.paddr or 0,
        )
        self._phys_starts = [s.paddr for s in self._phys]
        # What the segments cover, merged once, so each coverage() is a binary search.
        merged: list[list[int]] = []
        for seg in self._phys:
            span = seg.phys_span
            assert span is not None
            if merged and span[0] <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], span[1])
            else:
                merged.append([span[0], span[1]])
        self._covered = [(a, b) for a, b in merged]
        self._covered_ends = [b for _a, b in merged]

    def _read_headers(self, offset: int, size: int) -> bytes:
        """Read the program header table (which follows the ELF header), keeping everything
        from the start of the file to its end as :attr:`phdr_bytes`: the ``kcore-phdrs``
        blob."""
        ehdr = self.phdr_bytes
        self.phdr_bytes = ehdr + self._pread(offset + size - len(ehdr), len(ehdr))
        return self.phdr_bytes[offset:]

    def _note_overrun(self, index: int, message: str) -> NoReturn:
        # Unlike a core file's, the running kernel's notes are never cut: damage is fatal.
        raise self._bad(f"a note runs past its PT_NOTE {index}: {message}")

    def _classify(
        self, loads: list[tuple[int, ...]], ram: list[Range] | None
    ) -> tuple[str, int | None, list[KcoreSegment]]:
        if loads and all(p_paddr == 0 for _i, _o, _v, p_paddr, _f, _m in loads):
            if len(loads) > MAX_OLD_LAYOUT_LOADS:
                raise self._bad(
                    f"{len(loads)} PT_LOAD segments without physical addresses (a kernel "
                    f"before 4.11 has two per RAM range; at most {MAX_OLD_LAYOUT_LOADS} are "
                    "accepted)"
                )
            return self._classify_old(loads, ram)
        base, segments = classify_loads(loads)
        return "p_paddr", base, segments

    def _classify_old(
        self, loads: list[tuple[int, ...]], ram: list[Range] | None
    ) -> tuple[str, int | None, list[KcoreSegment]]:
        if ram is None:
            try:
                text = read_limited(self.sysroot, "/proc/iomem", MAX_IOMEM_BYTES)
                ram = system_ram(parse_iomem(text.decode("utf-8", "replace")))
            except (OSError, CollectorError):
                ram = []
        ps = self.page_size
        trimmed = sorted(
            (-(-r.start // ps) * ps, r.end // ps * ps) for r in ram if r.end // ps * ps > r.start
        )
        trimmed = [t for t in trimmed if t[1] > t[0]]
        starts = [a for a, _b in trimmed]
        by_size: dict[int, list[int]] = defaultdict(list)
        for a, b in trimmed:
            by_size[b - a].append(a)

        def inside(phys: int, size: int) -> bool:
            k = bisect.bisect_right(starts, phys) - 1
            return k >= 0 and phys + size <= trimmed[k][1]

        # Candidates come from the lowest segments (the direct map lies below every other
        # kernel mapping) paired with the lowest RAM ranges of their size, at most
        # MAX_OFFSET_CANDIDATES of them; each is then scored over every segment.
        candidates: dict[int, None] = {}
        for _i, _off, vaddr, _paddr, filesz, _memsz in sorted(loads, key=lambda t: t[2]):
            for a in by_size.get(filesz, ()):
                candidates.setdefault((vaddr - a) & U64_MAX)
                if len(candidates) >= MAX_OFFSET_CANDIDATES:
                    break
            if len(candidates) >= MAX_OFFSET_CANDIDATES:
                break
        exact = set(trimmed)
        best: tuple[int, int] | None = None
        for cand in candidates:
            score = sum(
                1
                for _i, _o, vaddr, _p, filesz, _m in loads
                if ((vaddr - cand) & U64_MAX, ((vaddr - cand) & U64_MAX) + filesz) in exact
            )
            if best is None or (score, -cand) > (best[0], -best[1]):
                best = (score, cand)
        base = best[1] if best else None
        segments = []
        for i, off, vaddr, paddr, filesz, memsz in loads:
            phys = None if base is None else (vaddr - base) & U64_MAX
            if phys is not None and filesz and inside(phys, filesz):
                segments.append(KcoreSegment(i, off, vaddr, paddr, filesz, memsz, "ram", phys))
            else:
                segments.append(KcoreSegment(i, off, vaddr, paddr, filesz, memsz, "virtual"))
        return "p_paddr=0", base, segments

    # -- reading ------------------------------------------------------------------------

    def _segment_at(self, paddr: int) -> KcoreSegment | None:
        k = bisect.bisect_right(self._phys_starts, paddr) - 1
        if k >= 0:
            seg = self._phys[k]
            if seg.paddr is not None and paddr < seg.paddr + seg.p_filesz:
                return seg
        return None

    def file_offset(self, paddr: int) -> int:
        seg = self._segment_at(paddr)
        if seg is None or seg.paddr is None:
            raise OSError(errno.ENXIO, f"physical address {paddr:#x} is in no kcore segment")
        return seg.p_offset + (paddr - seg.paddr)

    def read(self, paddr: int, size: int) -> bytes:
        parts = []
        pos, end = paddr, paddr + size
        while pos < end:
            seg = self._segment_at(pos)
            if seg is None or seg.paddr is None:
                raise OSError(errno.ENXIO, f"physical address {pos:#x} is in no kcore segment")
            stop = min(end, seg.paddr + seg.p_filesz)
            parts.append(
                pread_exact(self.fd, stop - pos, seg.p_offset + (pos - seg.paddr), self.name)
            )
            pos = stop
        return b"".join(parts)

    def coverage(self, start: int, end: int) -> list[Range]:
        pieces: list[Range] = []
        k = bisect.bisect_right(self._covered_ends, start)
        while k < len(self._covered) and self._covered[k][0] < end:
            a, b = self._covered[k]
            pieces.append(Range(max(a, start), min(b, end)))
            k += 1
        return pieces


_ALIASES = {
    "/dev/mem": DEV_MEM,
    "mem": DEV_MEM,
    "/proc/kcore": PROC_KCORE,
    "kcore": PROC_KCORE,
    "/dev/crash": DEV_CRASH,
    "crash": DEV_CRASH,
}
_CLASSES: dict[str, type[Source]] = {DEV_MEM: DevMem, PROC_KCORE: Kcore, DEV_CRASH: DevCrash}


def canonical_source_name(name: str) -> str:
    """``/dev/mem`` for ``mem`` or ``/dev/mem``, and so on.

    :raises CollectorError: (exit status 2) for a name that is not a source.
    """
    try:
        return _ALIASES[name.strip()]
    except KeyError:
        raise CollectorError(
            f"unknown source {name!r}: choose /dev/mem, /proc/kcore or /dev/crash", 2
        ) from None


def open_source(name: str, sysroot: Sysroot | str | os.PathLike[str] | None = None) -> Source:
    """Open a source by name (``/dev/mem``, ``/proc/kcore``, ``/dev/crash`` or ``mem``,
    ``kcore``, ``crash``).

    :raises CollectorError: with one line saying why the source cannot be used.
    """
    canonical = canonical_source_name(name)
    root = as_sysroot(sysroot)
    try:
        return _CLASSES[canonical](root)
    except OSError as exc:
        raise CollectorError(f"{canonical}: {open_failure(canonical, exc, root)}") from None


def open_failure(name: str, exc: OSError, sysroot: Sysroot) -> str:
    """Explain why opening source ``name`` failed, in a few words."""
    code = exc.errno or 0
    tag = errno_name(code)
    if code == errno.ENOENT:
        hint = _config_hint(name, sysroot)
        return f"not present on this kernel ({tag}{hint})"
    if code in (errno.ENXIO, errno.ENODEV):
        return f"no driver behind the device node ({tag})"
    if code in (errno.EPERM, errno.EACCES):
        state = lockdown_state(sysroot)
        # security/lockdown: /dev/mem is LOCKDOWN_DEV_MEM (integrity level), /proc/kcore is
        # LOCKDOWN_KCORE (confidentiality level); /dev/crash checks only CAP_SYS_RAWIO.
        blocked = {DEV_MEM: ("integrity", "confidentiality"), PROC_KCORE: ("confidentiality",)}
        if state in blocked.get(name, ()):
            return f"refused by lockdown ({state})"
        if sysroot.is_live and os.geteuid() != 0:
            return f"needs root (CAP_SYS_RAWIO) ({tag})"
        return (
            f"refused ({tag}): the process lacks CAP_SYS_RAWIO, or the kernel forbids it "
            "(an encrypted-memory guest)"
        )
    return f"cannot open ({tag}: {exc.strerror})"


def _config_hint(name: str, sysroot: Sysroot) -> str:
    option = {DEV_MEM: "CONFIG_DEVMEM", PROC_KCORE: "CONFIG_PROC_KCORE"}.get(name)
    if name == DEV_CRASH:
        return "; the crash driver is not loaded"
    found = kernel_config(sysroot) if option else None
    if found and found[0].get(option) == "n":
        return f"; {option} is not set"
    return ""


def live_vmcoreinfo(sysroot: Sysroot | str | None = None) -> VmcoreInfo | None:
    """The running kernel's VMCOREINFO, from /proc/kcore's note (Linux 4.19 and later).

    :returns: a :class:`collector.kernel.vmcoreinfo.VmcoreInfo`, or None when /proc/kcore
        cannot be opened (not root, lockdown, no CONFIG_PROC_KCORE) or carries no note.
    """
    from collector.kernel.vmcoreinfo import VmcoreInfo

    try:
        with Kcore(as_sysroot(sysroot)) as kcore:
            text = kcore.vmcoreinfo
    except (OSError, CollectorError):
        return None
    if not text:
        return None
    try:
        return VmcoreInfo.parse(text)
    except CollectorError:
        return None
