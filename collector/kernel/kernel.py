"""The offline view of one kernel in an image: the object plugins receive as ``kernel``.

Everything is worked out lazily from the image alone (physical memory plus its blobs):
VMCOREINFO, page tables, symbols, the address-space layout and BTF types.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from collector import profiles
from collector.errors import CollectorError, ImageError, NotApplicable
from collector.kernel.constructs import struct_definition
from collector.kernel.kallsyms_decode import decode_kallsyms
from collector.kernel.object import Object, Type, parse_type
from collector.kernel.symbols import KallsymsHidden, SymbolTable
from collector.kernel.variables import variable
from collector.kernel.vmcoreinfo import VmcoreInfo, scan_for_vmcoreinfo
from collector.memory import PhysicalMemory

#: The profile of an image whose header names none (LiME files, ELF cores, raw dumps).
DEFAULT_PROFILE = "x86_64"

#: The largest single virtual read; larger ones are a caller's bug or hostile sizes.
MAX_READ = 256 * 1024 * 1024
_CACHE_ENTRIES = 1 << 16
_PAGE = 4096
_MISSING = object()


class _Lazy:
    """A value computed once on first use; a failure is remembered and raised again."""

    def __init__(self, compute: Callable[[], Any]) -> None:
        self._compute = compute
        self._value: Any = _MISSING
        self._error: BaseException | None = None

    def get(self) -> Any:
        if self._error is not None:
            raise self._error
        if self._value is _MISSING:
            try:
                self._value = self._compute()
            except CollectorError as exc:
                self._error = exc
                raise
        return self._value


class _SymbolsIfAny:
    """Symbol lookups for the layout that quietly find nothing when there are no symbols."""

    def __init__(self, kernel: Kernel) -> None:
        self._kernel = kernel

    def get(self, name: str) -> int | None:
        try:
            return self._kernel.symbols.get(name)
        except CollectorError:
            return None


class Kernel:
    """One kernel as the image shows it.

    :param memory: the image's physical memory.
    :param vmcoreinfo: use this instead of the image's own (tests, external notes).
    :param symbols: use this table instead of building one from the image.
    :param btf: use these BTF types instead of parsing blob ``btf``.
    :param profile: the architecture profile's name; by default the one the image's header
        names, else :data:`DEFAULT_PROFILE`. Profiles come from :mod:`collector.profiles`.
    :raises CollectorError: the profile is unknown.
    """

    def __init__(
        self,
        memory: PhysicalMemory,
        vmcoreinfo: VmcoreInfo | None = None,
        symbols: SymbolTable | None = None,
        btf: Any | None = None,
        profile: str | None = None,
    ) -> None:
        self.memory = memory
        if profile is None:
            named = (getattr(memory, "metadata", None) or {}).get("profile")
            profile = named if isinstance(named, str) and named else DEFAULT_PROFILE
        #: The architecture profile: page-table walker and address-space layout.
        self.profile = profiles.get(profile)
        #: Fallbacks taken while working things out, one line each, for reports.
        self.notes: list[str] = []
        #: Where each piece of kernel metadata came from, once worked out: ``vmcoreinfo``,
        #: ``kallsyms`` and ``btf`` to one line each (``blob btf``, ``recovered from memory at``).
        self.sources: dict[str, str] = {}
        self._vmcoreinfo = _Lazy(
            lambda: (
                self._given("vmcoreinfo", vmcoreinfo)
                if vmcoreinfo is not None
                else self._find_vmcoreinfo()
            )
        )
        self._paging = _Lazy(self._make_paging)
        self._symbols = _Lazy(
            lambda: (
                self._given("kallsyms", symbols) if symbols is not None else self._make_symbols()
            )
        )
        self._layout = _Lazy(self._make_layout)
        self._btf = _Lazy(lambda: self._given("btf", btf) if btf is not None else self._make_btf())
        self._tlb: dict[int, tuple[int, int, int]] = {}
        self._types: dict[str, Type] = {}

    # -- lazily worked out -------------------------------------------------------------------

    @property
    def vmcoreinfo(self) -> VmcoreInfo:
        """The kernel's VMCOREINFO: blob ``vmcoreinfo``, else found in captured memory.

        :raises NotApplicable: the image has none.
        """
        return self._vmcoreinfo.get()

    @property
    def paging(self) -> Any:
        """The page-table walker for the kernel's own tables (``init_top_pgt``)."""
        return self._paging.get()

    @property
    def symbols(self) -> SymbolTable:
        """Kernel symbols: blob ``kallsyms``, else decoded from memory; plus VMCOREINFO's."""
        return self._symbols.get()

    @property
    def layout(self) -> Any:
        """Where the kernel put the direct map, the vmemmap and its image."""
        return self._layout.get()

    @property
    def btf(self) -> Any:
        """The kernel's BTF types: blob ``btf``, else the kernel's ``.BTF`` section read
        from memory (:mod:`collector.kernel.btf_memory`).

        :raises NotApplicable: neither gives BTF (each reason is in the message).
        """
        return self._btf.get()

    def _given(self, what: str, value: Any) -> Any:
        self.sources[what] = "given by the caller"
        return value

    def _find_vmcoreinfo(self) -> VmcoreInfo:
        blob = self.memory.blob("vmcoreinfo")
        if blob:
            try:
                found = VmcoreInfo.from_blob(blob)
            except ImageError as exc:
                self.notes.append(f"vmcoreinfo blob unusable ({exc}); scanning memory")
            else:
                self.sources["vmcoreinfo"] = "blob vmcoreinfo"
                return found
        found = scan_for_vmcoreinfo(self.memory)
        if found is None:
            raise NotApplicable(
                "the image has no VMCOREINFO: no usable 'vmcoreinfo' blob and none found"
                " in captured memory"
            )
        where = f" at physical {found.paddr:#x}" if found.paddr is not None else ""
        self.sources["vmcoreinfo"] = f"found in memory{where}"
        return found

    def _make_paging(self) -> Any:
        return self.profile.paging_for(self.memory, self.vmcoreinfo)

    def _make_symbols(self) -> SymbolTable:
        table: SymbolTable | None = None
        blob = self.memory.blob("kallsyms")
        if blob:
            try:
                table = SymbolTable.from_kallsyms_text(blob)
                self.sources["kallsyms"] = "blob kallsyms"
            except KallsymsHidden as exc:
                self.notes.append(f"{exc}; decoding kallsyms from memory instead")
            except ImageError as exc:
                self.notes.append(f"kallsyms blob unusable ({exc}); decoding from memory")
        try:
            vmcoreinfo: VmcoreInfo | None = self.vmcoreinfo
        except CollectorError:
            if table is None:
                raise
            return table
        if table is None:
            try:
                table = decode_kallsyms(self.read_virt, vmcoreinfo)
            except CollectorError as exc:
                self.notes.append(f"kallsyms not decoded ({exc}); only VMCOREINFO symbols")
                self.sources["kallsyms"] = "VMCOREINFO SYMBOL() entries only"
                return SymbolTable.from_vmcoreinfo(vmcoreinfo)
            self.sources["kallsyms"] = (
                f"decoded from memory ({len(table)} symbols, kallsyms_names at"
                f" {vmcoreinfo.symbol('kallsyms_names'):#x})"
            )
        return table.merged(SymbolTable.from_vmcoreinfo(vmcoreinfo))

    def _make_layout(self) -> Any:
        layout = self.profile.Layout.from_image(
            self.memory, self.vmcoreinfo, _SymbolsIfAny(self), paging=self.paging
        )
        self.notes.extend(layout.notes)
        return layout

    def _make_btf(self) -> Any:
        from collector.kernel.btf import BTF
        from collector.kernel.btf_memory import find_btf_in_memory

        blob = self.memory.blob("btf")
        if blob:
            try:
                parsed = BTF.parse(blob)
            except ImageError as exc:
                why = f"blob 'btf' unusable ({exc})"
            else:
                self.sources["btf"] = "blob btf"
                return parsed
        else:
            why = "no blob 'btf'"
        # Images from other tools (LiME, AVML, ELF cores) carry no blobs, but the kernel's
        # own BTF lies in its rodata and kallsyms (decoded from memory too) says where.
        try:
            found = find_btf_in_memory(self.read_virt, self.symbols)
        except CollectorError as exc:
            raise NotApplicable(
                f"the image carries no usable BTF: {why}, and none recovered from memory: {exc}"
            ) from None
        where = f"memory at {found.address:#x} ({found.size} bytes, __start_BTF..__stop_BTF)"
        self.sources["btf"] = f"recovered from {where}"
        self.notes.append(f"BTF recovered from {where}: {why}")
        return found.btf

    def metadata_sources(self) -> dict[str, str]:
        """Work out VMCOREINFO, the symbols and BTF, and say where each came from, or why
        it is not available (one line each, for ``collect info``)."""
        out = {}
        for what, get in (
            ("vmcoreinfo", lambda: self.vmcoreinfo),
            ("kallsyms", lambda: self.symbols),
            ("btf", lambda: self.btf),
        ):
            try:
                get()
            except CollectorError as exc:
                out[what] = f"not available: {exc}"
            else:
                out[what] = self.sources.get(what, "unknown")
        return out

    # -- identity ----------------------------------------------------------------------------

    @property
    def release(self) -> str | None:
        """``OSRELEASE``, e.g. ``6.1.0-56-amd64``."""
        return self.vmcoreinfo.osrelease

    @property
    def build_id(self) -> str | None:
        return self.vmcoreinfo.build_id

    @property
    def kaslr_offset(self) -> int:
        """``KERNELOFFSET``: how far KASLR moved the kernel image (0 without KASLR)."""
        return self.vmcoreinfo.kerneloffset or 0

    @property
    def paging_mode(self) -> str:
        """``"4-level"`` or ``"5-level"``."""
        return self.paging.mode

    # -- addresses ---------------------------------------------------------------------------

    def translate(self, vaddr: int) -> Any:
        """Walk the kernel's page tables for ``vaddr``, every step recorded."""
        return self.paging.translate(vaddr)

    def symbol(self, name: str) -> int:
        """The address of kernel symbol ``name``.

        :raises SymbolNotFound: the symbol is not known.
        """
        return self.symbols.lookup(name)

    def pfn_to_page(self, pfn: int) -> int:
        """``pfn_to_page()``: the ``struct page *`` of a PFN in the vmemmap."""
        return self.layout.pfn_to_page(pfn)

    def page_to_pfn(self, page: int) -> int:
        """``page_to_pfn()``: the PFN of a ``struct page *``."""
        return self.layout.page_to_pfn(page)

    # -- reading -----------------------------------------------------------------------------

    def read_phys(self, paddr: int, size: int) -> bytes:
        """Read physical memory (raises PageNotCaptured for pages the image lacks)."""
        _check_size(size)
        return self.memory.read(paddr, size)

    def _map(self, vaddr: int) -> tuple[int, int]:
        """Physical address of ``vaddr`` and how many bytes from it are contiguous."""
        hit = self._tlb.get(vaddr >> 12)
        if hit is None:
            t = self.paging.translate(vaddr)
            vbase = vaddr - vaddr % t.page_size
            hit = (t.paddr - vaddr % t.page_size, vbase, t.page_size)
            if len(self._tlb) >= _CACHE_ENTRIES:
                self._tlb.clear()
            self._tlb[vaddr >> 12] = hit
        pbase, vbase, size = hit
        return pbase + (vaddr - vbase), vbase + size - vaddr

    def read_virt(self, vaddr: int, size: int) -> bytes:
        """Read kernel virtual memory, translating page by page.

        :raises TranslationError: a page on the way is not mapped.
        :raises PageNotCaptured: a page (of data or of page tables) is not in the image.
        :raises ImageError: ``size`` is negative or larger than MAX_READ.
        """
        _check_size(size)
        out = bytearray()
        while size > 0:
            paddr, run = self._map(vaddr)
            n = min(size, run)
            if not out and n == size:  # one mapping holds it all: no copy
                return self.memory.read(paddr, n)
            out += self.memory.read(paddr, n)
            vaddr += n
            size -= n
        return bytes(out)

    def _unpack(self, fmt: str, vaddr: int) -> int:
        s = struct.Struct(fmt)
        return s.unpack(self.read_virt(vaddr, s.size))[0]

    def read_u8(self, vaddr: int) -> int:
        return self._unpack("<B", vaddr)

    def read_u16(self, vaddr: int) -> int:
        return self._unpack("<H", vaddr)

    def read_u32(self, vaddr: int) -> int:
        return self._unpack("<I", vaddr)

    def read_u64(self, vaddr: int) -> int:
        return self._unpack("<Q", vaddr)

    def read_s32(self, vaddr: int) -> int:
        return self._unpack("<i", vaddr)

    def read_s64(self, vaddr: int) -> int:
        return self._unpack("<q", vaddr)

    def read_pointer(self, vaddr: int) -> int:
        """An ``unsigned long``/pointer (8 bytes on x86_64)."""
        return self._unpack("<Q", vaddr)

    def read_cstring(self, vaddr: int, max_len: int = 4096) -> bytes:
        """A NUL-terminated string without its NUL; at most ``max_len`` bytes are returned.

        Reads stop at page boundaries, so a string ending just before an unmapped page
        still reads.
        """
        _check_size(max_len)
        out = bytearray()
        while len(out) < max_len:
            step = min(max_len - len(out), _PAGE - vaddr % _PAGE)
            chunk = self.read_virt(vaddr, step)
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                return bytes(out)
            out += chunk
            vaddr += step
        return bytes(out)

    # -- typed objects (BTF) -----------------------------------------------------------------

    def type(self, spelling: str) -> Type:
        """A kernel type from its C spelling: ``"struct task_struct"``, ``"char *"``,
        ``"unsigned long [64]"``, ``"pid_t"``.

        :raises ObjectError: BTF has no such type.
        :raises NotApplicable: the image carries no BTF.
        """
        t = self._types.get(spelling)
        if t is None:
            t = self._types[spelling] = parse_type(self.btf, spelling)
        return t

    def object(self, type: str | Type, address: int) -> Object:
        """The object of ``type`` at virtual ``address``; nothing is read until asked for."""
        t = self.type(type) if isinstance(type, str) else type
        return Object(self, t, address)

    def variable(self, name: str) -> Object:
        """The global variable ``name`` (``init_task``, ``modules``, ``prb``...), typed from
        :data:`collector.kernel.variables.GLOBALS` or BTF.

        :raises NotApplicable: the symbol or its type is unknown, or does not fit.
        """
        return variable(self, name)

    # -- types (BTF) -------------------------------------------------------------------------

    def struct(self, name: str) -> Any:
        """The construct definition of ``struct name`` from BTF."""
        return struct_definition(self.btf, name)

    def read_struct(self, name: str, vaddr: int) -> Any:
        """Parse one ``struct name`` at ``vaddr``.

        :raises ImageError: the bytes do not parse (construct's error, in one line).
        """
        import construct

        definition = struct_definition(self.btf, name)
        data = self.read_virt(vaddr, self.btf.sizeof(name))
        try:
            return definition.parse(data)
        except construct.ConstructError as exc:
            raise ImageError(f"struct {name} at {vaddr:#x} does not parse: {exc}") from None

    def read_array(self, name: str, vaddr: int, count: int) -> Any:
        """``count`` consecutive ``struct name`` at ``vaddr`` as one numpy structured array."""
        from collector.kernel.bulk import bulk_view

        size = self.btf.sizeof(name)
        if count < 0 or size * count > MAX_READ:
            raise ImageError(f"{count} x struct {name} ({size} bytes each) is too large a read")
        definition = struct_definition(self.btf, name)
        return bulk_view(self.read_virt(vaddr, size * count), definition, count)


def _check_size(size: int) -> None:
    if not 0 <= size <= MAX_READ:
        raise ImageError(f"read of {size} bytes refused (limit {MAX_READ})")


def kernel_image_map(kernel: Kernel) -> Any:
    """Where the kernel image lies physically and in its own mapping (the kernel-text
    segment of /proc/vmcore), from the image's iomem ("Kernel code" .. "Kernel bss") or else
    its page tables; see the profile's ``kernel_image_map``.

    :raises CollectorError: VMCOREINFO is missing or nothing checks.
    """
    memory = kernel.memory
    blob = memory.blob("iomem")
    text = blob.decode("ascii", "replace") if blob else None
    if text is None:
        meta = (getattr(memory, "metadata", None) or {}).get("iomem")
        text = meta if isinstance(meta, str) else None
    return kernel.profile.kernel_image_map(memory, kernel.vmcoreinfo, kernel.paging, text)
