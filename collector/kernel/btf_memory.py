"""The kernel's own BTF, read from captured memory when an image carries no ``btf`` blob.

A kernel built with CONFIG_DEBUG_INFO_BTF links its BTF into the ``.BTF`` section of
vmlinux, between the linker symbols ``__start_BTF`` and ``__stop_BTF``
(include/asm-generic/vmlinux.lds.h), inside the read-only data of the kernel image.
``/sys/kernel/btf/vmlinux`` serves those very bytes (kernel/bpf/sysfs_btf.c), so the
section read through the kernel's page tables is the blob a native capture stores.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from collector.errors import CollectorError, ImageError
from collector.kernel.btf import BTF, BTF_HEADER_SIZE, btf_check_sections, btf_magic_version
from collector.kernel.symbols import SymbolTable

#: The largest section believed: vmlinux BTF is 4-6 MB for distribution kernels and stays
#: well under this even for allyesconfig builds; a larger span is a misread symbol table.
MAX_BTF_BYTES = 64 << 20
#: btf_parse_hdr() (kernel/bpf/btf.c) accepts a longer header only if its extra bytes are
#: zero; no kernel header comes near a page.
MAX_HDR_LEN = 4096

ReadVirt = Callable[[int, int], bytes]


@dataclass(frozen=True)
class RecoveredBTF:
    """BTF found in memory: ``btf`` parsed from the ``size`` bytes at virtual ``address``."""

    address: int
    size: int
    btf: Any


def check_btf_header(head: bytes, section_size: int) -> int:
    """Check a BTF header against the section it opens; return the header's length.

    The checks are btf_parse_hdr() and btf_check_sec_info()'s (kernel/bpf/btf.c): magic
    0xeB9F in the kernel's byte order, version 1, a header of at least 24 bytes, and type
    and string sections that lie inside the section, do not overlap and, with the header,
    cover it exactly (the kernel refuses its own BTF at boot otherwise).

    :param head: at least the first 24 bytes of the section.
    :param section_size: ``__stop_BTF - __start_BTF``.
    :raises ImageError: one line saying which check failed.
    """
    if len(head) < BTF_HEADER_SIZE:
        raise ImageError(f"BTF in memory: {len(head)} bytes are too few for a header")
    e, hdr_len = btf_magic_version(head, "BTF in memory")
    if not BTF_HEADER_SIZE <= hdr_len <= min(MAX_HDR_LEN, section_size):
        raise ImageError(
            f"BTF in memory: header length {hdr_len} is not within"
            f" {BTF_HEADER_SIZE}..{min(MAX_HDR_LEN, section_size)}"
        )
    type_off, type_len, str_off, str_len = struct.unpack_from(e + "IIII", head, 8)
    body = section_size - hdr_len
    btf_check_sections(type_off, type_len, str_off, str_len, body, "BTF in memory")
    if type_len + str_len != body:
        raise ImageError(
            f"BTF in memory: header and sections ({hdr_len}+{type_len}+{str_len} bytes) do"
            f" not fill the {section_size} bytes between __start_BTF and __stop_BTF"
        )
    return hdr_len


def find_btf_in_memory(read_virt: ReadVirt, symbols: SymbolTable) -> RecoveredBTF:
    """Read and parse the kernel's ``.BTF`` section from memory.

    :param read_virt: ``read_virt(vaddr, size) -> bytes`` through the kernel's page tables.
    :param symbols: the kernel's symbols; ``__start_BTF`` and ``__stop_BTF`` must be there
        (kallsyms lists them: they are in the kernel image's address range).
    :raises ImageError: a symbol is missing, the span is implausible, the section cannot be
        read, or its bytes are not BTF.
    """
    start = symbols.get("__start_BTF")
    stop = symbols.get("__stop_BTF")
    if start is None or stop is None:
        missing = " and ".join(
            n for n, a in (("__start_BTF", start), ("__stop_BTF", stop)) if a is None
        )
        # A kernel without CONFIG_DEBUG_INFO_BTF has neither; a symbol table from VMCOREINFO
        # alone (kallsyms not decoded) has neither either.
        raise ImageError(f"the kernel symbols ({symbols.source}) have no {missing}")
    size = stop - start
    if not BTF_HEADER_SIZE <= size <= MAX_BTF_BYTES:
        raise ImageError(
            f"__start_BTF {start:#x} .. __stop_BTF {stop:#x} spans {size} bytes: not a BTF"
            f" section (expected {BTF_HEADER_SIZE}..{MAX_BTF_BYTES})"
        )
    try:
        head = read_virt(start, min(size, MAX_HDR_LEN))
        check_btf_header(head, size)
        data = read_virt(start, size)
    except CollectorError as exc:
        # A translation or capture failure, or a header check: either way one line that
        # names the section, so a report says where the BTF was looked for.
        raise ImageError(f"BTF section at {start:#x} ({size} bytes): {exc}") from None
    try:
        btf = BTF.parse(data)
    except ImageError as exc:
        raise ImageError(
            f"BTF section at {start:#x} ({size} bytes) does not parse: {exc}"
        ) from None
    return RecoveredBTF(start, size, btf)
