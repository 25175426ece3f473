"""makedumpfile's kdump-compressed dumps of a real capture read as images: a capture is
exported as an ELF core, Debian's makedumpfile compresses and filters it, and the reader must
give back the capture's bytes for every page the dump keeps, "excluded" for every page it
dropped, and the same analyses."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from collector.analyze import analyze_kernel
from collector.image.kdump import KdumpImage
from collector.image.open import open_image
from collector.kernel.kernel import Kernel
from collector.memory import Fate
from tests.vm.conftest import Capture, iomem_entries

pytestmark = pytest.mark.vm

PAGE = 4096


def collect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args], capture_output=True, text=True, timeout=600
    )


@dataclass
class Dump:
    path: Path
    level: int
    #: makedumpfile's own report (--message-level 16): counts of pages by why they went.
    report: dict[str, int]
    #: Pages of the ELF export's kernel-image PT_LOAD: the same RAM again at the kernel's
    #: virtual addresses, which makedumpfile counts among its "Original pages" a second time.
    kernel_segment_pages: int = 0


#: ``__START_KERNEL_map``: PT_LOADs at or above it map the kernel image, not the direct map.
START_KERNEL_MAP = 0xFFFFFFFF80000000


def _kernel_segment_pages(elf: Path) -> int:
    """Pages of the ELF64 core's PT_LOADs at kernel-image addresses (read from its program
    headers: e_phoff at 32, e_phnum at 56, 56-byte headers)."""
    with elf.open("rb") as f:
        head = f.read(64)
        (phoff,) = struct.unpack_from("<Q", head, 32)
        (phnum,) = struct.unpack_from("<H", head, 56)
        f.seek(phoff)
        table = f.read(56 * phnum)
    pages = 0
    for i in range(phnum):
        p_type, _flags, _offset, vaddr, _paddr, _filesz, memsz, _align = struct.unpack_from(
            "<IIQQQQQQ", table, 56 * i
        )
        if p_type == 1 and vaddr >= START_KERNEL_MAP:
            pages += memsz // PAGE
    return pages


def _makedumpfile(elf: Path, out: Path, *options: str) -> dict[str, int]:
    tool = shutil.which("makedumpfile")
    assert tool, "makedumpfile is not installed (.ci/install-debian-packages installs it)"
    # No vmlinux: makedumpfile finds mem_map and the page flags in VMCOREINFO alone.
    run = subprocess.run(
        [tool, *options, "--message-level", "31", str(elf), str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    text = run.stdout + run.stderr
    assert run.returncode == 0, text
    return {
        name.strip(): int(value, 16)
        for name, value in re.findall(r"^\s*([A-Za-z][A-Za-z -]+?)\s*:\s*(0x[0-9a-f]+)", text, re.M)
    }


@pytest.fixture(scope="module")
def dumps(capture: Capture) -> list[Dump]:
    out = capture.guest.out_dir / "kdump"
    out.mkdir(exist_ok=True)
    elf = out / "capture.elf"
    exported = collect("export", str(capture.image), "--to", "elf", "-o", str(elf), "--force")
    assert exported.returncode == 0, exported.stderr
    found = []
    for level in (31, 0):
        path = out / f"dump-d{level}.kdump"
        path.unlink(missing_ok=True)
        report = _makedumpfile(elf, path, "-c", "-d", str(level))
        found.append(Dump(path, level, report, _kernel_segment_pages(elf)))
    elf.unlink()
    return found


def _partial_pages(capture: Capture) -> set[int]:
    """Pages that System RAM covers only in part (a range ending mid-page, like 0x9fbff):
    makedumpfile puts them in its 1st bitmap and never in the 2nd."""
    out = set()
    for start, end in iomem_entries(capture.iomem, "System RAM"):
        if start % PAGE:
            out.add(start - start % PAGE)
        if end % PAGE:
            out.add(end - end % PAGE)
    return out


def test_kept_pages_are_the_captures_and_dropped_pages_are_excluded(capture, dumps):
    partial = _partial_pages(capture)
    with open_image(capture.image) as native:
        for dump in dumps:
            with KdumpImage(dump.path) as kd:
                assert kd.metadata["dump_level"] == dump.level
                assert kd.blob("vmcoreinfo") == native.blob("vmcoreinfo")
                read = zero = 0
                excluded = set()
                for start, end in kd.ranges():
                    for page in range(start, end, PAGE):
                        fate = kd.fate(page).fate
                        if fate == Fate.EXCLUDED:
                            excluded.add(page)
                            continue
                        assert fate == Fate.READ, (hex(page), fate)
                        data = kd.read(page, PAGE)
                        assert data == native.read(page, PAGE), hex(page)
                        read += 1
                        zero += not any(data)
                report = dump.report
                assert dump.kernel_segment_pages > 0
                assert read + len(excluded) + dump.kernel_segment_pages == report["Original pages"]
                if dump.level == 0:
                    assert excluded == partial
                else:
                    # Zero pages are counted as excluded by makedumpfile but stored as one
                    # shared zero page (its pd_zero), so they read back as zeros.
                    assert zero == report["Pages filled with zero"]
                    assert len(excluded) == (
                        report["Excluded pages"] - report["Pages filled with zero"] + len(partial)
                    )
                    assert report["Free pages"] > 0 and len(excluded) > report["Free pages"]


def _with_blobs(memory, donor):
    """The dump's memory with the capture's BTF, kallsyms and /proc/modules, which a
    kdump-compressed dump does not carry."""

    class WithBlobs:
        page_size = memory.page_size
        metadata = memory.metadata

        def ranges(self):
            return memory.ranges()

        def read(self, paddr, size):
            return memory.read(paddr, size)

        def fate(self, paddr):
            return memory.fate(paddr)

        def blob(self, name):
            return (donor if name in ("btf", "kallsyms", "modules") else memory).blob(name)

        def close(self):
            memory.close()

    return WithBlobs()


def _guest_processes(capture: Capture) -> set[tuple[int, str]]:
    """``(pid, comm)`` of every process /proc showed right before or after the capture."""
    return {
        (p["pid"], p["comm"])
        for snapshot in (capture.before, capture.after)
        for p in snapshot["processes"].values()
    }


#: What a record that differs from the capture's must say of itself (the tasks plugin's
#: notes for a page the image lacks, and for the torn records of a live capture).
EXPLAINED = (
    "was not captured: excluded",
    "torn record",
    "exited while the capture ran",
    "init_task.tasks breaks",
    "found walking init_task.tasks backwards",
)

#: The field that names a record, to pair a dump's records with the capture's.
KEYS = {"pslist": "pid", "lsmod": "name", "dmesg": "seq"}


@pytest.mark.parametrize("name", list(KEYS))
def test_analyses_match_the_capture(capture, dumps, kernel, name):
    native = analyze_kernel(kernel, name).records
    assert native
    for dump in dumps:
        with KdumpImage(dump.path) as kd:
            result = analyze_kernel(Kernel(_with_blobs(kd, kernel.memory)), name)
        records = result.records
        # Level 0 keeps every page; the printk ring buffer is never a page level 31 drops.
        if dump.level == 0 or name == "dmesg":
            assert records == native, (dump.level, name)
            assert result.error is None
            continue
        # At level 31, makedumpfile 1.7.2 (from 2022) drops some slab and module pages of
        # 6.12 that are in use, as free pages: it does not know the page types of 6.10 and
        # later ("mm: free up PG_slab"). Every record is then the capture's, or says what it
        # could not read; a shorter list says why it stopped.
        key = KEYS[name]
        by_key = {r[key]: r for r in native}
        seen = _guest_processes(capture)
        for record in records:
            if record == by_key.get(record[key]):
                continue
            note = str(record.get("note") or record.get("notes") or "")
            if note:
                # A record that differs says why: a page the dump dropped, or a process
                # torn or exited mid-capture that the walk met on its way.
                assert any(why in note for why in EXPLAINED), record
                continue
            # A capture is not atomic: a list broken by a process that exited mid-capture is
            # bridged, and with other pages missing the walk may bridge past other processes
            # than the capture's walk did (the guest's command loop runs `usleep` every
            # 50 ms). Such a process is a child of a process the guest listed itself.
            assert name == "pslist" and record["pid"] not in by_key, record
            assert record["ppid"] in {pid for pid, _comm in seen}, record
        said = " ".join(str(r.get("note") or r.get("notes") or "") for r in records)
        said += str(result.error or "")
        if records != native:
            assert "was not captured: excluded" in said, (name, said)


def test_every_command_reads_the_dump(capture, dumps):
    dump = dumps[0].path
    info = collect("info", str(dump))
    assert info.returncode == 0, info.stderr
    assert "(kdump-compressed)" in info.stdout and "not read: excluded " in info.stdout
    verify = collect("verify", str(dump))
    assert (verify.returncode, verify.stderr) == (
        7,
        f"collect: {dump}: unsupported: a kdump-compressed dump carries no checksums to "
        "verify; `collect info` lists its ranges and what is missing\n",
    )
    for args in (["translate", "init_task"], ["analyze", "sysinfo", "--format", "json"]):
        got = collect(args[0], str(dump), *args[1:])
        want = collect(args[0], str(capture.image), *args[1:])
        assert got.returncode == want.returncode == 0, got.stderr
        if args[0] == "translate":
            assert got.stdout == want.stdout
    lime = dump.with_suffix(".lime")
    export = collect("export", str(dump), "--to", "lime", "-o", str(lime), "--force")
    assert export.returncode == 0, export.stderr
    assert "excluded" in export.stderr  # excluded pages are counted, written as zeros
    with KdumpImage(dump) as kd, open_image(lime) as exported:
        for start, end in kd.ranges():
            for page in range(start, end, PAGE):
                if kd.fate(page).fate == Fate.READ:
                    assert exported.read(page, PAGE) == kd.read(page, PAGE)
    lime.unlink()
