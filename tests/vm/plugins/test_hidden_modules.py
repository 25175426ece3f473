"""hidden_modules on real captures, against the guest's own account of its modules and of its
module-area allocations.

Oracles: /proc/modules right before and right after the capture (tests/vm/snapshot.py), and
/proc/vmallocinfo read in the guest after the capture (each busy vmalloc area with its size,
guard page included, and its caller as ``%pS``; read with kptr_restrict 1 so that root sees
its addresses). No module in these guests hides, so the
analysis must report nothing; with ``--all`` it must show every module of /proc/modules in
all three views and every other module-area allocation /proc/vmallocinfo lists. The guests
have no compiler or kernel headers to build a module that hides itself: the hiding cases are
covered by the unit tests (tests/plugins/test_hidden_modules.py).
"""

from __future__ import annotations

import pytest

from collector.analyze import analyze_kernel
from collector.kernel.kernel import Kernel
from collector.plugin_manager import PluginManager
from collector.plugins.hidden_modules import NOT_MODULES, allocation_owner
from collector.profiles.x86_64 import MODULES_END, MODULES_VADDR
from tests.vm.conftest import Capture

pytestmark = pytest.mark.vm

ALL3 = "module list, sysfs kset, module memory"


def proc_modules(lines: list[str]) -> dict[str, tuple[int, int, str]]:
    """``{name: (address, size, state)}`` of /proc/modules lines."""
    out = {}
    for line in lines:
        name, size, _refs, _deps, state, address = line.split()[:6]
        out[name] = (int(address, 16), int(size), state)
    return out


def vmallocinfo(capture: Capture) -> dict[int, tuple[int, str]]:
    """``{start: (size, caller function+offset)}`` of /proc/vmallocinfo's module-area areas."""
    # vmallocinfo prints its addresses with %pK: hashed while kptr_restrict is 0 (Debian's
    # default), real for a reader with CAP_SYSLOG once it is 1.
    text = (
        capture.guest.run(
            "old=$(cat /proc/sys/kernel/kptr_restrict); echo 1 > /proc/sys/kernel/kptr_restrict;"
            " cat /proc/vmallocinfo; echo $old > /proc/sys/kernel/kptr_restrict"
        )
        .check()
        .stdout
    )
    out = {}
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 3 or "+" not in fields[2]:
            continue  # vm_map_ram areas and (6.9 on) unpurged ones name no caller
        start = int(fields[0].split("-")[0], 16)
        if MODULES_VADDR <= start < MODULES_END:
            out[start] = (int(fields[1]), fields[2].split("/")[0])
    return out


def run(kernel: Kernel, **options: object) -> list[dict]:
    result = analyze_kernel(
        kernel, "hidden_modules", options, manager=PluginManager(autoload=False)
    )
    assert result.error is None
    return result.records


def check(capture: Capture, kernel: Kernel) -> None:
    before = proc_modules(capture.before["modules"])
    after = proc_modules(capture.after["modules"])
    assert before, "the guest has modules loaded (9p, qemu_fw_cfg...)"
    # Every module of these guests is loaded before the capture and stays loaded.
    assert before == after

    assert run(kernel) == []

    everything = run(kernel, all=True)
    modules = [r for r in everything if r["kind"] == "module"]
    assert {r["name"]: (r["base"], r["size"], r["state"]) for r in modules} == before
    assert all(r["seen_in"] == ALL3 and r["missing_from"] == "" for r in modules)
    assert all(r["caller"].startswith("load_module+") for r in modules)

    # The rest is the module area's other allocations (BPF prog packs, kprobe pages...),
    # exactly those /proc/vmallocinfo lists that no module's memory starts in.
    areas = vmallocinfo(capture)
    others = [r for r in everything if r["kind"] != "module"]
    assert {r["kind"] for r in others} <= {"other allocation"}
    assert all(allocation_owner(r["caller"].split("+")[0]) in NOT_MODULES for r in others)
    module_bases = {base for base, _size, _state in before.values()}
    assert {r["base"]: (r["size"], r["caller"]) for r in others} == {
        start: area
        for start, area in areas.items()
        if not area[1].startswith("load_module+") and start not in module_bases
    }
    # Every module's code starts an allocation the guest lists, made by load_module.
    for base, _size, _state in before.values():
        assert areas[base][1].startswith("load_module+")


def test_no_module_hides_on_a_real_guest(capture: Capture, kernel: Kernel) -> None:
    check(capture, kernel)


def test_no_module_hides_on_five_level_paging(la57_capture: Capture, la57_kernel: Kernel) -> None:
    assert la57_kernel.paging_mode == "5-level"
    check(la57_capture, la57_kernel)
