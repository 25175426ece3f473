"""drgn's own helpers on real captures, through collector.interop.drgn (no DWARF), against the
guest's /proc/<pid>, /proc/modules and /dev/kmsg."""

from __future__ import annotations

import base64
import zlib
from typing import Any

import numpy as np
import pytest

from tests.vm.conftest import KMSG_MARKER, Capture
from tests.vm.helpers.conftest import stable_processes

pytestmark = pytest.mark.vm

drgn = pytest.importorskip("drgn")

from drgn.helpers.linux.mm import decode_page_flags, pfn_to_page  # noqa: E402
from drgn.helpers.linux.module import for_each_module  # noqa: E402
from drgn.helpers.linux.pid import for_each_task  # noqa: E402
from drgn.helpers.linux.printk import get_dmesg, get_printk_records  # noqa: E402

from collector.interop.drgn import program  # noqa: E402

#: PF_WQ_WORKER and PF_KTHREAD (include/linux/sched.h): a workqueue worker, a kernel thread.
PF_WQ_WORKER = 0x00000020
PF_KTHREAD = 0x00200000
#: include/uapi/linux/kernel-page-flags.h: KPF_NOPAGE, and KPF_RESERVED (PG_reserved).
KPF_NOPAGE = 20
KPF_RESERVED = 32
#: TASK_COMM_LEN (include/linux/sched.h): comm's size, its NUL included.
TASK_COMM_LEN = 16


def kmsg_escape(text: bytes) -> str:
    """A record's text as /dev/kmsg shows it: bytes below a space, from DEL up, and the
    backslash as ``\\xNN`` (kernel/printk/printk.c, info_print_ext_header()/msg_add_ext_text())."""
    return "".join(f"\\x{c:02x}" if c < 0x20 or c >= 0x7F or c == 0x5C else chr(c) for c in text)


def check_tasks(capture: Any, prog: Any) -> None:
    """for_each_task(prog) holds every process /proc showed before and after, named as /proc
    named it, and every thread of the witness."""
    stable = stable_processes(capture)
    leaders = {}
    every = set()
    for task in for_each_task(prog):
        pid = task.pid.value_()
        every.add(pid)
        if pid == task.tgid.value_():
            leaders[pid] = task.comm.string_().decode()
    assert sorted(set(stable) - set(leaders)) == []
    for pid, p in stable.items():
        comm = leaders[pid]
        if p["flags"] & PF_WQ_WORKER:
            # /proc names a workqueue worker after its current work too ("kworker/0:0-events").
            assert (
                p["comm"] == comm
                or p["comm"].startswith(comm + "-")
                or (len(comm) == TASK_COMM_LEN - 1 and p["comm"].startswith(comm))
            ), pid
        elif p["flags"] & PF_KTHREAD and len(comm) == TASK_COMM_LEN - 1:
            # ... and a kernel thread after its full name, cut to 15 in comm (5.17 and later).
            assert p["comm"].startswith(comm), pid
        else:
            assert comm == p["comm"], pid
    witness = capture.before["processes"][str(capture.witness)]
    assert set(witness["threads"]) <= every
    # Nothing else but what lived only during the capture: collect and what started it.
    shown = {int(pid) for pid in (*capture.before["processes"], *capture.after["processes"])}
    unknown = sorted(leaders[pid] for pid in set(leaders) - shown)
    assert "collect" in unknown and len(unknown) <= 6, unknown
    assert len(stable) > 40


def check_modules(capture: Any, prog: Any) -> None:
    """for_each_module(prog) names /proc/modules' modules in its order (the list order)."""
    assert capture.before["modules"] == capture.after["modules"]
    expected = [line.split()[0] for line in capture.before["modules"]]
    assert len(expected) >= 5  # the 9p and virtio modules the guest loads
    assert [m.name.string_().decode() for m in for_each_module(prog)] == expected


def check_dmesg(capture: Any, prog: Any) -> None:
    """drgn's printk records are /dev/kmsg's, record for record, up to the capture."""
    records = [
        (r.seq, r.facility * 8 + r.level, r.timestamp // 1000, kmsg_escape(r.text))
        for r in get_printk_records(prog)
    ]
    kmsg = [(k["seq"], k["prio"], k["usec"], k["text"]) for k in capture.before["kmsg"]]
    # The records written after the snapshot (by the capture itself) come after /dev/kmsg's.
    assert records[: len(kmsg)] == kmsg
    assert KMSG_MARKER.encode() in get_dmesg(prog)


def kpageflags(snapshot: dict) -> np.ndarray:
    return np.frombuffer(zlib.decompress(base64.b64decode(snapshot["kpageflags"])), "<u8")


def check_page_flags(capture: Any, prog: Any) -> None:
    """decode_page_flags() names PG_reserved exactly where /proc/kpageflags showed
    KPF_RESERVED before and after: on every reserved page, and on every 8th other page."""
    before, after = kpageflags(capture.before), kpageflags(capture.after)
    reserved = checked = 0
    for pfn in range(min(len(before), len(after))):
        bit = int(before[pfn] >> KPF_RESERVED) & 1
        if bit != int(after[pfn] >> KPF_RESERVED) & 1 or int(before[pfn] >> KPF_NOPAGE) & 1:
            continue
        if pfn % 8 and not bit:
            continue
        flags = decode_page_flags(pfn_to_page(prog, pfn)).split("|")
        assert ("PG_reserved" in flags) == bool(bit), (pfn, flags)
        checked += 1
        reserved += bit
    assert reserved > 1000 and checked > reserved  # the kernel image, memmap, firmware


CHECKS = (check_tasks, check_modules, check_dmesg, check_page_flags)


@pytest.fixture(scope="module")
def prog(capture: Capture) -> Any:
    return program(capture.image)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_drgn_helpers_match_the_guest(capture: Capture, prog: Any, check) -> None:
    check(capture, prog)


@pytest.fixture(scope="module")
def la57_prog(la57_capture: Capture) -> Any:
    return program(la57_capture.image)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_drgn_on_five_level_paging(la57_capture: Capture, la57_prog: Any, check) -> None:
    # drgn walks the page tables itself: pgtable_l5_enabled in VMCOREINFO tells it PML5.
    assert la57_prog.platform.arch == drgn.Architecture.X86_64
    check(la57_capture, la57_prog)
