"""The `collect` command: argument parsing and output only; the work happens in the core."""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable

import collector
from collector.errors import CollectorError, UnsupportedImage, UsageError
from collector.signals import Interrupted

CAPTURE_EPILOG = """\
commands (collect COMMAND --help for each):
  plan        print the per-range plan (range, size, source, reason) without reading RAM
  info        identity, plan, ranges, page fates, hashes and blobs of an image
  verify      check every byte of an image (exit 0 intact, 1 RAM damaged, 3 incomplete, 4 metadata damaged)
  export      convert an image to LiME, a raw padded file or an ELF core; or write its
              kernel's Volatility 3 symbol table (--to isf)
  translate   walk the page tables of an image for a virtual address (or a struct page)
  analyze     run an analysis plugin on an image
  drgn        drgn on an image (types from its BTF): a session, -e CODE, or a script
  plugins     list analysis plugins
  sweep       run analyses over many images on dask into a Parquet dataset (collector[fleet])
  stack       which values of a sweep's results few hosts share, rarest first
  profiles    list architecture profiles

examples:
  collect --profile x86_64                      capture all RAM to <host>-<time>.lime.zst
  collect --profile x86_64 -o - | ssh box 'cat > mem.lime.zst'
  collect plan --profile x86_64                 what would be read, from where, and why
  zstd -dc IMAGE > mem.lime                     a LiME file for Volatility 3
  collect export IMAGE --to isf -o syms/k.json.xz  its symbol table (vol -s syms)
  zstd -dc IMAGE | sha256sum                    compare with `collect info IMAGE`
  collect analyze /var/crash/*/dump.* dmesg     a kdump-compressed dump (makedumpfile -c/-z)
  collect info mem.raw --image-format raw       a raw file; its map from mem.raw.iomem if there

output: the image is always a new file, mode 0600, owned by the user running collect.
--force replaces an existing regular file (never a symlink, directory or device) by renaming
a new file over it before any RAM is read; the old file is not kept, so a capture that fails
after that leaves its own image, readable up to its last complete chunk, under that name.

exit status: 0 done, 1 error, 2 usage, 130/143 interrupted by SIGINT/SIGTERM; commands
that open an image: 3 truncated, 5 cannot open, 6 not a memory image, 7 unsupported. A signal
while planning or probing ends collect at once and writes nothing; once the image is open,
the chunk under way is completed and the image closed, saying what it misses.
"""

STANDALONE_EPILOG = """
standalone build: this file carries Python and the libraries collect needs. Each run unpacks
them into one new private directory (mode 0700) under $TMPDIR (default /tmp),
collect-XXXXXX, and removes it when it exits, whatever ends it (SIGINT, SIGTERM, SIGHUP and
SIGQUIT at any moment included); only SIGKILL of the first process can leave it behind. It
holds the C library, the loader and the program, and _MEIXXXXXX (Python and its packages).
Nothing else is written but the image; to keep even this off the disk being examined, point
TMPDIR at a tmpfs (TMPDIR=/dev/shm).
"""


def _size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    try:
        if text[-1:].lower() in units:
            return int(text[:-1], 0) * units[text[-1].lower()]
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def _range(text: str):
    from collector.acquire.iomem import parse_range

    try:
        return parse_range(text)
    except CollectorError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


IMAGE_FORMATS = ("auto", "native", "lime", "avml", "elf", "kdump", "raw")
#: Suffix of the iomem file beside a raw memory file (mem.raw -> mem.raw.iomem).
IOMEM_SIDECAR = ".iomem"


def add_image_options(p: argparse.ArgumentParser) -> None:
    """The options every command that opens an image shares: how to read the file."""
    p.add_argument(
        "--image-format",
        choices=IMAGE_FORMATS,
        default="auto",
        help="the image's format (default: auto, from its first bytes). A raw file has no "
        "magic: give raw for one",
    )
    p.add_argument(
        "--memory-map",
        metavar="MAP",
        help="for a raw file: the physical ranges it holds, at the offsets of their "
        "addresses, as START-END[,START-END...] (inclusive ends, like /proc/iomem; or "
        "START+SIZE) or the path of a /proc/iomem copy (its System RAM lines). Implies "
        f"--image-format raw. Default: FILE{IOMEM_SIDECAR} beside the raw file if it exists, "
        "else the whole file from address 0",
    )


def memory_map(text: str) -> list[tuple[int, int]]:
    """The ranges a ``--memory-map`` value names: an iomem file's System RAM, or a list.

    :raises CollectorError: an unreadable file (1), a bad range list (2).
    """
    from collector.acquire.iomem import parse_iomem, parse_range, system_ram

    if os.path.exists(text):
        try:
            with open(text, encoding="utf-8", errors="replace") as f:
                iomem = f.read()
        except OSError as e:
            raise CollectorError(f"{text}: cannot read the memory map: {e.strerror}") from None
        ranges = system_ram(parse_iomem(iomem))
        if not ranges:
            raise CollectorError(f"{text}: no System RAM lines: not a /proc/iomem copy", 2)
        return [(r.start, r.end) for r in ranges]
    out = []
    for part in text.split(","):
        r = parse_range(part)
        out.append((r.start, r.end))
    return out


def image_source(args: argparse.Namespace) -> tuple[str, list[tuple[int, int]] | None]:
    """The format and, for a raw file, the memory map to open ``args.image`` with."""
    fmt = args.image_format
    spec = args.memory_map
    if spec is not None:
        if fmt not in ("auto", "raw"):
            raise UsageError(f"--memory-map is for raw files, not --image-format {fmt}")
        fmt = "raw"
    elif fmt == "raw" and os.path.isfile(args.image + IOMEM_SIDECAR):
        spec = args.image + IOMEM_SIDECAR
    return fmt, None if spec is None else memory_map(spec)


def open_from_args(args: argparse.Namespace):
    """``open_image`` of ``args.image`` as the image options say."""
    from collector.image.open import open_image

    fmt, ranges = image_source(args)
    return open_image(args.image, fmt, ranges)


def _add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--profile",
        required=True,
        help="architecture profile of this machine (see `collect profiles`); checked against it",
    )
    p.add_argument(
        "--source",
        choices=["/dev/mem", "/proc/kcore", "/dev/crash", "mem", "kcore", "crash"],
        help="read every range from this source only (default: chosen per range by probing)",
    )
    p.add_argument(
        "--include",
        action="append",
        type=_range,
        default=[],
        metavar="RANGE",
        help="also capture RANGE (START-END inclusive, or START+SIZE); may repeat. Only named "
        "ranges outside System RAM are ever read",
    )
    p.add_argument(
        "--exclude",
        action="append",
        type=_range,
        default=[],
        metavar="RANGE",
        help="do not read RANGE; its pages are recorded as excluded; may repeat",
    )
    p.add_argument(
        "--sysroot",
        default="/",
        metavar="DIR",
        help="resolve /proc, /sys and /dev under DIR (for tests and replays; no root needed)",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")


def standalone() -> bool:
    """Whether this is the one-file build of tools/binary.py (PyInstaller sets sys.frozen)."""
    return bool(getattr(sys, "frozen", False))


def interrupt_once(signum: int, frame: object) -> None:
    """The standalone build's SIGINT handler outside :func:`collector.signals.handled`: a
    KeyboardInterrupt, which ends the command; copies that PyInstaller's launcher relays
    (Ctrl-C reaches it too) are ignored rather than interrupting main()'s report of it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.default_int_handler(signum, frame)


def restore_standalone_environment() -> None:
    """Give the standalone build's Python the caller's TMPDIR back, and a SIGINT handler.

    The outermost process (tools/guardian.c) points TMPDIR at its private directory so
    PyInstaller unpacks inside it, and passes the caller's own in COLLECT_USER_TMPDIR (absent
    when the caller had none); anything collect starts or creates gets the caller's.
    """
    if not standalone():
        return
    # tools/pyi_rth_collect.py gave SIGINT its default action for the start-up (a SIGINT the
    # caller ignores stays ignored); from here on a Ctrl-C is an Interrupted or
    # KeyboardInterrupt that main() reports.
    if signal.getsignal(signal.SIGINT) is signal.SIG_DFL:
        signal.signal(signal.SIGINT, interrupt_once)
    if "COLLECT_PRIVATE_DIR" not in os.environ:
        return
    del os.environ["COLLECT_PRIVATE_DIR"]
    user = os.environ.pop("COLLECT_USER_TMPDIR", None)
    if user is None:
        os.environ.pop("TMPDIR", None)
    else:
        os.environ["TMPDIR"] = user


def version_text() -> str:
    """What ``--version`` prints: where collect runs from and what it runs on."""
    if not standalone():
        return (
            f"collect {collector.__version__} from {os.path.dirname(collector.__file__)}"
            f" (Python {platform.python_version()})"
        )
    import zstandard

    return (
        f"collect {collector.__version__}, standalone build (Python "
        f"{platform.python_version()}, python-zstandard {zstandard.__version__}, libzstd "
        f"{'.'.join(map(str, zstandard.ZSTD_VERSION))})"
    )


def capture_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="collect",
        description="Capture the physical memory of this Linux machine into one compressed, "
        "self-describing image (zstd frames holding a LiME stream plus metadata), without a "
        "kernel module. Only System RAM is read, through pread() on /dev/mem, /proc/kcore or "
        "/dev/crash as the kernel allows; every page's fate is recorded.",
        epilog=CAPTURE_EPILOG + (STANDALONE_EPILOG if standalone() else ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=version_text())
    _add_plan_options(p)
    p.add_argument(
        "-o",
        "--output",
        metavar="PATH",
        help="image file, or - for stdout (default: <hostname>-<UTC time>.lime.zst); always a "
        "new file, mode 0600, never created through a symlink",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing regular file: a new 0600 file is renamed over it before any "
        "RAM is read (the old file's mode and owner are not kept)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the plan and read no RAM")
    p.add_argument("--level", type=int, default=1, help="zstd level (default 1: fastest)")
    p.add_argument(
        "--threads", type=int, default=None, help="compression threads (default: all cores)"
    )
    p.add_argument(
        "--chunk-size",
        type=_size,
        default=4 << 20,
        help="RAM per compressed chunk, 1M-4M (default 4M)",
    )
    p.add_argument(
        "--hash",
        choices=["sha256", "blake3"],
        default="sha256",
        help="whole-stream hash the image records: sha256 (`zstd -dc IMAGE | sha256sum`, one "
        "core) or blake3 (`zstd -dc IMAGE | b3sum`, every core); default sha256",
    )
    p.add_argument(
        "--readers",
        type=int,
        default=None,
        help="reader threads, for sources that allow concurrent pread (default: 1 per 2 "
        "compression threads, at most 8)",
    )
    p.add_argument(
        "--skip",
        type=_skip_classes,
        default=frozenset(),
        metavar="CLASSES",
        help="comma-separated: free and cache leave out pages the live struct page array "
        "calls free (buddy lists) or clean page cache no process maps, reading each chunk's "
        "struct pages just before it; zero records pages read and found all zeros as "
        "read-zero (they stay in the image as data, and need no struct pages); every such "
        "page is recorded with its own fate",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="with --skip free or cache: fail when the struct page array cannot be read, "
        "rather than read every page",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar even on a terminal")
    return p


def _skip_classes(text: str) -> frozenset[str]:
    chosen = frozenset(c.strip() for c in text.split(",") if c.strip())
    unknown = sorted(chosen - {"free", "cache", "zero"})
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(
            f"unknown class {', '.join(unknown) or '(none)'}: choose from free, cache, zero"
        )
    return chosen


# -- capture ----------------------------------------------------------------------------------


class ProgressBar:
    """One line on stderr: bytes, rate, ETA and unreadable pages so far."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.t0 = time.monotonic()
        self.last = 0.0

    def __call__(self, p) -> None:
        now = time.monotonic()
        if now - self.last < 0.2 and p.done_bytes < p.total_bytes:
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-6)
        rate = p.done_bytes / elapsed
        eta = (p.total_bytes - p.done_bytes) / rate if rate else 0
        pct = 100 * p.done_bytes / p.total_bytes if p.total_bytes else 100
        self.stream.write(
            f"\r{pct:5.1f}% {_human(p.done_bytes)}/{_human(p.total_bytes)} "
            f"{_human(rate)}/s ETA {eta:4.0f}s unreadable pages {p.unreadable_pages}  "
        )
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _check_profile(name: str, sysroot: str) -> None:
    from collector import profiles
    from collector.acquire import host
    from collector.acquire.sources import live_vmcoreinfo
    from collector.sysroot import Sysroot

    profile = profiles.get(name)
    root = Sysroot(sysroot)
    profile.check_machine(host.machine(root), host.cpu_flags(root), live_vmcoreinfo(root))


def cmd_capture(args: argparse.Namespace, argv: list[str]) -> int:
    from collector import signals

    with signals.handled():
        try:
            return _capture(args, argv)
        except Interrupted as e:
            if not e.detail and not args.dry_run:
                e.detail = "before any RAM was read; no image was written"
            raise


def _capture(args: argparse.Namespace, argv: list[str]) -> int:
    from collector.acquire import session

    _check_profile(args.profile, args.sysroot)
    options = session.CaptureOptions(
        profile=args.profile,
        output=args.output,
        sysroot=args.sysroot,
        source=args.source,
        include=args.include,
        exclude=args.exclude,
        level=args.level,
        threads=args.threads,
        chunk_size=args.chunk_size,
        force=args.force,
        command_line=["collect", *argv],
        stream_hash=args.hash,
        readers=args.readers,
        skip=args.skip,
        strict=args.strict,
    )
    if args.strict and not args.skip - {"zero"}:
        raise CollectorError("--strict applies to --skip free or cache only", 2)
    if options.readers is not None and not 1 <= options.readers <= 64:
        raise CollectorError("--readers must be between 1 and 64", 2)
    if not (1 << 12) <= options.chunk_size <= (64 << 20) or options.chunk_size % 4096:
        raise CollectorError("--chunk-size must be a multiple of 4 KiB between 4K and 64M", 2)
    if args.dry_run:
        with session.build_plan(options)[0] as the_plan:
            return _print_plan(the_plan, args.json)
    bar = None
    if not args.no_progress and not args.json and sys.stderr.isatty():
        bar = ProgressBar()
    try:
        summary, status = session.run(options, bar)
    finally:
        if bar:
            bar.close()
    # With the image on stdout, the summary must not land inside it.
    report = sys.stderr if args.output == "-" else sys.stdout
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True), file=report)
    else:
        _print_summary(summary, report)
    return status


def _print_plan(the_plan, as_json: bool) -> int:
    doc = the_plan.to_json()
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(f"lockdown: {doc['lockdown']}")
    print(f"strict /dev/mem: {doc['strict_devmem']} ({doc['strict_devmem_evidence']})")
    for name, state in doc["sources"].items():
        print(f"source {name}: {state}")
    for line in the_plan.lines():
        print(line)
    return 0


def _print_summary(s: dict, out=sys.stdout) -> None:
    pages = s.get("pages", {})
    state = "complete" if s.get("clean") else f"INCOMPLETE ({s.get('stopped_by')})"
    lines = [
        f"image: {s['output']} ({state})",
        f"chunks: {s.get('chunks')}  stream: {_human(s.get('stream_bytes', 0))}",
        "pages: " + ", ".join(f"{k} {v}" for k, v in pages.items()),
    ]
    if s.get("unreadable_errnos"):
        errs = ", ".join(f"{os.strerror(int(k))} x{v}" for k, v in s["unreadable_errnos"].items())
        lines.append(f"unreadable: {errs}")
    for k, v in (s.get("missing_metadata") or {}).items():
        lines.append(f"metadata missing: {k}: {v}")
    if s.get("unpadded"):
        start, end = s["unpadded"]
        lines.append(
            f"not padded: {start:#x}-{end - 1:#x} ({_human(end - start)}): the image ends inside "
            "this range, and `zstd -dc` gives a LiME file cut short there"
        )
    if s.get("skip_note"):
        lines.append(s["skip_note"])
    if "skip_seconds" in s:
        lines.append(
            f"skip: struct pages read and classified in {s['skip_seconds']:.3f} s "
            f"({_human(s.get('skip_struct_page_bytes', 0))} of memory map)"
        )
    name = s.get("stream_hash", "sha256")
    lines.append(f"{name} of `zstd -dc`: {s.get('stream_' + name)}")
    print("\n".join(lines), file=out)


# -- image commands -----------------------------------------------------------------------------


def cmd_plan(args: argparse.Namespace) -> int:
    from collector import signals
    from collector.acquire import session

    with signals.handled():
        _check_profile(args.profile, args.sysroot)
        options = session.CaptureOptions(
            profile=args.profile,
            sysroot=args.sysroot,
            source=args.source,
            include=args.include,
            exclude=args.exclude,
        )
        if args.mem_usage:
            return _print_mem_usage(session.mem_usage(options), args.json)
        with session.build_plan(options)[0] as the_plan:
            return _print_plan(the_plan, args.json)


def _print_mem_usage(doc: dict, as_json: bool) -> int:
    if as_json:
        print(json.dumps(doc, indent=2, sort_keys=True))
        return 0
    print(f"{'class':<24}{'pages':>12}{'bytes':>14}  --skip")
    for name, g in doc["groups"].items():
        print(f"{name:<24}{g['pages']:>12}{_human(g['bytes']):>14}  {g['skip'] or '(kept)'}")
    total = doc["total_pages"]
    print(f"{'total':<24}{total:>12}{_human(total * doc['page_size']):>14}")
    print(
        f"{doc['struct_page_bytes_read']} bytes of struct pages and page tables read through "
        f"{doc['via']} in {doc['seconds']:.3f} s"
    )
    pcp = doc.get("per_cpu_lists")
    if pcp and pcp["count"]:
        print(
            f"per-CPU free lists: {pcp['walked_pages']} pages walked "
            f"(their lists count {pcp['count']}), in free"
        )
    for note in doc["notes"]:
        print(f"note: {note}")
    print(f"zero pages: {doc['zero']}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from collector.image.info import image_info

    info = image_info(args.image, *image_source(args))
    if info["format"] != "collector":
        # Other tools' images carry no blobs: say what was found in memory instead.
        from collector.image.open import open_image
        from collector.kernel.kernel import Kernel

        with open_image(args.image, *image_source(args)) as memory:
            info["kernel_metadata"] = Kernel(memory).metadata_sources()
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
        return 0
    from collector.image.info import format_info
    from collector.text import escape_text

    print(escape_text(format_info(info), keep_newlines=True))
    return 0


VERIFY_EPILOG = """\
exit status:
  0  intact: every record, chunk and hash checks, and every range the image announces is there
  1  RAM damaged: a chunk, its descriptor, their order or the stream hash does not check
     (also: the HEADER is there but cannot be decoded)
  2  usage error
  3  incomplete: what is there checks, but RAM the image announced is missing (cut short,
     capture stopped by a signal or a full disk); the reason and the ranges are printed
  4  damaged metadata, RAM intact: a HEADER, blob, END, INDEX or seek-table record is damaged
     but every chunk checks against its descriptor
The first that applies, in the order 1, 4, 3. A file that cannot be opened ends as in
every command: 5 cannot open, 6 not a memory image, 3 cut inside its HEADER, 7 unsupported
(LiME, ELF, kdump and raw files carry no checksums to verify).
"""


def cmd_verify(args: argparse.Namespace) -> int:
    from collector.image.open import FORMAT_NAMES, open_image, sniff_file
    from collector.image.reader import STATUS_WORDS, NativeImage
    from collector.text import escape_text

    fmt, ranges = image_source(args)
    # Opened as every command opens it, so that a file that cannot be read fails alike.
    memory = open_image(args.image, fmt, ranges)
    if not isinstance(memory, NativeImage):
        memory.close()
        kind = fmt if fmt != "auto" else sniff_file(args.image) or "raw"
        # An AVML file's snappy chunks carry CRC-32Cs, checked as each chunk is read; none
        # covers the image as a whole, which is what verify reports on.
        what = "no whole-image checksums" if kind == "avml" else "no checksums"
        raise UnsupportedImage(
            args.image,
            f"{FORMAT_NAMES[kind]} carries {what} to verify; "
            "`collect info` lists its ranges and what is missing",
        )
    with memory as img:
        report = img.verify()
        damage = list(img.damage)
    status = report.status
    doc = {
        "image": args.image,
        "status": STATUS_WORDS[status],
        "format_version": report.version,
        "chunks": report.chunks,
        "stream_bytes": report.stream_bytes,
        "stream_sha256": report.stream_sha256,
        "stream_hash": report.stream_hash,
        "stream_digest": report.stream_digest,
        "blobs": report.blobs,
        "errors": report.errors,
        "ram_errors": report.ram_errors,
        "metadata_errors": report.metadata_errors,
        "incomplete": report.incomplete,
        "problems": report.problems,
        "missing": [[s, e] for s, e in report.missing],
        "read_around": damage,
        "lacks": report.lacks,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
        return status
    out = [
        f"{args.image}: {doc['status']}: {report.chunks} chunks, {report.stream_bytes} bytes",
        f"stream {report.stream_hash}: {report.stream_digest}",
    ]
    out += [f"damaged RAM: {e}" for e in report.ram_errors]
    out += [f"damaged metadata: {e}" for e in report.metadata_errors]
    out += [f"incomplete: {why}" for why in report.incomplete]
    out += [f"missing: {s:#x}-{e - 1:#x} ({_human(e - s)})" for s, e in report.missing]
    if report.lacks:
        out.append(f"format version {report.version} lacks these guarantees:")
        out += [f"  - {text}" for text in report.lacks]
    print("\n".join(escape_text(line) for line in out))
    return status


def cmd_profiles(args: argparse.Namespace) -> int:
    from collector import profiles

    rows = [{"name": p.name, "description": p.description} for p in profiles.available()]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:<10} {r['description']}")
    return 0


def cmd_translate(args: argparse.Namespace) -> int:
    from collector.kernel.kernel import Kernel

    memory = open_from_args(args)
    try:
        kernel = Kernel(memory)
        if args.pfn is not None:
            vaddr = kernel.pfn_to_page(args.pfn)
        elif args.address is None:
            raise CollectorError("give an ADDRESS or --pfn N", 2)
        else:
            vaddr = _address(kernel, args.address)
        t = kernel.translate(vaddr)
        if args.json:
            doc = t.to_json()
            if args.pfn is not None:
                doc["pfn"] = args.pfn
            print(json.dumps(doc, indent=2))
            return 0
        if args.pfn is not None:
            print(f"struct page for pfn {args.pfn:#x}: virtual {vaddr:#x}")
        for step in t.steps:
            print(step.describe())
        print(f"{vaddr:#x} -> physical {t.paddr:#x} ({_human(t.page_size)} page)")
    finally:
        memory.close()
    return 0


def _address(kernel, text: str) -> int:
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text, 0)
    except ValueError:
        return kernel.symbol(text)


def cmd_export(args: argparse.Namespace) -> int:
    from collector import outfile, signals
    from collector.image import export

    if args.to == "raw" and args.output == "-":
        raise CollectorError("a raw (padded) export needs a file it can seek in, not stdout", 2)
    if args.to == "isf":
        return _export_isf(args)
    memory = open_from_args(args)
    notes: list[str] = []
    try:
        with signals.handled(), outfile.writing(args.output, args.force) as out:
            if args.to == "raw":
                summary = export.export_raw(memory, out)
            elif args.to == "lime":
                summary = export.export_lime(memory, out)
            else:
                summary = export.export_elf(memory, out, **_elf_kernel(memory, notes))
    finally:
        memory.close()
    notes.extend(summary.notes)
    warning = summary.warning()
    doc = {
        "output": args.output,
        "format": args.to,
        "ranges": summary.ranges,
        "bytes": summary.bytes,
        "pages_not_captured": {f.label: n for f, n in summary.zero_filled.items()},
        "warning": warning,
        "notes": notes,
    }
    if args.to == "elf":
        doc["kernel_segments"] = summary.kernel_segments
    report = sys.stderr if args.output == "-" else sys.stdout
    if args.json:
        print(json.dumps(doc, indent=2), file=report)
    else:
        print(
            f"wrote {args.output}: {args.to}, {summary.ranges} ranges, {_human(summary.bytes)}",
            file=report,
        )
    if warning:
        print(f"collect: warning: {warning}", file=sys.stderr)
    for note in notes:
        print(f"collect: note: {note}", file=sys.stderr)
    return 0


def _elf_kernel(memory, notes: list[str]) -> dict:
    """What an ELF core of this kernel carries beyond RAM, as /proc/vmcore does: the
    VMCOREINFO text (blob, else found in memory, as a LiME file needs), the direct map's
    base for ``p_vaddr``, and the kernel image's own mapping. Each that cannot be worked
    out is left out, with a note saying why."""
    from collector.image.export import KernelMap
    from collector.kernel.kernel import Kernel, kernel_image_map

    kernel = Kernel(memory)
    out: dict = {}
    try:
        out["vmcoreinfo"] = kernel.vmcoreinfo.text.encode()
    except CollectorError as e:
        notes.append(f"no VMCOREINFO note ({e}): drgn and crash will not take it for a kernel core")
        return out
    try:
        out["page_offset_base"] = kernel.layout.page_offset_base
    except CollectorError as e:
        notes.append(f"p_vaddr left 0: the direct map's base is unknown ({e})")
    try:
        m = kernel_image_map(kernel)
        out["kernel_map"] = KernelMap(m.vaddr, m.paddr, m.size)
    except CollectorError as e:
        notes.append(f"no PT_LOAD for the kernel image's virtual addresses: {e}")
    return out


def cmd_drgn(args: argparse.Namespace) -> int:
    from collector.interop import drgn as interop

    # argparse hands `IMAGE -e CODE` to the script's arguments (everything after the first
    # positional is the script's): take -e back from there.
    code, rest = args.exec, list(args.args)
    if code is None and rest[:1] == ["-e"]:
        if len(rest) < 2:
            raise UsageError("drgn: -e needs the code to run")
        code, rest = rest[1], rest[2:]
    script = None
    if code is None and rest:
        script, rest = rest[0], rest[1:]
    prog = interop.program(args.image)
    interop.run(prog, code=code, script=script, args=rest)
    return 0


def _export_isf(args: argparse.Namespace) -> int:
    from collector import outfile, signals
    from collector.interop import isf
    from collector.kernel.kernel import Kernel

    started = time.monotonic()
    memory = open_from_args(args)
    try:
        result = isf.build_isf(Kernel(memory))
        with signals.handled(), outfile.writing(args.output, args.force) as out:
            sink = outfile.CheckedWriter(out)
            try:
                size = isf.write_isf(result, sink, xz=args.output.endswith(".xz"))  # type: ignore[arg-type]
            except OSError as e:
                raise sink.error(e) from None
    finally:
        memory.close()
    counts = result.counts()
    doc = {
        "output": args.output,
        "format": "isf",
        "isf_format": isf.FORMAT_VERSION,
        "bytes": size,
        **counts,
        "seconds": round(time.monotonic() - started, 3),
        "notes": result.notes,
    }
    report = sys.stderr if args.output == "-" else sys.stdout
    if args.json:
        print(json.dumps(doc, indent=2), file=report)
    else:
        print(
            f"wrote {args.output}: Volatility 3 symbol table (ISF {isf.FORMAT_VERSION}), "
            f"{counts['user_types']} user types, {counts['enums']} enums, "
            f"{counts['symbols']} symbols, {_human(size)}",
            file=report,
        )
    for note in result.notes:
        print(f"collect: note: {note}", file=sys.stderr)
    return 0


# -- dispatch -------------------------------------------------------------------------------


#: The subcommands collector.cli_analysis adds. Importing it loads the plugin machinery (a
#: third of the start-up time of an export): other commands build their parser without it.
ANALYSIS_COMMANDS = ("analyze", "plugins")
#: The subcommands collector.fleet.cli adds (many images, the fleet extra).
FLEET_COMMANDS = ("sweep", "stack")


def command_parser(
    with_analysis: bool = True,
    with_fleet: bool = True,
) -> tuple[argparse.ArgumentParser, dict[str, Callable]]:
    top = argparse.ArgumentParser(prog="collect")
    sub = top.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("plan", help="print the per-range plan without reading RAM")
    _add_plan_options(p)
    p.add_argument(
        "--mem-usage",
        action="store_true",
        help="classify this machine's struct pages and print what each --skip class would "
        "leave out (reads the memory map and page tables, no other RAM)",
    )
    p.set_defaults(handler=cmd_plan)

    p = sub.add_parser("info", help="describe an image")
    p.add_argument("image")
    add_image_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser(
        "verify",
        help="check every byte of an image: exit 0 intact, 1 RAM damaged, 3 incomplete, "
        "4 damaged metadata with the RAM intact",
        description="Walk every frame of an image and check each record's checksum, each "
        "chunk against its descriptor, the order of the chunks, the blobs the header "
        "announces, the END record's hashes, the INDEX and the seek table.",
        epilog=VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("image")
    add_image_options(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_verify)

    p = sub.add_parser("profiles", help="list architecture profiles")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_profiles)

    p = sub.add_parser(
        "translate",
        help="walk the page tables for a virtual address (hex, or a kernel symbol name)",
    )
    p.add_argument("image")
    add_image_options(p)
    p.add_argument("address", nargs="?")
    p.add_argument("--pfn", type=lambda s: int(s, 0), help="translate the struct page of PFN N")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_translate)

    p = sub.add_parser(
        "export",
        help="convert an image to LiME, raw (padded) or ELF core, or write its Volatility 3 "
        "symbol table",
        description="Convert an image; or, with --to isf, write a Volatility 3 symbol table "
        "(ISF JSON; xz-compressed when the name ends in .xz) built from the image's BTF, "
        "kallsyms and VMCOREINFO, for `vol -s DIR` with a LiME export of the same image. "
        "The output is written under a temporary name beside "
        "it, mode 0600, and renamed into place only when complete; a failed export removes "
        "its partial file and leaves an existing one as it was.",
    )
    p.add_argument("image")
    add_image_options(p)
    p.add_argument("--to", choices=["lime", "raw", "elf", "isf"], required=True)
    p.add_argument(
        "-o", "--output", required=True, help="file to create, or - for stdout (not for raw)"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing regular file (a new file is renamed over it)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser(
        "drgn",
        help="drgn on an image: an interactive session, -e CODE, or a script",
        description="Open the image as a drgn program without debug info: memory from the "
        "image, symbols from its kallsyms, types from its BTF, globals typed from BTF and "
        "collector's table. Without -e or a script, and with a terminal, an interactive "
        "session; without a terminal, the code on standard input. Needs drgn "
        "(pip install 'collector[drgn]').",
    )
    p.add_argument("image")
    p.add_argument(
        "-e", dest="exec", metavar="CODE", help="run CODE with drgn's helpers imported and exit"
    )
    p.add_argument(
        "args",
        nargs=argparse.REMAINDER,
        metavar="SCRIPT [ARG ...]",
        help="a Python script to run with `prog` set, and its arguments (sys.argv)",
    )
    p.set_defaults(handler=cmd_drgn)

    if with_analysis:
        from collector import cli_analysis

        cli_analysis.register(sub)
    if with_fleet:
        from collector.fleet import cli as fleet_cli

        fleet_cli.register(sub)
    return top, {name: parser for name, parser in sub.choices.items()}


#: Commands whose options may come between their positionals (`translate IMAGE --json ADDR`).
INTERMIXED = {"translate"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    restore_standalone_environment()
    try:
        top, commands = command_parser(
            with_analysis=bool(argv) and argv[0] in ANALYSIS_COMMANDS,
            with_fleet=bool(argv) and argv[0] in FLEET_COMMANDS,
        )
        if argv and argv[0] in commands:
            if argv[0] in INTERMIXED:
                # An optional positional after the image (translate's address) is only
                # matched by plain parse_args when it comes before every option.
                args = commands[argv[0]].parse_intermixed_args(argv[1:])
            else:
                args = top.parse_args(argv)
            return args.handler(args)
        args = capture_parser().parse_args(argv)
        return cmd_capture(args, argv)
    except CollectorError as e:
        from collector.text import escape_text

        print(f"collect: {escape_text(str(e))}", file=sys.stderr)
        return e.exit_code
    except Interrupted as e:
        print(f"collect: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("collect: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
