"""One capture from start to finish: checks, plan, output file, metadata, RAM, end records.

Signals and a full disk end the capture early without losing it: the chunk under way is
completed, the end records are written when the output still takes them, and the image
stays readable up to its last complete chunk either way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import platform
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

import collector
from collector.acquire import capture, host, iomem, metadata
from collector.acquire import plan as planning
from collector.errors import CollectorError
from collector.image import format as fmt
from collector.image.writer import ImageWriter, OutputError
from collector.sysroot import Sysroot

EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class CaptureOptions:
    """Everything `collect` was asked to do (see ``collect --help``)."""

    profile: str
    output: str | None = None
    sysroot: str = "/"
    source: str | None = None
    include: list[iomem.Range] = field(default_factory=list)
    exclude: list[iomem.Range] = field(default_factory=list)
    level: int = 1
    threads: int | None = None
    chunk_size: int = 4 << 20
    force: bool = False
    command_line: list[str] = field(default_factory=list)


def default_output_name(sysroot: Sysroot) -> str:
    """``<hostname>-<UTC time>.lime.zst``, the name an image gets unless told otherwise."""
    try:
        name = sysroot.read_text("/proc/sys/kernel/hostname").strip()
    except OSError:
        name = ""
    name = (name or socket.gethostname() or "host").replace("/", "_")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{name}-{stamp}.lime.zst"


def open_output(path: str, force: bool) -> BinaryIO:
    """Create the image file 0600, never following a symlink; refuse to clobber without force."""
    if path == "-":
        if sys.stdout.isatty():
            raise CollectorError("refusing to write an image to a terminal; use -o FILE or a pipe")
        return open(sys.stdout.fileno(), "wb", buffering=0, closefd=False)
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    flags |= os.O_TRUNC if force else os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as e:
        # O_EXCL meets a planted symlink as EEXIST, O_NOFOLLOW (with --force) as ELOOP.
        if os.path.islink(path):
            raise CollectorError(f"{path} is a symbolic link; refusing to follow it") from None
        if e.errno == errno.EEXIST:
            raise CollectorError(f"{path} already exists; use --force to overwrite it") from None
        raise CollectorError(f"cannot create {path}: {e.strerror}") from None
    return open(fd, "wb", buffering=0)


class _Stop(threading.Event):
    reason = "interrupted"
    signum = 0


@contextlib.contextmanager
def _stop_on_signals() -> Iterator[_Stop]:
    stop = _Stop()

    def handler(signum: int, _frame: object) -> None:
        stop.signum = signum
        stop.reason = f"interrupted by {signal.Signals(signum).name}"
        stop.set()
        # A second signal ends the process at once; the image is then cut short, which
        # the reader handles too.
        for s in EXIT_SIGNAL:
            signal.signal(s, signal.SIG_DFL)

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    old = {s: signal.signal(s, handler) for s in EXIT_SIGNAL}
    try:
        yield stop
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def build_plan(options: CaptureOptions) -> tuple[planning.Plan, str]:
    """Read /proc/iomem, select ranges, and plan a source for each; returns (plan, iomem text)."""
    root = Sysroot(options.sysroot)
    try:
        text = root.read_text("/proc/iomem")
    except OSError as e:
        raise CollectorError(f"cannot read /proc/iomem: {e.strerror}") from None
    tree = iomem.parse_iomem(text)
    if iomem.is_unprivileged_view(tree):
        raise CollectorError(
            "/proc/iomem shows every address as zero: run collect as root to see physical ranges"
        )
    selected, excluded = iomem.apply_user_ranges(
        iomem.system_ram(tree), options.include, options.exclude
    )
    if not selected:
        raise CollectorError("no System RAM ranges selected: nothing to capture")
    return planning.make_plan(root, selected, excluded, options.source), text


def run(options: CaptureOptions, on_progress: Callable | None = None) -> tuple[dict, int]:
    """Capture memory as ``options`` say; returns the summary and the exit status."""
    root = Sysroot(options.sysroot)
    if root.is_live:
        host.require_root()
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    the_plan, iomem_text = build_plan(options)
    with the_plan:
        kcore = the_plan.kcore
        gathered = metadata.gather(
            root,
            kcore.vmcoreinfo if kcore else None,
            kcore.phdr_bytes if kcore else None,
            lambda paddr, size: _read_phys(the_plan, paddr, size),
        )
        meta = _header_metadata(options, root, the_plan, iomem_text, gathered, started)
        path = options.output or default_output_name(root)
        out = open_output(path, options.force)
        summary = {"output": path, "plan": the_plan.to_json()}
        try:
            writer = ImageWriter(
                out,
                page_size=the_plan.page_size,
                chunk_size=options.chunk_size,
                metadata=meta,
                level=options.level,
                threads=options.threads,
            )
            with _stop_on_signals() as stop:
                for name, data in gathered.blobs.items():
                    writer.add_blob(name, data)
                result = capture.run_capture(
                    the_plan, the_plan.sources, writer, stop=stop, on_progress=on_progress
                )
                end = {
                    "end_time": dt.datetime.now(dt.UTC).isoformat(),
                    "seconds": round(time.monotonic() - t0, 3),
                    "stopped_by": result.stopped_by,
                }
                record = writer.finish(end, clean=result.stopped_by is None)
        except OutputError as e:
            writer.close()
            raise CollectorError(
                f"writing {path} failed: {e.strerror}; the image is valid up to its last "
                "complete chunk (`collect verify` lists what is missing)"
            ) from None
        finally:
            out.close()
    summary.update(record)
    summary["missing_metadata"] = gathered.missing
    status = EXIT_SIGNAL.get(stop.signum, 1) if result.stopped_by else 0
    return summary, status


def _read_phys(the_plan: planning.Plan, paddr: int, size: int) -> bytes:
    for entry in the_plan.entries:
        if entry.source and not entry.kernel_zero and entry.start <= paddr < entry.end:
            return the_plan.source(entry.source).read(paddr, size)
    raise OSError(5, "no planned source covers this address")


def _header_metadata(
    options: CaptureOptions,
    root: Sysroot,
    the_plan: planning.Plan,
    iomem_text: str,
    gathered: metadata.Gathered,
    started: dt.datetime,
) -> dict:
    return {
        "tool": {"name": "collector", "version": collector.__version__},
        "format_version": fmt.FORMAT_VERSION,
        "profile": options.profile,
        "command_line": options.command_line,
        "host": host.host_identity(root),
        "lockdown": the_plan.lockdown,
        "cpu_flags": host.cpu_flags(root),
        "python": platform.python_version(),
        "start_time": started.isoformat(),
        "iomem": iomem_text,
        "plan": the_plan.to_json(),
        "ranges": [[r.start, r.end] for r in the_plan.ram_ranges],
        "page_size": the_plan.page_size,
        "chunk_size": options.chunk_size,
        "compression": {"level": options.level, "threads": options.threads or os.cpu_count()},
        "blobs": sorted(gathered.blobs),
        "missing_metadata": gathered.missing,
        "vmcoreinfo_location": metadata.vmcoreinfo_location(root),
    }
