"""Gather what offline analysis needs (VMCOREINFO, BTF, kallsyms...) before any RAM is read.

Every item is optional: one that cannot be read is recorded as missing with the reason, and
the capture goes on.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from dataclasses import dataclass, field

from collector.acquire.host import read_limited
from collector.acquire.iomem import MAX_IOMEM_BYTES
from collector.elf import vmcoreinfo_from_note_bytes
from collector.sysroot import Sysroot

#: Blobs read from files: image name -> live path.
FILE_BLOBS = {
    "btf": "/sys/kernel/btf/vmlinux",
    "kallsyms": "/proc/kallsyms",
    "modules": "/proc/modules",
    "meminfo": "/proc/meminfo",
    "cpuinfo": "/proc/cpuinfo",
    "iomem": "/proc/iomem",
}
#: The largest file taken as each blob: several times what the largest kernels print (a
#: vmlinux BTF of about 6 MB, kallsyms of about 15 MB with every module loaded, cpuinfo of
#: about 2 MB on a thousand CPUs). A larger file is recorded as missing, never read whole.
BLOB_LIMITS = {
    "btf": 64 << 20,
    "kallsyms": 64 << 20,
    "modules": 8 << 20,
    "meminfo": 1 << 20,
    "cpuinfo": 16 << 20,
    "iomem": MAX_IOMEM_BYTES,
}
# VMCOREINFO_NOTE_SIZE (include/linux/crash_core.h, later vmcore_info.h): two ELF note headers, the
# name and VMCOREINFO_BYTES (one page) of text.
VMCOREINFO_NOTE_OVERHEAD = 2 * 12 + 12


@dataclass
class Gathered:
    """Blobs to write and the reasons for those that are missing."""

    blobs: dict[str, bytes] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    def add_file(self, sysroot: Sysroot, name: str, path: str) -> None:
        limit = BLOB_LIMITS.get(name, 1 << 20)
        try:
            data = read_limited(sysroot, path, limit)
        except OSError as e:
            if e.errno == errno.EFBIG:
                self.missing[name] = f"{path} is larger than {limit} bytes; not taken"
            else:
                self.missing[name] = f"{path}: {e.strerror or e}"
            return
        if not data:
            self.missing[name] = f"{path} is empty"
            return
        self.blobs[name] = data


def parse_vmcoreinfo_note(note: bytes) -> bytes | None:
    """The text of an ELF note named ``VMCOREINFO``, or None if ``note`` is not one."""
    return vmcoreinfo_from_note_bytes(note)


def vmcoreinfo_location(sysroot: Sysroot) -> tuple[int, int] | None:
    """``/sys/kernel/vmcoreinfo``: the physical address and size of the VMCOREINFO note.

    The kernel prints both in hex, the size without a ``0x`` (kernel/ksysfs.c: ``"%pa %x"``).
    """
    try:
        text = read_limited(sysroot, "/sys/kernel/vmcoreinfo", 4096).decode("ascii")
        addr, size = text.split()[:2]
        return int(addr, 16), int(size, 16)
    except (OSError, ValueError):
        return None


def gather(
    sysroot: Sysroot,
    kcore_vmcoreinfo: str | bytes | None,
    kcore_phdrs: bytes | None,
    read_phys: Callable[[int, int], bytes] | None,
    page_size: int = 4096,
) -> Gathered:
    """Collect every blob the image carries.

    :param kcore_vmcoreinfo: VMCOREINFO text from /proc/kcore's note, when kcore was opened.
    :param kcore_phdrs: /proc/kcore's ELF and program headers, when kcore was opened.
    :param read_phys: reads physical memory through the plan's sources, for VMCOREINFO when
        kcore does not carry it.
    :param page_size: the kernel's page size, which bounds the VMCOREINFO note.
    """
    out = Gathered()
    for name, path in FILE_BLOBS.items():
        out.add_file(sysroot, name, path)
    if kcore_phdrs:
        out.blobs["kcore-phdrs"] = kcore_phdrs
    else:
        out.missing["kcore-phdrs"] = "/proc/kcore was not opened"
    if kcore_vmcoreinfo:
        if isinstance(kcore_vmcoreinfo, str):
            kcore_vmcoreinfo = kcore_vmcoreinfo.encode()
        out.blobs["vmcoreinfo"] = kcore_vmcoreinfo
        return out
    where = vmcoreinfo_location(sysroot)
    if where is None:
        out.missing["vmcoreinfo"] = "not in /proc/kcore, and /sys/kernel/vmcoreinfo is unreadable"
    elif read_phys is None:
        out.missing["vmcoreinfo"] = "not in /proc/kcore, and no source reads its physical address"
    elif not 0 < where[1] <= page_size + VMCOREINFO_NOTE_OVERHEAD:
        out.missing["vmcoreinfo"] = (
            f"/sys/kernel/vmcoreinfo gives a note of {where[1]} bytes, not 1 to "
            f"{page_size + VMCOREINFO_NOTE_OVERHEAD}; not read"
        )
    else:
        try:
            text = parse_vmcoreinfo_note(read_phys(*where))
        except OSError as e:
            out.missing["vmcoreinfo"] = (
                f"reading it at {where[0]:#x} failed: {os.strerror(e.errno or 0)}"
            )
        else:
            if text:
                out.blobs["vmcoreinfo"] = text
            else:
                out.missing["vmcoreinfo"] = f"no VMCOREINFO note at {where[0]:#x}"
    return out
