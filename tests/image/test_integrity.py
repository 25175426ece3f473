"""Every byte of a native image is covered by a check, and damage is contained.

Records are located here by walking the seek table by hand (the zstd seekable format), and
the expected RAM is the test's own bytes, so nothing below trusts the reader to find them.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import pytest
import xxhash

from collector.cli import main
from collector.errors import ImageError
from collector.image.reader import NativeImage
from collector.image.writer import ImageWriter
from collector.memory import Fate, FateRun, PageNotCaptured
from tests.data.image import make_small_image

PAGE = 4096
CHUNK = 16 << 10
DATA = Path(__file__).parent.parent / "data" / "image"
V1 = DATA / "v1-small.lime.zst"
BLOBS = {
    "vmcoreinfo": b"OSRELEASE=6.1.0\nPAGESIZE=4096\n",
    "btf": bytes(range(256)) * 8,
    "kallsyms": b"ffffffff81000000 T _text\n" * 20,
    "modules": b"ext4 1036288 1 - Live 0x0000000000000000\n" * 20,
}
SKIPPABLE = struct.Struct("<II")
DESC, BLOB, END, INDEX, SEEK = 0x184D2A51, 0x184D2A52, 0x184D2A53, 0x184D2A54, 0x184D2A5E
KERNEL_ZERO_PAGE = 0x1000  # the first page of low RAM, recorded kernel-zero


def ram() -> dict[int, bytes]:
    rng = random.Random(11)
    low = bytearray(rng.randbytes(4 * PAGE))
    low[:PAGE] = bytes(PAGE)  # what a strict /dev/mem returns for it
    return {0x1000: bytes(low), 0x100000: rng.randbytes(4 * CHUNK)}


def write(path: Path, stop_after: int | None = None, metadata: dict | None = None) -> Path:
    """Write the test RAM chunk by chunk as the capture loop does. With ``stop_after``, the
    capture stops there as it does on SIGINT: the open range is padded with MISSING pages."""
    memory = ram()
    meta = {"ranges": [[s, s + len(d)] for s, d in memory.items()], "blobs": sorted(BLOBS)}
    meta.update(metadata or {})
    with open(path, "wb") as out:
        w = ImageWriter(out, page_size=PAGE, chunk_size=CHUNK, metadata=meta, threads=2)
        for name in sorted(BLOBS):
            w.add_blob(name, BLOBS[name])
        n = 0
        for start, data in memory.items():
            pos = start
            while pos < start + len(data):
                end = min(start + len(data), (pos // CHUNK + 1) * CHUNK)
                bounds = (start, start + len(data)) if pos == start else (None, None)
                if stop_after is not None and n == stop_after:
                    # As a capture does on SIGINT: pad the open range with MISSING pages.
                    while pos < start + len(data):
                        end = min(start + len(data), (pos // CHUNK + 1) * CHUNK)
                        missing = [FateRun(0, (end - pos) // PAGE, Fate.MISSING)]
                        w.add_chunk(pos, bytes(end - pos), missing, *bounds)
                        bounds, pos = (None, None), end
                    w.finish({"stopped_by": "interrupted by SIGINT"}, clean=False)
                    return path
                runs = []
                if pos == KERNEL_ZERO_PAGE:
                    runs.append(FateRun(0, 1, Fate.KERNEL_ZERO))
                w.add_chunk(pos, data[pos - start : end - start], runs, *bounds)
                n += 1
                pos = end
        w.finish({"stopped_by": None})
    return path


def frames(data: bytes) -> list[tuple[int, int, int]]:
    """``(offset, magic, size)`` of every frame, from the seek table at the end (by hand)."""
    count, _, magic = struct.unpack("<IBI", data[-9:])
    assert magic == 0x8F92EAB1
    table = len(data) - (8 + 8 * count + 9)
    out, pos = [], 0
    for i in range(count):
        size, _ = struct.unpack_from("<II", data, table + 8 + 8 * i)
        out.append((pos, struct.unpack_from("<I", data, pos)[0], size))
        pos += size
    out.append((table, SEEK, len(data) - table))
    return out


def reseal(payload: bytes, magic: int) -> bytes:
    """A payload's body with a fresh CRC-32 of magic and body (the format's rule, by hand)."""
    body = payload[:-4]
    crc = zlib.crc32(body, zlib.crc32(struct.pack("<I", magic)))
    return body + struct.pack("<I", crc)


def run(*argv: str, capsys) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def expected(paddr: int, size: int) -> bytes:
    for start, data in ram().items():
        if start <= paddr and paddr + size <= start + len(data):
            return data[paddr - start : paddr - start + size]
    raise AssertionError(paddr)


def reads_are_right_or_refused(path: Path) -> int:
    """Read every page of the test RAM: each read returns the test's bytes or raises. Returns
    how many pages were served."""
    served = 0
    try:
        img = NativeImage(path)
    except ImageError:
        return 0
    with img:
        for start, data in ram().items():
            for page in range(start, start + len(data), PAGE):
                try:
                    got = img.read(page, PAGE)
                except (ImageError, PageNotCaptured):
                    continue
                assert page != KERNEL_ZERO_PAGE, "a kernel-zero page was served as read"
                assert got == expected(page, PAGE), f"wrong bytes served at {page:#x}"
                served += 1
    return served


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return write(tmp_path / "good.lime.zst")


def test_intact_image_verifies_with_every_check(image: Path, capsys) -> None:
    code, out, _ = run("verify", str(image), capsys=capsys)
    assert code == 0 and out.startswith(f"{image}: intact: 6 chunks")
    data = image.read_bytes()
    # The END record's metadata hash is the SHA-256 of HEADER, BLOB and DESC frames, in order.
    meta = hashlib.sha256()
    for offset, magic, size in frames(data):
        if magic in (0x184D2A50, BLOB, DESC):
            meta.update(data[offset : offset + size])
        if magic == END:
            end = json.loads(data[offset + 8 : offset + size - 4])
            assert end["metadata_sha256"] == meta.hexdigest()
    # Each DESC holds its DATA frame's XXH3-64 before the run list, and ends with its CRC.
    for (offset, magic, size), (d_off, _, d_size) in itertools.pairwise(frames(data)):
        if magic == DESC:
            # seq u32, paddr u64, RAM u32, DATA size u32, flags u8, ns u64, runs u32, hash u64
            nruns = struct.unpack_from("<I", data, offset + 8 + 29)[0]
            (data_hash,) = struct.unpack_from("<Q", data, offset + 8 + 33)
            assert size == 8 + 41 + 11 * nruns + 4
            assert data_hash == xxhash.xxh3_64_intdigest(data[d_off : d_off + d_size])
            payload = data[offset + 8 : offset + size]
            assert reseal(payload, DESC) == payload


@pytest.mark.parametrize("step", [1, 3])
def test_every_flipped_bit_outside_ram_is_reported(tmp_path: Path, image: Path, step: int) -> None:
    """One flipped bit in any byte that is not RAM (every record of the image, all bit
    positions over the bytes) makes verify non-zero, and no read serves wrong bytes."""
    data = image.read_bytes()
    layout = frames(data)
    data_frames = [
        (layout[i + 1][0], layout[i + 1][0] + layout[i + 1][2])
        for i, (_, magic, _) in enumerate(layout)
        if magic == DESC
    ]
    positions = [p for p in range(len(data)) if not any(a <= p < b for a, b in data_frames)]
    bad = tmp_path / "bad.lime.zst"
    checked = 0
    chosen = positions[step - 1 :: 4]
    for i, pos in enumerate(chosen):
        mutated = bytearray(data)
        mutated[pos] ^= 1 << ((pos + i + step) % 8)
        bad.write_bytes(mutated)
        try:
            with NativeImage(bad) as img:
                report = img.verify()
        except ImageError:
            continue  # the header cannot be read: one clear error
        assert report.status != 0, f"flip at byte {pos} went unnoticed"
        checked += 1
        if i % 16 == 0:
            reads_are_right_or_refused(bad)
    assert checked > 0.9 * len(chosen)  # the rest broke the HEADER: one clear error


def test_flipped_bits_in_ram_frames_are_reported_and_never_served(tmp_path: Path, image) -> None:
    data = image.read_bytes()
    rng = random.Random(5)
    layout = frames(data)
    bad = tmp_path / "bad.lime.zst"
    for i, (_, magic, _) in enumerate(layout):
        if magic != DESC:
            continue
        d_off, _, d_size = layout[i + 1]
        for _ in range(6):
            mutated = bytearray(data)
            mutated[d_off + rng.randrange(d_size)] ^= 1 << rng.randrange(8)
            bad.write_bytes(mutated)
            with NativeImage(bad) as img:
                assert img.verify().status == 1
            reads_are_right_or_refused(bad)


def test_a_flipped_sequence_number_in_the_index_serves_no_other_chunk(tmp_path: Path, image):
    data = bytearray(image.read_bytes())
    offset, _, size = next(f for f in frames(bytes(data)) if f[1] == INDEX)
    # Row layout: u8 kind, u64 paddr, u32 ram, u64 offset, u32 frame size, u32 data size,
    # u32 seq, u16 name length, name. Rows for the 4 blobs come first, then the chunks.
    pos = offset + 8 + 4
    for _ in range(4):
        name_len = struct.unpack_from("<H", data, pos + 33)[0]
        pos += 35 + name_len
    pos += 35  # the first chunk row; the second chunk row's seq is at +29
    data[pos + 29] ^= 1
    bad = tmp_path / "bad.lime.zst"
    bad.write_bytes(data)
    with NativeImage(bad) as img:
        assert not img.indexed and any("INDEX" in d for d in img.damage)
        assert img.read(0x100000, 4 * CHUNK) == ram()[0x100000]
        report = img.verify()
    assert report.status == 4 and report.ram_errors == []
    assert any("INDEX record" in e for e in report.metadata_errors)
    # Resealed, the row passes its CRC but disagrees with the seek table and the DESC.
    payload = bytes(data[offset + 8 : offset + size])
    data[offset + 8 : offset + size] = reseal(payload, INDEX)
    bad.write_bytes(data)
    with NativeImage(bad) as img:
        assert not img.indexed
        assert img.read(0x100000, 4 * CHUNK) == ram()[0x100000]
        assert img.verify().status == 4


def test_a_kernel_zero_page_cannot_be_turned_into_read(tmp_path: Path, image) -> None:
    data = bytearray(image.read_bytes())
    offset, _, _ = next(f for f in frames(bytes(data)) if f[1] == DESC)
    # The first DESC (chunk at 0x1000) has one run: u32 first, u32 count, u8 fate, i16 errno.
    fate_at = offset + 8 + 41 + 8
    assert data[fate_at] == Fate.KERNEL_ZERO
    data[fate_at] = Fate.READ
    bad = tmp_path / "bad.lime.zst"
    bad.write_bytes(data)
    with NativeImage(bad) as img:
        with pytest.raises((ImageError, PageNotCaptured)):
            img.read(KERNEL_ZERO_PAGE, 16)
        report = img.verify()
    assert report.status == 1
    assert (
        report.ram_errors[0]
        == f"the DESC at byte {offset}: chunk descriptor does not match its checksum"
    )


def test_a_deleted_blob_is_damaged_metadata(tmp_path: Path, image, capsys) -> None:
    data = image.read_bytes()
    offset, _, size = next(
        f for f in frames(data) if f[1] == BLOB and data[f[0] + 10 : f[0] + 13] == b"btf"
    )
    bad = tmp_path / "bad.lime.zst"
    bad.write_bytes(data[:offset] + data[offset + size :])
    code, out, _ = run("verify", str(bad), capsys=capsys)
    assert code == 4
    assert (
        out.splitlines()[0]
        == f"{bad}: damaged metadata, RAM intact: 6 chunks, {4 * PAGE + 4 * CHUNK + 64} bytes"
    )
    assert "damaged metadata: blob 'btf' announced by the header is absent or damaged" in out
    with NativeImage(bad) as img:
        assert img.blob("btf") is None and img.blob("kallsyms") == BLOBS["kallsyms"]
        assert img.read(0x100000, 4 * CHUNK) == ram()[0x100000]


def test_swapped_index_rows_never_serve_one_blob_for_another(tmp_path: Path, image) -> None:
    """Swap where the kallsyms and modules rows point, and reseal the INDEX so that its CRC
    passes: the cross-checks and the blob's own name still catch it."""
    data = bytearray(image.read_bytes())
    offset, _, size = next(f for f in frames(bytes(data)) if f[1] == INDEX)
    rows, pos = {}, offset + 8 + 4
    for _ in range(4):
        name_len = struct.unpack_from("<H", data, pos + 33)[0]
        rows[bytes(data[pos + 35 : pos + 35 + name_len])] = pos
        pos += 35 + name_len
    k, m = rows[b"kallsyms"], rows[b"modules"]
    k_fields, m_fields = bytes(data[k + 13 : k + 25]), bytes(data[m + 13 : m + 25])
    data[k + 13 : k + 25], data[m + 13 : m + 25] = m_fields, k_fields  # file offset, size
    data[offset + 8 : offset + size] = reseal(bytes(data[offset + 8 : offset + size]), INDEX)
    bad = tmp_path / "bad.lime.zst"
    bad.write_bytes(data)
    with NativeImage(bad) as img:
        assert img.blob("kallsyms") == BLOBS["kallsyms"]
        assert img.blob("modules") == BLOBS["modules"]
        assert img.verify().status == 4


def test_swapped_data_frames_are_never_served(tmp_path: Path, image) -> None:
    data = image.read_bytes()
    layout = frames(data)
    # The second and third chunks of high RAM: DATA frames of random bytes, equal in size.
    descs = [i for i, f in enumerate(layout) if f[1] == DESC]
    a, b = layout[descs[3] + 1], layout[descs[4] + 1]
    assert a[2] == b[2]
    mutated = bytearray(data)
    mutated[a[0] : a[0] + a[2]] = data[b[0] : b[0] + b[2]]
    mutated[b[0] : b[0] + b[2]] = data[a[0] : a[0] + a[2]]
    bad = tmp_path / "bad.lime.zst"
    bad.write_bytes(mutated)
    with NativeImage(bad) as img:
        for paddr in (0x100000 + CHUNK, 0x100000 + 2 * CHUNK):
            with pytest.raises(ImageError, match="does not match the hash its DESC records"):
                img.read(paddr, 16)
        assert img.read(0x100000, CHUNK) == ram()[0x100000][:CHUNK]
        assert img.verify().status == 1
    out = tmp_path / "out.lime"
    assert main(["export", str(bad), "--to", "lime", "-o", str(out)]) == 1


def test_a_damaged_end_record_leaves_the_ram_readable(tmp_path: Path, image, capsys) -> None:
    data = bytearray(image.read_bytes())
    offset, _, size = next(f for f in frames(bytes(data)) if f[1] == END)
    data[offset + 8 + size // 3] ^= 0x04
    bad = tmp_path / "bad.lime.zst"
    bad.write_bytes(data)
    with NativeImage(bad) as img:
        assert img.end is None and not img.indexed
        assert img.damage == [
            f"the END record at byte {offset}: END record does not match its checksum; "
            "the image was read by a frame scan instead"
        ]
        assert img.read(0x100000, 4 * CHUNK) == ram()[0x100000]
        assert img.blob("btf") == BLOBS["btf"]
    code, out, _ = run("verify", str(bad), capsys=capsys)
    assert code == 4 and "damaged metadata, RAM intact" in out.splitlines()[0]
    if shutil.which("zstd"):
        lime = subprocess.run(["zstd", "-dc", str(bad)], capture_output=True, check=True).stdout
        with NativeImage(image) as img:
            assert hashlib.sha256(lime).hexdigest() == img.end["stream_sha256"]
    assert main(["info", str(bad)]) == 0
    assert "DAMAGED" in capsys.readouterr().out


def test_a_flipped_content_size_is_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    """Version 1 images have no DATA checksum; the frame header's size is checked first."""
    data = bytearray(V1.read_bytes())
    layout = frames(bytes(data))
    d_off = layout[[f[1] for f in layout].index(DESC) + 1][0]
    # zstd frame header: magic, descriptor; with a 4- or 8-byte content size field.
    fhd = data[d_off + 4]
    size_at = d_off + 5 + (0 if fhd & 0x20 else 1)
    data[size_at + (4 if fhd >> 6 == 2 else 7 if fhd >> 6 == 3 else 1)] ^= 0x40
    bad = tmp_path / "bad.lime.zst"
    bad.write_bytes(data)
    with NativeImage(bad) as img:
        with pytest.raises(ImageError, match="its frame header claims"):
            img.read(0x1000, 16)
        assert img.verify().status == 1


def test_deep_or_mistyped_json_is_one_clear_line(tmp_path: Path, image, capsys) -> None:
    data = image.read_bytes()
    offset, _, size = next(f for f in frames(data) if f[1] == END)
    deep = b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    end = deep + struct.pack("<I", zlib.crc32(deep, zlib.crc32(struct.pack("<I", END))))
    bad = tmp_path / "deep.lime.zst"
    bad.write_bytes(data[:offset] + SKIPPABLE.pack(END, len(end)) + end + data[offset + size :])
    for argv in (["info"], ["verify"], ["export", "--to", "raw", "-o", str(tmp_path / "r")]):
        code, out, err = run(argv[0], str(bad), *argv[1:], capsys=capsys)
        assert "Traceback" not in err and code in (0, 4), (argv, err)
    with NativeImage(bad) as img:
        # Longer than the END it replaced, it also moves the frames the seek table lists.
        assert img.damage[0].startswith("the seek table is damaged: its frame sizes do not add")
        assert img.damage[1] == (
            f"the END record at byte {offset}: the END record is not valid JSON (nested too deeply)"
        )
    # A header whose host is a list and whose hostname would reach the terminal raw.
    hostile = write(
        tmp_path / "hostile.lime.zst",
        metadata={"host": {"hostname": "box\x1b]0;owned\x07", "uname": []}, "plan": []},
    )
    code, out, err = run("info", str(hostile), capsys=capsys)
    assert code == 0 and "\x1b" not in out and "\x07" not in out
    assert "host:     box\\x1b]0;owned\\x07" in out


def test_a_capture_stopped_by_sigint_verifies_incomplete_and_says_why(tmp_path, capsys) -> None:
    path = write(tmp_path / "stopped.lime.zst", stop_after=3)
    code, out, _ = run("verify", str(path), capsys=capsys)
    assert code == 3
    lines = out.splitlines()
    assert lines[0].startswith(f"{path}: incomplete: ")
    assert "incomplete: the capture was interrupted by SIGINT" in lines
    # Chunks 0-2 hold low RAM's 4 pages and high RAM's first 16 KiB; the rest is padding.
    assert lines[-1] == "missing: 0x104000-0x10ffff (48.0 KiB)"


def test_version_1_images_stay_readable_and_say_what_they_lack(capsys) -> None:
    memory = make_small_image.ram()
    with NativeImage(V1) as img:
        assert img.version == 1 and img.indexed
        assert img.read(0x1000, len(memory[0x1000])) == memory[0x1000]
        assert img.read(0x100000, 5 * PAGE) == memory[0x100000][: 5 * PAGE]
        with pytest.raises(PageNotCaptured):
            img.read(0x105000, 1)
        assert img.blob("vmcoreinfo") == make_small_image.VMCOREINFO
    code, out, _ = run("verify", str(V1), capsys=capsys)
    assert code == 0
    assert "format version 1 lacks these guarantees:" in out
    if shutil.which("zstd"):
        lime = subprocess.run(["zstd", "-dc", str(V1)], capture_output=True, check=True).stdout
        assert hashlib.sha256(lime).hexdigest() in out


def test_version_1_index_damage_is_read_around(tmp_path: Path) -> None:
    data = bytearray(V1.read_bytes())
    offset, _, _ = next(f for f in frames(bytes(data)) if f[1] == INDEX)
    pos = offset + 8 + 4 + 35 + len("vmcoreinfo")  # the first chunk row
    data[pos + 1 + 2] ^= 0x10  # its paddr: 0x1000 becomes 0x101000
    bad = tmp_path / "bad.lime.zst"
    bad.write_bytes(data)
    memory = make_small_image.ram()
    with NativeImage(bad) as img:
        assert img.read(0x1000, 0x100) == memory[0x1000][:0x100]
        assert img.read(0x100000, 0x100) == memory[0x100000][:0x100]
        assert img.damage == [
            "INDEX row of chunk 0 names 0x101000, not 0x1000; "
            "the image was read by a frame scan instead"
        ]
        assert img.verify().status == 4


def test_a_damaged_desc_hides_its_own_chunk_only(tmp_path: Path, image) -> None:
    """In a cut image (read by a scan), the DATA frame after a DESC that fails its CRC is
    stepped over by its zstd block headers, and every later chunk is still read."""
    data = image.read_bytes()
    layout = frames(data)
    end_offset = next(f[0] for f in layout if f[1] == END)
    descs = [f for f in layout if f[1] == DESC]
    victim = descs[3]  # the chunk at 0x100000 + CHUNK
    mutated = bytearray(data[:end_offset])  # cut before the END: no index to lean on
    mutated[victim[0] + 8 + 6] ^= 0x20  # a bit of its address
    bad = tmp_path / "bad.lime.zst"
    bad.write_bytes(mutated)
    with NativeImage(bad) as img:
        assert not img.indexed
        assert img.damage == [
            f"the DESC at byte {victim[0]}: chunk descriptor does not match its checksum"
        ]
        high = ram()[0x100000]
        assert img.read(0x100000, CHUNK) == high[:CHUNK]
        assert img.read(0x100000 + 2 * CHUNK, 2 * CHUNK) == high[2 * CHUNK :]
        with pytest.raises(PageNotCaptured):
            img.read(0x100000 + CHUNK, 1)
        assert img.missing_ranges() == [(0x100000 + CHUNK, 0x100000 + 2 * CHUNK)]
        report = img.verify()
    assert report.status == 1 and report.chunks == 5
    assert report.ram_errors == [
        f"the DESC at byte {victim[0]}: chunk descriptor does not match its checksum"
    ]
