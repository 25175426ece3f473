"""The helpers on a kernel running 5-level paging: the same checks as on the 4-level guests."""

from __future__ import annotations

import pytest

from collector.kernel.kernel import Kernel
from tests.vm.conftest import Capture
from tests.vm.helpers import test_fs, test_mm, test_module, test_percpu, test_sched

pytestmark = pytest.mark.vm

CHECKS = (
    test_sched.test_for_each_process_matches_proc,
    test_sched.test_for_each_thread_and_task,
    test_sched.test_task_state_of_sleeping_tasks,
    test_module.test_for_each_module_matches_proc_modules,
    test_percpu.test_cpu_masks,
    test_percpu.test_per_cpu_cpu_info_matches_proc_cpuinfo,
    test_percpu.test_per_cpu_ptr_of_a_counter_lies_between_two_readings,
    # User page tables with a PML5 on top, and the direct map of a 5-level kernel.
    test_mm.test_the_witness_command_line,
    test_mm.test_the_witness_threads_and_environment,
    test_mm.test_every_command_line_matches_proc,
    test_mm.test_the_witness_executable_mapping_holds_the_file,
    test_mm.test_struct_pages_and_the_direct_map_agree_with_qemu,
    test_mm.test_kernel_threads_have_no_command_line,
    test_fs.test_every_executable_path_matches_proc,
    test_fs.test_the_witness_executable_seen_from_the_global_root,
    test_fs.test_the_witness_working_directory,
)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_on_five_level_paging(la57_capture: Capture, la57_kernel: Kernel, check) -> None:
    assert la57_kernel.paging_mode == "5-level"
    check(la57_capture, la57_kernel)
