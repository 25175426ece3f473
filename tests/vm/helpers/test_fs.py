"""collector.helpers.fs on real kernels: executable paths against /proc/PID/exe.

The guest runs its commands chrooted into the host's root, a 9p mount at /host of the
initramfs root, with tmpfs mounts inside it: /proc/PID/exe, read from inside the chroot, is
named from the chroot for files under it and from the global root for files outside it
(busybox in the initramfs), which exercises both ends of ``d_path``'s walk.
"""

from __future__ import annotations

import pytest

from collector.helpers.fs import d_path, dentry_path
from collector.helpers.sched import for_each_process
from collector.kernel.kernel import Kernel
from collector.kernel.object import Object
from tests.vm.conftest import Capture
from tests.vm.helpers.conftest import unchanged

pytestmark = pytest.mark.vm


def processes(kernel: Kernel) -> dict[int, Object]:
    """The image's processes (thread-group leaders) by PID."""
    return {task.pid.value(): task for task in for_each_process(kernel)}


def test_every_executable_path_matches_proc(capture: Capture, kernel: Kernel) -> None:
    tasks = processes(kernel)
    # /proc/PID/exe is named from the reader's root: snapshot.py ran in the same chroot as
    # the witness.
    root = tasks[capture.witness].fs.root
    compared = 0
    outside = 0
    for pid, p in unchanged(capture, "exe").items():
        if p["exe"] is None:
            continue  # kernel threads have no executable
        task = tasks[pid]
        got = d_path(task.mm.exe_file.f_path, root=root)
        assert got == p["exe"].encode(), (pid, p["comm"])
        compared += 1
        outside += d_path(task.mm.exe_file.f_path) == got
    print(f"executable paths compared: {compared}, {outside} of them outside the chroot")
    # The guest is small: at least its init (busybox, outside the chroot) and the witness.
    assert outside >= 1 and compared - outside >= 1


def test_the_witness_executable_seen_from_the_global_root(capture: Capture, kernel: Kernel) -> None:
    task = processes(kernel)[capture.witness]
    exe = capture.before["processes"][str(capture.witness)]["exe"].encode()
    f_path = task.mm.exe_file.f_path
    # Crossing out of the 9p mount at /host into the initramfs root.
    assert d_path(f_path) == b"/host" + exe
    assert d_path(f_path.mnt, f_path.dentry, root=task.fs.root) == exe
    # The 9p file system is the host's root, so the path inside it is the same.
    assert dentry_path(f_path.dentry) == exe


def test_the_witness_working_directory(capture: Capture, kernel: Kernel) -> None:
    task = processes(kernel)[capture.witness]
    # The guest's command runner cds into the checkout before it starts a command.
    repo = str(capture.guest.repo).encode()
    assert d_path(task.fs.pwd, root=task.fs.root) == repo
    assert d_path(task.fs.root, root=task.fs.root) == b"/"
    assert d_path(task.fs.root) == b"/host"
