"""One capture from start to finish: checks, plan, output file, metadata, RAM, end records.

Signals and a full disk end the capture early without losing it: the chunk under way is
completed, the end records are written when the output still takes them, and the image
stays readable up to its last complete chunk either way.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import platform
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

import collector
from collector import outfile, signals
from collector.acquire import capture, host, iomem, metadata
from collector.acquire import plan as planning
from collector.errors import CollectorError
from collector.image import format as fmt
from collector.image.writer import ImageWriter, OutputError
from collector.sysroot import Sysroot

EXIT_SIGNAL = signals.EXIT_STATUS


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
    stream_hash: str = "sha256"
    #: reader threads (None: :func:`default_readers`)
    readers: int | None = None
    #: ``--skip`` classes (``free``, ``cache``, ``zero``) and ``--strict``
    skip: frozenset[str] = frozenset()
    strict: bool = False


def default_readers(threads: int | None) -> int:
    """Reader threads for ``threads`` compressors: a 4 MiB pread from kcore costs about a
    third of compressing it at level 1, so one reader per two compressors keeps them fed."""
    return max(1, min(8, (threads or os.cpu_count() or 1) // 2))


def default_output_name(sysroot: Sysroot) -> str:
    """``<hostname>-<UTC time>.lime.zst``, the name an image gets unless told otherwise."""
    try:
        name = host.read_limited(sysroot, "/proc/sys/kernel/hostname", 4096, truncate=True)
        text = name.decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    # HOST_NAME_MAX is 64; a name is never allowed to leave the directory.
    text = (text or socket.gethostname() or "host")[:64].replace("/", "_")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{text}-{stamp}.lime.zst"


def build_plan(options: CaptureOptions) -> tuple[planning.Plan, str]:
    """Read /proc/iomem, select ranges, and plan a source for each; returns (plan, iomem text).

    Every range is checked against the machine's physical address space before anything is
    probed, so a planted or corrupt iomem ends here with one line.
    """
    root = Sysroot(options.sysroot)
    try:
        raw = host.read_limited(root, "/proc/iomem", iomem.MAX_IOMEM_BYTES)
    except OSError as e:
        raise CollectorError(f"cannot read /proc/iomem: {e.strerror}") from None
    text = raw.decode("utf-8", "replace")
    tree = iomem.parse_iomem(text)
    if iomem.is_unprivileged_view(tree):
        raise CollectorError(
            "/proc/iomem shows every address as zero: run collect as root to see physical ranges"
        )
    bits, evidence = host.phys_address_bits(root)
    iomem.check_addressable(tree, bits, evidence)
    selected, excluded = iomem.apply_user_ranges(
        iomem.system_ram(tree), options.include, options.exclude
    )
    if not selected:
        raise CollectorError("no System RAM ranges selected: nothing to capture")
    for r in selected:
        if r.end > 1 << bits:
            raise CollectorError(
                f"range {r} ends beyond the {bits}-bit physical address space of this machine "
                f"({evidence})",
                2,
            )
    return planning.make_plan(root, selected, excluded, options.source), text


def run(options: CaptureOptions, on_progress: Callable | None = None) -> tuple[dict, int]:
    """Capture memory as ``options`` say; returns the summary and the exit status.

    SIGINT and SIGTERM are honoured throughout: before the output file is created they end
    the run at once (:class:`collector.signals.Interrupted`, nothing written); from then on
    the chunk under way is completed and the image closed, and the status is 130 or 143.
    """
    root = Sysroot(options.sysroot)
    if root.is_live:
        host.require_root()
    started = dt.datetime.now(dt.UTC)
    t0 = time.monotonic()
    with signals.handled() as sig:
        try:
            the_plan, iomem_text = build_plan(options)
        except signals.Interrupted as e:
            e.detail = "before any RAM was read; no image was written"
            raise
        with the_plan:
            try:
                kcore = the_plan.kcore
                gathered = metadata.gather(
                    root,
                    kcore.vmcoreinfo if kcore else None,
                    kcore.phdr_bytes if kcore else None,
                    lambda paddr, size: _read_phys(the_plan, paddr, size),
                    page_size=the_plan.page_size,
                )
                live, skip_note = _open_skip(options, the_plan, gathered)
                meta = _header_metadata(options, root, the_plan, iomem_text, gathered, started)
                meta["skip"] = {
                    "classes": sorted(options.skip),
                    "in_use": live is not None,
                    "note": skip_note,
                }
                path = options.output or default_output_name(root)
                stop = sig.defer()
                if stop.is_set():
                    raise signals.Interrupted(stop.signum)
            except signals.Interrupted as e:
                e.detail = "before any RAM was read; no image was written"
                raise
            out = outfile.create_in_place(path, options.force)
            try:
                summary, result = _write_image(
                    the_plan, out, path, options, meta, gathered, stop, t0, on_progress, live
                )
                if skip_note:
                    summary["skip_note"] = skip_note
            finally:
                out.close()
    status = EXIT_SIGNAL.get(stop.signum, 1) if result.stopped_by else 0
    return summary, status


def _write_image(
    the_plan: planning.Plan,
    out: BinaryIO,
    path: str,
    options: CaptureOptions,
    meta: dict,
    gathered: metadata.Gathered,
    stop: signals.StopRequest,
    t0: float,
    on_progress: Callable | None,
    live=None,
) -> tuple[dict, capture.CaptureResult]:
    summary: dict = {"output": path, "plan": meta["plan"]}
    writer: ImageWriter | None = None
    try:
        writer = ImageWriter(
            out,
            page_size=the_plan.page_size,
            chunk_size=options.chunk_size,
            metadata=meta,
            level=options.level,
            threads=options.threads,
            stream_hash=options.stream_hash,
            # Skipped pages carry fates a version 2 reader does not know, and read-zero
            # pages one that a version 3 reader does not know.
            version=4 if "zero" in options.skip else 3 if live is not None else None,
        )
        for name, data in gathered.blobs.items():
            writer.add_blob(name, data)
        result = capture.run_capture(
            the_plan,
            the_plan.sources,
            writer,
            stop=stop,
            on_progress=on_progress,
            readers=options.readers or default_readers(options.threads),
            skip=(
                (lambda start, end: live.skip_runs(start, end, options.skip))
                if live is not None
                else None
            ),
            zero="zero" in options.skip,
        )
        end = {
            "end_time": dt.datetime.now(dt.UTC).isoformat(),
            "seconds": round(time.monotonic() - t0, 3),
            "stopped_by": result.stopped_by,
        }
        if live is not None:
            end["skip_seconds"] = round(live.seconds, 3)
            end["skip_struct_page_bytes"] = live.memory.bytes_read
        record = writer.finish(end, clean=result.stopped_by is None)
    except OutputError as e:
        raise CollectorError(
            f"writing {outfile.display_name(path)} failed: {e.strerror}; the image is valid "
            "up to its last complete chunk (`collect verify` lists what is missing)"
        ) from None
    finally:
        if writer is not None:
            writer.close()
    summary.update(record)
    summary["missing_metadata"] = gathered.missing
    if result.unpadded is not None:
        summary["unpadded"] = [result.unpadded[0], result.unpadded[1]]
    return summary, result


def mem_usage(options: CaptureOptions) -> dict:
    """What each ``--skip`` class would leave out on this machine now (``collect plan
    --mem-usage``), from its live struct pages; reads no other RAM than those and the page
    tables on the way (and the VMCOREINFO note where kcore does not carry it).

    :raises CollectorError: the struct page array cannot be read or is not understood.
    """
    from collector.acquire import live

    root = Sysroot(options.sysroot)
    if root.is_live:
        host.require_root()
    the_plan, _ = build_plan(options)
    with the_plan:
        kcore = the_plan.kcore
        blobs = {}
        if kcore is not None and kcore.vmcoreinfo:
            blobs["vmcoreinfo"] = kcore.vmcoreinfo.encode()
        else:
            gathered = metadata.gather(
                root,
                None,
                None,
                lambda paddr, size: _read_phys(the_plan, paddr, size),
                page_size=the_plan.page_size,
            )
            blobs.update(gathered.blobs)
        with contextlib.suppress(OSError):
            blobs["btf"] = host.read_limited(root, "/sys/kernel/btf/vmlinux", 64 << 20)
        if "kallsyms" not in blobs:
            # The per-CPU free lists' walk needs __per_cpu_offset and the CPU masks.
            with contextlib.suppress(OSError):
                blobs["kallsyms"] = host.read_limited(root, "/proc/kallsyms", 64 << 20)
        try:
            pages = live.open_live_pages(the_plan, blobs)
        except live.LiveUnavailable as e:
            raise CollectorError(f"--mem-usage: {e}") from None
        usage = pages.usage()
        page = the_plan.page_size
        return {
            "page_size": page,
            "via": "/proc/kcore vmemmap segments"
            if kcore is not None and pages.memory.bytes_read
            else "page tables and /dev/mem",
            "groups": {
                name: {
                    "pages": n,
                    "bytes": n * page,
                    "skip": live.GROUP_SKIP.get(name),
                }
                for name, n in usage.pages.items()
            },
            "zero": "not known before reading the RAM: a page is all zeros or not only once "
            "its bytes are read; --skip zero records such pages as read-zero as it reads them",
            "total_pages": sum(usage.pages.values()),
            "per_cpu_lists": {"walked_pages": usage.pcp_walked, "count": usage.pcp_counted},
            "seconds": round(usage.seconds, 3),
            "struct_page_bytes_read": usage.bytes_read,
            "notes": usage.notes,
        }


def _open_skip(options: CaptureOptions, the_plan: planning.Plan, gathered: metadata.Gathered):
    """The live struct page array for ``--skip free`` or ``cache``, or None and the one line
    saying why not (``zero`` needs none: it looks at the bytes read).

    :raises CollectorError: it cannot be used and ``--strict`` was given.
    """
    wanted = options.skip - {"zero"}
    if not wanted:
        return None, None
    from collector.acquire import live

    try:
        return live.open_live_pages(the_plan, gathered.blobs), None
    except live.LiveUnavailable as e:
        if options.strict:
            raise CollectorError(f"--skip {','.join(sorted(wanted))} --strict: {e}") from None
        return None, f"--skip {','.join(sorted(wanted))} not applied, every page is read: {e}"


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
        "stream_hash": options.stream_hash,
        "readers": options.readers or default_readers(options.threads),
        "blobs": sorted(gathered.blobs),
        "missing_metadata": gathered.missing,
        "vmcoreinfo_location": metadata.vmcoreinfo_location(root),
    }
