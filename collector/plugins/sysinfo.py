"""Identity of the captured system: uname fields read from memory, VMCOREINFO, boot time.

Covers ``init_uts_ns`` (include/linux/utsname.h, struct new_utsname in
include/uapi/linux/utsname.h) and ``tk_core`` (kernel/time/timekeeping.c, struct timekeeper in
include/linux/timekeeper_internal.h).
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from construct import ConstructError

from collector.api import (
    Analysis,
    CollectorError,
    Field,
    ImageError,
    NotApplicable,
    hookimpl,
    plausible_int,
    tk_core_timekeeper_offset,
)

if TYPE_CHECKING:
    from collector.api import Kernel

T = TypeVar("T")

#: The members of struct new_utsname, as ``uname(2)`` returns them.
UTS_MEMBERS = ("sysname", "nodename", "release", "version", "machine", "domainname")

#: struct new_utsname is user ABI (``uname(2)`` copies it out whole): six
#: ``char[__NEW_UTS_LEN + 1]`` with ``__NEW_UTS_LEN`` 64. Used only when the image has no BTF.
NEW_UTS_LEN = 64

#: No kernel's struct new_utsname comes near this; a larger BTF size is hostile.
_MAX_UTSNAME = 4096

FIELDS = (
    Field("sysname", "str", "init_uts_ns.name.sysname read from memory (uname -s)"),
    Field("nodename", "str", "init_uts_ns.name.nodename: the host name at capture (uname -n)"),
    Field("release", "str", "init_uts_ns.name.release (uname -r)"),
    Field("version", "str", "init_uts_ns.name.version: build number and date (uname -v)"),
    Field("machine", "str", "init_uts_ns.name.machine (uname -m)"),
    Field("domainname", "str", "init_uts_ns.name.domainname: the NIS domain name"),
    Field("osrelease", "str", "VMCOREINFO OSRELEASE: the release the kernel wrote at boot"),
    Field("build_id", "str", "VMCOREINFO BUILD-ID: the GNU build ID of vmlinux, in hex"),
    Field("kerneloffset", "hex", "VMCOREINFO KERNELOFFSET: how far KASLR moved the kernel image"),
    Field(
        "phys_base",
        "hex",
        "VMCOREINFO NUMBER(phys_base): where the kernel image was loaded in physical memory"
        " relative to its link address (negative under KASLR)",
    ),
    Field("paging_mode", "str", "4-level or 5-level, from VMCOREINFO NUMBER(pgtable_l5_enabled)"),
    Field("page_size", "int", "VMCOREINFO PAGESIZE, else the image's page size, in bytes"),
    Field(
        "range_bytes",
        "int",
        "bytes of physical address space the image's ranges cover, pages not read included",
    ),
    Field(
        "mem_total",
        "int",
        "MemTotal in bytes: of the meminfo blob (/proc/meminfo at capture), else"
        " totalram_pages() read from memory times the page size, which is what MemTotal shows",
    ),
    Field(
        "boot_time",
        "str",
        "UTC wall-clock time of boot (ISO 8601), from memory: tk_core.timekeeper.offs_real"
        " minus offs_boot, as getboottime64() computes it",
    ),
    Field("capture_time", "str", "when the capture started, from the image header (ISO 8601)"),
    Field("notes", "str", "what could not be read and why, and fallbacks taken; '; '-separated"),
)

SYSINFO = Analysis(
    name="sysinfo",
    summary="identity of the captured kernel: uname, VMCOREINFO, boot time, memory size",
    fields=FIELDS,
    run=lambda kernel, options: [sysinfo(kernel)],
)


@hookimpl
def collector_analyses() -> list[Analysis]:
    return [SYSINFO]


def sysinfo(kernel: Kernel) -> dict[str, Any]:
    """The one sysinfo record; each part that cannot be read is ``None`` and said in ``notes``."""
    notes: list[str] = []

    def attempt(what: str, get: Callable[[], T]) -> T | None:
        try:
            return get()
        except (CollectorError, ConstructError) as e:
            notes.append(f"{what}: {e}")
            return None

    record: dict[str, Any] = dict.fromkeys(f.name for f in FIELDS)
    record.update(attempt("init_uts_ns", lambda: read_init_uts_ns(kernel)) or {})
    vmcoreinfo = attempt("VMCOREINFO", lambda: kernel.vmcoreinfo)
    if vmcoreinfo is not None:
        record["osrelease"] = vmcoreinfo.osrelease
        record["build_id"] = vmcoreinfo.build_id
        record["kerneloffset"] = vmcoreinfo.kerneloffset
        record["phys_base"] = vmcoreinfo.phys_base
        record["page_size"] = vmcoreinfo.page_size
        record["paging_mode"] = attempt("paging", lambda: kernel.paging_mode)
    memory = kernel.memory
    if record.get("page_size") is None:
        record["page_size"] = memory.page_size
    record["range_bytes"] = sum(end - start for start, end in memory.ranges())
    record["mem_total"] = mem_total(memory.blob("meminfo"))
    if record["mem_total"] is None:
        # Images from other tools carry no meminfo blob; the kernel's own count is in memory.
        record["mem_total"] = attempt("mem_total", lambda: totalram_bytes(kernel))
    boot_ns = attempt("boot_time", lambda: getboottime64(kernel))
    if boot_ns is not None:
        record["boot_time"] = attempt("boot_time", lambda: _iso_utc(boot_ns))
    start = memory.metadata.get("start_time")
    record["capture_time"] = start if isinstance(start, str) else None
    if record["capture_time"] is None:
        # LiME, AVML and ELF cores record no capture metadata, only memory.
        kind = memory.metadata.get("format")
        what = f"the {kind} format" if isinstance(kind, str) else "the image"
        notes.append(f"capture_time: {what} records no capture start time")
    notes.extend(getattr(kernel, "notes", []))
    record["notes"] = "; ".join(notes) or None
    return record


def read_init_uts_ns(kernel: Kernel) -> dict[str, str]:
    """``init_uts_ns.name``: the ``struct new_utsname`` the kernel answers ``uname(2)`` with.

    Typed by BTF; without BTF, from VMCOREINFO ``OFFSET(uts_namespace.name)`` and the user
    ABI layout of struct new_utsname.
    """
    try:
        _ = kernel.btf
    except NotApplicable:
        return _init_uts_ns_without_btf(kernel)
    name = kernel.variable("init_uts_ns").name
    return {member: name.member(member).text(_MAX_UTSNAME) for member in UTS_MEMBERS}


def _init_uts_ns_without_btf(kernel: Kernel) -> dict[str, str]:
    offset = kernel.vmcoreinfo.offset("uts_namespace.name")
    if offset is None:
        raise NotApplicable("no BTF, and VMCOREINFO has no OFFSET(uts_namespace.name)")
    size = NEW_UTS_LEN + 1
    raw = kernel.read_virt(kernel.symbol("init_uts_ns") + offset, len(UTS_MEMBERS) * size)
    return {
        member: raw[i * size : (i + 1) * size]
        .split(b"\0", 1)[0]
        .decode("utf-8", "backslashreplace")
        for i, member in enumerate(UTS_MEMBERS)
    }


def getboottime64(kernel: Kernel) -> int:
    """Wall-clock time of boot in nanoseconds since the epoch, as ``getboottime64()``.

    ``offs_real`` is CLOCK_REALTIME minus CLOCK_MONOTONIC and ``offs_boot`` CLOCK_BOOTTIME
    minus CLOCK_MONOTONIC; at boot BOOTTIME is 0, so boot happened at ``offs_real - offs_boot``.
    """
    tk_core = kernel.symbols.get("tk_core")
    if tk_core is None:
        raise NotApplicable("symbol tk_core is not in the symbol table")
    # tk_core is static and anonymous before 6.13: no table can type it, so the timekeeper
    # inside it is found by its offset.
    timekeeper = kernel.object("struct timekeeper", tk_core + tk_core_timekeeper_offset(kernel.btf))
    return timekeeper.offs_real.value() - timekeeper.offs_boot.value()


#: No machine has this many pages (4 PiB of 4 KiB pages); a larger count is misread.
MAX_TOTALRAM_PAGES = 1 << 40


def totalram_bytes(kernel: Kernel) -> int:
    """``totalram_pages() << PAGE_SHIFT``: the RAM the page allocator manages, in bytes, which
    si_meminfo() reports as MemTotal (mm/show_mem.c, fs/proc/meminfo.c)."""
    # v5.0 "mm: convert totalram_pages and totalhigh_pages variables to atomic" renamed the
    # unsigned long totalram_pages to the atomic_long_t _totalram_pages. Both are one 64-bit
    # word on x86_64 (atomic_long_t is atomic64_t, whose only member is s64 counter), so
    # neither read needs BTF.
    for name in ("_totalram_pages", "totalram_pages"):
        address = kernel.symbols.get(name)
        if address is not None:
            pages = plausible_int(kernel.read_s64(address), 1, MAX_TOTALRAM_PAGES, name)
            page_size = kernel.vmcoreinfo.page_size or kernel.memory.page_size
            return pages * page_size
    raise NotApplicable("neither _totalram_pages nor totalram_pages is in the symbol table")


def _iso_utc(ns: int) -> str:
    try:
        when = dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.UTC)
    except (OverflowError, ValueError, OSError):
        raise ImageError(f"{ns} ns since the epoch is not a date") from None
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


_MEMTOTAL = re.compile(rb"^MemTotal:[ \t]+([0-9]{1,20}) kB[ \t]*$", re.MULTILINE)


def mem_total(meminfo: bytes | None) -> int | None:
    """``MemTotal`` of /proc/meminfo text, in bytes, or ``None``."""
    if not meminfo:
        return None
    found = _MEMTOTAL.search(meminfo)
    return None if found is None else int(found.group(1)) * 1024
