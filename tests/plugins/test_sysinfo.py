"""sysinfo on a synthetic kernel: page tables, VMCOREINFO, BTF and kallsyms built by hand."""

from __future__ import annotations

import argparse
import calendar
import json
import struct
from pathlib import Path

import pytest

from collector import cli_analysis
from collector.analyze import analyze_kernel, run_analysis
from collector.image.writer import ImageWriter
from collector.kernel.kernel import Kernel
from collector.kernel.variables import tk_core_timekeeper_offset
from collector.memory import Fate, PageFate
from collector.plugin_manager import DISABLE_AUTOLOAD_ENV, PluginManager
from collector.plugins import sysinfo
from collector.testing.btf_encoder import INT_SIGNED, Encoder
from collector.testing.pagetables import PageTableBuilder

START_KERNEL_MAP = 0xFFFFFFFF80000000
KERNELOFFSET = 0x1E000000
INIT_TOP_PGT = 0xFFFFFFFF9F00A000
TOP_PADDR = 0x100000
# __pa_symbol(init_top_pgt) must land on the top table: v - __START_KERNEL_map + phys_base.
PHYS_BASE = TOP_PADDR - (INIT_TOP_PGT - START_KERNEL_MAP)

UTS_PAGE, UTS_PADDR, INIT_UTS_NS = 0xFFFFFFFF9F613000, 0x400000, 0xFFFFFFFF9F613040
TK_PAGE, TK_PADDR, TK_CORE = 0xFFFFFFFF9F614000, 0x401000, 0xFFFFFFFF9F614080
UTS_NAME_OFFSET = 4  # struct uts_namespace { struct kref kref; struct new_utsname name; ... }
OFFS_REAL, OFFS_BOOT = 88, 96

UTS = {
    "sysname": "Linux",
    "nodename": "evidence-host",
    "release": "6.1.0-56-amd64",
    "version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.158-1 (2025-11-09)",
    "machine": "x86_64",
    "domainname": "(none)",
}
BOOT_SECONDS = calendar.timegm((2024, 3, 5, 6, 7, 8))
SUSPENDED_NS = 12_345_678_901
BUILD_ID = "0123456789abcdef0123456789abcdef01234567"
VMCOREINFO = (
    "OSRELEASE=6.1.0-56-amd64\n"
    f"BUILD-ID={BUILD_ID}\n"
    "PAGESIZE=4096\n"
    f"SYMBOL(init_uts_ns)={INIT_UTS_NS:x}\n"
    f"OFFSET(uts_namespace.name)={UTS_NAME_OFFSET}\n"
    f"SYMBOL(init_top_pgt)={INIT_TOP_PGT:x}\n"
    f"NUMBER(phys_base)={PHYS_BASE}\n"
    f"KERNELOFFSET={KERNELOFFSET:x}\n"
    "NUMBER(pgtable_l5_enabled)=0\n"
)
KALLSYMS = f"ffffffff81000000 T _stext\n{INIT_UTS_NS:x} D init_uts_ns\n{TK_CORE:x} d tk_core\n"
MEMINFO = b"MemTotal:        2030000 kB\nMemFree:          100000 kB\n"
START_TIME = "2024-03-06T10:00:00+00:00"


def make_btf(tk_layout: str = "tk_data") -> tuple[bytes, int]:
    """BTF for the types sysinfo reads; returns the blob and where tk_core's timekeeper is."""
    e = Encoder()
    char = e.int("char", 1, INT_SIGNED)
    name = e.array(char, 65)
    utsname = e.struct(
        "new_utsname", 390, [(m, name, 65 * 8 * i) for i, m in enumerate(sysinfo.UTS_MEMBERS)]
    )
    uint = e.int("unsigned int", 4)
    kref = e.struct("kref", 4, [("refcount", uint, 0)])
    e.struct("uts_namespace", 400, [("kref", kref, 0), ("name", utsname, 8 * UTS_NAME_OFFSET)])
    s64 = e.int("long long int", 8, INT_SIGNED)
    ktime = e.typedef("ktime_t", s64)
    timekeeper = e.struct(
        "timekeeper",
        280,
        [("offs_real", ktime, 8 * OFFS_REAL), ("offs_boot", ktime, 8 * OFFS_BOOT)],
    )
    seqcount = e.struct("seqcount", 4, [("sequence", uint, 0)])
    if tk_layout == "tk_data":  # 6.13 and later; a made-up offset shows it is the one used
        raw = e.struct("seqcount_raw_spinlock", 4, [("seqcount", seqcount, 0)])
        e.struct("tk_data", 640, [("seq", raw, 0), ("timekeeper", timekeeper, 8 * 64)])
        at = 64
    elif tk_layout == "seqcount_raw_spinlock":  # 5.10 to 6.12, here with a lockdep pointer
        ptr = e.ptr(uint)
        e.struct("seqcount_raw_spinlock", 12, [("seqcount", seqcount, 0), ("lock", ptr, 32)])
        at = 16
    else:  # before 5.10: a bare seqcount_t
        at = 8
    return e.encode(), at


def utsname_bytes(values: dict[str, str | bytes]) -> bytes:
    raw = bytearray(390)
    for i, member in enumerate(sysinfo.UTS_MEMBERS):
        value = values[member]
        value = value.encode() if isinstance(value, str) else value
        raw[65 * i : 65 * i + len(value)] = value
    return bytes(raw)


def make_pages(tk_at: int, uts: dict | None = None) -> PageTableBuilder:
    tables = PageTableBuilder(levels=4, top=TOP_PADDR, alloc=0x200000)
    tables.map(UTS_PAGE, UTS_PADDR)
    tables.map(TK_PAGE, TK_PADDR)
    uts_page = bytearray(4096)
    at = INIT_UTS_NS - UTS_PAGE + UTS_NAME_OFFSET
    uts_page[at : at + 390] = utsname_bytes(uts or UTS)
    tk_page = bytearray(4096)
    timekeeper = TK_CORE - TK_PAGE + tk_at
    offs_boot = SUSPENDED_NS
    offs_real = BOOT_SECONDS * 1_000_000_000 + offs_boot
    struct.pack_into("<q", tk_page, timekeeper + OFFS_REAL, offs_real)
    struct.pack_into("<q", tk_page, timekeeper + OFFS_BOOT, offs_boot)
    tables.pages[UTS_PADDR] = uts_page
    tables.pages[TK_PADDR] = tk_page
    return tables


def blobs(btf: bytes | None, kallsyms: str = KALLSYMS) -> dict[str, bytes]:
    out = {"vmcoreinfo": VMCOREINFO.encode(), "kallsyms": kallsyms.encode(), "meminfo": MEMINFO}
    if btf is not None:
        out["btf"] = btf
    return out


def make_kernel(
    tk_layout: str = "tk_data", with_btf: bool = True, fates=None, uts=None, kallsyms=KALLSYMS
) -> Kernel:
    btf, tk_at = make_btf(tk_layout)
    pages = make_pages(tk_at, uts)
    memory = pages.memory(
        fates=fates,
        blobs=blobs(btf if with_btf else None, kallsyms),
        metadata={"start_time": START_TIME},
    )
    return Kernel(memory)


# PML4, PDPT, PD and PT (both pages share them) plus the two data pages.
RANGE_BYTES = 6 * 4096

EXPECTED = {
    **UTS,
    "osrelease": "6.1.0-56-amd64",
    "build_id": BUILD_ID,
    "kerneloffset": KERNELOFFSET,
    "phys_base": PHYS_BASE,
    "paging_mode": "4-level",
    "page_size": 4096,
    "range_bytes": RANGE_BYTES,
    "mem_total": 2030000 * 1024,
    "boot_time": "2024-03-05T06:07:08Z",
    "capture_time": START_TIME,
    "notes": None,
}


@pytest.fixture
def manager() -> PluginManager:
    return PluginManager(autoload=False)


def test_phys_base_is_negative_as_under_kaslr() -> None:
    assert PHYS_BASE == -0x1EF0A000


def test_sysinfo_reads_every_field(manager: PluginManager) -> None:
    result = analyze_kernel(make_kernel(), "sysinfo", manager=manager)
    assert result.error is None
    assert result.records == [EXPECTED]
    assert list(result.records[0]) == [f.name for f in sysinfo.FIELDS]


@pytest.mark.parametrize("tk_layout", ["tk_data", "seqcount_raw_spinlock", "seqcount"])
def test_boot_time_finds_the_timekeeper_in_every_tk_core_layout(tk_layout: str) -> None:
    assert sysinfo.sysinfo(make_kernel(tk_layout))["boot_time"] == "2024-03-05T06:07:08Z"


def test_without_btf_uts_comes_from_vmcoreinfo_and_the_abi_layout() -> None:
    record = sysinfo.sysinfo(make_kernel(with_btf=False))
    assert {m: record[m] for m in UTS} == UTS
    assert record["boot_time"] is None
    assert record["notes"] == (
        "boot_time: the image carries no usable BTF: no blob 'btf', and none recovered from"
        " memory: the kernel symbols (kallsyms text + vmcoreinfo) have no __start_BTF and"
        " __stop_BTF"
    )


TOTALRAM = 0xFFFFFFFF9F614010  # _totalram_pages, on tk_core's page before it


def kernel_without_meminfo(totalram_pages: int | None) -> Kernel:
    """What an image from another tool gives: no meminfo blob; _totalram_pages in memory."""
    btf, tk_at = make_btf()
    pages = make_pages(tk_at)
    kallsyms = KALLSYMS
    if totalram_pages is not None:
        struct.pack_into("<q", pages.pages[TK_PADDR], TOTALRAM - TK_PAGE, totalram_pages)
        kallsyms += f"{TOTALRAM:x} D _totalram_pages\n"
    out = blobs(btf, kallsyms)
    del out["meminfo"]
    return Kernel(pages.memory(blobs=out, metadata={"format": "lime"}))


def test_mem_total_without_meminfo_is_totalram_pages_from_memory() -> None:
    # MEMINFO's MemTotal of 2030000 kB is 507500 pages of 4 KiB.
    record = sysinfo.sysinfo(kernel_without_meminfo(507500))
    assert record["mem_total"] == 2030000 * 1024
    # Every other field is filled; the one that stays None says why.
    assert [k for k, v in record.items() if v is None] == ["capture_time"]
    assert record["notes"] == "capture_time: the lime format records no capture start time"
    record = sysinfo.sysinfo(kernel_without_meminfo(None))
    assert record["mem_total"] is None
    assert record["notes"] == (
        "mem_total: neither _totalram_pages nor totalram_pages is in the symbol table;"
        " capture_time: the lime format records no capture start time"
    )
    record = sysinfo.sysinfo(kernel_without_meminfo(-3))
    assert record["mem_total"] is None
    assert record["notes"] == (
        "mem_total: the kernel metadata looks wrong for this image: _totalram_pages is -3,"
        " outside 1..1099511627776 (are the image's BTF and symbols those of the captured"
        " kernel?); capture_time: the lime format records no capture start time"
    )


def test_a_page_not_captured_blanks_only_what_lives_there() -> None:
    record = sysinfo.sysinfo(make_kernel(fates={UTS_PADDR: PageFate(Fate.EXCLUDED)}))
    assert {m: record[m] for m in UTS} == dict.fromkeys(UTS)
    assert record["notes"] == "init_uts_ns: physical page 0x400000 was not captured: excluded"
    assert {k: v for k, v in record.items() if k not in UTS and k != "notes"} == {
        k: v for k, v in EXPECTED.items() if k not in UTS and k != "notes"
    }


def test_hostile_strings_stay_inside_their_member() -> None:
    uts = {**UTS, "nodename": b"A" * 65, "machine": b"x86\xff_64"}
    record = sysinfo.sysinfo(make_kernel(uts=uts))
    assert record["nodename"] == "A" * 65
    assert record["release"] == "6.1.0-56-amd64"
    assert record["machine"] == "x86\\xff_64"


def test_no_tk_core_symbol_leaves_boot_time_unknown() -> None:
    record = sysinfo.sysinfo(make_kernel(kallsyms="ffffffff81000000 T _stext\n"))
    assert record["boot_time"] is None
    assert record["notes"] == "boot_time: symbol tk_core is not in the symbol table"
    assert record["release"] == "6.1.0-56-amd64"  # SYMBOL(init_uts_ns) comes from VMCOREINFO


def test_mem_total() -> None:
    assert sysinfo.mem_total(b"MemFree: 1 kB\nMemTotal:   16 kB\n") == 16384
    assert sysinfo.mem_total(b"MemTotal: lots\n") is None
    assert sysinfo.mem_total(None) is None


HOST_BTF = Path("/sys/kernel/btf/vmlinux")


@pytest.mark.skipif(not HOST_BTF.is_file(), reason="this kernel exposes no BTF")
def test_the_members_asked_for_exist_in_a_real_kernel() -> None:
    from collector.kernel.btf import BTF

    btf = BTF.parse(HOST_BTF.read_bytes())
    # include/uapi/linux/utsname.h: six char[65].
    assert btf.sizeof("new_utsname") == 390
    assert [btf.offsetof("new_utsname", m) for m in sysinfo.UTS_MEMBERS] == [
        0,
        65,
        130,
        195,
        260,
        325,
    ]
    assert btf.has_member("uts_namespace", "name")
    assert btf.has_member("timekeeper", "offs_real") and btf.has_member("timekeeper", "offs_boot")
    # Without lockdep, seq is a 4-byte seqcount: the timekeeper starts at 8 in every layout.
    assert tk_core_timekeeper_offset(btf) == 8


# -- end to end: a native image file through `collect analyze` ----------------------------


def write_image(path: Path) -> None:
    btf, tk_at = make_btf()
    pages = make_pages(tk_at).pages
    with path.open("wb") as out:
        writer = ImageWriter(
            out,
            page_size=4096,
            chunk_size=1 << 16,
            metadata={"start_time": START_TIME},
            threads=1,
        )
        for name, data in blobs(btf).items():
            writer.add_blob(name, data)
        for paddr in sorted(pages):
            writer.add_chunk(paddr, bytes(pages[paddr]), [], paddr, paddr + 4096)
        writer.finish({})


def test_run_analysis_on_an_image_file(tmp_path: Path, manager: PluginManager) -> None:
    image = tmp_path / "host.lime.zst"
    write_image(image)
    result = run_analysis(image, "sysinfo", manager=manager)
    assert result.records == [EXPECTED]
    assert (result.image.path, result.image.release) == (str(image), "6.1.0-56-amd64")
    assert result.image.build_id == BUILD_ID


def test_collect_analyze_sysinfo_json(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    image = tmp_path / "host.lime.zst"
    write_image(image)
    parser = argparse.ArgumentParser(prog="collect")
    cli_analysis.register(parser.add_subparsers())
    args = parser.parse_args(["analyze", str(image), "sysinfo", "--format", "json"])
    assert args.handler(args) == 0
    from collector import __version__

    assert json.loads(capsys.readouterr().out) == [
        {**EXPECTED, "plugin": "sysinfo", "plugin_version": __version__}
    ]
