"""The helpers on a kernel running 5-level paging: the same checks as on the 4-level guests."""

from __future__ import annotations

import pytest

from collector.image.open import open_image
from collector.kernel.kernel import Kernel
from tests.vm.conftest import Capture
from tests.vm.helpers import test_module, test_percpu, test_sched

pytestmark = pytest.mark.vm

CHECKS = (
    test_sched.test_for_each_process_matches_proc,
    test_sched.test_for_each_thread_and_task,
    test_sched.test_task_state_of_sleeping_tasks,
    test_module.test_for_each_module_matches_proc_modules,
    test_percpu.test_cpu_masks,
    test_percpu.test_per_cpu_cpu_info_matches_proc_cpuinfo,
    test_percpu.test_per_cpu_ptr_of_a_counter_lies_between_two_readings,
)


@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__ for c in CHECKS])
def test_on_five_level_paging(la57_capture: Capture, check) -> None:
    memory = open_image(la57_capture.image)
    try:
        kernel = Kernel(memory)
        assert kernel.paging_mode == "5-level"
        check(la57_capture, kernel)
    finally:
        memory.close()
