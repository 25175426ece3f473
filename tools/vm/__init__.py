"""A test bench of real Debian kernels booted under QEMU, with QEMU's view of RAM as the oracle."""

from tools.vm.guest import Guest, GuestError, GuestResult, GuestTimeout, Job, VMUnavailable
from tools.vm.kernels import KERNEL_KEYS, Kernel, fetch_kernel
from tools.vm.qmp import QMP, QMPError

__all__ = [
    "KERNEL_KEYS",
    "QMP",
    "Guest",
    "GuestError",
    "GuestResult",
    "GuestTimeout",
    "Job",
    "Kernel",
    "QMPError",
    "VMUnavailable",
    "fetch_kernel",
]
