"""lsmod on real captures against the guest's own /proc/modules and /sys/module parameters."""

from __future__ import annotations

import json

import pytest

from collector.analyze import analyze_kernel
from collector.kernel.kernel import Kernel
from tests.vm.conftest import Capture

pytestmark = pytest.mark.vm


def proc_modules(capture: Capture) -> list[tuple]:
    """/proc/modules as the guest printed it around the capture (kernel/module/procfs.c):
    name size refcount users state address, then the taint letters in parentheses with + or -
    for a module loading or unloading."""
    assert capture.before["modules"] == capture.after["modules"]
    out = []
    for line in capture.before["modules"]:
        name, size, refs, users, state, address, *flags = line.split()
        taints = flags[0].strip("()").rstrip("+-") if flags else ""
        out.append((name, int(size), int(refs), users, state, int(address, 16), taints))
    return out


def lsmod(kernel: Kernel) -> list[dict]:
    result = analyze_kernel(kernel, "lsmod")
    assert result.error is None
    return result.records


def check_lsmod_matches_proc_modules(capture: Capture, kernel: Kernel) -> None:
    expected = proc_modules(capture)
    assert len(expected) >= 5  # the 9p and virtio modules the guest loads
    records = lsmod(kernel)
    got = [
        (r["name"], r["size"], r["refcount"], r["users"], r["state"], r["address"], r["taints"])
        for r in records
    ]
    assert got == expected
    # The image's own /proc/modules (read by collect before the RAM) is the guest's, so every
    # module is "present" in it and no record comes from it alone.
    blob = kernel.memory.blob("modules")
    assert blob is not None and blob.decode().splitlines() == capture.before["modules"]
    assert [r["proc_modules"] for r in records] == ["present"] * len(expected)
    assert all(r["notes"] is None and r["module"] for r in records)
    assert all(r["core_size"] == r["size"] and r["init_size"] == 0 for r in records)


def check_parameters_match_sysfs(capture: Capture, kernel: Kernel) -> None:
    """Every decoded parameter value equals what /sys/module/NAME/parameters/PARAM shows
    (parameters with mode 0 are not there and are not compared)."""
    sysfs = {}
    listing = capture.guest.run("grep -r . /sys/module/*/parameters/ || true").check()
    for line in listing.stdout.splitlines():
        path, _, value = line.partition(":")
        *_, module, _parameters, parameter = path.split("/")
        sysfs[module, parameter] = value
    compared = 0
    for record in lsmod(kernel):
        for word in record["parameters"].split():
            name, equals, value = word.partition("=")
            if not equals or (record["name"], name) not in sysfs:
                continue
            if value.startswith('"'):
                value = json.loads(value)
            assert value == sysfs[record["name"], name], (record["name"], name)
            compared += 1
    assert compared >= 1  # netfs's debug on 6.1 and 6.12; fscache and virtio_pci on 6.1


def test_lsmod_matches_proc_modules(capture: Capture, kernel: Kernel) -> None:
    check_lsmod_matches_proc_modules(capture, kernel)


def test_parameters_match_sysfs(capture: Capture, kernel: Kernel) -> None:
    check_parameters_match_sysfs(capture, kernel)


def test_lsmod_on_five_level_paging(la57_capture: Capture, la57_kernel: Kernel) -> None:
    assert la57_kernel.paging_mode == "5-level"
    check_lsmod_matches_proc_modules(la57_capture, la57_kernel)
    check_parameters_match_sysfs(la57_capture, la57_kernel)
