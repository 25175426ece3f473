"""The maps plugin on real kernels, against the guest's own /proc/PID/maps.

The witness sleeps throughout the capture, so its maps read right before the capture are
what the image holds; the test checks they did not change by right after, then compares
every line, field by field and as text. Every user process alive across the capture must
have a map, and the run over all processes must finish without an error line (a process
that changed its map while the capture ran, collect itself among them, may end in a marker
record).
"""

from __future__ import annotations

import pytest

from collector.analyze import analyze_kernel
from collector.kernel.kernel import Kernel
from tests.vm.conftest import Capture
from tests.vm.helpers.conftest import stable_processes

pytestmark = pytest.mark.vm

#: include/linux/sched.h
PF_KTHREAD = 0x00200000


def parse_line(line: str) -> dict:
    """The fields of one /proc/PID/maps line: ``start-end perms offset dev inode [path]``."""
    fields = line.split(None, 5)
    start, end = (int(x, 16) for x in fields[0].split("-"))
    return {
        "start": start,
        "end": end,
        "perms": fields[1],
        "offset": int(fields[2], 16),
        "dev": fields[3],
        "inode": int(fields[4]),
        "path": fields[5].strip() if len(fields) > 5 else "",
    }


def check_the_witness_map_equals_proc(capture: Capture, kernel: Kernel) -> None:
    pid = capture.witness
    before = capture.before["processes"][str(pid)]["maps"]
    assert before, "the snapshot read no maps for the witness"
    assert before == capture.after["processes"][str(pid)]["maps"], "the witness's maps changed"
    result = analyze_kernel(kernel, "maps", {"pid": str(pid)})
    assert result.error is None
    records = list(result.records)
    assert len(records) == len(before)
    for record, line in zip(records, before, strict=True):
        assert record["error"] is None
        assert {k: record[k] for k in parse_line(line)} == parse_line(line), line
        assert record["line"] == line
        assert (record["pid"], record["comm"]) == (pid, "python")
    named = sorted(r["path"] for r in records if r["path"].startswith("["))
    print(f"{kernel.release}: {len(records)} lines of /proc/{pid}/maps equal; named: {named}")
    assert {"[heap]", "[stack]", "[vdso]"} <= set(named)


def check_every_user_process_has_a_map(capture: Capture, kernel: Kernel) -> None:
    stable = stable_processes(capture)
    user = {
        pid: p
        for pid, p in stable.items()
        if not p["flags"] & PF_KTHREAD
        and "Z" not in (p["state"][0], capture.after["processes"][str(pid)]["state"][0])
    }
    result = analyze_kernel(kernel, "maps")
    assert result.error is None
    records = list(result.records)
    vmas: dict[int, int] = {}
    markers = {}
    for r in records:
        if r["error"] is None:
            vmas[r["pid"]] = vmas.get(r["pid"], 0) + 1
        else:
            markers[r["pid"]] = r["error"]
    kthreads = {pid for pid, p in stable.items() if p["flags"] & PF_KTHREAD}
    assert not kthreads & (vmas.keys() | markers.keys())
    for pid, p in user.items():
        assert vmas.get(pid, 0) > 0, (pid, p["comm"], markers.get(pid))
        assert pid not in markers, (pid, p["comm"], markers[pid])
    # records come by PID, then by address
    order = [(r["pid"], r["start"] or 0) for r in records if r["error"] is None]
    assert order == sorted(order)
    print(
        f"{kernel.release}: {len(records)} records of {len(vmas)} processes; every one of"
        f" {len(user)} user processes alive across the capture has a map; markers: {markers}"
    )


def test_the_witness_map_equals_proc(capture: Capture, kernel: Kernel) -> None:
    check_the_witness_map_equals_proc(capture, kernel)


def test_every_user_process_has_a_map(capture: Capture, kernel: Kernel) -> None:
    check_every_user_process_has_a_map(capture, kernel)


@pytest.mark.parametrize(
    "check", [check_the_witness_map_equals_proc, check_every_user_process_has_a_map]
)
def test_on_five_level_paging(la57_capture: Capture, la57_kernel: Kernel, check) -> None:
    assert la57_kernel.paging_mode == "5-level"
    check(la57_capture, la57_kernel)
