"""`collect --skip` and `collect plan --mem-usage` on fake hosts whose kcore carries a
synthetic struct page array (collector.testing.pages) with known free and cache pages.

What is free or cache comes from how the memory map was built here, never from the
classifier: the test marks the pages, then checks what the capture read (the fake's read
log) and what the image records.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from collector.cli import main
from collector.image.reader import NativeImage
from collector.memory import Fate
from collector.testing.pages import MemoryMap
from tests.acquire.fakehost import FakeHost

PAGE = 4096
# RAM from PFN 1 to 0x9f and from 1 MiB to 16 MiB: 3,998 whole pages, one memory map.
IOMEM = """\
00000000-00000fff : Reserved
00001000-0009fbff : System RAM
000a0000-000fffff : Reserved
00100000-00ffffff : System RAM
  00200000-002fffff : Kernel code
  00300000-0037ffff : Kernel rodata
  00380000-003fffff : Kernel data
"""
RAM_PAGES = (0x9F - 1) + (0x1000 - 0x100)
FREE = [(0x400, 4), (0x800, 9), (0xC03, 0)]  # (head PFN, order) of free blocks
CACHE = range(0x500, 0x510)  # clean page cache no process maps
MAPPED_CACHE = 0x520  # a mapped file page: kept
SHMEM = 0x530  # an unmapped clean file page that is swap-backed (shmem): kept
ADDRESS_SPACE = 0xFFFF888000123400
ERAS = ("6.1", "6.6", "6.10", "6.12")
ROOT = Path(__file__).resolve().parents[2]


def free_pfns() -> set[int]:
    return {pfn for head, order in FREE for pfn in range(head, head + (1 << order))}


def memory_map(era: str) -> MemoryMap:
    mm = MemoryMap(era, start=0, count=0x1000, ram=False)
    for pfn in range(0x1000):
        mm.in_use(pfn)
    for head, order in FREE:
        mm.buddy(head, order)
    for pfn in CACHE:
        mm.in_use(pfn, mapping=ADDRESS_SPACE)
    mm.in_use(MAPPED_CACHE, mapping=ADDRESS_SPACE)
    mm.set(MAPPED_CACHE, page_type=0)  # _mapcount 0: mapped once
    mm.in_use(SHMEM, mapping=ADDRESS_SPACE, flags=mm.bit("PG_swapbacked"))
    return mm


@pytest.fixture(params=ERAS)
def fake(request, tmp_path):
    with FakeHost(tmp_path / "host", iomem=IOMEM, memory_map=memory_map(request.param)) as host:
        yield host


def capture(fake: FakeHost, out, *extra: str) -> int:
    return main(["--profile", "x86_64", "--sysroot", str(fake.root), "-o", str(out), *extra])


def stream_of(path) -> bytes:
    return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout


def ram_reads(fake: FakeHost) -> list[tuple[int, int]]:
    return [span for r in fake.reads for span in r.spans]


def test_mem_usage_counts_what_each_skip_class_leaves_out(fake, capsys):
    assert main(["plan", "--profile", "x86_64", "--sysroot", str(fake.root), "--mem-usage"]) == 0
    assert "free" in capsys.readouterr().out
    fake.clear_reads()
    args = ["plan", "--profile", "x86_64", "--sysroot", str(fake.root), "--mem-usage", "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    groups = {k: v["pages"] for k, v in doc["groups"].items()}
    assert groups["free"] == len(free_pfns()) == 16 + 512 + 1
    assert groups["cache clean, unmapped"] == len(CACHE)
    assert groups["cache clean, other"] == 2  # the mapped page and the shmem page
    assert doc["groups"]["free"]["skip"] == "free"
    assert doc["groups"]["free"]["bytes"] == 529 * PAGE
    assert doc["total_pages"] == RAM_PAGES
    assert sum(groups.values()) == RAM_PAGES
    # Only struct pages were read: no RAM span (the probes of planning aside, one page each).
    assert all(b - a <= PAGE for a, b in ram_reads(fake))
    read = [r.struct_pages for r in fake.reads if r.struct_pages]
    assert min(a for a, _ in read) <= 1 and max(b for _, b in read) >= 0x1000


def test_skip_free_reads_no_free_page_and_the_rest_is_a_full_capture(fake, tmp_path, capsys):
    full, skip = tmp_path / "full.lime.zst", tmp_path / "skip.lime.zst"
    assert capture(fake, full, "--readers", "1") == 0
    capsys.readouterr()
    fake.clear_reads()
    assert capture(fake, skip, "--skip", "free", "--readers", "1", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    free = free_pfns()
    for a, b in ram_reads(fake):
        touched = set(range(a // PAGE, -(-b // PAGE)))
        assert not touched & free, f"read {a:#x}-{b:#x} touches a free page"
    assert summary["pages"]["skipped-free"] == len(free)
    assert summary["skip_seconds"] > 0 and summary["skip_struct_page_bytes"] > 0
    # Each chunk's struct pages were read before its RAM: from the first struct page read on
    # (planning's one-page probes and the metadata come before it), every RAM read follows
    # a read of the struct page of its first page; the sub-page tail at 0x9f000 (read from
    # /dev/mem) is no whole page, never skipped, and needs none.
    seen: list[tuple[int, int]] = []
    start = next(i for i, r in enumerate(fake.reads) if r.struct_pages)
    assert all(b - a <= PAGE for r in fake.reads[:start] for a, b in r.spans)
    for r in fake.reads[start:]:
        if r.struct_pages:
            seen.append(r.struct_pages)
        for a, _b in r.spans:
            if a != 0x9F000:
                assert any(lo <= a // PAGE < hi for lo, hi in seen), f"{a:#x} read unclassified"
    with NativeImage(skip) as img, NativeImage(full) as whole:
        assert img.version == 3 and img.metadata["skip"]["in_use"] is True
        for pfn in free:
            assert img.fate(pfn * PAGE).fate == Fate.SKIPPED_FREE
        for pfn in (0x3FF, 0x410, 0x7FF, 0xA00, 0xC02, 0xC04, *CACHE):
            assert img.fate(pfn * PAGE).fate == Fate.READ
            assert img.read(pfn * PAGE, PAGE) == whole.read(pfn * PAGE, PAGE)
    # zstd -dc: the full capture's stream with the free pages zeroed, nothing else changed.
    expected = bytearray(stream_of(full))
    lime_offset = 32 + (0x9FC00 - 0x1000) + 32 - 0x100000  # second range's header
    for pfn in free:
        at = pfn * PAGE + lime_offset
        expected[at : at + PAGE] = bytes(PAGE)
    assert stream_of(skip) == bytes(expected)
    assert main(["verify", str(skip)]) == 0
    capsys.readouterr()
    assert main(["info", str(skip)]) == 0
    info = capsys.readouterr().out
    assert "skipped-free 529" in info
    seconds = summary["skip_seconds"]
    assert (
        f"skip:     free: struct pages read and classified before each chunk, {seconds} s" in info
    )


def test_skip_cache_leaves_out_unmapped_clean_page_cache_only(fake, tmp_path, capsys):
    out = tmp_path / "cache.lime.zst"
    assert capture(fake, out, "--skip", "cache,free", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pages"]["skipped-cache"] == len(CACHE)
    assert summary["pages"]["skipped-free"] == len(free_pfns())
    skipped = free_pfns() | set(CACHE)
    for a, b in ram_reads(fake):
        assert not set(range(a // PAGE, -(-b // PAGE))) & skipped
    with NativeImage(out) as img:
        assert img.fate(CACHE[0] * PAGE).fate == Fate.SKIPPED_CACHE
        assert img.fate(MAPPED_CACHE * PAGE).fate == Fate.READ
        assert img.fate(SHMEM * PAGE).fate == Fate.READ
        assert img.read(MAPPED_CACHE * PAGE, PAGE) == fake.ram_bytes(
            MAPPED_CACHE * PAGE, (MAPPED_CACHE + 1) * PAGE
        )


@pytest.fixture
def no_struct_pages(tmp_path):
    # The plain fake's BTF describes no struct page.
    with FakeHost(tmp_path / "host", iomem=IOMEM) as host:
        yield host


def test_an_unreadable_struct_page_array_means_every_page_is_read(
    no_struct_pages, tmp_path, capsys
):
    out = tmp_path / "all.lime.zst"
    assert capture(no_struct_pages, out, "--skip", "free") == 0
    text = capsys.readouterr().out
    notes = [line for line in text.splitlines() if "--skip free not applied" in line]
    assert len(notes) == 1 and "struct page" in notes[0]
    with NativeImage(out) as img:
        assert img.version == 2 and img.metadata["skip"]["in_use"] is False
        # Every whole page read; the sub-page tail is /dev/mem's fabricated zeros.
        assert img.end["pages"]["read"] == RAM_PAGES
        assert img.end["pages"]["kernel-zero"] == 1
        assert "skipped-free" not in img.end["pages"]


def test_strict_fails_in_one_line_and_writes_nothing(no_struct_pages, tmp_path, capsys):
    out = tmp_path / "strict.lime.zst"
    assert capture(no_struct_pages, out, "--skip", "free", "--strict") == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "--strict" in lines[0] and "Traceback" not in err
    assert not out.exists()


def test_bad_skip_arguments_are_usage_errors(no_struct_pages, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        capture(no_struct_pages, tmp_path / "x", "--skip", "free,bogus")
    assert e.value.code == 2 and "unknown class bogus" in capsys.readouterr().err
    assert capture(no_struct_pages, tmp_path / "y", "--strict") == 2
    assert "--strict applies to --skip free or cache only" in capsys.readouterr().err


@pytest.mark.parametrize("extra", [[], ["--skip", "zero"]], ids=["plain", "skip-zero"])
def test_a_capture_without_struct_pages_does_not_import_numpy(no_struct_pages, tmp_path, extra):
    if no_struct_pages.mode != "fuse":
        pytest.skip("the emulated device files answer only inside this process")
    code = (
        "import sys; from collector.cli import main; "
        f"rc = main(['--profile', 'x86_64', '--sysroot', {str(no_struct_pages.root)!r}, "
        f"*{extra!r}, '-o', {str(tmp_path / 'image.lime.zst')!r}]); "
        "print(rc, 'numpy' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert out.stdout.split()[-2:] == ["0", "False"]


def test_only_the_symbols_the_live_walk_needs_are_parsed_from_kallsyms():
    from collector.acquire.live import kallsyms_subset

    text = (
        b"ffffffff81000000 T _text\n"
        b"ffffffff82000010 D node_data\n"
        b"ffffffff82000020 D node_data_extra\n"  # a longer name: not node_data
        b"ffffffffc0000000 t nr_cpu_ids\t[some_module]\n"  # a module's: not the kernel's
        b"ffffffff82000030 d nr_cpu_ids\n"
        b"ffffffff82000040 D __per_cpu_offset"  # the last line, no newline
    )
    table = kallsyms_subset(text, ("_text", "node_data", "nr_cpu_ids", "__per_cpu_offset", "x"))
    assert sorted((s.name, s.address) for s in table) == [
        ("__per_cpu_offset", 0xFFFFFFFF82000040),
        ("_text", 0xFFFFFFFF81000000),
        ("node_data", 0xFFFFFFFF82000010),
        ("nr_cpu_ids", 0xFFFFFFFF82000030),
    ]
