"""kdump-compressed files (makedumpfile's layout) as physical memory."""

from __future__ import annotations

import io
import random

import pytest

from collector.errors import ImageCorrupted, ImageTruncated, UnsupportedImage
from collector.image.export import export_lime
from collector.image.info import image_info
from collector.image.kdump import KdumpImage, _bit_runs
from collector.image.open import open_image, sniff
from collector.memory import Fate, FateRun, PageFate, PageNotCaptured
from collector.testing.kdump import INCOMPLETE, write_kdump

PAGE = 4096
VMCOREINFO = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\nSYMBOL(init_uts_ns)=ffffffff82a12345\n"


def _pages(pfns, seed=1):
    rng = random.Random(seed)
    return {pfn: rng.randbytes(PAGE) if pfn % 3 else bytes(PAGE) for pfn in pfns}


# RAM: pfns 1-159 and 256-1023; the dump keeps 1-9, 300-399 and 1000-1022.
RAM = [(1, 160), (256, 1024)]
KEPT = [*range(1, 10), *range(300, 400), *range(1000, 1023)]


@pytest.mark.parametrize("compression", ["zlib", "zstd", "none"])
def test_pages_read_back_and_dropped_pages_are_excluded(tmp_path, compression):
    pages = _pages(KEPT)
    path = tmp_path / "dump"
    write_kdump(path, pages, RAM, compression=compression, vmcoreinfo=VMCOREINFO)
    with KdumpImage(path) as img:
        assert img.ranges() == [(0x1000, 0xA0000), (0x100000, 0x400000)]
        assert img.page_size == PAGE
        for pfn, data in pages.items():
            assert img.read(pfn * PAGE, PAGE) == data
            assert img.fate(pfn * PAGE) == PageFate(Fate.READ)
        # A read across two kept pages, starting mid-page.
        assert img.read(301 * PAGE + 100, PAGE) == pages[301][100:] + pages[302][:100]
        assert img.fate(10 * PAGE) == PageFate(Fate.EXCLUDED)
        assert img.fate(200 * PAGE) == PageFate(Fate.OUTSIDE)
        assert img.fate(0) == PageFate(Fate.OUTSIDE)
        assert img.fate(1023 * PAGE) == PageFate(Fate.EXCLUDED)
        with pytest.raises(PageNotCaptured) as e:
            img.read(9 * PAGE + 8, PAGE)  # runs from kept pfn 9 into excluded pfn 10
        assert (e.value.paddr, e.value.fate) == (10 * PAGE, Fate.EXCLUDED)
        with pytest.raises(PageNotCaptured) as e:
            img.read(200 * PAGE + 4, 8)
        assert (e.value.paddr, e.value.fate) == (200 * PAGE + 4, Fate.OUTSIDE)
        assert list(img.fate_runs()) == [
            FateRun(10 * PAGE, 150, Fate.EXCLUDED),
            FateRun(256 * PAGE, 44, Fate.EXCLUDED),
            FateRun(400 * PAGE, 600, Fate.EXCLUDED),
            FateRun(1023 * PAGE, 1, Fate.EXCLUDED),
        ]
        assert img.blob("vmcoreinfo") == VMCOREINFO
        assert img.blob("btf") is None
        assert img.metadata["format"] == "kdump-compressed"
        assert img.metadata["release"] == "6.1.0-test"
        assert img.metadata["dump_level"] == 31
        assert img.problems == []


def test_descriptors_are_found_across_rank_blocks(tmp_path):
    """A descriptor's index is the count of kept pages before it, over 4096-page blocks."""
    kept = [0, 1, 4095, 4096, 4097, 8191, 8192, 12345, 20000, 20001]
    pages = _pages(kept, seed=7)
    path = tmp_path / "dump"
    write_kdump(path, pages, [(0, 20002)], compression="zstd")
    with KdumpImage(path) as img:
        for pfn in kept:
            assert img.read(pfn * PAGE, PAGE) == pages[pfn], pfn
        assert img.fate(4094 * PAGE).fate == Fate.EXCLUDED


def test_descriptors_are_found_past_the_first_2_mib_of_bitmap(tmp_path):
    """The rank table is built 2 MiB of bitmap (2^24 page frames) at a time."""
    kept = [5, (1 << 24) - 1, 1 << 24, (1 << 24) + 300]
    pages = _pages(kept, seed=9)
    path = tmp_path / "dump"
    write_kdump(path, pages, [(0, 10), ((1 << 24) - 10, (1 << 24) + 400)], compression="zstd")
    with KdumpImage(path) as img:
        assert img.ranges() == [(0, 10 * PAGE), (((1 << 24) - 10) * PAGE, ((1 << 24) + 400) * PAGE)]
        for pfn in kept:
            assert img.read(pfn * PAGE, PAGE) == pages[pfn], pfn


def test_header_version_5_takes_the_32_bit_max_mapnr(tmp_path):
    pages = _pages(range(1, 5))
    path = tmp_path / "dump"
    write_kdump(path, pages, [(1, 8)], header_version=5)
    with KdumpImage(path) as img:
        assert img.max_mapnr == 8
        assert img.read(PAGE, 4 * PAGE) == b"".join(pages[p] for p in range(1, 5))


def test_open_image_sniffs_it_and_info_counts_what_is_not_read(tmp_path):
    path = tmp_path / "dump"
    write_kdump(path, _pages(KEPT), RAM)
    assert sniff(path.read_bytes()[:16]) == "kdump"
    with open_image(path) as img:
        assert isinstance(img, KdumpImage)
    info = image_info(str(path))
    assert info["format"] == "kdump-compressed"
    assert info["pages_not_read_in_image"] == {"excluded": 150 + 44 + 600 + 1}
    assert info["blobs"] == ["vmcoreinfo"]


def test_export_writes_excluded_pages_as_counted_zeros(tmp_path):
    pages = _pages(range(1, 4))
    path = tmp_path / "dump"
    write_kdump(path, pages, [(1, 6)])
    out = io.BytesIO()
    with KdumpImage(path) as img:
        summary = export_lime(img, out)
    assert summary.zero_filled == {Fate.EXCLUDED: 2}
    lime = out.getvalue()
    assert lime[32:] == pages[1] + pages[2] + pages[3] + bytes(2 * PAGE)


@pytest.mark.parametrize("compression", ["lzo", "snappy"])
def test_compressions_not_read_here_are_refused_by_name(tmp_path, compression):
    path = tmp_path / "dump"
    write_kdump(path, _pages(range(1, 4)), [(1, 4)], compression=compression)
    with pytest.raises(UnsupportedImage) as e:
        KdumpImage(path)
    assert str(e.value) == (
        f"{path}: unsupported: kdump-compressed pages compressed with {compression}, which is "
        "not read here (read: zlib, zstd; makedumpfile -c writes zlib, -z zstd)"
    )
    assert e.value.exit_code == 7


def test_a_page_flagged_lzo_in_a_zlib_dump_is_refused_when_read(tmp_path):
    path = tmp_path / "dump"
    write_kdump(path, {1: b"\x11" * PAGE}, [(1, 2)], compression="lzo", status=0x1)
    with KdumpImage(path) as img, pytest.raises(UnsupportedImage) as e:
        img.read(PAGE, 1)
    assert "page frame 0x1 (data at" in str(e.value)
    assert str(e.value).endswith(
        "is compressed with lzo, which is not read here (read: zlib, zstd)"
    )


def test_a_cut_dump_serves_what_it_has_and_reports_the_rest_missing(tmp_path):
    pages = _pages(range(1, 9), seed=3)
    pages = {p: d if any(d) else b"\x01" * PAGE for p, d in pages.items()}
    path = tmp_path / "dump"
    size = write_kdump(path, pages, [(1, 9)], compression="none", status=INCOMPLETE)
    with open(path, "r+b") as f:
        f.truncate(size - 3 * PAGE)  # the last three pages' data is gone
    with KdumpImage(path) as img:
        assert img.read(PAGE, 5 * PAGE) == b"".join(pages[p] for p in range(1, 6))
        assert img.fate(6 * PAGE) == PageFate(Fate.MISSING)
        with pytest.raises(PageNotCaptured) as e:
            img.read(8 * PAGE, 1)
        assert e.value.fate == Fate.MISSING
        assert list(img.fate_runs()) == [FateRun(6 * PAGE, 3, Fate.MISSING)]
        assert img.problems == [
            "makedumpfile marked the dump incomplete (DUMP_DH_COMPRESSED_INCOMPLETE: it "
            "stopped writing, e.g. on a full disk); pages it did not write are missing"
        ]


@pytest.mark.parametrize(
    ("cut", "where"),
    [
        (100, "inside the disk_dump_header (bytes 0x0-0x1cf)"),
        (PAGE + 50, "inside the sub header (bytes 0x1000-0x1067)"),
        (3 * PAGE, "inside the 1st bitmap (bytes 0x3000-0x3000)"),
        (4 * PAGE, "inside the 2nd bitmap (bytes 0x4000-0x4000)"),
    ],
)
def test_headers_cut_short_are_truncated(tmp_path, cut, where):
    path = tmp_path / "dump"
    write_kdump(path, _pages(range(1, 4)), [(1, 4)])
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(ImageTruncated) as e:
        KdumpImage(path)
    assert str(e.value) == f"{path}: truncated: the file ends at byte {cut} {where}"
    assert e.value.exit_code == 3


def test_impossible_geometry_is_corrupted(tmp_path):
    path = tmp_path / "dump"
    write_kdump(path, _pages(range(1, 4)), [(1, 4)])
    data = bytearray(path.read_bytes())
    data[428:432] = (1000).to_bytes(4, "little")  # block_size
    path.write_bytes(bytes(data))
    with pytest.raises(ImageCorrupted) as e:
        KdumpImage(path)
    assert str(e.value) == f"{path}: corrupted: block_size 1000 is not a page size"
    assert e.value.exit_code == 1


def test_damaged_page_data_is_corrupted_when_read(tmp_path):
    path = tmp_path / "dump"
    size = write_kdump(path, {1: b"\x42" * PAGE}, [(1, 2)], compression="zlib")
    data = bytearray(path.read_bytes())
    data[size - 5 : size] = b"\xff" * 5  # the end of the only page's zlib stream
    path.write_bytes(bytes(data))
    with KdumpImage(path) as img, pytest.raises(ImageCorrupted) as e:
        img.read(PAGE, 1)
    assert str(e.value).startswith(f"{path}: corrupted: page frame 0x1 (data at ")


def test_split_flattened_and_diskdump_files_are_refused_by_name(tmp_path):
    path = tmp_path / "split"
    write_kdump(path, _pages(range(1, 4)), [(1, 4)], split=True)
    with pytest.raises(UnsupportedImage, match=r"one part of a split dump"):
        open_image(path)
    flat = tmp_path / "flat"
    flat.write_bytes(b"makedumpfile\0\0\0\0" + bytes(4096))
    with pytest.raises(UnsupportedImage) as e:
        open_image(flat)
    assert str(e.value) == (
        f"{flat}: unsupported: a flattened makedumpfile stream (makedumpfile -F); "
        "`makedumpfile -R FILE < STREAM` turns it into a kdump-compressed file"
    )
    old = tmp_path / "diskdump"
    old.write_bytes(b"DISKDUMP" + bytes(4096))
    with pytest.raises(UnsupportedImage, match="a DISKDUMP dump of the old diskdump driver"):
        open_image(old)


def test_bit_runs_cross_the_chunks_they_are_counted_in():
    size = (1 << 20) + 16  # the runs are found 1 MiB of bitmap at a time
    bitmap = bytearray(size)
    expected = [(3, 9), (8 * (1 << 20) - 5, 8 * (1 << 20) + 20), (8 * size - 4, 8 * size)]
    for first, end in expected:
        for bit in range(first, end):
            bitmap[bit >> 3] |= 1 << (bit & 7)
    assert list(_bit_runs(bytes(bitmap))) == expected
    assert list(_bit_runs(b"\xff" * 4)) == [(0, 32)]
    assert list(_bit_runs(b"")) == []
