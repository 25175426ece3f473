"""The shared capture of each guest, opened once, for the helpers' real-kernel tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from collector.image.open import open_image
from collector.kernel.kernel import Kernel
from tests.vm.conftest import Capture

_open: dict[str, Kernel] = {}


@pytest.fixture
def kernel(capture: Capture) -> Iterator[Kernel]:
    """The kernel of the shared capture (opened once per capture for the session)."""
    key = str(capture.image)
    if key not in _open:
        _open[key] = Kernel(open_image(capture.image))
    yield _open[key]


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
