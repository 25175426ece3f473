"""`collect plan --mem-usage` and `collect --skip free,zero` on real kernels, in a 1 GiB guest
with two CPUs whose RAM is mostly free.

Oracles: the guest's /proc/meminfo, /proc/kpageflags and /proc/kpagecount read right before
and right after the classification (tests/vm/free_pages.py), the per-CPU lists' own counts,
QEMU's pmemsave of all RAM taken with the guest stopped right before and right after the
skipping capture, and the analyses of a full capture of the same guest taken just before it.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from collector.image.reader import NativeImage
from collector.memory import Fate
from tests.vm.conftest import iomem_entries, session_guest, snapshot
from tools.vm.guest import Guest
from tools.vm.kernels import KERNEL_KEYS

pytestmark = pytest.mark.vm

PAGE = 4096
MEMORY_MIB = 1024
#: Two CPUs, as most machines have at least: BLAKE3 then hashes on both while the other
#: stages run, as it does on a real machine's cores.
CPUS = 2
PAGE_TABLES = Path(__file__).with_name("live_page_tables.py")
KPAGEFLAGS = Path(__file__).with_name("kpageflags.py")
FREE_PAGES = Path(__file__).with_name("free_pages.py")
SAMPLER = Path(__file__).with_name("sample_rss.py")
SKIPPABLE = struct.Struct("<II")
DESC_MAGIC = 0x184D2A51
DESC_HEAD = struct.Struct("<IQIIBQ")  # seq, paddr, RAM bytes, DATA size, flags, ns since start
STALE = (
    "python -c 'import os; b = bytearray(os.urandom(1 << 20)) * 600; "
    "print(sum(b[:: 1 << 20]))' > /dev/null"
)


def host_collect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args], capture_output=True, text=True, timeout=600
    )


@dataclass
class Skipped:
    guest: Guest
    usage: dict
    free_before: dict
    free_after: dict
    full: Path
    full_summary: dict
    full_seconds: float
    skip: Path
    skip_summary: dict
    skip_seconds: float
    qemu: dict[str, tuple[int, int, bytes]]
    pids_before: set[int]
    pids_after: set[int]
    #: System RAM ranges and QEMU's copies of them taken right before and right after the
    #: skipping capture, with the guest stopped
    ram_before: dict[tuple[int, int], Path]
    ram_after: dict[tuple[int, int], Path]
    page_tables: dict
    iomem: str
    #: the guest's /proc/kpageflags right after the skipping capture, one word per PFN
    kpageflags: Path

    @property
    def ram_pfns(self) -> list[tuple[int, int]]:
        spans = [(-(-s // PAGE), e // PAGE) for s, e in iomem_entries(self.iomem, "System RAM")]
        return [(lo, hi) for lo, hi in spans if hi > lo]


@pytest.fixture(scope="module", params=KERNEL_KEYS, ids=[f"linux-{k}" for k in KERNEL_KEYS])
def skipped(request: pytest.FixtureRequest) -> Iterator[Skipped]:
    for guest in session_guest(
        request.param, label=" (1 GiB, skip)", memory_mib=MEMORY_MIB, cpus=CPUS
    ):
        out = guest.out_dir / "skip"
        out.mkdir(exist_ok=True)
        g = guest.to_guest(out)
        iomem = guest.run("cat /proc/iomem").check().stdout
        # Free memory on a machine that has run a while holds what was there before: 600 MiB
        # of data a process wrote and freed, which a full capture must read and compress.
        guest.run(STALE).check()
        free_before = json.loads(guest.run(f"python {FREE_PAGES}").check().stdout)
        # collect's own memory (numpy, the parsed BTF) is not free while it classifies.
        guest.run(
            f"collect plan --profile x86_64 --mem-usage --json > {g}/usage.json & pid=$!; "
            f"python {SAMPLER} $pid {g}/usage-rss; wait $pid"
        ).check()
        usage = json.loads((out / "usage.json").read_text())
        rss = (out / "usage-rss").read_text().splitlines()
        usage["rss_anon"] = max(int(line.split()[1]) for line in rss) * 1024
        free_after = json.loads(guest.run(f"python {FREE_PAGES}").check().stdout)
        page_tables = json.loads(guest.run(f"python {PAGE_TABLES}", timeout=600).check().stdout)
        pids_before = {int(pid) for pid in snapshot(guest)["processes"]}
        times = {}
        summaries = {}
        # BLAKE3 for both: the stream hash covers the skipped pages' zeros too, and SHA-256,
        # serial and without the CPU's SHA instructions under emulation, would dominate both.
        ram = iomem_entries(iomem, "System RAM")
        for name, extra in (("full", ""), ("skip", "--skip free,zero")):
            if name == "skip":
                ram_before = save_ram(guest, ram, out / "before")
            t0 = time.monotonic()
            result = guest.run(
                f"collect --profile x86_64 --hash blake3 {extra} -o {g}/{name}.lime.zst --json",
                timeout=900,
            ).check()
            times[name] = time.monotonic() - t0
            summaries[name] = json.loads(result.stdout)
        ram_after = save_ram(guest, ram, out / "after")
        max_pfn = max(end for _, end in ram) // PAGE
        guest.run(f"python {KPAGEFLAGS} {g}/kpageflags.bin {max_pfn}").check()
        qemu = {}
        for what in ("Kernel code", "Kernel rodata"):
            (start, end), *_ = iomem_entries(iomem, what)
            qemu[what] = (start, end, qemu_bytes(ram_after, start, end))
        pids_after = {int(pid) for pid in snapshot(guest)["processes"]}
        yield Skipped(
            guest,
            usage,
            free_before,
            free_after,
            out / "full.lime.zst",
            summaries["full"],
            times["full"],
            out / "skip.lime.zst",
            summaries["skip"],
            times["skip"],
            qemu,
            pids_before,
            pids_after,
            ram_before,
            ram_after,
            page_tables,
            iomem,
            out / "kpageflags.bin",
        )


def save_ram(guest: Guest, ram: list[tuple[int, int]], prefix: Path) -> dict:
    """QEMU's copy of every System RAM range, the guest stopped meanwhile (one instant)."""
    saved = {}
    guest.qmp.stop()
    try:
        for start, end in ram:
            path = prefix.with_name(f"{prefix.name}-{start:x}.bin")
            guest.qmp.pmemsave(start, end - start, str(path))
            saved[(start, end)] = path
    finally:
        guest.qmp.cont()
    return saved


def qemu_bytes(saved: dict, start: int, end: int) -> bytes:
    for (lo, hi), path in saved.items():
        if lo <= start and end <= hi:
            with open(path, "rb") as f:
                f.seek(start - lo)
                return f.read(end - start)
    raise AssertionError(f"{start:#x}-{end:#x} is in no saved System RAM range")


def test_mem_usage_free_agrees_with_the_kernels_own_counts(skipped: Skipped) -> None:
    free = skipped.usage["groups"]["free"]["bytes"]
    memfree = [skipped.free_before["memfree"], skipped.free_after["memfree"]]
    # MemFree, read right before and right after, did not count collect's own anonymous
    # memory.
    seen = free + skipped.usage["rss_anon"]
    assert min(memfree) * 0.95 <= seen <= max(memfree) * 1.05, (free, seen, memfree)
    assert free > MEMORY_MIB * 0.5 * (1 << 20)  # most of the guest is free
    print(f"\nfree {free} bytes (+ collect's {skipped.usage['rss_anon']}), MemFree {memfree}")
    # Every page called free has no flag but PG_buddy and no mapping in /proc/kpageflags.
    loose = max(skipped.free_before["kpage_free"], skipped.free_after["kpage_free"])
    assert free <= loose * 1.05, (free, loose)
    assert skipped.usage["via"] == "/proc/kcore vmemmap segments"
    # The struct pages of 1 GiB are 16 MiB; nothing else of RAM is read but the per-CPU
    # lists' heads and the zones.
    assert skipped.usage["struct_page_bytes_read"] <= (MEMORY_MIB << 20) // PAGE * 64 + (1 << 20)


def test_mem_usage_walks_the_per_cpu_free_lists(skipped: Skipped) -> None:
    pcp = skipped.usage["per_cpu_lists"]
    seen = [skipped.free_before["pcp_count"], skipped.free_after["pcp_count"]]
    print(f"\nper-CPU lists: {pcp}; /proc/zoneinfo before and after: {seen}")
    # The lists change while they are walked: a list that breaks (a link NULL or poisoned
    # by a page just taken off it) is left there, with a note; any other note is a failure.
    assert [n for n in skipped.usage["notes"] if "per-CPU" not in n or "list" not in n] == []
    # What the walk found against what the lists said they held (pcp->count, read during
    # the same walk): lists that changed while they were walked add or lose pages, checked
    # again per chunk before anything is skipped. /proc/zoneinfo, read right before and
    # right after, shows the same counters at rest; collect's own allocations fill the
    # lists while it runs.
    assert 0.5 * pcp["count"] <= pcp["walked_pages"] <= 2 * pcp["count"]
    assert pcp["walked_pages"] > 256 and min(seen) > 0


def test_struct_pages_through_the_page_tables_agree_with_kcore(skipped: Skipped) -> None:
    # Where kcore is refused but /dev/mem allows RAM, the vmemmap is reached through the
    # kernel's page tables. No Debian kernel allows RAM through /dev/mem, so the guest
    # forces that walk over kcore's physical reads, and reads each chunk's struct pages
    # both ways, one right after the other.
    got = skipped.page_tables
    print(f"\n{got}")
    assert got["vmemmap_base"]["kcore"] == got["vmemmap_base"]["page tables"]
    assert got["struct_pages"] == sum(hi - lo for lo, hi in skipped.ram_pfns)
    # The few that differ changed between the two reads (a reference taken or dropped).
    assert got["equal"] >= got["struct_pages"] * 0.999, got["equal"]
    kcore, tables = got["classes"]["kcore"], got["classes"]["page tables"]
    assert kcore.keys() == tables.keys() and sum(kcore.values()) == sum(tables.values())
    for name, n in kcore.items():
        assert abs(tables[name] - n) <= max(64, n // 100), name
    # The struct pages twice each way, and the page tables on the way.
    reads = got["bytes_read"]
    assert reads["kcore"] <= reads["page tables"] <= reads["kcore"] + (4 << 20)


def ram_seconds(image: Path) -> float:
    """How long the capture spent on RAM, from its first chunk to its last: the window the
    image is smeared over (each DESC records when its chunk was queued)."""
    # The frames walked here, from the format's description, not through collector/image.
    data = image.read_bytes()
    times, pos = [], 0
    while pos + 8 <= len(data):
        magic, length = SKIPPABLE.unpack_from(data, pos)
        if magic & 0xFFFFFFF0 != 0x184D2A50:
            break
        if magic == DESC_MAGIC:
            *_, data_size, _flags, time_ns = DESC_HEAD.unpack_from(data, pos + 8)
            times.append(time_ns)
            pos += data_size
        pos += 8 + length
    assert len(times) > 200
    return (max(times) - min(times)) / 1e9


def test_skip_free_is_smaller_and_shorter(skipped: Skipped) -> None:
    full, skip = skipped.full_summary, skipped.skip_summary
    skipped_pages = skip["pages"]["skipped-free"]
    windows = ram_seconds(skipped.full), ram_seconds(skipped.skip)
    print(
        f"\nfull: {skipped.full.stat().st_size} bytes, {skipped.full_seconds:.1f} s in all, "
        f"RAM over {windows[0]:.1f} s; --skip free,zero: {skipped.skip.stat().st_size} bytes, "
        f"{skipped.skip_seconds:.1f} s in all, RAM over {windows[1]:.1f} s, {skipped_pages} "
        f"pages skipped, {skip['pages']['read-zero']} read-zero, classification "
        f"{skip['skip_seconds']} s"
    )
    assert skipped_pages * PAGE > MEMORY_MIB * 0.4 * (1 << 20)
    not_skipped = skip["pages"]["read"] + skip["pages"]["read-zero"]
    assert not_skipped + skipped_pages >= full["pages"]["read"] - 64
    assert skipped.skip.stat().st_size < skipped.full.stat().st_size
    # The smear window: from the first chunk read to the last. Under emulation both
    # captures are bound by BLAKE3 over the whole stream, the skipped pages' zeros included
    # (17 s a GiB on one emulated CPU against about 1 s on a real one), so on 6.1, whose kcore
    # reads are cheap here, skipping shortens the window by a tenth; on 6.12 by half. The
    # command as a whole also imports numpy and parses BTF first (seconds here).
    assert windows[1] < windows[0]


def test_blake3_images_verify_and_match_b3sum(skipped: Skipped) -> None:
    for image, summary in (
        (skipped.full, skipped.full_summary),
        (skipped.skip, skipped.skip_summary),
    ):
        stream = subprocess.run(["zstd", "-dc", str(image)], capture_output=True, check=True)
        b3 = subprocess.run(
            ["b3sum", "--no-names"], input=stream.stdout, capture_output=True, check=True
        )
        assert summary["stream_blake3"] == b3.stdout.decode().split()[0]
        result = host_collect("verify", str(image), "--json")
        assert result.returncode == 0, result.stdout
        assert json.loads(result.stdout)["stream_digest"] == summary["stream_blake3"]


def test_kernel_code_and_rodata_equal_qemus(skipped: Skipped) -> None:
    with NativeImage(skipped.skip) as img:
        for name, (start, end, qemu) in skipped.qemu.items():
            assert img.read(start, end - start) == qemu, name
            for p in range(start - start % PAGE, end, PAGE):
                lo, hi = max(p, start) - start, min(p + PAGE, end) - start
                zero = not any(qemu[lo:hi])
                assert img.fate(p).fate == (Fate.READ_ZERO if zero else Fate.READ), hex(p)


#: /proc/kpageflags bits (include/uapi/linux/kernel-page-flags.h)
KPF = {
    "uptodate": 1 << 3,
    "dirty": 1 << 4,
    "lru": 1 << 5,
    "slab": 1 << 7,
    "writeback": 1 << 8,
    "buddy": 1 << 10,
    "mmap": 1 << 11,
    "anon": 1 << 12,
    "swapbacked": 1 << 14,
    "pgtable": 1 << 26,
    "reserved": 1 << 32,
}


def what_it_is(flags: int) -> str:
    """What a page is to its kernel, from its /proc/kpageflags word, in the terms the test
    needs: ``file`` for page cache of a file (no process writes it without leaving it
    changed), else what the kernel or a process uses it for."""
    if flags & KPF["reserved"]:
        return "reserved"  # the memory map, per-CPU areas, boot-time allocations
    for name in ("slab", "pgtable", "buddy", "anon"):
        if flags & KPF[name]:
            return name
    if flags & KPF["swapbacked"]:
        return "shmem"
    if flags & (KPF["lru"] | KPF["uptodate"] | KPF["dirty"] | KPF["writeback"] | KPF["mmap"]):
        return "file"
    return "kernel or free"  # no flags: a kernel allocation, or a page on a per-CPU list


def test_every_page_read_is_qemus_unless_the_kernel_changed_it(skipped: Skipped) -> None:
    """QEMU saved all RAM with the guest stopped right before the capture and right after
    it. A page the two copies disagree on was changed while the capture ran: any of its
    states may be in the image. A page they agree on must be in the image as they have it,
    unless it changed and changed back meanwhile, which the capture itself causes: its read
    buffers (anonymous memory, freed at its exit, refilled with the same RAM's bytes in the
    same pages as the capture before), the slab objects and page-table entries it takes
    and releases, and the struct pages of all of these. The guest's /proc/kpageflags, read
    right after, tells those pages apart. A page of a file's page cache, of the kernel's
    code or rodata, or one that is zeros in the image and data in both copies, is none of
    them: there the image must match."""
    import numpy as np

    stable = changed = 0
    differ: list[tuple[int, int, bool]] = []  # stable pages the image does not match
    with NativeImage(skipped.skip) as img:
        readable = img.readable_ranges()
        for (lo, hi), before_path in skipped.ram_before.items():
            before = np.fromfile(before_path, dtype=np.uint8)
            after = np.fromfile(skipped.ram_after[(lo, hi)], dtype=np.uint8)
            for start, end in readable:
                a, b = max(start, lo), min(end, hi)
                # whole pages only: the sub-page ends of a range have no page to compare
                a, b = -(-a // PAGE) * PAGE, b // PAGE * PAGE
                for pos in range(a, b, 4 << 20):
                    stop = min(b, pos + (4 << 20))
                    got = np.frombuffer(img.read(pos, stop - pos), dtype=np.uint8)
                    got = got.reshape(-1, PAGE)
                    x = before[pos - lo : stop - lo].reshape(-1, PAGE)
                    y = after[pos - lo : stop - lo].reshape(-1, PAGE)
                    same = (x == y).all(axis=1)
                    mismatch = (got != y).sum(axis=1)
                    stable += int(same.sum())
                    changed += int((~same).sum())
                    for i in np.flatnonzero(same & (mismatch > 0)):
                        zeroed = not got[i].any() and bool(y[i].any())
                        differ.append((pos + int(i) * PAGE, int(mismatch[i]), zeroed))
    flags = np.fromfile(skipped.kpageflags, dtype=np.uint64)
    kinds: dict[str, list[int]] = {}
    for paddr, _, _ in differ:
        kinds.setdefault(what_it_is(int(flags[paddr // PAGE])), []).append(paddr)
    text = [
        s for name in ("Kernel code", "Kernel rodata") for s in iomem_entries(skipped.iomem, name)
    ]
    print(
        f"\n{stable} pages read that QEMU saw unchanged, {changed} changed during the capture; "
        f"{len(differ)} unchanged ones the image differs on, by what they are right after: "
        f"{ {k: len(v) for k, v in kinds.items()} }"
    )
    assert stable > 20_000
    assert kinds.get("file", []) == []
    assert [p for p, _, zeroed in differ if zeroed] == []
    assert [p for p, _, _ in differ if any(s <= p < e for s, e in text)] == []
    # The capture's own churn stays small beside what it read.
    assert len(differ) <= stable // 20


def analyze(image: Path, name: str) -> list[dict]:
    result = host_collect("analyze", str(image), name, "--format", "json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_analyses_equal_a_full_captures(skipped: Skipped) -> None:
    # Processes alive before both captures and after them: the same in both images.
    steady = skipped.pids_before & skipped.pids_after
    procs = {}
    for which in ("full", "skip"):
        rows = analyze(getattr(skipped, which), "pslist")
        procs[which] = {(r["pid"], r["ppid"], r["comm"]) for r in rows if r["pid"] in steady}
    assert procs["full"] == procs["skip"] and len(procs["full"]) == len(steady)
    assert analyze(skipped.full, "lsmod") == analyze(skipped.skip, "lsmod")
    # The log only grows: the full capture's records open the later one's.
    full_log, skip_log = (
        [{k: v for k, v in r.items() if k != "state"} for r in analyze(img, "dmesg")]
        for img in (skipped.full, skipped.skip)
    )
    assert full_log and skip_log[: len(full_log)] == full_log
    volatile = {"capture_time"}
    info = [
        {k: v for k, v in analyze(img, "sysinfo")[0].items() if k not in volatile}
        for img in (skipped.full, skipped.skip)
    ]
    assert info[0] == info[1]
