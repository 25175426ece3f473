"""`collect --skip zero` on fake hosts whose RAM has known zero pages: whole zero chunks,
isolated zero pages inside chunks of data, a zero page beside an unreadable one.

Which pages are zero comes from how the fake was built (its generator makes a page zero by a
hash of its PFN; the test zeroes a whole chunk and knows where the fake wrote its VMCOREINFO
note), never from the code under test.
"""

from __future__ import annotations

import errno
import json
from io import BytesIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collector.acquire.capture import with_zero_pages, zero_runs
from collector.cli import main
from collector.errors import ImageError
from collector.image import format as fmt
from collector.image.elfcore import ElfCore
from collector.image.reader import NativeImage
from collector.image.writer import ImageWriter
from collector.memory import Fate, FateRun
from tests.acquire.fakehost import FakeHost
from tests.acquire.test_skip import (
    CACHE,
    IOMEM,
    capture,
    free_pfns,
    memory_map,
    ram_reads,
    stream_of,
)
from tests.image.test_integrity import V1

PAGE = 4096
CHUNK = 4 << 20
ZERO_CHUNK = range(0x800, 0xC00)  # PFNs of the 4 MiB chunk at 8 MiB, zeroed by the test
# Whole pages of IOMEM's RAM; the sub-page tail 0x9f000-0x9fbff is one more (partial) page.
WHOLE_PAGES = [*range(0x1, 0x9F), *range(0x100, 0x1000)]
TAIL = 0x9F


def note_pfns(fake: FakeHost) -> set[int]:
    """The pages the fake wrote its VMCOREINFO note into (zero or not by the generator)."""
    size = len(fake._vmcoreinfo_note()) + 12
    first = fake.vmcoreinfo_paddr // PAGE
    return set(range(first, -(-(fake.vmcoreinfo_paddr + size) // PAGE)))


def lone_pfn(fake: FakeHost) -> int:
    """A page of data between two pages of data (the generator makes zero pages in pairs)."""
    return next(
        p
        for p in range(0x300, 0x400)
        if not any(fake.is_zero_page(q * PAGE) for q in (p - 1, p, p + 1))
    )


def zero_pfns(fake: FakeHost, pfns=WHOLE_PAGES) -> set[int]:
    """The pages of ``pfns`` the fake's construction and :func:`add_zeros` left all zeros."""
    made = {p for p in pfns if fake.is_zero_page(p * PAGE)} | set(ZERO_CHUNK) | {lone_pfn(fake)}
    return made - note_pfns(fake)


def add_zeros(fake: FakeHost) -> None:
    """A whole zero chunk, and one zero page alone among pages of data."""
    fake.write(ZERO_CHUNK[0] * PAGE, bytes(len(ZERO_CHUNK) * PAGE))
    fake.write(lone_pfn(fake) * PAGE, bytes(PAGE))


@pytest.fixture
def fake(tmp_path):
    """kcore for RAM, a strict /dev/mem for the sub-page tail (kernel zeros there)."""
    with FakeHost(tmp_path / "host", iomem=IOMEM) as host:
        add_zeros(host)
        yield host


def fates_of(img: NativeImage, pfns) -> dict[int, Fate]:
    return {p: img.fate(p * PAGE).fate for p in pfns}


def test_the_fake_has_every_kind_of_zero_page(fake):
    zero = zero_pfns(fake)
    # Isolated zero pages in chunks of data, and a whole zero chunk.
    mixed = {p for p in zero if p not in ZERO_CHUNK}
    assert len(mixed) > 500 and set(ZERO_CHUNK) <= zero
    lone = lone_pfn(fake)
    assert lone in zero and lone - 1 not in zero and lone + 1 not in zero
    for p in WHOLE_PAGES:  # the construction and the fake's own bytes agree
        assert (fake.ram_bytes(p * PAGE, (p + 1) * PAGE) == bytes(PAGE)) == (p in zero)


@pytest.mark.parametrize("readers", ["1", "4"])
def test_skip_zero_marks_exactly_the_zero_pages(fake, tmp_path, capsys, readers):
    full, zero_img = tmp_path / "full.lime.zst", tmp_path / "zero.lime.zst"
    assert capture(fake, full) == 0
    capsys.readouterr()
    assert capture(fake, zero_img, "--skip", "zero", "--readers", readers, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    zero = zero_pfns(fake)
    assert summary["pages"]["read-zero"] == len(zero)
    assert summary["pages"]["read"] == len(WHOLE_PAGES) - len(zero)
    assert summary["pages"]["kernel-zero"] == 1  # the tail keeps its fate
    assert "skip_note" not in summary and "skip_seconds" not in summary
    with NativeImage(zero_img) as img:
        assert img.version == 4
        assert img.metadata["skip"] == {"classes": ["zero"], "in_use": False, "note": None}
        expected = {p: Fate.READ_ZERO if p in zero else Fate.READ for p in WHOLE_PAGES}
        assert fates_of(img, WHOLE_PAGES) == expected
        assert img.fate(TAIL * PAGE).fate == Fate.KERNEL_ZERO
        # Served as data: no PageNotCaptured, across runs of both fates at once.
        for p in [*sorted(zero)[:50], ZERO_CHUNK[0], lone_pfn(fake)]:
            assert img.read(p * PAGE, PAGE) == bytes(PAGE)
        assert img.read(0x100000, 0x1000000 - 0x100000) == fake.ram_bytes(0x100000, 0x1000000)
        assert img.read(0x1000, 0x9F000 - 0x1000) == fake.ram_bytes(0x1000, 0x9F000)
        assert img.readable_ranges() == [(0x1000, 0x9F000), (0x100000, 0x1000000)]
    # zstd -dc: the same LiME bytes as the full capture.
    assert stream_of(zero_img) == stream_of(full)
    assert main(["verify", str(zero_img)]) == 0
    capsys.readouterr()
    assert main(["info", str(zero_img)]) == 0
    text = capsys.readouterr().out
    assert f"read-zero {len(zero)}" in text.split("fates:")[1].splitlines()[0]
    assert f"skip:     zero: {len(zero)} pages read and found all zeros" in text
    assert "not applied" not in text
    assert main(["info", "--json", str(zero_img)]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["pages_read_zero_in_image"] == len(zero)
    assert doc["pages_not_read_in_image"] == {"kernel-zero": 1}


def test_exports_hold_read_zero_pages_as_data(fake, tmp_path, capsys):
    src = tmp_path / "zero.lime.zst"
    assert capture(fake, src, "--skip", "zero") == 0
    lime, elf = tmp_path / "out.lime", tmp_path / "out.elf"
    capsys.readouterr()
    assert main(["export", str(src), "--to", "lime", "-o", str(lime), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pages_not_captured"] == {"kernel-zero": 1}
    assert lime.read_bytes() == stream_of(src)
    assert main(["export", str(src), "--to", "elf", "-o", str(elf)]) == 0
    zero = zero_pfns(fake)
    with ElfCore(str(elf)) as core:
        # The page-fates note lists what was not read; read-zero pages come back as data.
        assert [(r.start, r.count, r.fate) for r in core.fate_runs()] == [
            (TAIL * PAGE, 1, Fate.KERNEL_ZERO)
        ]
        for p in (min(zero), max(zero), ZERO_CHUNK[5]):
            assert core.read(p * PAGE, PAGE) == bytes(PAGE)
            assert core.fate(p * PAGE).fate == Fate.READ


def test_a_zero_page_beside_an_unreadable_one(tmp_path, capsys):
    # /dev/mem alone, not strict: every page is read from it, the sub-page tail too.
    with FakeHost(tmp_path / "host", iomem=IOMEM, kcore=False, strict_devmem=False) as fake:
        add_zeros(fake)
        zero = zero_pfns(fake, [*WHOLE_PAGES, TAIL])
        # A zero page that fails to read, with a zero page after it and data before it;
        # and a page of data that fails, with a zero page before it.
        bad_zero = next(p for p in sorted(zero) if p + 1 in zero and p - 1 not in zero)
        bad_data = next(p for p in WHOLE_PAGES if p not in zero and p - 1 in zero and p > 0x200)
        fake.bad_pages = {bad_zero * PAGE: errno.EIO, bad_data * PAGE: errno.EFAULT}
        out = tmp_path / "zero.lime.zst"
        assert capture(fake, out, "--skip", "zero", "--json") == 0
        summary = json.loads(capsys.readouterr().out)
        read_zero = zero - {bad_zero}
        assert summary["pages"]["read-zero"] == len(read_zero)
        assert summary["pages"]["unreadable"] == 2
        assert summary["pages"]["read"] == len(WHOLE_PAGES) + 1 - len(read_zero) - 2
        assert summary["unreadable_errnos"] == {str(errno.EIO): 1, str(errno.EFAULT): 1}
        with NativeImage(out) as img:
            pfns = [*WHOLE_PAGES, TAIL]
            expected = {p: Fate.READ_ZERO if p in read_zero else Fate.READ for p in pfns}
            expected[bad_zero] = expected[bad_data] = Fate.UNREADABLE
            assert fates_of(img, pfns) == expected
            assert img.fate(bad_zero * PAGE).errno == errno.EIO
            assert img.read((bad_zero + 1) * PAGE, PAGE) == bytes(PAGE)
            assert img.read((bad_data - 1) * PAGE, PAGE) == bytes(PAGE)
            with pytest.raises(Exception) as e:
                img.read(bad_zero * PAGE, 2 * PAGE)
            assert getattr(e.value, "fate", None) == Fate.UNREADABLE
        assert main(["verify", str(out)]) == 0


@pytest.fixture
def vmemmap_fake(tmp_path):
    with FakeHost(tmp_path / "host", iomem=IOMEM, memory_map=memory_map("6.12")) as host:
        add_zeros(host)
        yield host


@pytest.mark.parametrize("classes", ["free,zero", "cache,zero"])
def test_zero_with_a_struct_page_class(vmemmap_fake, tmp_path, capsys, classes):
    fake = vmemmap_fake
    out = tmp_path / "both.lime.zst"
    assert capture(fake, out, "--skip", classes, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    skipped, fate = (
        (free_pfns(), Fate.SKIPPED_FREE)
        if classes == "free,zero"
        else (set(CACHE), Fate.SKIPPED_CACHE)
    )
    for a, b in ram_reads(fake):
        assert not set(range(a // PAGE, -(-b // PAGE))) & skipped, f"read {a:#x}-{b:#x}"
    zero = zero_pfns(fake) - skipped
    assert summary["pages"][fate.label] == len(skipped)
    assert summary["pages"]["read-zero"] == len(zero)
    assert summary["skip_seconds"] > 0
    with NativeImage(out) as img:
        assert img.version == 4 and img.metadata["skip"]["in_use"] is True
        expected = {
            p: fate if p in skipped else Fate.READ_ZERO if p in zero else Fate.READ
            for p in WHOLE_PAGES
        }
        assert fates_of(img, WHOLE_PAGES) == expected
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"skip:     {classes.split(',')[0]}: struct pages read and classified" in text
    assert f"skip:     zero: {len(zero)} pages read" in text


@pytest.fixture
def no_struct_pages(tmp_path):
    # The plain fake's BTF describes no struct page.
    with FakeHost(tmp_path / "host", iomem=IOMEM) as host:
        add_zeros(host)
        yield host


def test_zero_needs_no_struct_pages_and_strict_is_for_the_others(no_struct_pages, tmp_path, capsys):
    fake = no_struct_pages
    assert capture(fake, tmp_path / "s.lime.zst", "--skip", "zero", "--strict") == 2
    assert "--strict applies to --skip free or cache only" in capsys.readouterr().err
    out = tmp_path / "fz.lime.zst"
    assert capture(fake, out, "--skip", "free,zero") == 0
    lines = capsys.readouterr().out.splitlines()
    notes = [line for line in lines if "not applied" in line]
    assert len(notes) == 1 and notes[0].startswith("--skip free not applied, every page is read:")
    with NativeImage(out) as img:
        assert img.version == 4 and img.metadata["skip"]["in_use"] is False
        assert img.end["pages"]["read-zero"] == len(zero_pfns(fake))
        assert "skipped-free" not in img.end["pages"]
    assert capture(fake, tmp_path / "x", "--skip", "free,zero", "--strict") == 1
    assert "--skip free --strict:" in capsys.readouterr().err


def test_mem_usage_says_zero_is_not_known_before_reading(vmemmap_fake, capsys):
    args = ["plan", "--profile", "x86_64", "--sysroot", str(vmemmap_fake.root), "--mem-usage"]
    assert main(args) == 0
    assert "zero pages: not known before reading the RAM" in capsys.readouterr().out


# -- the detection itself ---------------------------------------------------------------------


def test_zero_runs_over_blocks_pages_and_partial_pages():
    page = PAGE
    # A chunk starting 0x400 into a page: page 0 is partial (0xc00 bytes), then 40 whole
    # pages, then a partial last page of 0x100 bytes. Zero: the partial first page, pages
    # 3, 17-35 (a whole 64 KiB block 16-31 among them) and the partial last page.
    lead, whole, tail = 0xC00, 40, 0x100
    zero = {0, 3, *range(17, 36), 41}
    data = bytearray()
    for k in range(whole + 2):
        size = lead if k == 0 else tail if k == whole + 1 else page
        data += bytes(size) if k in zero else bytes([k + 1]) * size
    runs = zero_runs(bytes(data), 0x10400, page)
    assert runs == [(0, 1), (3, 4), (17, 36), (41, 42)]
    # One non-zero byte at the end of page 30 breaks the block and that page only.
    data[lead + 29 * page + page - 1] = 1
    assert zero_runs(bytes(data), 0x10400, page) == [(0, 1), (3, 4), (17, 30), (31, 36), (41, 42)]


def test_zero_pages_never_replace_another_fate():
    data = bytes(8 * PAGE)
    runs = [FateRun(2, 2, Fate.UNREADABLE, errno.EIO), FateRun(6, 1, Fate.KERNEL_ZERO)]
    assert with_zero_pages(data, 0, PAGE, runs) == [
        FateRun(0, 2, Fate.READ_ZERO),
        FateRun(2, 2, Fate.UNREADABLE, errno.EIO),
        FateRun(4, 2, Fate.READ_ZERO),
        FateRun(6, 1, Fate.KERNEL_ZERO),
        FateRun(7, 1, Fate.READ_ZERO),
    ]
    assert with_zero_pages(bytes([1]) * 8 * PAGE, 0, PAGE, runs) == runs


@settings(max_examples=200, deadline=None)
@given(
    lead=st.sampled_from([0, 0x400, 0xFFF]),
    kinds=st.lists(st.sampled_from(["zero", "data", "unreadable", "skipped"]), max_size=40),
    tail=st.sampled_from([0, 0x100]),
)
def test_zero_pages_are_the_read_pages_that_hold_only_zeros(lead, kinds, tail):
    # Against a page-by-page reference: which page of the chunk is read and all zeros.
    sizes = [PAGE - lead if i == 0 and lead else PAGE for i in range(len(kinds))]
    if kinds and tail:
        sizes[-1] = min(sizes[-1], tail)
    data = b"".join(
        bytes([7]) * n if k == "data" else bytes(n) for k, n in zip(kinds, sizes, strict=True)
    )
    fates = {"unreadable": Fate.UNREADABLE, "skipped": Fate.SKIPPED_FREE}
    runs = []
    for i, k in enumerate(kinds):
        if k in fates:
            if runs and runs[-1].fate == fates[k] and runs[-1].start + runs[-1].count == i:
                runs[-1] = FateRun(runs[-1].start, runs[-1].count + 1, fates[k])
            else:
                runs.append(FateRun(i, 1, fates[k]))
    want = {i for i, k in enumerate(kinds) if k == "zero"}
    got = with_zero_pages(data, 0x100000 + lead, PAGE, runs)
    zero = {r.start + j for r in got if r.fate == Fate.READ_ZERO for j in range(r.count)}
    assert zero == want
    assert [r for r in got if r.fate != Fate.READ_ZERO] == runs


# -- the format -------------------------------------------------------------------------------


def test_read_zero_needs_format_version_4():
    desc = fmt.Desc(0, 0x100000, 4 * PAGE, 0, 0, 0, [FateRun(1, 2, Fate.READ_ZERO)])
    for version in (2, 3):
        payload = desc.encode(version)[8:]
        with pytest.raises(ImageError, match="read-zero"):
            fmt.Desc.decode(payload, version)
    assert fmt.Desc.decode(desc.encode(4)[8:], 4).runs == [FateRun(1, 2, Fate.READ_ZERO)]
    # Nor does the writer make an image its own reader would refuse.
    writer = ImageWriter(BytesIO(), page_size=PAGE, chunk_size=CHUNK, metadata={}, threads=1)
    with pytest.raises(ValueError, match="version 4"):
        writer.add_chunk(0x100000, bytes(2 * PAGE), [FateRun(0, 1, Fate.READ_ZERO)])
    writer.close()


def test_a_version_1_image_still_opens_without_read_zero():
    with NativeImage(V1) as img:
        assert img.version == 1
        # Its all-zero chunk at 0x104000 was read: plain READ, as it always was.
        assert img.fate(0x104000).fate == Fate.READ
        assert img.read(0x104000, PAGE) == bytes(PAGE)
        assert {r.fate for r in img.fate_runs()} == {Fate.UNREADABLE}


def test_verify_finds_read_zero_pages_that_hold_data(tmp_path, capsys):
    # A writer that records read-zero over a page of data: the stream and every checksum are
    # consistent, the promise is not.
    path = tmp_path / "lie.lime.zst"
    data = bytes(PAGE) + b"\x01" * PAGE + bytes(2 * PAGE)
    meta = {"ranges": [[0x100000, 0x104000]]}
    with open(path, "wb") as out:
        w = ImageWriter(out, page_size=PAGE, chunk_size=CHUNK, metadata=meta, version=4, threads=1)
        w.add_chunk(0x100000, data, [FateRun(0, 3, Fate.READ_ZERO)], 0x100000, 0x104000)
        w.finish({"stopped_by": None})
        w.close()
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert "chunk 0 at 0x100000: pages recorded read-zero from page 0 hold other bytes" in out
