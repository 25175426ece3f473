"""Output files of captures and exports: always a new file, mode 0600, owned by whoever runs
`collect`, never reached through a symbolic link.

An existing file is replaced (with ``--force``) by creating a new file under a temporary name
in the same directory and renaming it over the old one: writing into the old file would keep
its mode and owner, so a RAM image could end up world-readable, and would write through every
hard link to it. Only regular files are replaced.

A capture puts its file in place before the first byte is written (:func:`create_in_place`):
what it writes cannot be taken again, so the name asked for always holds the newest capture,
whole or cut short, and never an older image that could be mistaken for it. An export is put
in place only when it is complete (:func:`writing`): a raw or LiME file cut short looks whole,
so a failed export removes its partial file and leaves the old one as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
import sys
from collections.abc import Iterator
from typing import BinaryIO

from collector.errors import CollectorError
from collector.signals import Interrupted

STDOUT = "-"
MODE = 0o600
_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# Room for the temporary name's suffix within NAME_MAX (255).
_MAX_BASE = 200


def display_name(path: str) -> str:
    """How messages name an output: its path, or ``standard output`` for ``-``."""
    return "standard output" if path == STDOUT else path


def open_stdout() -> BinaryIO:
    """Standard output for an image, refused when it is a terminal."""
    if sys.stdout.isatty():
        raise CollectorError("refusing to write an image to a terminal; use -o FILE or a pipe")
    out = open(sys.stdout.fileno(), "wb", buffering=0, closefd=False)  # noqa: SIM115
    out.name = "standard output"  # type: ignore[misc]
    return out


def check_target(path: str, force: bool) -> bool:
    """Refuse a symlink, an existing file without ``force``, and anything but a regular file.

    :returns: whether a file exists at ``path`` (and will be replaced).
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise CollectorError(f"cannot create {path}: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise CollectorError(f"{path} is a symbolic link; refusing to follow it")
    if not force:
        raise CollectorError(f"{path} already exists; use --force to replace it")
    if not stat.S_ISREG(st.st_mode):
        raise CollectorError(f"{path} is not a regular file; --force replaces only regular files")
    return True


class Output:
    """A new 0600 file, written under ``temp`` until :meth:`put_in_place` renames it ``path``.

    ``file.name`` is ``path``, so every message about a write names the file asked for.
    """

    def __init__(self, path: str, force: bool) -> None:
        self.path = path
        self.force = force
        self.replaces = check_target(path, force)
        directory, base = os.path.split(path)
        self.temp: str | None = None
        for _attempt in range(100):
            name = f"{base[:_MAX_BASE]}.{secrets.token_hex(4)}.partial"
            temp = os.path.join(directory, name)
            try:
                fd = os.open(temp, _FLAGS, MODE)
            except FileExistsError:
                continue
            except OSError as e:
                raise CollectorError(f"cannot create {path}: {e.strerror}") from None
            self.temp = temp
            break
        else:
            raise CollectorError(f"cannot create {path}: no free temporary name beside it")
        try:
            # The mode asked of open() passes through the umask, which may take bits away.
            os.fchmod(fd, MODE)
        except OSError:
            os.close(fd)
            self.discard()
            raise
        self.file: BinaryIO = open(fd, "wb", buffering=0)  # noqa: SIM115
        self.file.name = path  # type: ignore[misc]

    def put_in_place(self) -> None:
        """Rename the file to ``path``; without ``force`` never over a file that appeared since.

        :raises CollectorError: the rename failed; the temporary file is then removed.
        """
        temp = self.temp
        if temp is None:
            return
        try:
            if self.force:
                os.rename(temp, self.path)
            else:
                self._link_new(temp)
        except OSError as e:
            self.discard()
            if e.errno == errno.EEXIST:
                raise CollectorError(
                    f"{self.path} appeared while it was being written; it was left as it was"
                ) from None
            raise CollectorError(f"cannot create {self.path}: {e.strerror}") from None
        self.temp = None

    def _link_new(self, temp: str) -> None:
        # link() never replaces an existing name; where the file system has no hard links,
        # check for the name and rename.
        try:
            os.link(temp, self.path, follow_symlinks=False)
        except OSError as e:
            if e.errno == errno.EEXIST:
                raise
            if os.path.lexists(self.path):
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
            os.rename(temp, self.path)
            return
        os.unlink(temp)

    def sync(self) -> None:
        """Flush the file to disk, so a rename after a crash never names a file cut short."""
        os.fsync(self.file.fileno())

    def discard(self) -> None:
        """Close and remove the file if it is not in place yet."""
        with contextlib.suppress(OSError):
            if getattr(self, "file", None) is not None:
                self.file.close()
        if self.temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.temp)
            self.temp = None

    def close(self) -> None:
        self.file.close()


def create_in_place(path: str, force: bool) -> BinaryIO:
    """The output of a capture: ``path`` created 0600 (or standard output for ``-``).

    Without ``force`` the file is created with ``O_EXCL``. With ``force`` a new file is created
    beside the old one and renamed over it at once, before anything is written.

    :raises CollectorError: for a symlink, an existing file without ``force``, a file that is
        not regular, or a directory that cannot take the file; nothing is changed then.
    """
    if path == STDOUT:
        return open_stdout()
    if not force:
        check_target(path, force)
        try:
            fd = os.open(path, _FLAGS, MODE)
        except OSError as e:
            # Planted between the check and the open: O_EXCL sees a symlink as EEXIST.
            check_target(path, force)
            raise CollectorError(f"cannot create {path}: {e.strerror}") from None
        try:
            os.fchmod(fd, MODE)
        except OSError:
            os.close(fd)
            raise
        out = open(fd, "wb", buffering=0)  # noqa: SIM115
        out.name = path  # type: ignore[misc]
        return out
    output = Output(path, force)
    output.put_in_place()
    return output.file


@contextlib.contextmanager
def writing(path: str, force: bool) -> Iterator[BinaryIO]:
    """The output of an export: written under a temporary name, put in place when the body
    of the ``with`` block ends without error.

    On an error (or a signal) the partial file is removed, a file that was at ``path`` stays as
    it was, and the error's one line says so.
    """
    if path == STDOUT:
        yield open_stdout()
        return
    output = Output(path, force)
    removed = "the partial file was removed"
    if output.replaces:
        removed += f" and {path} left as it was"
    try:
        yield output.file
        output.sync()
        output.close()
    except Interrupted as e:
        output.discard()
        e.detail = removed
        raise
    except CollectorError as e:
        output.discard()
        raise CollectorError(f"{e}; {removed}", e.exit_code) from None
    except OSError as e:
        output.discard()
        raise CollectorError(f"writing {path} failed: {e.strerror or e}; {removed}") from None
    except BaseException:
        output.discard()
        raise
    output.put_in_place()


class CheckedWriter:
    """An output whose every write is checked: short writes finished or refused.

    A raw file object may write fewer bytes than asked (a file reaching ``ulimit -f`` with
    SIGXFSZ ignored, as Python does; a disk filling up) and only says so by its return value;
    the rest is written again, which then fails with the reason (EFBIG, ENOSPC). A stream
    that takes nothing, or returns no count, is an error too, so an export is never
    reported written when its file is short.
    """

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.name = getattr(out, "name", "output")
        #: The file offset the next write goes to (bytes written, for a stream).
        self.offset = 0

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = self.out.write(view)
            if n is None or n <= 0:
                what = "would block" if n is None else "wrote nothing"
                raise OSError(errno.EIO, f"the output {what} ({len(view)} bytes left to write)")
            self.offset += n
            view = view[n:]

    def seek(self, offset: int) -> None:
        self.out.seek(offset)
        self.offset = offset

    def truncate(self, size: int) -> None:
        self.out.truncate(size)

    def error(self, e: OSError) -> CollectorError:
        """The one line for a failed write: the output, where it stopped and why."""
        return CollectorError(f"{self.name}: write failed at byte {self.offset}: {e.strerror or e}")
