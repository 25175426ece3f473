"""dmesg on real captures, against /dev/kmsg as the guest read it right before and right after.

tests/vm/snapshot.py reads every /dev/kmsg record (devkmsg_read(): ``prio,seq,usec,...;text``
with the text escaped, then ``SUBSYSTEM=``/``DEVICE=`` lines); the capture fixture writes
:data:`KMSG_MARKER` to /dev/kmsg at level :data:`KMSG_LEVEL` just before the capture.
"""

from __future__ import annotations

import re

import pytest

from collector.analyze import analyze_kernel
from collector.kernel.kernel import Kernel
from tests.vm.conftest import KMSG_LEVEL, KMSG_MARKER, Capture

pytestmark = pytest.mark.vm

#: /dev/kmsg gives what user space writes there the user facility (devkmsg_write()).
USER_FACILITY = 1


def kmsg_view(record: dict) -> tuple:
    """A dmesg record as /dev/kmsg shows it: prio, seq, usec, text, dictionary lines."""
    props = []
    if record["subsystem"] is not None:
        props.append(f"SUBSYSTEM={record['subsystem']}")
    if record["device"] is not None:
        props.append(f"DEVICE={record['device']}")
    prio = record["facility"] << 3 | record["level"]
    return prio, record["seq"], record["ts_usec"], record["text"], props


def guest_view(record: dict) -> tuple:
    return record["prio"], record["seq"], record["usec"], record["text"], record["dict"]


def check(capture: Capture, kernel: Kernel) -> None:
    result = analyze_kernel(kernel, "dmesg", {"escape": True})
    assert result.error is None
    records = result.records
    # Nothing skipped: a small guest's ring overwrote no record (and none was being written).
    assert all(r["seq"] is not None for r in records), records[-1]
    ours = {r["seq"]: kmsg_view(r) for r in records}
    assert [r["seq"] for r in records] == list(range(len(records)))

    before = capture.before["kmsg"]
    assert before, "the guest's /dev/kmsg gave no record"
    missing = [k for k in before if ours.get(k["seq"]) != guest_view(k)]
    assert missing == [], [(k, ours.get(k["seq"])) for k in missing[:5]]
    # Records logged while the capture ran are in the guest's later reading.
    after = {k["seq"]: guest_view(k) for k in capture.after["kmsg"]}
    later = [r for r in records if r["seq"] > before[-1]["seq"]]
    assert [kmsg_view(r) for r in later] == [after[r["seq"]] for r in later]

    (marker,) = [r for r in records if r["text"] == KMSG_MARKER]
    assert (marker["level"], marker["level_name"]) == (KMSG_LEVEL, "warn")
    assert (marker["facility"], marker["facility_name"]) == (USER_FACILITY, "user")
    assert re.fullmatch(r"T[1-9][0-9]*", marker["caller"])  # a task wrote it, not an IRQ
    assert marker["state"] == "finalized" and marker["cleared"] is False

    # --level keeps exactly the records of that level or more urgent.
    warnings = analyze_kernel(kernel, "dmesg", {"escape": True, "level": 4}).records
    assert [r["seq"] for r in warnings] == [r["seq"] for r in records if r["level"] <= 4]


def test_dmesg_is_what_dev_kmsg_gave(capture: Capture, kernel: Kernel) -> None:
    check(capture, kernel)


def test_dmesg_on_five_level_paging(la57_capture: Capture, la57_kernel: Kernel) -> None:
    assert la57_kernel.paging_mode == "5-level"
    check(la57_capture, la57_kernel)
