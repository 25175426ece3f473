"""The native image format: every property of docs/image-format.md, checked against oracles
that do not use the reader (the zstd CLI, hand-parsed LiME headers, the seekable-format spec)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import shutil
import struct
import subprocess
import threading

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.errors import ImageError
from collector.image.reader import NativeImage
from collector.image.writer import ImageWriter
from collector.memory import Fate, FateRun, PageNotCaptured

PAGE = 4096
CHUNK = 64 * 1024
needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")


def make_ram(seed: int = 1) -> dict[int, bytes]:
    """Two ranges like a small machine's: low RAM with a sub-page end, and RAM above 1 MiB."""
    rng = random.Random(seed)
    dense = lambda n: rng.randbytes(n)  # noqa: E731
    low = dense(0x9E000) + dense(0xC00)  # 0x1000-0x9fbff, the last page partial
    high = bytearray(dense(5 * CHUNK + 3 * PAGE))
    high[CHUNK : 2 * CHUNK] = bytes(CHUNK)  # one all-zero chunk
    return {0x1000: low, 0x100000: bytes(high)}


def write_image(out, ram, *, unreadable=(), threads=2, stop_after=None, finish=True):
    """Write ``ram`` chunk by chunk the way the capture loop does; pages in ``unreadable``
    are zeroed and recorded with EIO. Returns the writer."""
    ranges = [[s, s + len(d)] for s, d in ram.items()]
    w = ImageWriter(
        out, page_size=PAGE, chunk_size=CHUNK, metadata={"ranges": ranges}, threads=threads
    )
    w.add_blob("vmcoreinfo", b"OSRELEASE=6.1.0\nPAGESIZE=4096\n")
    n = 0
    for start, data in ram.items():
        pos = start
        while pos < start + len(data):
            end = min(start + len(data), (pos // CHUNK + 1) * CHUNK)
            chunk = bytearray(data[pos - start : end - start])
            runs = []
            for page in unreadable:
                if pos <= page < end:
                    chunk[page - pos : page - pos + PAGE] = bytes(PAGE)
                    runs.append(FateRun((page - pos) // PAGE, 1, Fate.UNREADABLE, 5))
            bounds = (start, start + len(data)) if pos == start else (None, None)
            w.add_chunk(pos, bytes(chunk), runs, *bounds)
            n += 1
            if stop_after is not None and n == stop_after:
                w.flush()
                if finish:
                    w.finish({}, clean=False)
                return w
            pos = end
    if finish:
        w.finish({"reason": "test"})
    return w


def expected_lime(ram, unreadable=()) -> bytes:
    """The LiME stream, built from the test's own bytes and the LiME spec."""
    out = b""
    for start, data in ram.items():
        data = bytearray(data)
        for page in unreadable:
            if start <= page < start + len(data):
                data[page - start : page - start + PAGE] = bytes(PAGE)
        out += struct.pack("<IIQQ8x", 0x4C694D45, 1, start, start + len(data) - 1) + data
    return out


@pytest.fixture
def image(tmp_path):
    ram = make_ram()
    path = tmp_path / "m.lime.zst"
    with open(path, "wb") as f:
        write_image(f, ram, unreadable=[0x100000 + 3 * PAGE])
    return path, ram


@needs_zstd
def test_zstd_cli_decompresses_to_the_lime_stream_and_its_hash(image):
    path, ram = image
    lime = subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout
    assert lime == expected_lime(ram, [0x100000 + 3 * PAGE])
    with NativeImage(path) as img:
        assert img.end["stream_sha256"] == hashlib.sha256(lime).hexdigest()
    subprocess.run(["zstd", "-t", "-q", str(path)], check=True)  # every checksum


def test_seek_table_follows_the_seekable_format(image):
    path, _ = image
    data = path.read_bytes()
    count, descriptor, magic = struct.unpack("<IBI", data[-9:])
    assert magic == 0x8F92EAB1 and descriptor == 0
    table_size = 8 + count * 8 + 9
    frame_magic, length = struct.unpack_from("<II", data, len(data) - table_size)
    assert (frame_magic, length) == (0x184D2A5E, table_size - 8)
    entries = [
        struct.unpack_from("<II", data, len(data) - table_size + 8 + 8 * i) for i in range(count)
    ]
    assert sum(c for c, _ in entries) == len(data) - table_size
    # Walking the file by the table's compressed sizes lands on every frame start.
    offset, total = 0, 0
    for comp, decomp in entries:
        magic = struct.unpack_from("<I", data, offset)[0]
        if decomp:
            assert magic == 0xFD2FB528
            assert (
                len(zstandard.ZstdDecompressor().decompress(data[offset : offset + comp])) == decomp
            )
        else:
            assert magic & 0xFFFFFFF0 == 0x184D2A50
        offset += comp
        total += decomp
    assert total == len(expected_lime(make_ram()))


def test_random_access_reads_the_test_bytes(image):
    path, ram = image
    with NativeImage(path) as img:
        assert img.indexed
        assert img.ranges() == [(0x1000, 0x9FC00), (0x100000, 0x100000 + len(ram[0x100000]))]
        assert img.read(0x1000, 0x9EC00) == ram[0x1000]  # across chunks, partial last page
        assert img.read(0x100000 + CHUNK - 100, 200) == ram[0x100000][CHUNK - 100 : CHUNK + 100]
        assert img.blob("vmcoreinfo") == b"OSRELEASE=6.1.0\nPAGESIZE=4096\n"
        assert img.blob("btf") is None


def test_unread_page_is_never_data(image):
    path, _ = image
    bad = 0x100000 + 3 * PAGE
    with NativeImage(path) as img:
        assert img.fate(bad + 10).fate == Fate.UNREADABLE and img.fate(bad).errno == 5
        assert img.fate(bad + PAGE).fate == Fate.READ
        with pytest.raises(PageNotCaptured) as e:
            img.read(bad - 8, 16)
        assert e.value.paddr == bad and e.value.errno == 5
        assert img.fate(0x0).fate == Fate.OUTSIDE
        with pytest.raises(PageNotCaptured):
            img.read(0x9FC00, 1)  # just past the sub-page end
        assert img.end["pages"]["unreadable"] == 1
        assert [(r.start, r.count, r.fate) for r in img.fate_runs()] == [(bad, 1, Fate.UNREADABLE)]


def test_truncated_image_is_read_up_to_its_last_complete_chunk(tmp_path):
    ram = make_ram()
    full = tmp_path / "full.lime.zst"
    with open(full, "wb") as f:
        write_image(f, ram)
    data = full.read_bytes()
    with NativeImage(full) as img:
        chunks = sorted(img.chunks, key=lambda c: c.desc_offset)
        header_end = chunks[0].desc_offset
        img_end_offset = chunks[-1].data_offset + chunks[-1].data_size
    cut_points = sorted({header_end, *(c.desc_offset + 5 for c in chunks), len(data) - 20})
    for cut in cut_points:
        part = tmp_path / f"cut{cut}.lime.zst"
        part.write_bytes(data[:cut])
        with NativeImage(part) as img:
            assert not img.indexed
            complete = [c for c in chunks if c.data_offset + c.data_size <= cut]
            assert len(img.chunks) == len(complete)
            for c in complete:
                start = next(s for s in ram if s <= c.paddr < s + len(ram[s]))
                assert img.read(c.paddr, c.ram_bytes) == ram[start][c.paddr - start : c.end - start]
            held = sum(c.ram_bytes for c in complete)
            assert sum(e - s for s, e in img.missing_ranges()) == sum(map(len, ram.values())) - held
            report = img.verify()
            if cut < img_end_offset:
                assert not report.complete and report.ok and report.status == 3
            else:  # cut inside the end records: every chunk is there, the seek table is not
                assert report.ram_errors == [] and report.status == 4


def test_cut_inside_the_header_is_a_clear_error(tmp_path):
    full = tmp_path / "full.lime.zst"
    with open(full, "wb") as f:
        write_image(f, make_ram())
    for cut in (0, 3, 20):
        p = tmp_path / f"h{cut}"
        p.write_bytes(full.read_bytes()[:cut])
        with pytest.raises(ImageError):
            NativeImage(p)


def test_bit_flip_in_data_is_reported(tmp_path, image):
    path, _ = image
    with NativeImage(path) as img:
        victim = img.chunks[2]
    data = bytearray(path.read_bytes())
    data[victim.data_offset + victim.data_size // 2] ^= 0x40
    bad = tmp_path / "bad.lime.zst"
    bad.write_bytes(data)
    with NativeImage(bad) as img:
        report = img.verify()
        assert not report.ok and any(f"chunk {victim.seq}" in e for e in report.errors)
        with pytest.raises(ImageError):
            img.read(victim.paddr, 16)


def test_pipe_output_equals_file_output(tmp_path):
    ram = make_ram()
    r, w = os.pipe()
    got = bytearray()
    t = threading.Thread(target=lambda: got.extend(_drain(r)))
    t.start()
    with open(w, "wb", buffering=0) as out:
        write_image(out, ram)
    t.join()
    p = tmp_path / "piped.lime.zst"
    p.write_bytes(got)
    with NativeImage(p) as img:
        assert img.indexed and img.verify().ok
        for start, data in ram.items():
            assert img.read(start, len(data)) == data


def _drain(fd: int) -> bytes:
    chunks = []
    while block := os.read(fd, 1 << 16):
        chunks.append(block)
    os.close(fd)
    return b"".join(chunks)


def test_interrupted_capture_writes_end_records(tmp_path):
    path = tmp_path / "stopped.lime.zst"
    with open(path, "wb") as f:
        write_image(f, make_ram(), stop_after=4)
    with NativeImage(path) as img:
        assert img.indexed and img.end["clean"] is False
        assert len(img.chunks) == 4 and img.missing_ranges()
        assert img.verify().ok


def test_memory_window_is_bounded():
    class Counting:
        def __init__(self):
            self.peak = 0

        def write(self, b):
            return len(b)

        def flush(self):
            pass

    out = Counting()
    w = ImageWriter(out, page_size=PAGE, chunk_size=CHUNK, metadata={}, threads=2)
    for i in range(100):
        w.add_chunk(i * CHUNK, os.urandom(CHUNK), [])
        out.peak = max(out.peak, len(w._window))
    w.finish({})
    assert out.peak <= 4


@settings(
    max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.data())
def test_damaged_images_never_crash(tmp_path, data):
    ram = {0x100000: random.Random(3).randbytes(3 * CHUNK)}
    path = tmp_path / "f.lime.zst"
    with open(path, "wb") as f:
        write_image(f, ram)
    blob = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] ^= 1 << data.draw(st.integers(0, 7))
    cut = data.draw(st.integers(0, len(blob)))
    fuzzed = tmp_path / "fuzzed.lime.zst"
    fuzzed.write_bytes(bytes(blob[:cut]))
    try:
        img = NativeImage(fuzzed)
    except ImageError:
        return
    with img:
        for start, end in img.ranges()[:4]:
            with contextlib.suppress(ImageError, PageNotCaptured):
                img.read(start, min(end - start, 3 * CHUNK))
        img.verify()
