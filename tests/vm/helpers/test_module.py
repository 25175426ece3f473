"""Modules read from real captures against the guest's /proc/modules."""

from __future__ import annotations

import pytest

from collector.helpers.module import (
    for_each_module,
    module_address,
    module_name,
    module_refcount,
    module_size,
    module_state,
)
from collector.kernel.kernel import Kernel
from tests.vm.conftest import Capture

pytestmark = pytest.mark.vm


def test_for_each_module_matches_proc_modules(capture: Capture, kernel: Kernel) -> None:
    # /proc/modules: name size refcount users state address (kernel/module/procfs.c).
    proc = [line.split() for line in capture.before["modules"]]
    assert capture.before["modules"] == capture.after["modules"]
    assert len(proc) >= 5  # the 9p and virtio modules the guest loads
    found = [
        (
            module_name(m),
            module_size(m),
            module_refcount(m),
            module_state(m),
            module_address(m),
        )
        for m in for_each_module(kernel)
    ]
    expected = [
        (name, int(size), int(refs), state, int(address, 16))
        for name, size, refs, _users, state, address, *_taint in proc
    ]
    assert found == expected
