"""Boot a Debian kernel under QEMU (TCG) and run shell commands in it, chrooted into the host's root.

The guest sees the host's filesystem read-only over 9p and runs the host's own Python and this
checkout; a second, writable 9p share carries commands in and results out. A bare guest
(``bare_files``) sees nothing of the host: its root is the initramfs, holding busybox and the
files given, and only the writable share is mounted.
"""

from __future__ import annotations

import ctypes
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from collector.errors import CollectorError
from tools.vm.initramfs import (
    GUEST_OUT,
    OUT_MOUNT,
    Initramfs,
    build_bare_initramfs,
    build_initramfs,
)
from tools.vm.kernels import KERNEL_KEYS, Kernel, fetch_kernel
from tools.vm.qmp import QMP

QEMU = "qemu-system-x86_64"
REPO_ROOT = Path(__file__).resolve().parents[2]
CONSOLE_TAIL_LINES = 40
# QEMU's default qemu64 model lacks SSSE3/SSE4: numpy 2 (baseline x86-64-v2) then dies with
# SIGILL on import. These flags make it x86-64-v2 while keeping the AMD vendor (so no page table
# isolation) and 4-level paging; add ",+la57" for 5-level paging.
DEFAULT_CPU = "qemu64,+ssse3,+sse4.1,+sse4.2,+popcnt"
_POLL = 0.05


class GuestError(CollectorError):
    """The guest failed to boot, died, or a command could not be run in it."""


class VMUnavailable(GuestError):
    """QEMU or a kernel cannot be had on this machine; VM tests skip with this reason."""


class GuestTimeout(GuestError):
    """A command did not finish in time (its process group was killed)."""


@dataclass(frozen=True)
class GuestResult:
    """What a guest command left behind."""

    returncode: int
    stdout: str
    stderr: str

    def check(self) -> GuestResult:
        """Return self, or raise GuestError with the output if the command failed."""
        if self.returncode != 0:
            raise GuestError(
                f"guest command exited {self.returncode}\n--- stdout\n{self.stdout}"
                f"\n--- stderr\n{self.stderr}"
            )
        return self


def host_python() -> str:
    """The host's real interpreter (pyenv shims resolved), as the guest runs it."""
    return os.path.realpath(sys.executable)


def guest_path_env() -> str:
    """PATH inside the guest: the interpreter's own bin directory first, never pyenv shims."""
    return ":".join(
        [
            os.path.dirname(host_python()),
            "/usr/local/sbin",
            "/usr/local/bin",
            "/usr/sbin",
            "/usr/bin",
            "/sbin",
            "/bin",
        ]
    )


class Job:
    """A command started with :meth:`Guest.run_background`."""

    def __init__(self, guest: Guest, number: int, command: str) -> None:
        self.guest = guest
        self.number = number
        self.command = command
        self._result: GuestResult | None = None

    def _res(self, suffix: str) -> Path:
        return self.guest.out_dir / "res" / f"{self.number}.{suffix}"

    def poll(self) -> GuestResult | None:
        """The result if the command has finished, else None."""
        if self._result is None:
            rc = self._res("rc")
            if rc.exists():
                text = rc.read_text().strip()
                self._result = GuestResult(
                    int(text) if text.lstrip("-").isdigit() else -1,
                    self._res("stdout").read_text(errors="replace"),
                    self._res("stderr").read_text(errors="replace"),
                )
        return self._result

    def wait(self, timeout: float = 300) -> GuestResult:
        """Wait for the command; on timeout kill its process group and raise GuestTimeout."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.poll()
            if result is not None:
                return result
            self.guest._check_running(f"running {self.command!r}")
            if time.monotonic() > deadline:
                self.kill()
                raise GuestTimeout(
                    f"guest command did not finish in {timeout:.0f} s: {self.command!r}"
                )
            time.sleep(_POLL)

    @property
    def pid(self) -> int:
        """The guest pid (and process group id) of the command's shell."""
        path = self._res("pid")
        deadline = time.monotonic() + 30
        while True:
            text = path.read_text().strip() if path.exists() else ""
            if text.isdigit():
                return int(text)
            if time.monotonic() > deadline:
                raise GuestError(f"guest job {self.number} never reported its pid")
            time.sleep(_POLL)

    def kill(self, sig: str = "KILL") -> None:
        """Send ``sig`` to the command's whole process group, from another guest command."""
        if self.poll() is not None:
            return
        # dash's kill takes no "--"; a negative pid right after the signal names the group.
        self.guest.run(f"kill -{sig} -{self.pid} 2>/dev/null; true", timeout=60)


class Guest:
    """A booted guest; use as a context manager so QEMU never outlives it.

    :param kernel: a key of :data:`tools.vm.kernels.META_PACKAGES` ("6.1", "6.12").
    :param memory_mib: guest RAM.
    :param cpus: virtual CPUs.
    :param extra_qemu_args: appended to QEMU's command line.
    :param cpu: QEMU ``-cpu`` model; :data:`DEFAULT_CPU` when None (``DEFAULT_CPU + ",+la57"``
        for 5-level paging).
    :param boot_timeout: seconds from launch until the agent reports ready.
    :param append: extra kernel command-line words (KASLR stays on: never ``nokaslr``).
    :param bare_files: boot a bare guest whose root filesystem is the initramfs with these
        files added (path in the guest -> host file), no host root and no chroot; commands
        run there with busybox's applets, the share at ``/out``.
    """

    def __init__(
        self,
        kernel: str = "6.1",
        memory_mib: int = 384,
        cpus: int = 1,
        extra_qemu_args: tuple[str, ...] | list[str] = (),
        cpu: str | None = None,
        boot_timeout: float = 180,
        append: tuple[str, ...] = (),
        bare_files: dict[str, Path] | None = None,
    ) -> None:
        if "nokaslr" in append:
            raise GuestError("the bench keeps KASLR on; drop nokaslr", 2)
        if kernel not in KERNEL_KEYS:
            raise GuestError(f"unknown kernel {kernel!r}; known: {', '.join(KERNEL_KEYS)}", 2)
        self.kernel_key = kernel
        self.memory_mib = memory_mib
        self.cpus = cpus
        self.extra_qemu_args = tuple(extra_qemu_args)
        self.cpu = cpu or DEFAULT_CPU
        self.boot_timeout = boot_timeout
        self.append = tuple(append)
        self.repo = REPO_ROOT
        self.bare_files = dict(bare_files) if bare_files is not None else None
        self.guest_out = OUT_MOUNT if self.bare else GUEST_OUT
        self.kernel: Kernel | None = None
        self.initramfs: Initramfs | None = None
        self.boot_seconds: float | None = None
        self.ready_info: dict[str, str] = {}
        self._workdir: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._qmp: QMP | None = None
        self._next = 1
        self._finalizer: weakref.finalize | None = None

    @property
    def bare(self) -> bool:
        """Whether the guest's root is the initramfs alone (see ``bare_files``)."""
        return self.bare_files is not None

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> Guest:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> None:
        """Fetch the kernel, build the initramfs, boot, and wait for the agent."""
        if shutil.which(QEMU) is None:
            raise VMUnavailable(f"{QEMU} is not installed (apt-get install qemu-system-x86)")
        try:
            self.kernel = fetch_kernel(self.kernel_key)
        except CollectorError as exc:
            raise VMUnavailable(f"kernel {self.kernel_key} unavailable: {exc}") from None
        self._workdir = Path(tempfile.mkdtemp(prefix="collector-vm-"))
        # A guest that is never closed still goes at interpreter exit.
        self._finalizer = weakref.finalize(self, _discard, None, self._workdir)
        if self.bare_files is not None:
            self.initramfs = build_bare_initramfs(self.kernel, self.bare_files, self._workdir)
        else:
            self.initramfs = build_initramfs(self.kernel)
        self.out_dir.mkdir()
        for sub in ("cmd", "res", "ctl"):
            (self.out_dir / sub).mkdir()
        argv = self.qemu_argv()
        started = time.monotonic()
        with open(self.console_log, "wb") as console:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._finalizer.detach()
        self._finalizer = weakref.finalize(self, _discard, self._proc, self._workdir)
        self._qmp = QMP(self._workdir / "qmp.sock", timeout=30)
        ready = self.out_dir / "ready"
        deadline = started + self.boot_timeout
        while not ready.exists():
            self._check_running("booting")
            if time.monotonic() > deadline:
                raise GuestError(
                    f"guest did not boot in {self.boot_timeout:.0f} s\n{self.console_tail()}"
                )
            time.sleep(_POLL)
        self.boot_seconds = time.monotonic() - started
        for line in ready.read_text().splitlines():
            key, _, value = line.partition("=")
            self.ready_info[key] = value.strip()

    def _keep(self) -> list[str]:
        """``vm.keep=`` for the checkout when it lives under /tmp or /run, which the guest
        covers with its own tmpfs (CI clones into such places)."""
        repo = str(self.repo)
        if repo.startswith(("/tmp/", "/run/")) and " " not in repo and "," not in repo:
            return [f"vm.keep={repo}"]
        return []

    def qemu_argv(self) -> list[str]:
        """QEMU's command line for this guest."""
        assert self.kernel is not None and self.initramfs is not None and self._workdir
        argv = [
            QEMU,
            "-accel", "tcg",
            "-m", str(self.memory_mib),
            "-smp", str(self.cpus),
            "-nographic",
            "-no-reboot",
            "-nic", "none",
            "-kernel", str(self.kernel.vmlinuz),
            "-initrd", str(self.initramfs.path),
            "-append", " ".join(("console=ttyS0", "panic=-1", *self._keep(), *self.append)),
            "-qmp", f"unix:{self._workdir / 'qmp.sock'},server=on,wait=off",
            "-device", "vmcoreinfo",
            "-virtfs", f"local,path={self.out_dir},mount_tag=out,security_model=none",
        ]  # fmt: skip
        if not self.bare:
            argv += [
                "-virtfs",
                "local,path=/,mount_tag=host,security_model=none,readonly=on,multidevs=remap",
            ]
        return [*argv, "-cpu", self.cpu, *self.extra_qemu_args]

    def close(self, timeout: float = 30) -> None:
        """Power off through the agent, then QMP quit, then kill; remove the work directory."""
        proc = self._proc
        if proc is not None and proc.poll() is None and self._workdir is not None:
            (self.out_dir / "ctl" / "poweroff").touch()
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                if self._qmp is not None:
                    self._qmp.quit()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        if self._qmp is not None:
            self._qmp.close()
            self._qmp = None
        self._proc = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None

    @property
    def commands_started(self) -> int:
        """How many commands this guest was given."""
        return self._next - 1

    # -- paths --------------------------------------------------------------------------------

    @property
    def workdir(self) -> Path:
        if self._workdir is None:
            raise GuestError("the guest is not running")
        return self._workdir

    @property
    def out_dir(self) -> Path:
        """Host path of the writable share; the guest sees it as :attr:`guest_out`."""
        return self.workdir / "out"

    @property
    def console_log(self) -> Path:
        return self.workdir / "console.log"

    @property
    def qmp(self) -> QMP:
        if self._qmp is None:
            raise GuestError("the guest is not running")
        return self._qmp

    def to_guest(self, host_path: str | os.PathLike[str]) -> str:
        """The chroot path of a file inside :attr:`out_dir`."""
        rel = Path(host_path).resolve().relative_to(self.out_dir.resolve())
        return f"{self.guest_out}/{rel}"

    # -- commands -----------------------------------------------------------------------------

    def run_background(self, command: str) -> Job:
        """Start a shell command as root in the chroot (cwd and PYTHONPATH = the checkout); do
        not wait."""
        self._check_running("starting a command")
        number = self._next
        self._next += 1
        if self.bare:
            lines = ["export PATH=/bin:/sbin HOME=/", "cd / || exit 126", command, ""]
        else:
            lines = [
                f"export PATH={shlex.quote(guest_path_env())}",
                "export HOME=/tmp LANG=C.UTF-8 PYTHONDONTWRITEBYTECODE=1",
                # `collect` and `python -m collector` import this checkout, whichever
                # checkout the host's environment has installed.
                f"export PYTHONPATH={shlex.quote(str(self.repo))}",
                f"cd {shlex.quote(str(self.repo))} || exit 126",
                command,
                "",
            ]
        script = "\n".join(lines)
        target = self.out_dir / "cmd" / f"{number}.sh"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(script)
        os.replace(tmp, target)
        return Job(self, number, command)

    def run(self, command: str, timeout: float = 300) -> GuestResult:
        """Run a shell command as root in the chroot and wait for it."""
        return self.run_background(command).wait(timeout)

    def run_python(
        self, source: str, args: tuple[str, ...] = (), timeout: float = 300
    ) -> GuestResult:
        """Run a Python program with the host's interpreter in the guest (no shell quoting)."""
        number = self._next
        script = self.out_dir / f"script-{number}.py"
        script.write_text(source)
        argv = " ".join(shlex.quote(a) for a in (host_python(), self.to_guest(script), *args))
        return self.run(argv, timeout)

    def alive(self, timeout: float = 60) -> bool:
        """Whether QEMU still runs and the guest still answers a trivial command."""
        if self._proc is None or self._proc.poll() is not None:
            return False
        try:
            return self.run("echo alive", timeout).stdout.strip() == "alive"
        except GuestError:
            return False

    # -- diagnostics --------------------------------------------------------------------------

    def console_text(self) -> str:
        try:
            return self.console_log.read_text(errors="replace")
        except (OSError, GuestError):
            return ""

    def console_tail(self, lines: int = CONSOLE_TAIL_LINES) -> str:
        tail = self.console_text().splitlines()[-lines:]
        where = self.console_log if self._workdir else "console"
        return f"--- last {len(tail)} lines of {where}\n" + "\n".join(tail)

    def _check_running(self, doing: str) -> None:
        if self._proc is None:
            raise GuestError(f"the guest is not running ({doing})")
        status = self._proc.poll()
        if status is not None:
            raise GuestError(
                f"QEMU exited with status {status} while {doing}\n{self.console_tail()}"
            )


def _discard(proc: subprocess.Popen[bytes] | None, workdir: Path) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


def _die_with_parent() -> None:
    # QEMU must not outlive the Python process that booted it, even when that one is killed.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
