"""`collect` on real Debian kernels: the plan, the image against QEMU's view, and every way a
capture can end (finished, killed, interrupted, disk full, refused output).

The guest's own files (iomem, kallsyms, BTF) and QEMU's pmemsave are the oracles; the image is
checked with the zstd CLI and a frame walk written here, as well as with the project's reader.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import json
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from collector.errors import ImageError
from collector.image.lime import iter_lime_ranges
from collector.image.reader import NativeImage
from collector.memory import Fate, PageNotCaptured
from tests.vm.conftest import Capture, iomem_entries
from tools.vm.guest import Guest, Job

pytestmark = pytest.mark.vm

PAGE = 4096
LOW_MEM_END = 0x100000  # x86 devmem_is_allowed(): RAM below 256 page frames reads as zeros
CAPTURE = "collect --profile x86_64"

# The image format's frames, written out here so the tests do not trust collector/image.
SKIPPABLE = struct.Struct("<II")
DESC_MAGIC = 0x184D2A51
DESC_HEAD = struct.Struct("<IQII")  # seq, paddr, RAM bytes, DATA frame size
ELF_NOTE = struct.Struct("<III")  # namesz, descsz, type


# -- helpers -------------------------------------------------------------------------------------


def host_collect(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `collect` on the host (image commands need no guest)."""
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def verify(image: Path) -> tuple[int, dict]:
    result = host_collect("verify", str(image), "--json")
    return result.returncode, json.loads(result.stdout)


def ram_ranges(iomem: str) -> list[tuple[int, int]]:
    return iomem_entries(iomem, "System RAM")


def pages_in(start: int, end: int) -> int:
    """Pages touched by ``[start, end)`` (a partial last page counts)."""
    return (end - 1) // PAGE - start // PAGE + 1


def subtract(ranges: list[tuple[int, int]], cut: int) -> list[tuple[int, int]]:
    """What is left of ``ranges`` from address ``cut`` on."""
    return [(max(s, cut), e) for s, e in ranges if e > cut]


class _HashingReader:
    """A pipe that hashes and counts what is read through it."""

    def __init__(self, raw) -> None:
        self.raw = raw
        self.name = "zstd -dc"
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int) -> bytes:
        data = self.raw.read(size)
        self.sha256.update(data)
        self.bytes += len(data)
        return data


def zstd_stream(image: Path, parse_lime: bool) -> tuple[list[tuple[int, int]], str, int]:
    """``zstd -dc IMAGE``, streamed: its LiME ranges (inclusive ends), SHA-256 and length."""
    proc = subprocess.Popen(["zstd", "-dc", str(image)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    reader = _HashingReader(proc.stdout)
    try:
        if parse_lime:
            ranges = [(r.start, r.end) for r in iter_lime_ranges(reader)]  # type: ignore[arg-type]
        else:
            ranges = []
            while reader.read(1 << 20):
                pass
    finally:
        proc.stdout.close()
        rc = proc.wait(60)
    assert rc == 0, f"zstd -dc {image} exited {rc}"
    return ranges, reader.sha256.hexdigest(), reader.bytes


def walk_chunks(image: Path) -> tuple[list[tuple[int, int]], int]:
    """Every complete chunk ``(paddr, end)`` found by walking frame headers, and where the
    walk stopped: the format's own recipe for an image cut short."""
    chunks = []
    with open(image, "rb") as f:
        size = f.seek(0, 2)
        offset = 0
        while offset + SKIPPABLE.size <= size:
            f.seek(offset)
            magic, length = SKIPPABLE.unpack(f.read(SKIPPABLE.size))
            assert magic & 0xFFFFFFF0 == 0x184D2A50, f"unexpected frame {magic:#x} at {offset}"
            end = offset + SKIPPABLE.size + length
            if magic == DESC_MAGIC:
                if offset + SKIPPABLE.size + DESC_HEAD.size > size:
                    break
                _, paddr, ram, data_size = DESC_HEAD.unpack(f.read(DESC_HEAD.size))
                if end + data_size > size:
                    break
                chunks.append((paddr, paddr + ram))
                end += data_size
            elif end > size:
                break
            offset = end
    return chunks, offset


def merged(chunks: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in chunks:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], e)
        else:
            out.append((s, e))
    return out


def note_desc(note: bytes, name: bytes) -> bytes:
    """The descriptor of an ELF note named ``name`` at the start of ``note``."""
    namesz, descsz, _ = ELF_NOTE.unpack_from(note)
    assert note[ELF_NOTE.size : ELF_NOTE.size + namesz].rstrip(b"\0") == name
    start = ELF_NOTE.size + (namesz + 3) // 4 * 4
    return note[start : start + descsz]


def kallsyms_text_base(kallsyms: bytes) -> int:
    for line in kallsyms.splitlines():
        addr, _, sym = line.split()[:3]
        if sym == b"_text":
            return int(addr, 16)
    raise AssertionError("no _text in kallsyms")


def describe_differences(
    got: bytes, want: bytes, paddr: int, capture: Capture, limit: int = 8
) -> str:
    """Where two views of kernel memory differ, as kernel symbols (for the failure message)."""
    code_start = iomem_entries(capture.iomem, "Kernel code")[0][0]
    text_base = kallsyms_text_base(capture.fact("kallsyms"))
    symbols = []
    for line in capture.fact("kallsyms").splitlines():
        addr, _, sym = line.split()[:3]
        symbols.append((int(addr, 16), sym.decode()))
    symbols.sort()
    keys = [a for a, _ in symbols]
    diffs = [i for i in range(min(len(got), len(want))) if got[i] != want[i]]
    lines = [f"{len(diffs)} bytes differ"]
    for i in diffs[:limit]:
        vaddr = text_base + (paddr + i - code_start)
        k = bisect.bisect_right(keys, vaddr) - 1
        where = f"{symbols[k][1]}+{vaddr - symbols[k][0]:#x}" if k >= 0 else "?"
        lines.append(
            f"  {paddr + i:#x} ({where}): image {got[i]:#04x}, qemu {want[i]:#04x}, "
            f"image {got[i - i % 16 : i - i % 16 + 16].hex()} qemu "
            f"{want[i - i % 16 : i - i % 16 + 16].hex()}"
        )
    return "\n".join(lines)


def assert_kernel_bytes(image: NativeImage, capture: Capture, name: str) -> int:
    """The image's bytes of iomem's ``name`` equal QEMU's pmemsave; returns bytes compared.

    Only complete chunks count (a cut image may hold part of the range)."""
    start, end, qemu = capture.qemu[name]
    compared = 0
    for lo, hi in image.captured_ranges():
        lo, hi = max(lo, start), min(hi, end)
        if lo >= hi:
            continue
        got = image.read(lo, hi - lo)
        want = qemu[lo - start : hi - start]
        assert got == want, f"{name}: " + describe_differences(got, want, lo, capture)
        compared += hi - lo
    return compared


def wait_for_image(
    job: Job, path: Path, ready: Callable[[NativeImage], bool], timeout: float = 240
) -> int:
    """Poll the image a running capture is writing until ``ready`` says so; chunks seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = job.poll()
        assert result is None, f"the capture ended before it could be interrupted: {result}"
        if path.exists() and path.stat().st_size > 0:
            try:
                with NativeImage(path) as img:
                    if ready(img):
                        return len(img.chunks)
            except ImageError:
                pass  # the header is still being written
        time.sleep(0.2)
    raise AssertionError(f"{path} did not reach the point to interrupt in {timeout} s")


def workdir(guest: Guest, name: str) -> tuple[Path, str]:
    host = guest.out_dir / name
    host.mkdir(exist_ok=True)
    return host, guest.to_guest(host)


# -- 1. the automatic plan -----------------------------------------------------------------------


def test_plan_reads_ram_through_kcore_because_strict_devmem_refuses_it(guest: Guest) -> None:
    result = guest.run(
        "cat /proc/iomem; echo =====; collect plan --profile x86_64 --json; echo =====; "
        "collect plan --profile x86_64"
    ).check()
    iomem, plan_json, plan_text = result.stdout.split("=====\n")
    print(plan_text)
    doc = json.loads(plan_json)
    ram = ram_ranges(iomem)
    low = [(s, e) for s, e in ram if e <= LOW_MEM_END]
    high = [(s, e) for s, e in ram if s >= LOW_MEM_END]
    assert low and high and len(low) + len(high) == len(ram), ram

    assert doc["strict_devmem"] == "detected"
    assert doc["strict_devmem_evidence"] == f"EPERM reading RAM at {high[0][0]:#x}"
    assert doc["sources"]["/dev/mem"] == "available"
    assert doc["sources"]["/proc/kcore"] == "available"
    assert doc["sources"]["/dev/crash"].startswith("not present on this kernel (ENOENT")
    probes = {(p["source"], p["start"]): p["result"] for p in doc["probes"]}
    assert probes[("/dev/mem", high[0][0])] == "EPERM"
    assert probes[("/dev/mem", low[0][0])] == "zeros"
    assert [(r["start"], r["end"]) for r in doc["ram_ranges"]] == ram

    # Independently: kcore maps whole page frames, so a range ending inside a page leaves its
    # tail to /dev/mem, whose low-RAM answer is the kernel's zeros.
    expected = []
    for s, e in low:
        whole = e // PAGE * PAGE
        expected.append((s, whole, "/proc/kcore", "read", False))
        if whole < e:
            expected.append((whole, e, "/dev/mem", "kernel-zero", True))
    expected += [(s, e, "/proc/kcore", "read", False) for s, e in high]
    entries = doc["entries"]
    got = [(x["start"], x["end"], x["source"], x["fate"], x["kernel_zero"]) for x in entries]
    assert got == expected
    low_zeros = "/dev/mem returns fabricated zeros for RAM below 1 MiB"
    for x in entries:
        if x["start"] >= LOW_MEM_END:
            assert x["reason"] == "/dev/mem refused (EPERM): CONFIG_STRICT_DEVMEM"
        elif x["kernel_zero"]:
            assert x["reason"].startswith("in no /proc/kcore segment (kcore maps whole pages")
            assert low_zeros in x["reason"]
        else:
            assert x["reason"].startswith(low_zeros)

    lines = plan_text.splitlines()
    assert lines[0] == "lockdown: none"  # securityfs is mounted in the guest
    assert lines[1] == f"strict /dev/mem: detected (EPERM reading RAM at {high[0][0]:#x})"
    assert "source /dev/mem: available" in lines
    assert "source /proc/kcore: available" in lines
    entry_lines = lines[-len(entries) :]
    for x, line in zip(entries, entry_lines, strict=True):
        source = x["source"] + (" (zeros)" if x["kernel_zero"] else "")
        words = line.split(None, 1)
        assert words[0] == f"{x['start']:#x}-{x['end'] - 1:#x}", line
        assert words[1].startswith(source), line
        assert line.endswith(" " + x["reason"]), line


# -- 2. kernel text and rodata against QEMU -------------------------------------------------------


def test_kernel_code_and_rodata_equal_qemus_physical_memory(capture: Capture) -> None:
    with NativeImage(capture.image) as img:
        for name in ("Kernel code", "Kernel rodata"):
            start, end, qemu = capture.qemu[name]
            assert len(qemu) == end - start
            assert assert_kernel_bytes(img, capture, name) == end - start, name


# -- 3. ranges, LiME stream, hashes and blobs ----------------------------------------------------


def test_image_holds_system_ram_as_lime_with_the_guests_metadata(capture: Capture) -> None:
    ram = ram_ranges(capture.iomem)
    with NativeImage(capture.image) as img:
        assert img.ranges() == ram
        assert img.captured_ranges() == ram
        assert img.missing_ranges() == []
        end = img.end
        assert end is not None and end["clean"] is True and end["stopped_by"] is None
        assert img.blob("btf") == capture.fact("btf")
        assert img.blob("kallsyms") == capture.fact("kallsyms")
        # VMCOREINFO: the blob (from /proc/kcore's note) equals the note in RAM at the
        # address /sys/kernel/vmcoreinfo gives (size in hex without 0x: kernel/ksysfs.c).
        addr_text, size_text = capture.fact("vmcoreinfo-location").split()
        note_addr, note_size = int(addr_text, 16), int(size_text, 16)
        in_image = img.read(note_addr, note_size)
        vmcoreinfo = img.blob("vmcoreinfo")
        # the page of the tail RAM /proc/kcore does not map is the kernel's zeros, not data
        for _, e in ram:
            if e % PAGE:
                assert img.fate(e - 1).fate == Fate.KERNEL_ZERO
                with pytest.raises(PageNotCaptured):
                    img.read(e - 1, 1)
    qemu_note = capture.guest.qmp.read_physical(note_addr, note_size, capture.guest.out_dir)
    assert in_image == qemu_note
    assert vmcoreinfo == note_desc(in_image, b"VMCOREINFO")
    release = capture.fact("uname-r").decode().strip()
    assert vmcoreinfo.startswith(f"OSRELEASE={release}\n".encode())

    lime, sha256, length = zstd_stream(capture.image, parse_lime=True)
    assert lime == [(s, e - 1) for s, e in ram]
    assert length == sum(32 + e - s for s, e in ram)
    assert sha256 == end["stream_sha256"] == capture.summary["stream_sha256"]
    assert length == end["stream_bytes"]
    # Page fates: every page read except each range's partial last page.
    tails = sum(1 for _, e in ram if e % PAGE)
    assert end["pages"] == {
        "read": sum(pages_in(s, e) for s, e in ram) - tails,
        "kernel-zero": tails,
        "unreadable": 0,
        "not-covered": 0,
        "excluded": 0,
        "missing": 0,
    }

    rc, report = verify(capture.image)
    assert (rc, report["status"], report["errors"], report["missing"]) == (0, "intact", [], [])
    assert report["stream_sha256"] == sha256
    print(f"LiME ranges {[(hex(s), hex(e)) for s, e in lime]}; pages {end['pages']}")
    print(f"zstd -dc | sha256 = {sha256} = END.stream_sha256; verify exit {rc}")


# -- 4. forced /dev/mem ----------------------------------------------------------------------------


def test_forced_devmem_records_every_page_it_was_refused(guest: Guest, capture: Capture) -> None:
    host, inside = workdir(guest, "devmem")
    image = host / "devmem.lime.zst"
    result = guest.run(
        f"{CAPTURE} --source /dev/mem -o {inside}/devmem.lime.zst --json", timeout=600
    )
    assert result.returncode == 0, result.stderr
    assert guest.alive(), "the guest stopped answering after reading /dev/mem"
    summary = json.loads(result.stdout)
    ram = ram_ranges(capture.iomem)
    low = sum(pages_in(s, e) for s, e in ram if e <= LOW_MEM_END)
    high = sum(pages_in(s, e) for s, e in ram if s >= LOW_MEM_END)
    expected = {
        "read": 0, "kernel-zero": low, "unreadable": high, "not-covered": 0, "excluded": 0,
        "missing": 0,
    }  # fmt: skip
    assert summary["pages"] == expected
    assert summary["unreadable_errnos"] == {str(errno.EPERM): high}
    assert summary["clean"] is True and summary["stopped_by"] is None
    assert summary["plan"]["forced_source"] == "/dev/mem"
    print(f"exit 0; pages {summary['pages']}; errnos {summary['unreadable_errnos']}")

    with NativeImage(image) as img:
        assert img.end is not None and img.end["clean"] is True
        assert img.captured_ranges() == ram
        counts: dict[tuple[Fate, int], int] = {}
        for run in img.fate_runs():
            counts[run.fate, run.errno] = counts.get((run.fate, run.errno), 0) + run.count
        assert counts == {(Fate.KERNEL_ZERO, 0): low, (Fate.UNREADABLE, errno.EPERM): high}
        code_start = capture.qemu["Kernel code"][0]
        for s, e in ram:
            for paddr in (s, e - 1, (s + e) // 2 // PAGE * PAGE):
                fate = img.fate(paddr)
                if s < LOW_MEM_END:
                    assert (fate.fate, fate.errno) == (Fate.KERNEL_ZERO, 0), hex(paddr)
                else:
                    assert (fate.fate, fate.errno) == (Fate.UNREADABLE, errno.EPERM), hex(paddr)
                with pytest.raises(PageNotCaptured):
                    img.read(paddr, 1)
        assert img.fate(code_start) == img.fate(ram[-1][0])
    rc, report = verify(image)
    assert (rc, report["errors"], report["missing"]) == (0, [], [])


# -- 5. SIGKILL ------------------------------------------------------------------------------------


def test_capture_killed_with_sigkill_is_readable_up_to_its_last_chunk(
    guest: Guest, capture: Capture
) -> None:
    host, inside = workdir(guest, "sigkill")
    image = host / "killed.lime.zst"
    code_start, code_end, _ = capture.qemu["Kernel code"]
    # Kernel code is followed by the rest of the kernel image (rodata, data, bss: tens of MiB)
    # wherever KASLR puts it, so the capture is still running once two chunks of code are in.
    want = (code_start, min(code_end, code_start + (8 << 20)))

    def covered(img: NativeImage) -> bool:
        return any(s <= want[0] and want[1] <= e for s, e in img.captured_ranges())

    # exec: the job's status comes when collect itself is gone, with every thread; a killed
    # thread may still be finishing its write to the share until then.
    job = guest.run_background(f"exec {CAPTURE} -o {inside}/killed.lime.zst --json")
    wait_for_image(job, image, covered)
    job.kill("KILL")
    assert job.wait(60).returncode == 128 + 9
    # What collect wrote before it died is in the guest's page cache; the share (cache=loose)
    # writes it back page by page in any order, so look at the file once it has all arrived.
    guest.run("sync").check()

    chunks, stop = walk_chunks(image)
    ram = ram_ranges(capture.iomem)
    cut = chunks[-1][1]
    assert merged(chunks) == [(s, min(e, cut)) for s, e in ram if s < cut]
    with NativeImage(image) as img:
        assert not img.indexed and img.end is None
        assert img.captured_ranges() == merged(chunks)
        assert img.missing_ranges() == subtract(ram, cut)
        assert img.blob("btf") == capture.fact("btf")
        assert assert_kernel_bytes(img, capture, "Kernel code") >= want[1] - want[0]
        assert_kernel_bytes(img, capture, "Kernel rodata")
        last = img.chunks[-1]
        assert len(img.read(last.paddr, last.ram_bytes)) == last.ram_bytes
        with pytest.raises(PageNotCaptured) as missing:
            img.read(cut, 1)
        assert missing.value.fate == Fate.MISSING
        assert img.fate(cut).fate == Fate.MISSING
    print(
        f"killed after {len(chunks)} chunks; frames walked to byte {stop} of {image.stat().st_size}"
    )

    rc, report = verify(image)
    assert (rc, report["status"], report["errors"]) == (3, "incomplete", [])
    if stop == image.stat().st_size:  # killed between two frames
        assert report["incomplete"] == ["the image ends without its END record (cut short)"]
    else:
        assert report["incomplete"][0].startswith("the image is cut short (")
    assert [tuple(m) for m in report["missing"]] == subtract(ram, cut)
    text = host_collect("verify", str(image))
    assert text.returncode == 3
    print(text.stdout)
    for s, e in subtract(ram, cut):
        assert f"missing: {s:#x}-{e - 1:#x}" in text.stdout
    info = host_collect("info", str(image), "--json")
    assert info.returncode == 0, info.stderr
    doc = json.loads(info.stdout)
    assert doc["complete"] is False and doc["clean_finish"] is None
    assert [tuple(m) for m in doc["missing_ranges"]] == subtract(ram, cut)
    text = host_collect("info", str(image))
    assert "state:    CUT SHORT" in text.stdout.splitlines()
    print("\n".join(x for x in text.stdout.splitlines() if x.startswith(("state", "missing"))))


# -- 6. SIGTERM and SIGINT ------------------------------------------------------------------------


@pytest.mark.parametrize(("signame", "status"), [("TERM", 143), ("INT", 130)])
def test_capture_interrupted_by_a_signal_ends_with_a_complete_image(
    guest: Guest, capture: Capture, signame: str, status: int
) -> None:
    host, inside = workdir(guest, f"sig{signame.lower()}")
    image = host / "interrupted.lime.zst"
    # exec: the signal reaches collect alone, and the job's status is collect's own.
    job = guest.run_background(f"exec {CAPTURE} -o {inside}/interrupted.lime.zst --json")
    wait_for_image(job, image, lambda img: len(img.chunks) >= 8)
    job.kill(signame)
    result = job.wait(120)
    assert result.returncode == status, result.stderr
    summary = json.loads(result.stdout)  # printed by collect: it exited, it was not killed
    assert summary["clean"] is False
    assert summary["stopped_by"] == f"interrupted by SIG{signame}"
    print(f"exit {result.returncode}; clean {summary['clean']}; {summary['stopped_by']}")

    ram = ram_ranges(capture.iomem)
    chunks, _ = walk_chunks(image)
    # The range the capture stopped in is finished with zero padding recorded as missing
    # (so `zstd -dc` stays LiME); ranges after it are absent.
    open_end = chunks[-1][1]
    open_range = next((s, e) for s, e in ram if s < open_end <= e)
    assert open_end == open_range[1]
    cut = open_end - summary["pages"]["missing"] * PAGE
    assert open_range[0] < cut < open_end and cut % PAGE == 0
    with NativeImage(image) as img:
        assert img.indexed, "an interrupted capture still ends with its index and seek table"
        assert img.end is not None
        assert (img.end["clean"], img.end["stopped_by"]) == (False, f"interrupted by SIG{signame}")
        assert img.end["chunks"] == len(chunks) == summary["chunks"]
        assert img.captured_ranges() == merged(chunks)
        assert img.missing_ranges() == subtract(ram, cut)
        assert img.fate(cut).fate == Fate.MISSING and img.fate(open_end - 1).fate == Fate.MISSING
        assert img.fate(cut - PAGE).fate == Fate.READ
        with pytest.raises(PageNotCaptured):
            img.read(cut, 8)
    # RAM the image announced is missing: verify says so, and why, with a non-zero status.
    rc, report = verify(image)
    assert (rc, report["status"], report["errors"]) == (3, "incomplete", [])
    assert report["incomplete"] == [f"the capture was interrupted by SIG{signame}"]
    assert [tuple(m) for m in report["missing"]] == subtract(ram, cut)
    text = host_collect("verify", str(image))
    assert text.returncode == 3, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].startswith(f"{image}: incomplete: {len(chunks)} chunks")
    assert f"incomplete: the capture was interrupted by SIG{signame}" in lines
    for s, e in subtract(ram, cut):
        assert f"missing: {s:#x}-{e - 1:#x}" in text.stdout
    print(text.stdout)
    # `zstd -dc` of any complete image is a LiME file (docs/image-format.md): every range the
    # capture started is whole, and its hash is the one the image records.
    lime, sha256, _ = zstd_stream(image, parse_lime=True)
    assert sha256 == summary["stream_sha256"]
    assert lime == [(s, e - 1) for s, e in ram if s < cut]


# -- 7. output to stdout -------------------------------------------------------------------------


def test_image_written_to_stdout_matches_the_one_written_to_a_file(
    guest: Guest, capture: Capture
) -> None:
    host, inside = workdir(guest, "stdout")
    image = host / "piped.lime.zst"
    result = guest.run(f"{CAPTURE} -o - --json > {inside}/piped.lime.zst", timeout=600)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stderr)  # with -o -, the summary goes to stderr
    # RAM elsewhere changes between the two captures; the kernel's text, rodata and the
    # metadata do not, so those must be identical.
    with NativeImage(image) as piped, NativeImage(capture.image) as filed:
        assert piped.indexed and piped.end is not None and piped.end["clean"] is True
        assert piped.ranges() == filed.ranges() == ram_ranges(capture.iomem)
        assert piped.captured_ranges() == filed.captured_ranges()
        for name in ("vmcoreinfo", "btf", "kallsyms"):
            assert piped.blob(name) == filed.blob(name), name
        for name in ("Kernel code", "Kernel rodata"):
            start, end, _ = capture.qemu[name]
            assert piped.read(start, end - start) == filed.read(start, end - start), name
            assert assert_kernel_bytes(piped, capture, name) == end - start
        end_record = piped.end
    lime, sha256, _ = zstd_stream(image, parse_lime=True)
    assert lime == [(s, e - 1) for s, e in ram_ranges(capture.iomem)]
    assert sha256 == end_record["stream_sha256"] == summary["stream_sha256"]
    rc, report = verify(image)
    assert (rc, report["status"], report["errors"]) == (0, "intact", [])


# -- 8. a full disk ----------------------------------------------------------------------------------


def test_full_disk_ends_with_one_line_and_a_truncated_valid_image(
    guest: Guest, capture: Capture
) -> None:
    small_mib = 24
    assert capture.image.stat().st_size > 2 * (small_mib << 20), "the tmpfs must be smaller"
    host, inside = workdir(guest, "fulldisk")
    result = guest.run(
        f"mkdir -p /tmp/small && mount -t tmpfs -o size={small_mib}m tmpfs /tmp/small || exit 99\n"
        f"{CAPTURE} -o /tmp/small/full.lime.zst > {inside}/stdout 2> {inside}/stderr\n"
        f"echo $? > {inside}/rc\n"
        f"cp /tmp/small/full.lime.zst {inside}/full.lime.zst\n"
        "umount /tmp/small",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    stderr = (host / "stderr").read_text()
    print(stderr)
    assert (host / "rc").read_text().strip() == "1"
    assert (host / "stdout").read_text() == ""
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert stderr.startswith(
        "collect: writing /tmp/small/full.lime.zst failed: No space left on device; "
    )
    assert "the image is valid up to its last complete chunk" in stderr

    image = host / "full.lime.zst"
    assert image.stat().st_size <= small_mib << 20
    ram = ram_ranges(capture.iomem)
    chunks, _ = walk_chunks(image)
    assert chunks, "the tmpfs took no chunk at all"
    cut = chunks[-1][1]
    with NativeImage(image) as img:
        assert img.end is None and not img.indexed
        assert img.captured_ranges() == merged(chunks)
        assert img.missing_ranges() == subtract(ram, cut)
        assert img.blob("kallsyms") == capture.fact("kallsyms")
    rc, report = verify(image)
    assert (rc, report["status"], report["errors"]) == (3, "incomplete", [])
    assert [tuple(m) for m in report["missing"]] == subtract(ram, cut)
    print(f"{image.stat().st_size} bytes, {len(chunks)} chunks; verify exit {rc}: {report}")


# -- 9. refusing to clobber or follow ---------------------------------------------------------


def test_existing_output_and_planted_symlinks_are_left_alone(guest: Guest) -> None:
    host, inside = workdir(guest, "clobber")
    (host / "existing").write_bytes(b"existing file\n")
    (host / "target").write_bytes(b"symlink target\n")
    (host / "link").symlink_to(f"{inside}/target")
    (host / "dangling").symlink_to(f"{inside}/never-created")
    cases = {
        "existing": "existing",
        "link": "link",
        "link-force": "link --force",
        "dangling-force": "dangling --force",
    }
    script = "\n".join(
        f"{CAPTURE} -o {inside}/{args} > {inside}/{case}.out 2> {inside}/{case}.err; "
        f"echo $? > {inside}/{case}.rc"
        for case, args in cases.items()
    )
    guest.run(script, timeout=600).check()
    messages = {
        "existing": f"collect: {inside}/existing already exists; use --force to replace it\n",
        "link": f"collect: {inside}/link is a symbolic link; refusing to follow it\n",
        "link-force": f"collect: {inside}/link is a symbolic link; refusing to follow it\n",
        "dangling-force": (
            f"collect: {inside}/dangling is a symbolic link; refusing to follow it\n"
        ),
    }
    for case in cases:
        got = (
            (host / f"{case}.rc").read_text().strip(),
            (host / f"{case}.out").read_text(),
            (host / f"{case}.err").read_text(),
        )
        print(case, got)
        assert got == ("1", "", messages[case]), case
    assert (host / "existing").read_bytes() == b"existing file\n"
    assert (host / "target").read_bytes() == b"symlink target\n"
    assert (host / "link").is_symlink() and (host / "dangling").is_symlink()
    assert not (host / "never-created").exists()
    assert sorted(
        p.name for p in host.iterdir() if not p.name.endswith((".rc", ".out", ".err"))
    ) == [
        "dangling",
        "existing",
        "link",
        "target",
    ]


def test_force_replaces_a_file_another_user_owns_with_a_new_private_image(guest: Guest) -> None:
    """--force over a 0666 file of another user: a new 0600 root-owned file holds the image,
    and the old file, reached through its other hard link, is untouched (on the guest's tmpfs,
    so the guest kernel's own rename, link and chmod are the judges)."""
    host, inside = workdir(guest, "force")
    stat = "stat -c '%a %u %g %i %h'"
    result = guest.run(
        "mkdir -p /tmp/force && mount -t tmpfs -o size=64m tmpfs /tmp/force || exit 99\n"
        "cd /tmp/force\n"
        "printf 'old file\\n' > mem.lime.zst && chmod 0666 mem.lime.zst\n"
        "chown 4321:4321 mem.lime.zst && ln mem.lime.zst other-name\n"
        f"{stat} mem.lime.zst > {inside}/before\n"
        f"cat /proc/iomem > {inside}/iomem\n"
        # RAM above 16 MiB is excluded (recorded, not read) so the image fits the guest's tmpfs.
        f"{CAPTURE} --exclude 0x1000000-0xfffffffffff -o /tmp/force/mem.lime.zst --force "
        f"> {inside}/stdout 2> {inside}/stderr\n"
        f"echo $? > {inside}/rc\n"
        f"ls -ln /tmp/force > {inside}/ls\n"
        f"{stat} mem.lime.zst > {inside}/after && {stat} other-name > {inside}/other-stat\n"
        f"cat other-name > {inside}/other && cp mem.lime.zst {inside}/mem.lime.zst\n"
        "cd / && umount /tmp/force",
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    listing = (host / "ls").read_text()
    print(listing)
    assert ((host / "rc").read_text(), (host / "stderr").read_text()) == ("0\n", "")
    mode, uid, gid, inode, links = (host / "before").read_text().split()
    assert (mode, uid, gid, links) == ("666", "4321", "4321", "2")
    new = (host / "after").read_text().split()
    assert new[:3] == ["600", "0", "0"] and new[3] != inode and new[4] == "1"
    assert (host / "other-stat").read_text().split() == ["666", "4321", "4321", inode, "1"]
    assert (host / "other").read_text() == "old file\n"
    names = sorted(line.split()[-1] for line in listing.splitlines()[1:])
    assert names == ["mem.lime.zst", "other-name"], "no temporary file is left behind"
    image = host / "mem.lime.zst"
    rc, report = verify(image)
    assert (rc, report["status"]) == (0, "intact")
    with NativeImage(image) as img:
        assert img.ranges() == ram_ranges((host / "iomem").read_text())
        assert img.end["clean"] is True
