"""hidden_tasks on real captures: every thread of every process /proc showed before and after
the capture is in all three views; any difference concerns a task that came or went while
the capture ran. The task_struct slabs found agree with /proc/slabinfo."""

from __future__ import annotations

import pytest

from collector.analyze import analyze_kernel
from collector.helpers.slab import find_slabs, slab_objects
from collector.kernel.kernel import Kernel
from collector.plugin_manager import PluginManager
from tests.vm.conftest import Capture
from tests.vm.helpers.conftest import stable_processes

pytestmark = pytest.mark.vm

#: Tasks that come and go while a capture runs (the guest agent's pollers, collect's own
#: helpers): far fewer than this.
MAX_DIFFERENCES = 10


def records(kernel: Kernel) -> list[dict]:
    result = analyze_kernel(
        kernel, "hidden_tasks", {"all": True}, manager=PluginManager(autoload=False)
    )
    assert result.final_error() is None
    return list(result.records)


def slabinfo(snapshot: dict) -> tuple[int, int, int]:
    """``task_struct``'s <objsize>, <objperslab> and <num_slabs> in /proc/slabinfo."""
    for line in snapshot["memory"]["slabinfo"].splitlines():
        fields = line.split()
        if fields and fields[0] == "task_struct":
            return int(fields[3]), int(fields[4]), int(fields[fields.index("slabdata") + 2])
    raise AssertionError("/proc/slabinfo has no task_struct line")


def possible(capture: Capture) -> list[int]:
    """The CPUs of /sys/devices/system/cpu/possible (``0-1``), as the guest printed them."""
    cpus = []
    for part in capture.before["possible"].strip().split(","):
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def check_views(capture: Capture, kernel: Kernel) -> None:
    stable = stable_processes(capture)
    threads = {tid: (pid, p) for pid, p in stable.items() for tid in p["threads"]}
    got = records(kernel)
    assert got[-1]["kind"] == "summary"
    tasks = [r for r in got if r["kind"] == "task"]
    everywhere = {r["pid"]: r for r in tasks if r["missing_from"] == ""}
    for tid, (pid, p) in threads.items():
        # Every thread of a process /proc showed before and after is in all three views,
        # once, with /proc's thread group.
        assert tid in everywhere, (tid, p["comm"], [r for r in tasks if r["pid"] == tid])
        assert everywhere[tid]["tgid"] == p["tgid"] == pid, tid
        assert everywhere[tid]["seen_in"] == "task list, pid idr, task_struct slab"
    differ = [r for r in tasks if r["missing_from"]]
    # What differs came or went while the capture ran: never a stable thread.
    assert not {r["pid"] for r in differ} & set(threads), differ
    assert len(differ) <= MAX_DIFFERENCES, differ
    # One idle task per possible CPU: init_task for CPU 0, the others in the task_struct
    # slab, on no list and in no IDR.
    idle = [r for r in got if r["kind"] == "idle"]
    assert [r["comm"] for r in idle] == [f"swapper/{cpu}" for cpu in possible(capture)]
    assert [r["seen_in"] for r in idle] == ["", *["task_struct slab"] * (len(idle) - 1)]
    if not differ:
        assert got[-1]["note"].startswith("the three views agree")
    else:
        assert got[-1]["note"].startswith(f"{len(differ)} tasks differ")


def check_slabs(capture: Capture, kernel: Kernel) -> None:
    objsize, per_slab, *_ = slabinfo(capture.before)
    counts = sorted({slabinfo(capture.before)[2], slabinfo(capture.after)[2]})
    slabs = list(find_slabs(kernel, "task_struct"))
    # /proc/slabinfo's num_slabs before and after bound the slabs the memory map holds.
    assert counts[0] <= len(slabs) <= counts[-1], (len(slabs), counts)
    for cache, slab, _order in slabs:
        assert cache.object_size.value() == objsize
        assert len(slab_objects(cache, slab, _order)) == per_slab


def test_every_stable_task_is_in_every_view(capture: Capture, kernel: Kernel) -> None:
    check_views(capture, kernel)


def test_task_struct_slabs_match_slabinfo(capture: Capture, kernel: Kernel) -> None:
    check_slabs(capture, kernel)


def test_five_level_paging(la57_capture: Capture, la57_kernel: Kernel) -> None:
    assert la57_kernel.paging_mode == "5-level"
    check_views(la57_capture, la57_kernel)
    check_slabs(la57_capture, la57_kernel)
