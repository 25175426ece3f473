"""Shared by the helpers' real-kernel tests: the captured kernel, opened once per guest, and
the processes of the image found by walking ``init_task.tasks`` with plain object reads."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from collector.image.open import open_image
from collector.kernel.kernel import Kernel
from collector.kernel.object import Object
from tests.vm.conftest import Capture

#: More processes than any test guest runs; the walk stops there rather than loop forever.
MAX_TASKS = 100_000


@pytest.fixture(scope="module")
def kernel(capture: Capture) -> Iterator[Kernel]:
    """The kernel of the shared capture, opened once per kernel for the module."""
    memory = open_image(capture.image)
    try:
        yield Kernel(memory)
    finally:
        memory.close()


def processes(kernel: Kernel) -> dict[int, Object]:
    """Every thread-group leader on ``init_task.tasks`` (include/linux/sched/signal.h
    ``for_each_process``) by PID, init_task itself left out."""
    init = kernel.variable("init_task")
    head = init.tasks.address
    found: dict[int, Object] = {}
    node = init.tasks.next.value()
    for _ in range(MAX_TASKS):
        if node == head:
            return found
        task = kernel.object("struct list_head", node).container_of("struct task_struct", "tasks")
        found[int(task.pid)] = task
        node = task.tasks.next.value()
    raise AssertionError(f"init_task.tasks did not close within {MAX_TASKS} entries")


def unchanged(capture: Capture, key: str) -> dict[int, dict]:
    """The processes of both snapshots (the same start time, so the same process) whose
    ``key`` is the same in both: what the capture, taken between the two, must show."""
    before, after = capture.before["processes"], capture.after["processes"]
    out = {}
    for pid, p in before.items():
        q = after.get(pid)
        if q is not None and q["starttime"] == p["starttime"] and q[key] == p[key]:
            out[int(pid)] = p
    return out
