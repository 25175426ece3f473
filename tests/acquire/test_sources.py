"""The sources: real kcore headers, malformed ELF, and real errnos through the fake host."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest

from collector.acquire.iomem import Range
from collector.acquire.sources import (
    DevCrash,
    DevMem,
    Kcore,
    open_source,
    pread_exact,
)
from collector.errors import CollectorError
from collector.sysroot import Sysroot
from tests.acquire.fakehost import IOMEM_NESTED, PAGE, FakeHost

DATA = Path(__file__).parent.parent / "data" / "acquire"
KCORE_61 = (DATA / "kcore-head-debian-6.1.bin").read_bytes()
KCORE_612 = (DATA / "kcore-head-debian-6.12.bin").read_bytes()


def kcore_root(tmp_path: Path, data: bytes) -> Path:
    (tmp_path / "proc").mkdir(exist_ok=True)
    (tmp_path / "proc" / "kcore").write_bytes(data)
    return tmp_path


# -- /proc/kcore headers from real kernels ------------------------------------------------


def test_real_61_kcore_header(tmp_path):
    with Kcore(kcore_root(tmp_path, KCORE_61)) as k:
        # Values read off the 6.1 guest's program headers (tests/data/acquire/README.md).
        assert k.layout == "p_paddr"
        assert k.page_offset_base == 0xFFFF8DD880000000
        assert k.phdr_bytes == KCORE_61[: 64 + 8 * 56]
        ram = [(s.paddr, s.p_filesz) for s in k.segments if s.kind == "ram"]
        assert ram == [(0x1000, 0x9E000), (0x100000, 0x1FEE0000)]
        assert [s.kind for s in k.segments] == [
            "text",
            "virtual",
            "virtual",
            "ram",
            "virtual",
            "ram",
            "virtual",
        ]
        text = k.segments[0]
        assert (text.p_vaddr, text.p_paddr) == (0xFFFFFFFFA4A00000, 0x14A00000)
        assert k.coverage(0, 1 << 40) == [Range(0x1000, 0x9F000), Range(0x100000, 0x1FFE0000)]
        # The sub-page tail of 00001000-0009fbff is in no segment.
        assert k.coverage(0x9F000, 0x9FC00) == []
        assert k.file_offset(0x1000) == 0xDD880004000
        assert k.file_offset(0x100000) == 0xDD880103000
        assert [(n.name, n.type, len(n.desc)) for n in k.note_list] == [
            ("CORE", 1, 336),
            ("CORE", 3, 136),
            ("CORE", 4, 6208),
            ("VMCOREINFO", 0, 3279),
        ]
        assert len(k.notes) == 0x273C
        assert k.vmcoreinfo.startswith("OSRELEASE=6.1.0-56-amd64\nBUILD-ID=")
        assert "PAGESIZE=4096\n" in k.vmcoreinfo
        assert k.page_size == 4096


def test_real_612_kcore_header(tmp_path):
    with Kcore(kcore_root(tmp_path, KCORE_612)) as k:
        assert k.page_offset_base == 0xFFFF8B9480000000
        assert k.coverage(0, 1 << 40) == [Range(0x1000, 0x9F000), Range(0x100000, 0x1FFE0000)]
        assert k.vmcoreinfo.startswith("OSRELEASE=6.12.117+deb12-amd64\n")
        assert k.segments[0].p_paddr == 0x15A00000  # iomem's "Kernel code" of that boot


def test_reading_past_the_end_of_a_cut_kcore_is_eio(tmp_path):
    with Kcore(kcore_root(tmp_path, KCORE_61)) as k:
        with pytest.raises(OSError) as info:
            k.read(0x1000, 16)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            k.read(0x9F000, 16)
        assert info.value.errno == errno.ENXIO


def mutate(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)


PHDR = 64  # e_phoff of the real header
NOTE_AT = 0x200


@pytest.mark.parametrize(
    ("data", "what"),
    [
        (b"", "cannot read 64 bytes at 0x0"),
        (KCORE_61[:40], "cannot read 64 bytes"),
        (b"\x7fELG" + KCORE_61[4:], "no ELF magic"),
        (mutate(KCORE_61, 4, "B", 1), "EI_CLASS 1 is not ELFCLASS64"),
        (mutate(KCORE_61, 5, "B", 3), "EI_DATA 3"),
        (mutate(KCORE_61, 16, "<H", 2), "e_type 2 is not ET_CORE"),
        (mutate(KCORE_61, 54, "<H", 32), "e_phentsize 32"),
        (mutate(KCORE_61, 56, "<H", 0), "e_phnum 0"),
        (mutate(KCORE_61, 56, "<H", 0xFFFF), "e_phnum 65535"),
        (mutate(KCORE_61, 32, "<Q", 1 << 40), "out of bounds"),
        (mutate(KCORE_61, 32, "<Q", 8), "out of bounds"),
        (mutate(KCORE_61, 56, "<H", 200), "cannot read"),
        # PT_NOTE bigger than any real one.
        (mutate(KCORE_61, PHDR + 32, "<Q", 64 << 20), "PT_NOTE 0 is"),
        # PT_NOTE past the end of the file.
        (mutate(KCORE_61, PHDR + 8, "<Q", 0x100000), "cannot read"),
        # A note whose descsz runs past its PT_NOTE.
        (mutate(KCORE_61, NOTE_AT + 4, "<I", 0x10000), "runs past its PT_NOTE"),
        # A PT_LOAD whose file range overflows loff_t.
        (mutate(KCORE_61, PHDR + 56 + 8, "<Q", (1 << 63) - 16), "largest file offset"),
    ],
)
def test_malformed_kcore_is_one_clear_line(tmp_path, data, what):
    root = kcore_root(tmp_path, data)
    with pytest.raises(CollectorError) as info:
        open_source("kcore", root)
    message = str(info.value)
    assert message.startswith("/proc/kcore: malformed ELF core: ")
    assert what in message
    assert "\n" not in message


def test_malformed_kcore_closes_its_descriptor(tmp_path):
    root = kcore_root(tmp_path, b"\x7fELG" + KCORE_61[4:])
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(CollectorError):
            Kcore(root)
    assert len(os.listdir("/proc/self/fd")) == before


def test_big_endian_kcore_parses(tmp_path):
    # Built by hand: ELF64 MSB core with a PT_NOTE and one RAM PT_LOAD (s390x-like).
    note = struct.pack(">III", 11, 8, 0) + b"VMCOREINFO\0\0" + b"PAGESIZE"
    ehdr = b"\x7fELF" + bytes([2, 2, 1, 0]) + bytes(8)
    ehdr += struct.pack(">HHIQQQIHHHHHH", 4, 22, 1, 0, 64, 0, 0, 64, 56, 2, 0, 0, 0)
    notes_at = 64 + 2 * 56
    phdrs = struct.pack(">IIQQQQQQ", 4, 0, notes_at, 0, 0, len(note), 0, 0)
    phdrs += struct.pack(">IIQQQQQQ", 1, 7, 0x2000, 0x3D000001000, 0x1000, 0x3000, 0x3000, 4096)
    with Kcore(kcore_root(tmp_path, ehdr + phdrs + note)) as k:
        assert k.endian == ">"
        assert k.page_offset_base == 0x3D000000000
        assert k.coverage(0, 1 << 20) == [Range(0x1000, 0x4000)]
        assert k.vmcoreinfo == "PAGESIZE"


# -- through the fake host: both kcore layouts, /dev/mem and /dev/crash errnos ------------


@pytest.mark.parametrize("layout", ["p_paddr", "p_paddr=0"])
def test_kcore_maps_physical_addresses_in_both_layouts(tmp_path, layout):
    with FakeHost(tmp_path, kcore_layout=layout) as fake, Kcore(fake.sysroot) as k:
        assert k.layout == layout
        assert k.page_offset_base == fake.page_offset_base
        expected = [Range(a, b) for a, b in fake.kcore_ram_segments]
        assert k.coverage(0, 1 << 48) == expected
        # Whole pages only: the low range 0x1000-0x9fbff is served up to 0x9efff.
        assert expected[0] == Range(0x1000, 0x9F000)
        for a, b in fake.kcore_ram_segments:
            assert k.read(a, b - a) == fake.ram_bytes(a, b)
        if layout == "p_paddr":
            assert k.vmcoreinfo == fake.vmcoreinfo
        else:
            assert k.vmcoreinfo is None  # the note arrived in Linux 4.19
        assert k.segments[0].kind == ("text" if layout == "p_paddr" else "virtual")


def test_kcore_old_layout_on_nested_ram(tmp_path):
    with (
        FakeHost(tmp_path, iomem=IOMEM_NESTED, kcore_layout="p_paddr=0") as fake,
        Kcore(fake.sysroot) as k,
    ):
        assert k.page_offset_base == fake.page_offset_base
        assert k.coverage(0, 1 << 48) == [Range(a, b) for a, b in fake.kcore_ram_segments]
        top = fake.ram_ranges[-1]
        assert k.read(top[0], 3 * PAGE) == fake.ram_bytes(top[0], top[0] + 3 * PAGE)


def test_kcore_old_layout_without_iomem_maps_nothing(tmp_path):
    with FakeHost(tmp_path, kcore_layout="p_paddr=0") as fake:
        (fake.root / "proc" / "iomem").write_text("")
        with Kcore(fake.sysroot) as k:
            assert k.page_offset_base is None
            assert k.coverage(0, 1 << 48) == []


def test_kcore_read_spans_segments_only_where_they_are(tmp_path):
    with FakeHost(tmp_path) as fake, Kcore(fake.sysroot) as k:
        # A read that runs off a segment's end fails; one inside it returns the fake's bytes.
        with pytest.raises(OSError) as info:
            k.read(0x9E000, 2 * PAGE)
        assert info.value.errno == errno.ENXIO
        big = k.read(0x100000, 0x500000)  # one large read, served by FUSE in pieces
        assert big == fake.ram_bytes(0x100000, 0x600000)


def test_devmem_strict_errnos(tmp_path):
    with FakeHost(tmp_path, strict_devmem=True) as fake, DevMem(fake.sysroot) as mem:
        for paddr in (0x100000, 0x1000000 // 4, 0x100000000):
            with pytest.raises(OSError) as info:
                mem.read(paddr, PAGE)
            assert info.value.errno == errno.EPERM
        assert mem.read(0x1000, PAGE) == bytes(PAGE)  # low RAM: the kernel's zeros
        assert mem.read(0x9F000, 0xC00) == bytes(0xC00)
        # One read over an allowed page and a refused one fails as a whole (seen on 6.1).
        with pytest.raises(OSError) as info:
            mem.read(0xFF000, 2 * PAGE)
        assert info.value.errno == errno.EPERM
        assert mem.read(0xF0000, 4) == b"\x55\xaa\x55\xaa"  # System ROM is not RAM
        fake.allow(0xF0000, 0x100000)


def test_devmem_reads_the_fakes_bytes_when_not_strict(tmp_path):
    with (
        FakeHost(tmp_path, strict_devmem=False, check_reads=False) as fake,
        DevMem(fake.sysroot) as mem,
    ):
        for a, b in fake.ram_ranges:
            assert mem.read(a, b - a) == fake.ram_bytes(a, b)
        # Above the last RAM page frame, valid_phys_addr_range() says EFAULT.
        top = fake.ram_ranges[-1][1]
        with pytest.raises(OSError) as info:
            mem.read(top, PAGE)
        assert info.value.errno == errno.EFAULT
    assert fake.reads_outside() == [("mem", top, top + PAGE)]


def test_devmem_injected_bad_pages(tmp_path):
    bad = {0x200000: errno.EIO, 0x203000: errno.EFAULT}
    with FakeHost(tmp_path, strict_devmem=False, bad_pages=bad) as fake:
        with DevMem(fake.sysroot) as mem:
            with pytest.raises(OSError) as info:
                mem.read(0x200000, PAGE)
            assert info.value.errno == errno.EIO
            data, failed = mem.read_pages(0x1FF000, 6 * PAGE)
            assert failed == {0x200000: errno.EIO, 0x203000: errno.EFAULT}
            expected = bytearray(fake.ram_bytes(0x1FF000, 0x205000))
            expected[0x1000:0x2000] = bytes(PAGE)
            expected[0x4000:0x5000] = bytes(PAGE)
            assert data == bytes(expected)
        with Kcore(fake.sysroot) as k:
            # kcore returns zeros for a page the kernel cannot read, without an error.
            assert k.read(0x200000, PAGE) == bytes(PAGE)


def test_devcrash_reads_one_page_at_a_time(tmp_path):
    with (
        FakeHost(tmp_path, crash=True, strict_devmem=True) as fake,
        DevCrash(fake.sysroot) as crash,
    ):
        # crash_read() refuses reads that cross a page: the source splits them.
        assert crash.read(0x100800, 3 * PAGE) == fake.ram_bytes(0x100800, 0x103800)
        assert crash.read(0x9F000, 0xC00) == fake.ram_bytes(0x9F000, 0x9FC00)
        with pytest.raises(OSError) as info:
            crash.read(0x700000, PAGE)  # no struct page: pfn_valid() is false
        assert info.value.errno == errno.EFAULT
        fake.allow(0x700000, 0x701000)
        with pytest.raises(OSError) as info:
            os.pread(crash.fd, 2 * PAGE, 0x100000)
        assert info.value.errno == errno.EINVAL


def test_emulated_device_files_give_the_same_answers(tmp_path):
    with FakeHost(tmp_path, mode="emulated", bad_pages={0x300000: errno.EIO}) as fake:
        assert fake.mode == "emulated"
        with DevMem(fake.sysroot) as mem:
            with pytest.raises(OSError) as info:
                mem.read(0x100000, PAGE)
            assert info.value.errno == errno.EPERM
            assert mem.read(0x2000, PAGE) == bytes(PAGE)
        with Kcore(fake.sysroot) as k:
            assert k.read(0x100000, 0x10000) == fake.ram_bytes(0x100000, 0x110000)
    # Two /dev/mem reads; kcore's ELF header, program headers, notes, then the RAM read.
    assert [r.file for r in fake.reads] == ["mem", "mem"] + ["kcore"] * 4


def test_fuse_is_used_here(tmp_path):
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.skip("FUSE needs root and /dev/fuse")
    with FakeHost(tmp_path) as fake:
        assert fake.mode == "fuse"
        assert os.path.ismount(fake.base / "fuse")
    assert not os.path.ismount(fake.base / "fuse")


# -- pread and opening ------------------------------------------------------------------


def test_pread_exact_raises_eio_at_end_of_file(tmp_path):
    f = tmp_path / "short"
    f.write_bytes(b"x" * 100)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert pread_exact(fd, 10, 90) == b"x" * 10
        with pytest.raises(OSError) as info:
            pread_exact(fd, 20, 90)
        assert info.value.errno == errno.EIO
        with pytest.raises(OSError) as info:
            pread_exact(fd, 16, (1 << 63) - 8)
        assert info.value.errno == errno.EINVAL
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("name", "cls"),
    [("/dev/mem", DevMem), ("mem", DevMem), ("kcore", Kcore), ("/proc/kcore", Kcore)],
)
def test_open_source_names(tmp_path, name, cls):
    with FakeHost(tmp_path) as fake, open_source(name, fake.sysroot) as src:
        assert type(src) is cls


def test_open_source_explains_failures(tmp_path):
    with FakeHost(tmp_path, lockdown="integrity") as fake:
        with pytest.raises(CollectorError) as info:
            open_source("mem", fake.sysroot)
        assert str(info.value) == "/dev/mem: refused by lockdown (integrity)"
        open_source("kcore", fake.sysroot).close()  # kcore is LOCKDOWN_KCORE: confidentiality
        with pytest.raises(CollectorError) as info:
            open_source("crash", fake.sysroot)
        assert str(info.value) == (
            "/dev/crash: not present on this kernel (ENOENT; the crash driver is not loaded)"
        )
        with pytest.raises(CollectorError) as info:
            open_source("/dev/kmem", fake.sysroot)
        assert info.value.exit_code == 2 and "choose /dev/mem, /proc/kcore or /dev/crash" in str(
            info.value
        )


def test_open_without_cap_sys_rawio(tmp_path):
    with FakeHost(tmp_path, rawio=False) as fake:
        with pytest.raises(CollectorError) as info:
            open_source("kcore", fake.sysroot)
        assert str(info.value).startswith("/proc/kcore: refused (EPERM): ")
        assert "CAP_SYS_RAWIO" in str(info.value)


def test_open_not_present_names_the_config_option(tmp_path):
    (tmp_path / "proc" / "sys" / "kernel").mkdir(parents=True)
    (tmp_path / "proc" / "sys" / "kernel" / "osrelease").write_text("6.1.0-test\n")
    (tmp_path / "boot").mkdir()
    (tmp_path / "boot" / "config-6.1.0-test").write_text(
        "# CONFIG_DEVMEM is not set\nCONFIG_PROC_KCORE=y\n"
    )
    with pytest.raises(CollectorError) as info:
        open_source("mem", tmp_path)
    assert (
        str(info.value) == "/dev/mem: not present on this kernel (ENOENT; CONFIG_DEVMEM is not set)"
    )


def test_a_device_node_without_its_driver_is_enxio(tmp_path):
    # `mknod c 1 1` on a kernel without the /dev/mem driver gives a node whose open fails with ENXIO.
    (tmp_path / "dev").mkdir()
    try:
        os.mknod(tmp_path / "dev" / "mem", 0o600 | 0o020000, os.makedev(1, 1))
    except OSError as exc:
        pytest.skip(f"mknod: {exc.strerror}")
    try:
        src = open_source("mem", Sysroot(tmp_path))
    except CollectorError as exc:
        if "ENXIO" not in str(exc):
            pytest.skip(f"this kernel has /dev/mem: {exc}")
        assert str(exc) == "/dev/mem: no driver behind the device node (ENXIO)"
    else:
        src.close()
        pytest.skip("this kernel has a /dev/mem driver")
