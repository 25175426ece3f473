"""Hostile hosts: every size a host gives is checked before anything is allocated or looped
over, the capture streams its chunks, and SIGINT/SIGTERM end `collect` at any point.

The commands run in a subprocess with an address-space limit, so a regression fails the test
with a MemoryError instead of taking the machine's memory, and report their own peak RSS.
"""

from __future__ import annotations

import errno
import io
import json
import os
import resource
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collector.acquire import metadata
from collector.acquire.sources import MAX_OLD_LAYOUT_LOADS, Kcore
from collector.cli import main
from collector.errors import CollectorError
from collector.image.reader import NativeImage
from collector.sysroot import Sysroot
from tests.acquire.fakehost import IOMEM_GUEST, PAGE, FakeHost

REPO = Path(__file__).resolve().parent.parent.parent
ADDRESS_SPACE = 2 << 30  # zstd workers, the FUSE client and Python fit well inside
PEAK_RSS = 200 << 20
# The fake's last RAM range, and what a planted iomem says instead.
REAL_LAST = "100000000-1001fffff : System RAM\n"
BEYOND = "100000000-ffffffffffffffff : System RAM\n"
HUGE_END = 0x400000000000  # 64 TiB: inside the fake CPU's 46-bit physical address space
HUGE = f"100000000-{HUGE_END - 1:x} : System RAM\n"

RUNNER = """\
import resource, sys
from collector.cli import main
status = main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(f"peak-rss {peak}", file=sys.stderr)
sys.exit(status)
"""


def _limit() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", RUNNER, *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_limit,
    )


def finish(proc: subprocess.Popen, timeout: float) -> tuple[int, str, str, int]:
    """Exit status, stdout, stderr without the peak line, and the peak RSS in bytes."""
    out, err = proc.communicate(timeout=timeout)
    lines = err.splitlines()
    assert lines and lines[-1].startswith("peak-rss "), err
    return proc.returncode, out, "\n".join(lines[:-1]), int(lines[-1].split()[1])


def planted(fake: FakeHost, line: str) -> None:
    (fake.root / "proc/iomem").write_text(IOMEM_GUEST.replace(REAL_LAST, line))


@pytest.fixture
def fake(tmp_path):
    with FakeHost(tmp_path / "host", strict_devmem=True) as host:
        yield host


def test_ram_beyond_the_physical_address_space_is_refused_at_once(fake, tmp_path):
    planted(fake, BEYOND)
    expected = (
        "collect: /proc/iomem line 20: System RAM 0x100000000-0xffffffffffffffff ends beyond "
        "the 46-bit physical address space of this machine (46 bits physical in /proc/cpuinfo); "
        "no RAM can be there"
    )
    out = tmp_path / "x.lime.zst"
    root = str(fake.root)
    for args in (
        ("plan", "--profile", "x86_64", "--sysroot", root),
        ("--profile", "x86_64", "--sysroot", root, "--dry-run"),
        ("--profile", "x86_64", "--sysroot", root, "-o", str(out)),
    ):
        t0 = time.monotonic()
        status, stdout, err, peak = finish(start(*args), timeout=60)
        assert (status, stdout, err) == (1, "", expected), args
        assert time.monotonic() - t0 < 10 and peak < PEAK_RSS, (args, peak)
    assert not out.exists() and fake.bytes_read() == 0
    assert list(tmp_path.iterdir()) == [tmp_path / "host"]


def test_a_huge_range_is_planned_exactly_and_captured_as_a_stream(fake, tmp_path):
    planted(fake, HUGE)
    fake.allow(0x100200000, HUGE_END)  # what the planted iomem calls RAM may be probed
    assert main(["plan", "--profile", "x86_64", "--sysroot", str(fake.root), "--json"]) == 0
    # A dry run prints the same plan; its last entry covers 64 TiB with one record.
    proc = start("--profile", "x86_64", "--sysroot", str(fake.root), "--dry-run", "--json")
    status, stdout, err, peak = finish(proc, timeout=60)
    assert (status, err) == (0, "") and peak < PEAK_RSS
    plan = json.loads(stdout)
    assert [(r["start"], r["end"]) for r in plan["ram_ranges"]][-1] == (0x100000000, HUGE_END)
    assert [(e["start"], e["end"], e["source"], e["fate"]) for e in plan["entries"][-2:]] == [
        (0x100000000, 0x100200000, "/proc/kcore", "read"),
        (0x100200000, HUGE_END, None, "not-covered"),
    ]

    out = tmp_path / "huge.lime.zst"
    proc = start("--profile", "x86_64", "--sysroot", str(fake.root), "-o", str(out), "--json")
    # Wait until the capture is well inside the huge range, then stop it.
    deadline = time.monotonic() + 60
    while not out.exists() or out.stat().st_size < 64 << 10:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    status, stdout, err, peak = finish(proc, timeout=60)
    assert (status, err) == (143, "") and time.monotonic() - t0 < 10
    assert peak < PEAK_RSS, peak
    summary = json.loads(stdout)
    assert summary["stopped_by"] == "interrupted by SIGTERM" and summary["clean"] is False
    # The rest of the range is far beyond what padding could write in time: the image ends
    # inside it, and says where.
    cut, end = summary["unpadded"]
    assert end == HUGE_END and 0x100200000 < cut < HUGE_END and cut % (4 << 20) == 0
    from collector.cli import _print_summary

    text = io.StringIO()
    _print_summary(summary, text)
    assert text.getvalue().splitlines()[-2] == (
        f"not padded: {cut:#x}-0x3fffffffffff ({(HUGE_END - cut) / (1 << 40):.1f} TiB): the "
        "image ends inside this range, and `zstd -dc` gives a LiME file cut short there"
    )
    with NativeImage(out) as img:
        assert img.ranges() == [(0x1000, 0x9FC00), (0x100000, 0x600000), (0x100000000, HUGE_END)]
        assert img.missing_ranges() == [(cut, HUGE_END)]
        assert img.read(0x100000000, 0x200000) == fake.ram_bytes(0x100000000, 0x100200000)
        assert img.end["pages"]["not-covered"] == (cut - 0x100200000) // PAGE
        assert img.verify().ok


def test_sigterm_while_probing_ends_at_once_and_writes_nothing(fake, tmp_path):
    fake.slow["mem"] = 2.0
    out = tmp_path / "x.lime.zst"
    proc = start("--profile", "x86_64", "--sysroot", str(fake.root), "-o", str(out))
    assert fake.slow_read.wait(60)
    proc.send_signal(signal.SIGTERM)
    t0 = time.monotonic()
    status, stdout, err, _peak = finish(proc, timeout=60)
    # The read under way completes (the fake answers after its delay), then collect stops.
    assert time.monotonic() - t0 < 2.0 + 5
    assert (status, stdout) == (143, "")
    assert err == ("collect: interrupted by SIGTERM; before any RAM was read; no image was written")
    assert list(tmp_path.iterdir()) == [tmp_path / "host"]


def test_sigint_during_collect_plan(fake):
    fake.slow["mem"] = 2.0
    proc = start("plan", "--profile", "x86_64", "--sysroot", str(fake.root))
    assert fake.slow_read.wait(60)
    proc.send_signal(signal.SIGINT)
    status, stdout, err, _peak = finish(proc, timeout=60)
    assert (status, stdout, err) == (130, "", "collect: interrupted by SIGINT")


# -- files a host gives ---------------------------------------------------------------------


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_oversized_deep_or_fifo_iomem_is_one_line(fake, tmp_path, capsys):
    args = ["plan", "--profile", "x86_64", "--sysroot", str(fake.root)]
    iomem = fake.root / "proc/iomem"
    iomem.write_text(IOMEM_GUEST * (4 * 1024 * 1024 // len(IOMEM_GUEST) + 1))
    assert main(args) == 1
    assert one_line(capsys.readouterr().err) == (
        "collect: cannot read /proc/iomem: /proc/iomem is larger than 4194304 bytes"
    )
    # r_show() never indents deeper than MAX_IORES_LEVEL (5) levels.
    iomem.write_text(
        "".join(f"{'  ' * d}{d:08x}-{0xFFFFFFFF - d:08x} : level {d}\n" for d in range(7))
    )
    assert main(args) == 1
    assert one_line(capsys.readouterr().err) == (
        "collect: /proc/iomem line 7: indented 6 levels, deeper than the kernel prints (5)"
    )
    iomem.unlink()
    os.mkfifo(iomem)  # nobody writes it: an open that waited would hang
    t0 = time.monotonic()
    assert main(args) == 1
    assert one_line(capsys.readouterr().err) == (
        "collect: cannot read /proc/iomem: /proc/iomem is not a regular file"
    )
    assert time.monotonic() - t0 < 5


def test_an_include_beyond_the_physical_address_space_is_refused(fake, capsys):
    args = ["plan", "--profile", "x86_64", "--sysroot", str(fake.root)]
    assert main([*args, "--include", "pmem=0x400000000000+4K"]) == 2
    assert one_line(capsys.readouterr().err) == (
        "collect: range 0x400000000000-0x400000000fff ends beyond the 46-bit physical address "
        "space of this machine (46 bits physical in /proc/cpuinfo)"
    )


def test_vmcoreinfo_size_from_sysfs_is_bounded(tmp_path):
    root = Sysroot(tmp_path)
    (tmp_path / "sys/kernel").mkdir(parents=True)
    reads = []

    def read_phys(paddr: int, size: int) -> bytes:
        reads.append((paddr, size))
        raise OSError(errno.EIO, "not here")

    (tmp_path / "sys/kernel/vmcoreinfo").write_text("0x0000000001234000 ffffffff\n")
    got = metadata.gather(root, None, None, read_phys, page_size=4096)
    assert got.missing["vmcoreinfo"] == (
        "/sys/kernel/vmcoreinfo gives a note of 4294967295 bytes, not 1 to 4132; not read"
    )
    assert reads == []
    # VMCOREINFO_NOTE_SIZE with 4 KiB pages, as Debian's 6.1 prints it: read as given.
    (tmp_path / "sys/kernel/vmcoreinfo").write_text("0x0000000001234000 1024\n")
    got = metadata.gather(root, None, None, read_phys, page_size=4096)
    assert reads == [(0x1234000, 0x1024)]


def test_a_blob_larger_than_its_bound_is_recorded_missing(tmp_path, monkeypatch):
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/modules").write_bytes(b"m 1 0 - Live 0x0\n" * 100)
    monkeypatch.setitem(metadata.BLOB_LIMITS, "modules", 1000)
    got = metadata.gather(Sysroot(tmp_path), None, None, None)
    assert got.missing["modules"] == "/proc/modules is larger than 1000 bytes; not taken"
    assert "modules" not in got.blobs


def old_kcore(loads: list[tuple[int, int]]) -> bytes:
    """An ELF core like /proc/kcore before Linux 4.11: every p_paddr 0, no notes."""
    n = len(loads)
    ehdr = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 4, 62, 1, 0, 64, 0, 0, 64, 56, n, 0, 0, 0)
    data = 64 + n * 56
    phdrs = b"".join(
        struct.pack("<IIQQQQQQ", 1, 7, data + i * PAGE, vaddr, 0, size, size, PAGE)
        for i, (vaddr, size) in enumerate(loads)
    )
    return ehdr + phdrs


def test_old_kcore_with_many_equal_segments_is_classified_in_bounded_time(tmp_path):
    from collector.acquire.iomem import Range

    base = 0xFFFF880000000000
    # Two thousand RAM ranges of two pages each, four pages apart, and a struct page segment
    # of the same size for each: every segment pairs with every range.
    ram = [Range(0x100000 + i * 4 * PAGE, 0x100000 + i * 4 * PAGE + 2 * PAGE) for i in range(2048)]
    loads = [(base + r.start, r.size) for r in ram]
    loads += [(0xFFFFEA0000000000 + i * 2 * PAGE, 2 * PAGE) for i in range(2048)]
    assert len(loads) == MAX_OLD_LAYOUT_LOADS
    (tmp_path / "proc").mkdir()
    (tmp_path / "proc/kcore").write_bytes(old_kcore(loads))
    t0 = time.monotonic()
    with Kcore(tmp_path, ram=ram) as k:
        assert time.monotonic() - t0 < 5
        assert (k.layout, k.page_offset_base) == ("p_paddr=0", base)
        assert [s.paddr for s in k.segments if s.kind == "ram"] == [r.start for r in ram]
        assert k.coverage(0, 1 << 46) == ram
    (tmp_path / "proc/kcore").write_bytes(old_kcore([*loads, (0xFFFFFFFFC0000000, PAGE)]))
    with pytest.raises(CollectorError) as e:
        Kcore(tmp_path, ram=ram)
    assert str(e.value) == (
        "/proc/kcore: malformed ELF core: 4097 PT_LOAD segments without physical addresses "
        "(a kernel before 4.11 has two per RAM range; at most 4096 are accepted)"
    )
