"""Fixtures for the helpers' real-kernel tests: the shared capture opened as a Kernel (once per
capture for the session), the processes /proc showed throughout, and the witness process found
by walking the task list with plain object reads (no helper under test)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from collector.kernel.kernel import Kernel
from collector.kernel.object import Object, container_of
from tests.vm.conftest import Capture

#: More tasks than a test guest ever runs: a walk past this is a loop.
MAX_TASKS = 100_000


def stable_processes(capture: Capture) -> dict[int, dict]:
    """The processes /proc showed both right before and right after the capture, with the
    same name, parent and start time: those the image must hold as the guest showed them."""
    before, after = capture.before["processes"], capture.after["processes"]
    keys = ("comm", "ppid", "starttime", "tgid")
    return {
        int(pid): p
        for pid, p in before.items()
        if pid in after and all(p[k] == after[pid][k] for k in keys)
    }


def unchanged(capture: Capture, key: str) -> dict[int, dict]:
    """Of :func:`stable_processes`, those whose ``key`` (``cmdline``, ``exe``) /proc showed
    the same before and after the capture: what the image, taken between, must show."""
    after = capture.after["processes"]
    return {
        pid: p for pid, p in stable_processes(capture).items() if after[str(pid)][key] == p[key]
    }


def walk_tasks(kernel: Kernel) -> Iterator[Object]:
    """Every process on ``init_task.tasks`` (thread group leaders), init_task first."""
    init = kernel.variable("init_task")
    yield init
    head = init.tasks.address
    node = init.tasks.next.value()
    for _ in range(MAX_TASKS):
        if node == head:
            return
        yield container_of(kernel.object("struct list_head", node), "struct task_struct", "tasks")
        node = kernel.read_pointer(node)
    raise AssertionError("init_task.tasks does not close")


@pytest.fixture(scope="module")
def witness_task(kernel: Kernel, capture: Capture) -> Object:
    """The ``struct task_struct`` of the capture's witness process."""
    for task in walk_tasks(kernel):
        if int(task.pid) == capture.witness:
            return task
    raise AssertionError(f"the witness (PID {capture.witness}) is not on init_task.tasks")
