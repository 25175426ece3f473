"""The per-range plan on fake hosts, and the host facts it rests on.

Expected entries are worked out by hand from the fake's iomem (IOMEM_GUEST):
System RAM 0x1000-0x9fbff, 0x100000-0x5fffff and 0x100000000-0x1001fffff; kcore serves
whole pages, so its first segment ends at 0x9efff.
"""

from __future__ import annotations

import errno
import json
import os

import pytest

from collector.acquire import host, sources
from collector.acquire.iomem import Range, parse_range
from collector.acquire.plan import make_plan
from collector.errors import CollectorError
from collector.memory import Fate
from tests.acquire.fakehost import IOMEM_NESTED, PAGE, FakeHost

MEM, KCORE, CRASH = "/dev/mem", "/proc/kcore", "/dev/crash"
RAM = [
    Range(0x1000, 0x9FC00, "System RAM"),
    Range(0x100000, 0x600000, "System RAM"),
    Range(0x100000000, 0x100200000, "System RAM"),
]
NO_CRASH = "not present on this kernel (ENOENT; the crash driver is not loaded)"


def summary(plan) -> list[tuple]:
    return [(e.start, e.end, e.source, e.fate, e.kernel_zero) for e in plan.entries]


def check_cover(plan) -> None:
    """Every byte of every selected range is in exactly one entry; inner cuts are on pages."""
    entries = iter(plan.entries)
    for idx, r in enumerate(plan.ram_ranges):
        pos = r.start
        while pos < r.end:
            e = next(entries)
            assert e.start == pos and e.range_index == idx
            assert e.end <= r.end
            if e.end != r.end:
                assert e.end % plan.page_size == 0
            pos = e.end
    assert next(entries, None) is None


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- automatic choice -----------------------------------------------------------------------


def test_strict_host_reads_ram_through_kcore(tmp_path):
    fake = FakeHost(tmp_path, strict_devmem=True)
    fake.write(0x9F000, b"the sub-page tail holds data")
    with fake, make_plan(fake.sysroot, RAM, [], None) as plan:
        assert summary(plan) == [
            (0x1000, 0x9F000, KCORE, Fate.READ, False),
            (0x9F000, 0x9FC00, MEM, Fate.KERNEL_ZERO, True),
            (0x100000, 0x600000, KCORE, Fate.READ, False),
            (0x100000000, 0x100200000, KCORE, Fate.READ, False),
        ]
        reasons = [e.reason for e in plan.entries]
        assert reasons[0].startswith("/dev/mem returns fabricated zeros for RAM below 1 MiB")
        assert reasons[1].startswith("in no /proc/kcore segment (kcore maps whole pages only)")
        assert reasons[2] == reasons[3] == "/dev/mem refused (EPERM): CONFIG_STRICT_DEVMEM"
        assert plan.strict_devmem == "detected"
        assert plan.strict_devmem_evidence == "EPERM reading RAM at 0x100000"
        assert plan.sources_tried == {MEM: "available", KCORE: "available", CRASH: NO_CRASH}
        assert plan.lockdown == "none"
        assert plan.ram_ranges == RAM
        check_cover(plan)
        # What the entries read is the fake's RAM, and the kernel's zeros where it says so.
        for e in plan.entries:
            data = plan.source(e.source).read(e.start, e.size)
            if e.kernel_zero:
                assert data == bytes(e.size) != fake.ram_bytes(e.start, e.end)
            else:
                assert data == fake.ram_bytes(e.start, e.end)


def test_low_ram_zeros_are_told_apart_by_kcore(tmp_path):
    fake = FakeHost(tmp_path, strict_devmem=True)
    fake.write(0x1000, b"\x01" * 8)
    low = [RAM[0]]  # nothing above 1 MiB selected: no EPERM to learn from
    with fake, make_plan(fake.sysroot, low, [], None) as plan:
        assert summary(plan) == [
            (0x1000, 0x9F000, KCORE, Fate.READ, False),
            (0x9F000, 0x9FC00, MEM, Fate.KERNEL_ZERO, True),
        ]
        assert plan.strict_devmem == "detected"
        assert plan.strict_devmem_evidence == "/dev/mem zeros at 0x1000 where /proc/kcore has data"
        assert [(p.source, p.start, p.size, p.result) for p in plan.probes] == [
            (MEM, 0x1000, PAGE, "zeros"),
            (KCORE, 0x1000, PAGE, "data"),
        ]


def test_low_ram_zeros_with_the_kernel_config_as_witness(tmp_path):
    fake = FakeHost(tmp_path, strict_devmem=True, kernel_config=True)
    fake.write(0x1000, bytes(PAGE))  # a real zero page: kcore cannot tell the difference
    with fake, make_plan(fake.sysroot, [RAM[0]], [], None) as plan:
        assert plan.strict_devmem == "detected"
        assert plan.strict_devmem_evidence == "CONFIG_STRICT_DEVMEM=y in /proc/config.gz"
        assert summary(plan)[0] == (0x1000, 0x9F000, KCORE, Fate.READ, False)
        assert plan.entries[0].reason.startswith("/dev/mem returns fabricated zeros")


def test_low_zeros_nothing_can_check_are_read_and_flagged(tmp_path):
    # Only low RAM selected, no kcore, no config: nothing tells /dev/mem's zeros from real ones.
    with (
        FakeHost(tmp_path, kcore=False) as fake,
        make_plan(fake.sysroot, [RAM[0]], [], None) as plan,
    ):
        assert summary(plan) == [(0x1000, 0x9FC00, MEM, Fate.READ, False)]
        assert plan.entries[0].reason == (
            "/proc/kcore not present on this kernel (ENOENT); "
            "/dev/mem returned zeros that may be fabricated (strict /dev/mem unknown)"
        )
        assert plan.strict_devmem == "unknown"


def test_sub_page_tail_is_not_covered_when_devmem_is_locked_down(tmp_path):
    with (
        FakeHost(tmp_path, lockdown="integrity") as fake,
        make_plan(fake.sysroot, RAM, [], None) as plan,
    ):
        assert summary(plan) == [
            (0x1000, 0x9F000, KCORE, Fate.READ, False),
            (0x9F000, 0x9FC00, None, Fate.NOT_COVERED, False),
            (0x100000, 0x600000, KCORE, Fate.READ, False),
            (0x100000000, 0x100200000, KCORE, Fate.READ, False),
        ]
        assert plan.entries[1].reason == (
            "in no /proc/kcore segment (kcore maps whole pages only); "
            "/dev/mem refused by lockdown (integrity)"
        )
        assert plan.entries[0].reason == "/dev/mem refused by lockdown (integrity)"
        assert plan.lockdown == "integrity"
        assert plan.strict_devmem == "unknown"
        assert plan.sources_tried[MEM] == "refused by lockdown (integrity)"
        assert all(not r.spans for r in fake.reads)  # kcore headers only: no RAM probed


def test_sub_page_tail_from_devcrash(tmp_path):
    with (
        FakeHost(tmp_path, lockdown="integrity", crash=True) as fake,
        make_plan(fake.sysroot, RAM, [], None) as plan,
    ):
        assert summary(plan)[:2] == [
            (0x1000, 0x9F000, KCORE, Fate.READ, False),
            (0x9F000, 0x9FC00, CRASH, Fate.READ, False),
        ]
        assert plan.source(CRASH).read(0x9F000, 0xC00) == fake.ram_bytes(0x9F000, 0x9FC00)


def test_non_strict_host_prefers_devmem(tmp_path):
    with (
        FakeHost(tmp_path, strict_devmem=False) as fake,
        make_plan(fake.sysroot, RAM, [], None) as plan,
    ):
        assert summary(plan) == [
            (0x1000, 0x9FC00, MEM, Fate.READ, False),
            (0x100000, 0x600000, MEM, Fate.READ, False),
            (0x100000000, 0x100200000, MEM, Fate.READ, False),
        ]
        assert {e.reason for e in plan.entries} == {"/dev/mem readable"}
        assert plan.strict_devmem == "not detected"
        # High ranges first (their verdict decides low RAM), a second probe in the middle of
        # ranges over 1 MiB, one page each.
        assert [(p.source, p.start, p.size) for p in plan.probes] == [
            (MEM, 0x100000, PAGE),
            (MEM, 0x380000, PAGE),
            (MEM, 0x100000000, PAGE),
            (MEM, 0x100100000, PAGE),
            (MEM, 0x1000, PAGE),
        ]
        for e in plan.entries:
            assert plan.source(e.source).read(e.start, e.size) == fake.ram_bytes(e.start, e.end)


def test_nested_ram_on_a_strict_host(tmp_path):
    # IOMEM_NESTED: RAM 0x1000-0x9efff, 0x100000-0x2fffff, kmem 0x180000000-0x1801fffff,
    # virtio_mem 0x10000000000-0x100000fffff; all of it page-aligned, so kcore covers all.
    ram = [
        Range(0x1000, 0x9F000, "System RAM"),
        Range(0x100000, 0x300000, "System RAM"),
        Range(0x180000000, 0x180200000, "System RAM (kmem)"),
        Range(0x10000000000, 0x10000100000, "System RAM (virtio_mem)"),
    ]
    with (
        FakeHost(tmp_path, iomem=IOMEM_NESTED) as fake,
        make_plan(fake.sysroot, ram, [], None) as plan,
    ):
        assert summary(plan) == [(r.start, r.end, KCORE, Fate.READ, False) for r in ram]


def test_old_kcore_layout_gives_the_same_plan(tmp_path):
    with (
        FakeHost(tmp_path, kcore_layout="p_paddr=0") as fake,
        make_plan(fake.sysroot, RAM, [], None) as plan,
    ):
        assert summary(plan) == [
            (0x1000, 0x9F000, KCORE, Fate.READ, False),
            (0x9F000, 0x9FC00, MEM, Fate.KERNEL_ZERO, True),
            (0x100000, 0x600000, KCORE, Fate.READ, False),
            (0x100000000, 0x100200000, KCORE, Fate.READ, False),
        ]
        assert plan.to_json()["kcore"]["layout"] == "p_paddr=0"


# -- forced sources -------------------------------------------------------------------------


def test_forced_devmem_on_a_strict_host(tmp_path):
    with (
        FakeHost(tmp_path, strict_devmem=True) as fake,
        make_plan(fake.sysroot, RAM, [], "mem") as plan,
    ):
        assert summary(plan) == [
            (0x1000, 0x9FC00, MEM, Fate.KERNEL_ZERO, True),
            (0x100000, 0x600000, MEM, Fate.READ, False),
            (0x100000000, 0x100200000, MEM, Fate.READ, False),
        ]
        assert plan.forced_source == MEM
        assert plan.entries[1].reason == (
            "forced source /dev/mem; /dev/mem refused (EPERM): CONFIG_STRICT_DEVMEM: "
            "its pages will be recorded unreadable"
        )
        assert plan.sources_tried[KCORE] == "not tried (forced source /dev/mem)"
        assert {r.file for r in fake.reads} == {"mem"}
        with pytest.raises(OSError) as info:
            plan.source(MEM).read(0x100000, PAGE)
        assert info.value.errno == errno.EPERM


def test_forced_kcore_leaves_the_tail_uncovered(tmp_path):
    with (
        FakeHost(tmp_path) as fake,
        make_plan(fake.sysroot, RAM, [], "/proc/kcore") as plan,
    ):
        assert summary(plan) == [
            (0x1000, 0x9F000, KCORE, Fate.READ, False),
            (0x9F000, 0x9FC00, None, Fate.NOT_COVERED, False),
            (0x100000, 0x600000, KCORE, Fate.READ, False),
            (0x100000000, 0x100200000, KCORE, Fate.READ, False),
        ]
        assert all(r.file == "kcore" and not r.spans for r in fake.reads)  # headers only


def test_forced_crash(tmp_path):
    with (
        FakeHost(tmp_path, crash=True) as fake,
        make_plan(fake.sysroot, RAM, [], "crash") as plan,
    ):
        assert summary(plan) == [(r.start, r.end, CRASH, Fate.READ, False) for r in RAM]


def test_forced_source_that_cannot_open(tmp_path):
    with FakeHost(tmp_path, lockdown="integrity") as fake:
        with pytest.raises(CollectorError) as info:
            make_plan(fake.sysroot, RAM, [], "mem")
        assert str(info.value) == "/dev/mem: refused by lockdown (integrity)"


# -- no source ------------------------------------------------------------------------------


def test_no_source_at_all(tmp_path):
    with FakeHost(tmp_path, devmem=False, kcore=False) as fake:
        with pytest.raises(CollectorError) as info:
            make_plan(fake.sysroot, RAM, [], None)
        assert str(info.value) == (
            "no readable source: /dev/mem: not present on this kernel (ENOENT); "
            f"/proc/kcore: not present on this kernel (ENOENT); /dev/crash: {NO_CRASH}"
        )


def test_lockdown_confidentiality_is_a_clear_error(tmp_path):
    with FakeHost(tmp_path, lockdown="confidentiality") as fake:
        with pytest.raises(CollectorError) as info:
            make_plan(fake.sysroot, RAM, [], None)
        assert str(info.value) == (
            "no readable source: /dev/mem: refused by lockdown (confidentiality); "
            f"/proc/kcore: refused by lockdown (confidentiality); /dev/crash: {NO_CRASH}"
        )


def test_strict_devmem_without_kcore(tmp_path):
    before = fds()
    with FakeHost(tmp_path, kcore=False) as fake:
        with pytest.raises(CollectorError) as info:
            make_plan(fake.sysroot, RAM, [], None)
        assert str(info.value) == (
            "no readable source: /dev/mem: refused for every RAM page probed "
            "(EPERM reading RAM at 0x100000); /proc/kcore: not present on this kernel (ENOENT); "
            f"/dev/crash: {NO_CRASH}"
        )
    assert fds() == before  # the failed plan closed what it opened


# -- exclusions, named ranges, and reading nothing outside the selection ---------------------


def test_excluded_pages_are_planned_and_never_read(tmp_path):
    excluded = [Range(0x1000, 0x3000), Range(0x100000, 0x101000), Range(0x200000, 0x201000)]
    with (
        FakeHost(tmp_path, strict_devmem=False) as fake,
        make_plan(fake.sysroot, RAM, excluded, None) as plan,
    ):
        assert summary(plan)[:6] == [
            (0x1000, 0x3000, None, Fate.EXCLUDED, False),
            (0x3000, 0x9FC00, MEM, Fate.READ, False),
            (0x100000, 0x101000, None, Fate.EXCLUDED, False),
            (0x101000, 0x200000, MEM, Fate.READ, False),
            (0x200000, 0x201000, None, Fate.EXCLUDED, False),
            (0x201000, 0x600000, MEM, Fate.READ, False),
        ]
        assert plan.excluded == excluded
        check_cover(plan)
        allowed = [(r.start, r.end) for r in Range(0, 1 << 40).subtract(excluded)]
        fake.assert_no_read_outside(allowed)
        assert fake.bytes_read() > 0


@pytest.mark.parametrize("strict", [True, False])
def test_nothing_outside_the_selection_is_read(tmp_path, strict):
    fake = FakeHost(tmp_path, strict_devmem=strict)
    fake.write(0x2000, b"\x01")
    selected = [
        Range(0x2000, 0x5000),
        Range(0x180000, 0x181800),
        Range(0x300000, 0x500000),
        Range(0x100001000, 0x100002000),
    ]
    with fake, make_plan(fake.sysroot, selected, [], None) as plan:
        check_cover(plan)
        fake.assert_no_read_outside([(r.start, r.end) for r in selected])
        # A page or two of /dev/mem per range, plus one kcore page for the low RAM check.
        assert fake.bytes_read("mem") <= 2 * PAGE * len(selected)
        assert fake.bytes_read("kcore") <= PAGE


def test_named_range_outside_ram_reads_through_devmem_unprobed(tmp_path):
    rom = parse_range("rom=0xf0000-0xfffff")
    with (
        FakeHost(tmp_path) as fake,
        make_plan(fake.sysroot, [RAM[0], rom, RAM[1]], [], None) as plan,
    ):
        rom_entries = [e for e in plan.entries if e.range_index == 1]
        assert [(e.start, e.end, e.source, e.fate) for e in rom_entries] == [
            (0xF0000, 0x100000, MEM, Fate.READ)
        ]
        assert rom_entries[0].reason == "named range outside System RAM: /dev/mem"
        fake.assert_no_read_outside(fake.ram_ranges)  # planning did not touch it
        fake.allow(0xF0000, 0x100000)
        assert plan.source(MEM).read(0xF0000, 4) == b"\x55\xaa\x55\xaa"


def test_bad_ranges_are_refused(tmp_path):
    with FakeHost(tmp_path) as fake:
        with pytest.raises(CollectorError, match="overlap"):
            make_plan(fake.sysroot, [Range(0x1000, 0x3000), Range(0x2000, 0x4000)], [], None)
        with pytest.raises(CollectorError, match="no physical ranges"):
            make_plan(fake.sysroot, [], [], None)
        with pytest.raises(CollectorError) as info:
            make_plan(fake.sysroot, RAM, [], "kmem")
        assert info.value.exit_code == 2


def test_plan_json(tmp_path):
    with FakeHost(tmp_path) as fake, make_plan(fake.sysroot, RAM, [], None) as plan:
        data = json.loads(json.dumps(plan.to_json()))
    assert data["entries"][1] == {
        "start": 0x9F000,
        "end": 0x9FC00,
        "range": "0x9f000-0x9fbff",
        "source": MEM,
        "fate": "kernel-zero",
        "kernel_zero": True,
        "reason": plan.entries[1].reason,
    }
    assert data["ram_ranges"][0] == {
        "start": 0x1000,
        "end": 0x9FC00,
        "range": "0x1000-0x9fbff",
        "name": "System RAM",
    }
    assert data["kcore"] == {
        "layout": "p_paddr",
        "page_offset_base": "0xffff8dd880000000",
        "vmcoreinfo": True,
    }
    assert (data["lockdown"], data["strict_devmem"], data["page_size"]) == (
        "none",
        "detected",
        4096,
    )
    assert data["sources"][CRASH] == NO_CRASH
    assert len(plan.lines()) == 4 and "/dev/mem (zeros)" in plan.lines()[1]


def test_plan_close_releases_descriptors(tmp_path):
    with FakeHost(tmp_path, crash=True) as fake:
        before = fds()
        plan = make_plan(fake.sysroot, RAM, [], None)
        assert fds() == before + 3
        plan.close()
        assert fds() == before


# -- host facts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "state"),
    [
        ("[none] integrity confidentiality\n", "none"),
        ("none [integrity] confidentiality\n", "integrity"),
        ("none integrity [confidentiality]\n", "confidentiality"),
        ("none integrity confidentiality\n", "unknown"),
        ("[sideways]\n", "unknown"),
    ],
)
def test_lockdown_state(tmp_path, text, state):
    path = tmp_path / "sys" / "kernel" / "security"
    path.mkdir(parents=True)
    (path / "lockdown").write_text(text)
    assert host.lockdown_state(tmp_path) == state


def test_lockdown_absent(tmp_path):
    assert host.lockdown_state(tmp_path) == "absent"


def test_host_identity_and_cpu(tmp_path):
    with FakeHost(tmp_path, check_reads=False) as fake:
        (fake.root / "etc" / "machine-id").unlink()
        ident = host.host_identity(fake.sysroot)
        assert ident["hostname"] == "fakehost"
        assert ident["boot_id"] == FakeHost.boot_id
        assert ident["cmdline"] == FakeHost.cmdline
        assert ident["uname"] == {
            "sysname": "Linux",
            "nodename": "fakehost",
            "release": "6.1.0-fake-amd64",
            "version": "#1 SMP PREEMPT_DYNAMIC Debian 6.1.0-fake",
            "machine": "x86_64",
        }
        assert ident["machine_id"] is None
        assert ident["missing"] == {"machine_id": "/etc/machine-id: No such file or directory"}
        assert host.cpu_flags(fake.sysroot) == sorted(FakeHost.cpu_flags.split())
        assert host.machine(fake.sysroot) == "x86_64"
        info = sources.live_vmcoreinfo(fake.sysroot)
        assert info is not None and info.osrelease == "6.1.0-fake-amd64"
    json.dumps(ident)
    assert host.cpu_flags(tmp_path / "nowhere") == []


def test_require_root(tmp_path, monkeypatch):
    host.require_root(tmp_path)  # a fake host needs no privileges
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    host.require_root(tmp_path)
    with pytest.raises(CollectorError) as info:
        host.require_root()
    assert str(info.value) == (
        "collect must run as root (reading physical memory needs CAP_SYS_RAWIO)"
    )
