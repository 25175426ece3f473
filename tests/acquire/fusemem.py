"""Serve device files from a Python model: through FUSE, or by patching os.open/os.pread.

A *device model* answers ``check_open(name, flags)``, ``read(name, size, offset)`` (bytes, or
OSError with the errno the caller must see) and ``size(name)``. :class:`FuseMount` exposes
its files in a FUSE file system run by libfuse in a daemon thread of this process, with
``direct_io`` so every ``pread`` reaches the model; :class:`Emulation` answers for the same
files at the ``os.open``/``os.pread``/``os.close`` boundary where FUSE cannot mount.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import logging
import os
import stat
import threading
import time
from pathlib import Path
from typing import Protocol

log = logging.getLogger(__name__)


class DeviceModel(Protocol):
    def check_open(self, name: str, flags: int) -> None: ...

    def read(self, name: str, size: int, offset: int) -> bytes: ...

    def size(self, name: str) -> int: ...


_FUSE_STATE: dict[str, bool] = {}
MNT_DETACH = 2
_ACTIVE: set[FuseMount] = set()


@atexit.register
def _unmount_leftovers() -> None:
    """A process that ends without stopping its fakes must not leave mounts behind."""
    for mount in list(_ACTIVE):
        mount.stop()


def fuse_usable() -> bool:
    """Whether FUSE can be tried here (checked once per process)."""
    if "usable" not in _FUSE_STATE:
        ok = os.geteuid() == 0 and os.path.exists("/dev/fuse")
        if ok:
            try:
                import mfusepy  # noqa: F401
            except (ImportError, OSError):
                ok = False
        _FUSE_STATE["usable"] = ok
    return _FUSE_STATE["usable"]


def mark_fuse_unusable() -> None:
    """Remember that a mount failed, so later fakes emulate at once."""
    _FUSE_STATE["usable"] = False


class FuseMount:
    """One FUSE file system with the device files, run by libfuse in a daemon thread."""

    START_TIMEOUT = 10.0
    STOP_TIMEOUT = 1.0

    def __init__(self, device: DeviceModel, mountpoint: Path, files: dict[str, str]) -> None:
        self.device = device
        self.mountpoint = mountpoint
        self.files = files
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.conn: int | None = None

    def start(self) -> None:
        import mfusepy

        self.mountpoint.mkdir(parents=True, exist_ok=True)
        ops = _operations(mfusepy, self.device, self.files)
        # libfuse's fuse_main() changes the working directory of the whole process to /; a
        # subprocess started by a test would then import the installed collector instead of
        # this checkout's.
        cwd = os.getcwd()

        def run() -> None:
            try:
                mfusepy.FUSE(
                    ops,
                    str(self.mountpoint),
                    raw_fi=True,
                    foreground=True,
                    ro=True,
                    nothreads=True,
                    fsname="collector-fakehost",
                )
            except BaseException as exc:  # reported by start()
                self.error = exc

        self.thread = threading.Thread(target=run, name="fakehost-fuse", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + self.START_TIMEOUT
        while not os.path.ismount(self.mountpoint):
            if not self.thread.is_alive():
                raise RuntimeError(f"FUSE mount failed: {self.error!r}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("FUSE mount timed out")
            time.sleep(0.002)
        self.conn = os.minor(os.stat(self.mountpoint).st_dev)
        _ACTIVE.add(self)
        os.listdir(self.mountpoint)  # answered by the loop, so fuse_main() is past its chdir
        os.chdir(cwd)

    def stop(self) -> None:
        _ACTIVE.discard(self)
        if self.thread is None:
            return
        libc = ctypes.CDLL(None, use_errno=True)
        # Lazy: the mount leaves the namespace at once even if a test left a file open.
        libc.umount2(str(self.mountpoint).encode(), MNT_DETACH)
        self.thread.join(self.STOP_TIMEOUT)
        abort = Path(f"/sys/fs/fuse/connections/{self.conn}/abort")
        if self.thread.is_alive() and self.conn is not None and abort.exists():
            # A file still open keeps the connection up: abort it (needs fusectl mounted).
            with contextlib.suppress(OSError):
                abort.write_text("1")
            self.thread.join(self.STOP_TIMEOUT)
        if self.thread.is_alive():
            log.warning("FUSE thread still serving an open file; it ends when that file closes")
        self.thread = None


def _operations(mfusepy: object, device: DeviceModel, files: dict[str, str]) -> object:
    class Operations(mfusepy.Operations):  # type: ignore[name-defined]
        use_ns = True

        def getattr(self, path: str, fh: object = None) -> dict:
            if path == "/":
                return {"st_mode": stat.S_IFDIR | 0o755, "st_nlink": 2}
            name = path.lstrip("/")
            if name not in files:
                raise mfusepy.FuseOSError(errno.ENOENT)
            size = device.size(name)
            return {"st_mode": stat.S_IFREG | 0o400, "st_nlink": 1, "st_size": size}

        def readdir(self, path: str, fh: object) -> list[str]:
            return [".", "..", *files]

        def open(self, path: str, fi) -> int:
            name = path.lstrip("/")
            if name not in files:
                raise mfusepy.FuseOSError(errno.ENOENT)
            try:
                device.check_open(name, fi.flags)
            except OSError as exc:
                raise mfusepy.FuseOSError(exc.errno) from None
            # Every read reaches the handler: no page cache, no readahead.
            fi.direct_io = 1
            fi.keep_cache = 0
            return 0

        def read(self, path: str, size: int, offset: int, fh: object) -> bytes:
            try:
                return device.read(path.lstrip("/"), size, offset)
            except OSError as exc:
                raise mfusepy.FuseOSError(exc.errno or errno.EIO) from None

    return Operations()


class Emulation:
    """Answer for the device files at the os.open/os.pread/os.close boundary."""

    def __init__(self, device: DeviceModel, paths: dict[str, str]) -> None:
        self.device = device
        self.paths = paths
        self.fds: dict[int, str] = {}
        self.saved: tuple | None = None

    def install(self) -> None:
        self.saved = (os.open, os.pread, os.close)
        real_open, real_pread, real_close = self.saved

        def fake_open(path, flags, mode=0o777, *, dir_fd=None):
            name = None
            if dir_fd is None:
                name = self.paths.get(os.path.realpath(os.fspath(path)))
            if name is not None:
                self.device.check_open(name, flags)
            fd = real_open(path, flags, mode, dir_fd=dir_fd)
            if name is not None:
                self.fds[fd] = name
            return fd

        def fake_pread(fd, size, offset):
            name = self.fds.get(fd)
            if name is None:
                return real_pread(fd, size, offset)
            return self.device.read(name, size, offset)

        def fake_close(fd):
            self.fds.pop(fd, None)
            return real_close(fd)

        os.open, os.pread, os.close = fake_open, fake_pread, fake_close

    def uninstall(self) -> None:
        if self.saved is not None:
            os.open, os.pread, os.close = self.saved
            self.saved = None
