"""Per-CPU data read from real captures against the guest's /proc/cpuinfo and /proc/stat."""

from __future__ import annotations

import pytest

from collector.helpers.percpu import (
    for_each_online_cpu,
    for_each_possible_cpu,
    per_cpu,
    per_cpu_ptr,
)
from collector.kernel.kernel import Kernel
from tests.vm.conftest import Capture

pytestmark = pytest.mark.vm

#: USER_HZ: /proc/stat counts clock ticks of 1/100 s; the kernel keeps nanoseconds.
NSEC_PER_USER_HZ = 10_000_000


def cpu_list(text: str) -> list[int]:
    """A /sys CPU list such as ``0-3,5``."""
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def test_cpu_masks(capture: Capture, kernel: Kernel) -> None:
    assert list(for_each_possible_cpu(kernel)) == cpu_list(capture.before["possible"])
    assert list(for_each_online_cpu(kernel)) == cpu_list(capture.before["online"])


def test_per_cpu_cpu_info_matches_proc_cpuinfo(capture: Capture, kernel: Kernel) -> None:
    # DECLARE_PER_CPU_READ_MOSTLY(struct cpuinfo_x86, cpu_info): what /proc/cpuinfo prints.
    cpus = capture.before["cpus"]
    assert [int(c["processor"]) for c in cpus] == list(for_each_online_cpu(kernel))
    for c in cpus:
        info = per_cpu(kernel, "cpu_info", int(c["processor"]))
        assert info.x86_model_id.text() == c["model name"]
        assert info.cpu_index.value() == int(c["processor"])
        # 6.7 ("x86/cpu: Move cpu_*_id into topology info") moved the APIC IDs to info.topo.
        topo = info.topo if info.type.has_member("topo") else info
        assert topo.initial_apicid.value() == int(c["initial apicid"])
        assert topo.apicid.value() == int(c["apicid"])


def test_per_cpu_ptr_of_a_counter_lies_between_two_readings(
    capture: Capture, kernel: Kernel
) -> None:
    # kernel_cpustat.cpustat[CPUTIME_USER] and [CPUTIME_SYSTEM] only grow: the image's value,
    # taken during the capture, lies between /proc/stat's readings before and after it.
    user = kernel.btf.enum_value("cpu_usage_stat", "CPUTIME_USER")
    system = kernel.btf.enum_value("cpu_usage_stat", "CPUTIME_SYSTEM")
    # &kernel_cpustat: a per-CPU pointer, as this_cpu_ptr(&kernel_cpustat) takes it.
    pointer = kernel.object("struct kernel_cpustat", kernel.symbol("kernel_cpustat")).address_of()
    for cpu in for_each_online_cpu(kernel):
        stat = per_cpu_ptr(pointer, cpu).cpustat
        before, after = capture.before["cpustat"][str(cpu)], capture.after["cpustat"][str(cpu)]
        for index, column in ((user, 0), (system, 2)):
            ticks = stat[index].value() // NSEC_PER_USER_HZ
            assert before[column] <= ticks <= after[column], (cpu, index)
        assert stat[system].value() > 0
