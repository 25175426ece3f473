"""What `collect info` shows: identity, plan, ranges, page fates, hashes and blobs of an image.

Everything here comes from the image, which may be hostile: values are taken only when they
have the type the format gives them, and text is escaped before it reaches a terminal.
"""

from __future__ import annotations

import os
from typing import Any

from collector.image import format as image_format
from collector.image.reader import NativeImage


def _typed(value: Any, kind: type | tuple[type, ...]) -> Any:
    """``value`` when it is of ``kind`` (bools are not ints), else None."""
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        return None
    return value if isinstance(value, kind) else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def _counts(value: Any) -> dict[str, int] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): v for k, v in value.items() if type(v) is int}


def _strings(value: Any) -> list[str] | None:
    if not isinstance(value, list):
        return None
    return [v for v in value if isinstance(v, str)]


def image_info(
    path: str, fmt: str = "auto", memory_map: list[tuple[int, int]] | None = None
) -> dict:
    """Describe an image as a JSON-ready dict (native images in full, others by their ranges,
    and, where the format records them, the pages it does not hold).

    :param fmt: and ``memory_map``: as :func:`collector.image.open.open_image` takes them.
    """
    from collector.image.open import open_image, sniff_file

    if (fmt == "auto" and sniff_file(path) != "native") or fmt not in ("auto", "native"):
        other = open_image(path, fmt, memory_map)  # says what the file is not, if nothing known
        try:
            doc = {
                "image": path,
                "format": other.metadata.get("format", type(other).__name__),
                "ranges": [[s, e] for s, e in other.ranges()],
                "blobs": [n for n in ("vmcoreinfo",) if other.blob(n) is not None],
                "problems": list(getattr(other, "problems", [])),
            }
            fate_runs = getattr(other, "fate_runs", None)
            if callable(fate_runs):
                fates: dict[str, int] = {}
                for run in fate_runs():
                    fates[run.fate.label] = fates.get(run.fate.label, 0) + run.count
                doc["pages_not_read_in_image"] = fates
            return doc
        finally:
            other.close()
    with NativeImage(path) as memory:
        meta = memory.metadata
        end = memory.end or {}
        fates: dict[str, int] = {}
        read_zero = 0
        for run in memory.fate_runs():
            if run.fate.is_data:  # read-zero: read, so not among the pages not read
                read_zero += run.count
            else:
                fates[run.fate.label] = fates.get(run.fate.label, 0) + run.count
        host = _dict(meta.get("host"))
        return {
            "image": path,
            "format": "collector",
            "format_version": memory.version,
            "file_bytes": memory.size,
            "uuid": memory.header.uuid.hex(),
            "complete": memory.end is not None and not memory.problems,
            "clean_finish": _typed(end.get("clean"), bool),
            "stopped_by": _typed(end.get("stopped_by"), str),
            "tool": _dict(meta.get("tool")),
            "profile": _typed(meta.get("profile"), str),
            "command_line": _strings(meta.get("command_line")),
            "host": host,
            "lockdown": _typed(meta.get("lockdown"), str),
            "start_time": _typed(meta.get("start_time"), str),
            "end_time": _typed(end.get("end_time"), str),
            "page_size": memory.page_size,
            "chunk_size": memory.header.chunk_size,
            "plan": _dict(meta.get("plan")),
            "ranges": [[s, e] for s, e in memory.ranges()],
            "captured_ranges": [[s, e] for s, e in memory.captured_ranges()],
            "missing_ranges": [[s, e] for s, e in memory.missing_ranges()],
            "pages": _counts(end.get("pages")),
            "pages_not_read_in_image": fates,
            "pages_read_zero_in_image": read_zero,
            "unreadable_errnos": _counts(end.get("unreadable_errnos")),
            "stream_sha256": _typed(end.get("stream_sha256"), str),
            "stream_hash": _typed(image_format.end_stream_hash(end)[0], str),
            "stream_digest": _typed(image_format.end_stream_hash(end)[1], str),
            "stream_bytes": _typed(end.get("stream_bytes"), int),
            "skip": _dict(meta.get("skip")),
            "skip_seconds": _typed(end.get("skip_seconds"), (int, float)),
            "skip_struct_page_bytes": _typed(end.get("skip_struct_page_bytes"), int),
            "blobs": sorted(memory.blobs),
            "missing_metadata": _dict(meta.get("missing_metadata")),
            "problems": memory.problems,
            "damage": memory.damage,
        }


def _plan_lines(plan: dict) -> list[str]:
    lines = []
    entries = plan.get("entries")
    for e in entries if isinstance(entries, list) else []:
        if not isinstance(e, dict):
            continue
        start, end = _typed(e.get("start"), int), _typed(e.get("end"), int)
        if start is None or end is None:
            continue
        src = e.get("source") or f"({e.get('fate')})"
        lines.append(f"plan:     {start:#x}-{end - 1:#x} {src}: {e.get('reason')}")
    return lines


def format_info(info: dict) -> str:
    """The human-readable form of :func:`image_info` (escape it before it meets a terminal)."""
    lines = [f"image:    {info['image']} ({info['format']})"]
    if info["format"] != "collector":
        lines += [f"range:    {s:#x}-{e - 1:#x}" for s, e in info["ranges"]]
        lines += [f"blobs:    {', '.join(info['blobs']) or 'none'}"]
        # Filled in by the caller from the kernel view: where each piece came from.
        for what, source in (info.get("kernel_metadata") or {}).items():
            lines.append(f"{what + ':':<12}{source}")
        not_read = info.get("pages_not_read_in_image")
        if not_read is not None:
            shown = ", ".join(f"{k} {v}" for k, v in not_read.items()) or "none"
            lines.append(f"not read: {shown} (pages in the ranges the image has no data for)")
        lines += [f"problem:  {p}" for p in info["problems"]]
        return "\n".join(lines)
    host = info.get("host") or {}
    uname = _dict(host.get("uname"))
    tool = info.get("tool") or {}
    state = "complete" if info["complete"] else "CUT SHORT"
    if info.get("stopped_by"):
        state += f", stopped: {info['stopped_by']}"
    if info.get("damage"):
        state += ", DAMAGED (see `collect verify`)"
    lines += [
        f"state:    {state}",
        f"format:   version {info.get('format_version')}",
        f"tool:     {tool.get('name')} {tool.get('version')}",
        f"profile:  {info.get('profile')}",
        f"host:     {host.get('hostname')}  {uname.get('release', '')} {uname.get('machine', '')}",
        f"boot id:  {host.get('boot_id')}",
        f"lockdown: {info.get('lockdown')}",
        f"time:     {info.get('start_time')} .. {info.get('end_time')}",
        f"command:  {' '.join(info.get('command_line') or [])}",
        f"pages:    {info['page_size']} bytes, chunks of {info['chunk_size']} bytes",
    ]
    lines += _plan_lines(info.get("plan") or {})
    for s, e in info["ranges"]:
        lines.append(f"range:    {s:#x}-{e - 1:#x} ({(e - s) >> 10} KiB)")
    for s, e in info["missing_ranges"]:
        lines.append(f"missing:  {s:#x}-{e - 1:#x}")
    if info.get("pages"):
        lines.append("fates:    " + ", ".join(f"{k} {v}" for k, v in info["pages"].items()))
    skip = info.get("skip") or {}
    classes = [str(c) for c in skip.get("classes") or [] if c != "zero"]
    if classes:
        if info.get("skip_seconds") is not None:
            how = (
                f"struct pages read and classified before each chunk, "
                f"{info['skip_seconds']} s in all ({info.get('skip_struct_page_bytes')} bytes)"
            )
        else:
            how = str(skip.get("note") or "not applied")
        lines.append(f"skip:     {','.join(classes)}: {how}")
    if "zero" in (skip.get("classes") or []):
        lines.append(
            f"skip:     zero: {info.get('pages_read_zero_in_image')} pages read and found all "
            "zeros (read-zero: data, kept in the stream)"
        )
    for errno, count in (info.get("unreadable_errnos") or {}).items():
        name = os.strerror(int(errno)) if errno.isdigit() and int(errno) < 4096 else errno
        lines.append(f"errno:    {name}: {count} pages")
    name = info.get("stream_hash") or "sha256"
    check = image_format.STREAM_HASHES.get(name, name)
    lines.append(f"{name + ':':<10}{info.get('stream_digest')} (`zstd -dc IMAGE | {check}`)")
    lines.append(f"blobs:    {', '.join(info['blobs'])}")
    for k, v in (info.get("missing_metadata") or {}).items():
        lines.append(f"no {k}: {v}")
    lines += [f"problem:  {p}" for p in info["problems"]]
    lines += [f"damage:   {d}" for d in info.get("damage") or []]
    return "\n".join(lines)
