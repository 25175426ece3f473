"""A fake host for tests: /proc, /sys and /etc files under a directory, with /dev/mem,
/proc/kcore and /dev/crash answering reads the way the real drivers do.

The device files are served through FUSE (a real file system in this process), so the
collector's real read path (``os.pread`` on an ``O_RDONLY`` descriptor) meets real errnos.
Where FUSE cannot mount (no /dev/fuse, not root), the same behaviour is emulated at the
``os.open``/``os.pread``/``os.close`` boundary: those three functions are patched for the
life of the fake and answer for the device files only (``fake.mode`` says which is in use).

Usage::

    with FakeHost(tmp_path, strict_devmem=True) as fake:
        plan = make_plan(fake.sysroot, ranges, [], None)
        expected = fake.ram_bytes(0x100000, 0x200000)

Every read of a device file is logged in ``fake.reads``; on a clean exit the fake fails the
test if any read touched a byte outside its System RAM (or the ranges passed to
``fake.allow``), or read kcore's virtual (non-physical) segments.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import logging
import os
import random
import re
import struct
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from collector.sysroot import Sysroot
from tests.acquire.fusemem import Emulation, FuseMount, fuse_usable, mark_fuse_unusable

PAGE = 4096
U64 = (1 << 64) - 1
LOW_MEM_END = 0x100000
PAGE_OFFSET_BASE = 0xFFFF8DD880000000  # seen in one boot of Debian's 6.1 kernel
VMEMMAP_BASE = 0xFFFFF93940000000
VMALLOC_START, VMALLOC_SIZE = 0xFFFFD4A480000000, 0x1FFFFFFFFFFF
MODULES_VADDR, MODULES_SIZE = 0xFFFFFFFFC0000000, 0x3F000000
# Kernel text: vaddr - paddr seen in the same boot (__START_KERNEL_map with KASLR).
TEXT_DELTA = 0xFFFFFFFF90000000
# x86-64 kc_vaddr_to_offset(): the address masked to 47 bits (4-level paging).
VIRTUAL_MASK = (1 << 47) - 1
SIZEOF_PAGE = 64

# Modelled on a Debian 6.1 QEMU guest (tests/data/acquire/iomem-debian-6.1-qemu-512m.txt),
# with little RAM: a sub-page low range, RAM from 1 MiB with the kernel image nested in it,
# holes, and RAM above 4 GiB.
IOMEM_GUEST = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
0009fc00-0009ffff : Reserved
000a0000-000bffff : PCI Bus 0000:00
000c0000-000c9bff : Video ROM
000ca000-000cadff : Adapter ROM
000f0000-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-005fffff : System RAM
  00200000-002fffff : Kernel code
  00300000-0037ffff : Kernel rodata
  00380000-003bffff : Kernel data
  003c0000-003fffff : Kernel bss
00600000-007fffff : Reserved
00800000-febfffff : PCI Bus 0000:00
  fd000000-fdffffff : 0000:00:02.0
fec00000-fec003ff : IOAPIC 0
fee00000-fee00fff : Local APIC
fffc0000-ffffffff : Reserved
100000000-1001fffff : System RAM
"""

# System RAM nested under other resources: device-dax memory onlined by kmem under a Soft
# Reserved window, and virtio-mem memory above 1 TiB.
IOMEM_NESTED = """\
00000000-00000fff : Reserved
00001000-0009efff : System RAM
0009f000-000fffff : Reserved
  000f0000-000fffff : System ROM
00100000-002fffff : System RAM
  00100000-0017ffff : Kernel code
  00180000-001bffff : Kernel data
00300000-7fffffff : PCI Bus 0000:00
180000000-1801fffff : Soft Reserved
  180000000-1801fffff : dax0.0
    180000000-1801fffff : System RAM (kmem)
10000000000-100001fffff : virtio0
  10000000000-100000fffff : System RAM (virtio_mem)
"""

_IOMEM_LINE = re.compile(r"^( *)([0-9a-f]+)-([0-9a-f]+) : (.*)$")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FakeRead:
    """One read request a device file received.

    ``spans`` are the physical ranges ``[start, end)`` it asked for; ``virtual`` is set when a
    kcore read reached memory with no physical address (vmalloc, modules, vmemmap, or no
    segment); ``error`` is the errno returned, 0 on success.
    """

    file: str
    offset: int
    size: int
    spans: tuple[tuple[int, int], ...]
    virtual: bool
    error: int
    #: PFNs ``[first, last)`` whose struct pages a kcore read of the vmemmap returned (only
    #: with a ``memory_map``; without one, vmemmap reads are ``virtual``).
    struct_pages: tuple[int, int] | None = None


@dataclass(frozen=True)
class _Res:
    start: int
    end: int  # exclusive
    name: str


def _parse(iomem: str) -> list[_Res]:
    """The fake's own reading of its iomem text (independent of the collector's parser)."""
    out = []
    for line in iomem.splitlines():
        m = _IOMEM_LINE.match(line)
        if m:
            out.append(_Res(int(m.group(2), 16), int(m.group(3), 16) + 1, m.group(4)))
    return out


def _page_is_zero(pfn: int, seed: int) -> bool:
    return (pfn * 2654435761 + seed) % 5 < 2


@dataclass(frozen=True)
class _Segment:
    vaddr: int
    size: int
    paddr: int | None  # physical address for RAM and text; None for virtual memory
    kind: str  # "text", "vmalloc", "modules", "ram", "vmemmap"


class _Kernel:
    """What the drivers answer: drivers/char/mem.c read_mem(), fs/proc/kcore.c read_kcore(),
    RHEL's crash_read(), and their open checks. Shared by the FUSE and emulated modes."""

    def __init__(self, fake: FakeHost) -> None:
        self.fake = fake
        self.lock = threading.Lock()

    # -- open --------------------------------------------------------------------------

    def check_open(self, name: str, flags: int) -> None:
        f = self.fake
        if flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES))
        if name == "mem":
            # open_port(): capable(CAP_SYS_RAWIO), then security_locked_down(LOCKDOWN_DEV_MEM).
            if not f.rawio or f.lockdown in ("integrity", "confidentiality"):
                raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        elif name == "kcore":
            # open_kcore(): security_locked_down(LOCKDOWN_KCORE), capable(CAP_SYS_RAWIO).
            if not f.rawio or f.lockdown == "confidentiality":
                raise OSError(errno.EPERM, os.strerror(errno.EPERM))
        elif name == "crash" and not f.rawio:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

    def size(self, name: str) -> int:
        """st_size: /dev/mem and /dev/crash report 0, kcore its i_size, as the kernel does."""
        return self.fake.kcore_size if name == "kcore" else 0

    # -- read --------------------------------------------------------------------------

    def read(self, name: str, size: int, offset: int) -> bytes:
        delay = self.fake.slow.get(name)
        if delay:
            self.fake.slow_read.set()
            time.sleep(delay)
        spans: list[tuple[int, int]] = []
        virtual = [False]
        struct_pages: list[int] = []
        try:
            if name == "mem":
                data = self._read_mem(size, offset, spans)
            elif name == "kcore":
                data = self._read_kcore(size, offset, spans, virtual, struct_pages)
            elif name == "crash":
                data = self._read_crash(size, offset, spans)
            else:
                raise OSError(errno.ENOENT, name)
        except OSError as exc:
            self._log(FakeRead(name, offset, size, tuple(spans), virtual[0], exc.errno or 0))
            raise
        pfns = (min(struct_pages), max(struct_pages)) if struct_pages else None
        self._log(FakeRead(name, offset, size, tuple(spans), virtual[0], 0, pfns))
        return data

    def _log(self, record: FakeRead) -> None:
        with self.lock:
            self.fake.reads.append(record)

    def _devmem_is_allowed(self, pfn: int) -> int:
        """arch/x86/mm/init.c devmem_is_allowed(), for CONFIG_STRICT_DEVMEM."""
        page = pfn * PAGE
        if any(r.start < page + PAGE and page < r.end for r in self.fake.ram):
            return 2 if pfn < 256 else 0
        return 1

    def _read_mem(self, size: int, offset: int, spans: list) -> bytes:
        f = self.fake
        if size == 0:
            return b""
        spans.append((offset, offset + size))
        # valid_phys_addr_range() (arch/x86/mm/mmap.c): nothing above the last RAM page frame.
        if offset + size > f.max_pfn * PAGE:
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        out = bytearray()
        p, end = offset, offset + size
        while p < end:
            page = p - p % PAGE
            sz = min(page + PAGE, end) - p
            allowed = self._devmem_is_allowed(page // PAGE) if f.strict_devmem else 1
            if allowed == 0:
                # read_mem() fails the whole read, whatever it copied before.
                raise OSError(errno.EPERM, os.strerror(errno.EPERM))
            if allowed == 2:
                out += bytes(sz)
            else:
                if page in f.bad_pages:
                    code = f.bad_pages[page]
                    raise OSError(code, os.strerror(code))
                out += f.phys_bytes(p, p + sz)
            p += sz
        return bytes(out)

    def _read_crash(self, size: int, offset: int, spans: list) -> bytes:
        f = self.fake
        if size == 0:
            return b""
        spans.append((offset, offset + size))
        if offset // PAGE != (offset + size - 1) // PAGE:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        page = offset - offset % PAGE
        # map_virtual(): pfn_valid() holds where the kernel has a struct page, i.e. for RAM.
        if not any(r.start < page + PAGE and page < r.end for r in f.ram):
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        if page in f.bad_pages:
            raise OSError(errno.EFAULT, os.strerror(errno.EFAULT))
        return f.phys_bytes(offset, offset + size)

    def _read_kcore(
        self,
        size: int,
        offset: int,
        spans: list,
        virtual: list,
        struct_pages: list | None = None,
    ) -> bytes:
        f = self.fake
        total = f.kcore_size
        if offset >= total or size == 0:
            return b""
        size = min(size, total - offset)
        out = bytearray()
        pos, end = offset, offset + size
        if pos < f.kcore_data_offset:
            stop = min(end, f.kcore_data_offset)
            header = f.kcore_header.ljust(f.kcore_data_offset, b"\0")
            out += header[pos:stop]
            pos = stop
        while pos < end:
            # kc_offset_to_vaddr(): set the bits kc_vaddr_to_offset() masked off.
            vaddr = ((pos - f.kcore_data_offset) | ~VIRTUAL_MASK) & U64
            seg = next((s for s in f.kcore_segments if s.vaddr <= vaddr < s.vaddr + s.size), None)
            if seg is None:
                nxt = min((s.vaddr for s in f.kcore_segments if s.vaddr > vaddr), default=None)
                stop = end if nxt is None else min(end, pos + (nxt - vaddr))
                virtual[0] = True
                out += bytes(stop - pos)  # read_kcore() clears what no segment covers
            else:
                stop = min(end, pos + (seg.vaddr + seg.size - vaddr))
                if seg.kind == "vmemmap" and f.memory_map is not None:
                    out += f.struct_page_bytes(vaddr, stop - pos)
                    if struct_pages is not None:
                        first = (vaddr - VMEMMAP_BASE) // SIZEOF_PAGE
                        struct_pages += [
                            first,
                            -(-(vaddr + stop - pos - VMEMMAP_BASE) // SIZEOF_PAGE),
                        ]
                elif seg.paddr is None:
                    virtual[0] = True
                    out += bytes(stop - pos)
                else:
                    phys = seg.paddr + (vaddr - seg.vaddr)
                    spans.append((phys, phys + stop - pos))
                    out += f.phys_bytes(phys, phys + stop - pos, kcore=True)
            pos = stop
        return bytes(out)


class FakeHost:
    """A fake machine under ``tmp_path``: files, RAM contents and device files.

    :param iomem: /proc/iomem text (``IOMEM_GUEST``, ``IOMEM_NESTED`` or your own); its
        ``System RAM`` lines (nested or not) are the fake's RAM.
    :param strict_devmem: /dev/mem behaves as with CONFIG_STRICT_DEVMEM (x86): EPERM for RAM
        above 1 MiB, zeros for RAM below it.
    :param lockdown: ``none``, ``integrity``, ``confidentiality`` or ``absent``.
    :param devmem, kcore, crash: which device files exist.
    :param kcore_layout: ``p_paddr`` (Linux 4.11 and later) or ``p_paddr=0`` (older: every
        ``p_paddr`` is 0 and there is no VMCOREINFO note).
    :param bad_pages: ``{page address: errno}``: /dev/mem fails these pages with the errno,
        /dev/crash with EFAULT, kcore returns zeros for them (as the kernel does).
    :param rawio: False makes every device open fail with EPERM (no CAP_SYS_RAWIO).
    :param kernel_config: write /proc/config.gz saying whether CONFIG_STRICT_DEVMEM is set.
    :param mode: ``fuse``, ``emulated``, or None to use FUSE when it can mount.
    :param check_reads: on a clean exit, fail if any read touched memory outside the RAM.
    :param memory_map: a :class:`collector.testing.pages.MemoryMap` (64-byte struct pages,
        built with ``ram=False``) whose struct pages kcore's vmemmap segments serve, whose
        BTF is /sys/kernel/btf/vmlinux and whose VMCOREINFO lines join the fake's.
    """

    def __init__(
        self,
        tmp_path: str | os.PathLike[str],
        *,
        iomem: str = IOMEM_GUEST,
        strict_devmem: bool = True,
        lockdown: str = "none",
        devmem: bool = True,
        kcore: bool = True,
        crash: bool = False,
        kcore_layout: str = "p_paddr",
        page_offset_base: int = PAGE_OFFSET_BASE,
        bad_pages: dict[int, int] | None = None,
        rawio: bool = True,
        kernel_config: bool = False,
        seed: int = 1,
        mode: str | None = None,
        check_reads: bool = True,
        vmcoreinfo: str | None = None,
        memory_map=None,
    ) -> None:
        if kcore_layout not in ("p_paddr", "p_paddr=0"):
            raise ValueError(f"kcore_layout {kcore_layout!r}")
        self.base = Path(tmp_path)
        self.root = self.base / "root"
        self.sysroot = Sysroot(self.root)
        self.iomem = iomem
        self.strict_devmem = strict_devmem
        self.lockdown = lockdown
        self.devmem, self.kcore, self.crash = devmem, kcore, crash
        self.kcore_layout = kcore_layout
        self.page_offset_base = page_offset_base
        self.bad_pages = dict(bad_pages or {})
        self.rawio = rawio
        self.kernel_config = kernel_config
        self.seed = seed
        self.requested_mode = mode
        self.mode: str | None = None
        self.check_reads = check_reads
        self.reads: list[FakeRead] = []
        self.memory_map = memory_map
        self.allowed: list[tuple[int, int]] = []
        #: Seconds each read of a device (``mem``, ``kcore``, ``crash``) takes; ``slow_read``
        #: is set when such a read starts.
        self.slow: dict[str, float] = {}
        self.slow_read = threading.Event()
        self.resources = _parse(iomem)
        self.ram = self._ram_ranges()
        self.max_pfn = max(r.end for r in self.ram) // PAGE if self.ram else 0
        self._ram_data = {r.start: self._generate(r) for r in self.ram}
        self.vmcoreinfo_paddr = self._vmcoreinfo_home()
        self.vmcoreinfo = vmcoreinfo if vmcoreinfo is not None else self._vmcoreinfo_text()
        self._place_vmcoreinfo_note()
        self.kcore_segments = self._kcore_segments()
        self._build_kcore_header()
        self._kernel = _Kernel(self)
        self._fuse: FuseMount | None = None
        self._emulation: Emulation | None = None

    # -- RAM ----------------------------------------------------------------------------

    def _ram_ranges(self) -> list[_Res]:
        found = [r for r in self.resources if r.name.startswith("System RAM")]
        return sorted(found, key=lambda r: r.start)

    @property
    def ram_ranges(self) -> list[tuple[int, int]]:
        """The fake's System RAM as ``(start, end)`` with ``end`` exclusive."""
        return [(r.start, r.end) for r in self.ram]

    def _generate(self, r: _Res) -> bytearray:
        """Deterministic contents: zero pages and dense pages, each dense page starting with
        its own physical address (so a byte read from the wrong place shows)."""
        rng = random.Random(self.seed * 1_000_003 + r.start)
        buf = bytearray(rng.randbytes(r.end - r.start))
        page = r.start - r.start % PAGE
        while page < r.end:
            a, b = max(page, r.start), min(page + PAGE, r.end)
            if _page_is_zero(page // PAGE, self.seed):
                buf[a - r.start : b - r.start] = bytes(b - a)
            elif a == page and b - a >= 8:
                struct.pack_into("<Q", buf, a - r.start, page)
            page += PAGE
        return buf

    def _locate(self, start: int, end: int) -> tuple[_Res, bytearray]:
        for r in self.ram:
            if r.start <= start and end <= r.end:
                return r, self._ram_data[r.start]
        raise ValueError(f"{start:#x}-{end:#x} is not inside one System RAM range of the fake")

    def ram_bytes(self, start: int, end: int) -> bytes:
        """The fake's own RAM bytes for ``[start, end)`` (inside one System RAM range)."""
        r, data = self._locate(start, end)
        return bytes(data[start - r.start : end - r.start])

    def write(self, paddr: int, data: bytes) -> None:
        """Put bytes into the fake's RAM (e.g. a structure a plugin test wants to find)."""
        r, buf = self._locate(paddr, paddr + len(data))
        buf[paddr - r.start : paddr - r.start + len(data)] = data

    def is_zero_page(self, page: int) -> bool:
        """Whether the generator made this page all zeros (before any ``write``)."""
        return _page_is_zero(page // PAGE, self.seed)

    def phys_bytes(self, start: int, end: int, kcore: bool = False) -> bytes:
        """What physical memory holds at ``[start, end)``: RAM bytes, a ROM pattern, or the
        0xff of unclaimed bus addresses. Bad pages read as zeros through kcore."""
        out = bytearray()
        pos = start
        while pos < end:
            r = next((x for x in self.ram if x.start <= pos < x.end), None)
            if r is not None:
                stop = min(end, r.end)
                out += self._ram_data[r.start][pos - r.start : stop - r.start]
                if kcore:
                    for page in self.bad_pages:
                        lo, hi = max(page, pos), min(page + PAGE, stop)
                        if lo < hi:
                            out[len(out) - (stop - lo) : len(out) - (stop - hi)] = bytes(hi - lo)
            else:
                nxt = min((x.start for x in self.ram if x.start > pos), default=end)
                stop = min(end, nxt)
                rom = any("ROM" in x.name and x.start <= pos < x.end for x in self.resources)
                out += (
                    (b"\x55\xaa" * ((stop - pos + 1) // 2))[: stop - pos]
                    if rom
                    else (b"\xff" * (stop - pos))
                )
            pos = stop
        return bytes(out)

    # -- kernel metadata ----------------------------------------------------------------

    def _kernel_image(self) -> tuple[int, int]:
        code = next((r for r in self.resources if r.name == "Kernel code"), None)
        parts = [r for r in self.resources if r.name.startswith("Kernel ")]
        if code is None:
            home = self.ram[-1] if self.ram else _Res(0x1000000, 0x2000000, "System RAM")
            return home.start, min(home.end, home.start + 0x100000)
        end = max(r.end for r in parts)
        return code.start, -(-end // PAGE) * PAGE

    @property
    def text_vaddr(self) -> int:
        return (self._kernel_image()[0] + TEXT_DELTA) & U64

    def _vmcoreinfo_home(self) -> int:
        big = max(self.ram, key=lambda r: r.end - r.start)
        text_start, text_end = self._kernel_image()
        page = -(-big.start // PAGE) * PAGE + 0x10 * PAGE
        if text_start <= page < text_end:
            page = text_end
        return page

    def _vmcoreinfo_text(self) -> str:
        text_paddr = self._kernel_image()[0]
        lines = [
            "OSRELEASE=6.1.0-fake-amd64",
            "BUILD-ID=0123456789abcdef0123456789abcdef01234567",
            f"PAGESIZE={PAGE}",
            f"SYMBOL(_stext)={self.text_vaddr:x}",
            f"SYMBOL(swapper_pg_dir)={self.text_vaddr + 0x10000:x}",
            f"SIZE(page)={SIZEOF_PAGE}",
            "OFFSET(page.flags)=0",
            "OFFSET(page._refcount)=52",
            "OFFSET(page.mapping)=24",
            "OFFSET(page.lru)=8",
            "NUMBER(PG_lru)=4",
            "NUMBER(pgtable_l5_enabled)=0",
            f"NUMBER(phys_base)={text_paddr - (self.text_vaddr - 0xFFFFFFFF80000000)}",
            f"KERNELOFFSET={self.text_vaddr - 0xFFFFFFFF81000000 & U64:x}",
            f"VMCOREINFO_PADDR={self.vmcoreinfo_paddr:x}",
        ]
        if self.memory_map is not None:
            have = {line.split("=")[0] for line in lines}
            lines += [x for x in self.memory_map.sk.vmcoreinfo_extra if x.split("=")[0] not in have]
        return "\n".join(lines) + "\n"

    def struct_page_bytes(self, vaddr: int, size: int) -> bytes:
        """What the vmemmap holds at ``vaddr``: the memory map's struct pages (zeros for
        PFNs it does not describe)."""
        mm = self.memory_map
        out = bytearray(size)
        first = (vaddr - VMEMMAP_BASE) // SIZEOF_PAGE
        last = -(-(vaddr + size - VMEMMAP_BASE) // SIZEOF_PAGE)
        lo, hi = max(first, mm.start), min(last, mm.start + mm.count)
        if lo < hi:
            data = mm.array(lo, hi - lo)
            base = VMEMMAP_BASE + lo * SIZEOF_PAGE
            a, b = max(base, vaddr), min(base + len(data), vaddr + size)
            out[a - vaddr : b - vaddr] = data[a - base : b - base]
        return bytes(out)

    def _vmcoreinfo_note(self) -> bytes:
        desc = self.vmcoreinfo.encode()
        return _note("VMCOREINFO", 0, desc)

    def _place_vmcoreinfo_note(self) -> None:
        note = self._vmcoreinfo_note() + bytes(12)  # final_note(): an empty header
        with contextlib.suppress(ValueError):
            self.write(self.vmcoreinfo_paddr, note)

    def _kcore_segments(self) -> list[_Segment]:
        segs = []
        text_start, text_end = self._kernel_image()
        segs.append(
            _Segment((text_start + TEXT_DELTA) & U64, text_end - text_start, text_start, "text")
        )
        segs.append(_Segment(VMALLOC_START, VMALLOC_SIZE, None, "vmalloc"))
        segs.append(_Segment(MODULES_VADDR, MODULES_SIZE, None, "modules"))
        vmemmap_end = 0
        for r in self.ram:
            # walk_system_ram_range() hands kcore whole page frames only.
            start, end = -(-r.start // PAGE) * PAGE, r.end // PAGE * PAGE
            if end <= start:
                continue
            segs.append(_Segment((self.page_offset_base + start) & U64, end - start, start, "ram"))
            # get_sparsemem_vmemmap_info(): the struct pages of those frames, page-aligned.
            vm_start = VMEMMAP_BASE + (start // PAGE) * SIZEOF_PAGE
            vm_start -= vm_start % PAGE
            vm_end = VMEMMAP_BASE + (end // PAGE) * SIZEOF_PAGE
            vm_end = -(-vm_end // PAGE) * PAGE
            vm_start = max(vm_start, vmemmap_end)
            if vm_start < vm_end:
                segs.append(_Segment(vm_start, vm_end - vm_start, None, "vmemmap"))
                vmemmap_end = vm_end
        return segs

    def _build_kcore_header(self) -> None:
        old = self.kcore_layout == "p_paddr=0"
        notes = _note("CORE", 1, bytes(336))  # NT_PRSTATUS
        prpsinfo = bytearray(136)
        prpsinfo[1] = ord("R")
        prpsinfo[40:47] = b"vmlinux"
        cmdline = self.cmdline.encode()[:79]
        prpsinfo[56 : 56 + len(cmdline)] = cmdline
        notes += _note("CORE", 3, bytes(prpsinfo))  # NT_PRPSINFO
        notes += _note("CORE", 4, bytes(256))  # NT_TASKSTRUCT
        if not old:
            # Linux 4.19, "proc/kcore: add vmcoreinfo note to /proc/kcore".
            notes += self._vmcoreinfo_note()
        nphdr = 1 + len(self.kcore_segments)
        notes_offset = 64 + nphdr * 56
        data_offset = -(-(notes_offset + len(notes)) // PAGE) * PAGE
        ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
        ehdr += struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, nphdr, 0, 0, 0)
        phdrs = struct.pack("<IIQQQQQQ", 4, 0, notes_offset, 0, 0, len(notes), 0, 0)
        end = 0
        for s in self.kcore_segments:
            off = (s.vaddr & VIRTUAL_MASK) + data_offset
            if old:
                paddr = 0
            else:
                paddr = s.paddr if s.kind in ("ram", "text") and s.paddr is not None else U64
            phdrs += struct.pack("<IIQQQQQQ", 1, 7, off, s.vaddr, paddr, s.size, s.size, PAGE)
            end = max(end, off + s.size)
        self.kcore_header = ehdr + phdrs + notes
        self.kcore_data_offset = data_offset
        self.kcore_size = end

    @property
    def kcore_ram_segments(self) -> list[tuple[int, int]]:
        """kcore's direct-map segments as physical ``(start, end)``."""
        return [(s.paddr, s.paddr + s.size) for s in self.kcore_segments if s.kind == "ram"]

    cmdline = "BOOT_IMAGE=/boot/vmlinuz-6.1.0-fake-amd64 root=/dev/vda ro quiet"
    hostname = "fakehost"
    boot_id = "3f1c2a7e-8d4b-4e2a-9c61-0b7d5e9f1a24"
    machine_id = "5a1e0c3b9d7f4e2a8b6c4d2e0f1a3b5c"
    osrelease = "6.1.0-fake-amd64"
    cpu_flags = "fpu vme de pse tsc msr pae mce cx8 apic sep mtrr pge lm nx pdpe1gb la57 smep smap"

    # -- files --------------------------------------------------------------------------

    def _write_files(self) -> None:
        root = self.root

        def put(path: str, data: str | bytes) -> None:
            p = root / path.lstrip("/")
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(data.encode() if isinstance(data, str) else data)

        put("/proc/iomem", self.iomem)
        cpu = (
            "processor\t: {n}\nvendor_id\t: GenuineIntel\nmodel name\t: Fake CPU\n"
            "flags\t\t: {flags}\naddress sizes\t: 46 bits physical, 57 bits virtual\n\n"
        )
        put("/proc/cpuinfo", "".join(cpu.format(n=n, flags=self.cpu_flags) for n in range(2)))
        put("/proc/cmdline", self.cmdline + "\n")
        put("/proc/sys/kernel/random/boot_id", self.boot_id + "\n")
        put("/proc/sys/kernel/hostname", self.hostname + "\n")
        put("/proc/sys/kernel/osrelease", self.osrelease + "\n")
        put("/proc/sys/kernel/ostype", "Linux\n")
        put("/proc/sys/kernel/version", "#1 SMP PREEMPT_DYNAMIC Debian 6.1.0-fake\n")
        put("/proc/sys/kernel/arch", "x86_64\n")
        put("/etc/machine-id", self.machine_id + "\n")
        t = self.text_vaddr
        put(
            "/proc/kallsyms",
            f"{t:016x} T _text\n{t:016x} T startup_64\n{t + 0x1000:016x} T _stext\n"
            f"{t + 0x10000:016x} D swapper_pg_dir\n{t + 0x200000:016x} D init_task\n"
            f"{t + 0x210000:016x} D page_offset_base\n{t + 0x210008:016x} D vmemmap_base\n"
            f"ffffffffc0001000 t fake_init\t[fakemod]\n",
        )
        put("/proc/modules", "fakemod 16384 0 - Live 0xffffffffc0000000\n")
        total_kb = sum(r.end - r.start for r in self.ram) // 1024
        put(
            "/proc/meminfo",
            f"MemTotal:       {total_kb} kB\nMemFree:        {total_kb // 2} kB\n"
            f"MemAvailable:   {total_kb // 2} kB\n",
        )
        # A valid, empty BTF blob (struct btf_header with no types and one NUL string), or
        # the memory map's, which describes struct page.
        put(
            "/sys/kernel/btf/vmlinux",
            self.memory_map.sk.btf
            if self.memory_map is not None
            else struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, 0, 0, 1) + b"\0",
        )
        # kernel/ksysfs.c vmcoreinfo_show(): "%pa %x\n" of the note's address and
        # VMCOREINFO_NOTE_SIZE (0x1024 with 4 KiB pages).
        put("/sys/kernel/vmcoreinfo", f"0x{self.vmcoreinfo_paddr:016x} 1024\n")
        if self.lockdown != "absent":
            levels = ("none", "integrity", "confidentiality")
            put(
                "/sys/kernel/security/lockdown",
                " ".join(f"[{x}]" if x == self.lockdown else x for x in levels) + "\n",
            )
        if self.kernel_config:
            strict = (
                "CONFIG_STRICT_DEVMEM=y"
                if self.strict_devmem
                else ("# CONFIG_STRICT_DEVMEM is not set")
            )
            config = f"CONFIG_DEVMEM=y\n{strict}\nCONFIG_PROC_KCORE=y\n"
            put("/proc/config.gz", gzip.compress(config.encode()))
        for d in ("dev", "proc"):
            (root / d).mkdir(parents=True, exist_ok=True)

    def device_files(self) -> dict[str, str]:
        """Device name in the model -> its path under the sysroot."""
        files = {}
        if self.devmem:
            files["mem"] = "/dev/mem"
        if self.kcore:
            files["kcore"] = "/proc/kcore"
        if self.crash:
            files["crash"] = "/dev/crash"
        return files

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> FakeHost:
        self._write_files()
        mode = self.requested_mode
        if mode is None:
            mode = "fuse" if fuse_usable() else "emulated"
        if mode == "fuse":
            try:
                self._fuse = FuseMount(self._kernel, self.base / "fuse", self.device_files())
                self._fuse.start()
            except (OSError, RuntimeError, ImportError) as exc:
                if self.requested_mode == "fuse":
                    raise
                log.warning("FUSE unavailable (%s): emulating device files", exc)
                mark_fuse_unusable()
                self._fuse = None
                mode = "emulated"
        self.mode = mode
        for name, path in self.device_files().items():
            target = self.root / path.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if mode == "fuse":
                assert self._fuse is not None
                target.symlink_to(self._fuse.mountpoint / name)
            else:
                target.write_bytes(self.kcore_header if name == "kcore" else b"")
        if mode == "emulated":
            paths = {
                os.path.realpath(self.root / p.lstrip("/")): n
                for n, p in self.device_files().items()
            }
            self._emulation = Emulation(self._kernel, paths)
            self._emulation.install()
        return self

    def stop(self) -> None:
        if self._emulation is not None:
            self._emulation.uninstall()
            self._emulation = None
        if self._fuse is not None:
            self._fuse.stop()
            self._fuse = None

    def __enter__(self) -> FakeHost:
        return self.start()

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.stop()
        if exc_type is None and self.check_reads:
            self.assert_no_read_outside()

    # -- read log -----------------------------------------------------------------------

    def allow(self, start: int, end: int) -> None:
        """Let reads touch ``[start, end)`` too (a named range outside RAM a test includes)."""
        self.allowed.append((start, end))

    def clear_reads(self) -> None:
        self.reads.clear()

    def reads_outside(
        self, ranges: Iterable[tuple[int, int]] | None = None
    ) -> list[tuple[str, int, int]]:
        """Physical spans read outside ``ranges`` (default: the RAM plus ``allow``-ed ranges),
        and kcore reads of virtual memory (reported with start = end = -1)."""
        if ranges is None:
            ranges = self.ram_ranges + self.allowed
        allowed = sorted((int(a), int(b)) for a, b in ranges)
        bad = []
        for rec in list(self.reads):
            if rec.virtual:
                bad.append((rec.file, -1, -1))
            for start, end in rec.spans:
                for lo, hi in _uncovered(start, end, allowed):
                    bad.append((rec.file, lo, hi))
        return bad

    def assert_no_read_outside(self, ranges: Iterable[tuple[int, int]] | None = None) -> None:
        bad = self.reads_outside(ranges)
        if bad:
            shown = ", ".join(
                f"{f} {a:#x}-{b - 1:#x}" if a >= 0 else f"{f} virtual memory" for f, a, b in bad[:5]
            )
            raise AssertionError(f"{len(bad)} read(s) outside the allowed ranges: {shown}")

    def bytes_read(self, file: str | None = None) -> int:
        """Physical bytes requested so far (from one device file, or all)."""
        return sum(b - a for r in self.reads if file in (None, r.file) for a, b in r.spans)


def _uncovered(start: int, end: int, allowed: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out = []
    pos = start
    for a, b in allowed:
        if b <= pos:
            continue
        if a >= end:
            break
        if a > pos:
            out.append((pos, a))
        pos = max(pos, b)
        if pos >= end:
            break
    if pos < end:
        out.append((pos, end))
    return out


def _note(name: str, ntype: int, desc: bytes) -> bytes:
    raw = name.encode() + b"\0"
    pad = lambda b: b + bytes(-len(b) % 4)  # noqa: E731
    return struct.pack("<III", len(raw), len(desc), ntype) + pad(raw) + pad(desc)
