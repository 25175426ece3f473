"""What `collect info` shows: identity, plan, ranges, page fates, hashes and blobs of an image."""

from __future__ import annotations

import os

from collector.errors import ImageError
from collector.image.reader import NativeImage


def image_info(path: str) -> dict:
    """Describe an image as a JSON-ready dict (native images in full, others by their ranges)."""
    try:
        memory = NativeImage(path)
    except ImageError as native_error:
        from collector.image.open import open_image

        try:
            other = open_image(path)
        except ImageError:
            raise native_error from None
        try:
            return {
                "image": path,
                "format": other.metadata.get("format", type(other).__name__),
                "ranges": [[s, e] for s, e in other.ranges()],
                "blobs": [n for n in ("vmcoreinfo",) if other.blob(n) is not None],
                "problems": list(getattr(other, "problems", [])),
            }
        finally:
            other.close()
    with memory:
        meta = memory.metadata
        end = memory.end or {}
        fates: dict[str, int] = {}
        for run in memory.fate_runs():
            fates[run.fate.label] = fates.get(run.fate.label, 0) + run.count
        return {
            "image": path,
            "format": "collector",
            "file_bytes": memory.size,
            "uuid": memory.header.uuid.hex(),
            "complete": memory.end is not None and not memory.problems,
            "clean_finish": end.get("clean"),
            "stopped_by": end.get("stopped_by"),
            "tool": meta.get("tool"),
            "profile": meta.get("profile"),
            "command_line": meta.get("command_line"),
            "host": meta.get("host"),
            "lockdown": meta.get("lockdown"),
            "start_time": meta.get("start_time"),
            "end_time": end.get("end_time"),
            "page_size": memory.page_size,
            "chunk_size": memory.header.chunk_size,
            "plan": meta.get("plan"),
            "ranges": [[s, e] for s, e in memory.ranges()],
            "captured_ranges": [[s, e] for s, e in memory.captured_ranges()],
            "missing_ranges": [[s, e] for s, e in memory.missing_ranges()],
            "pages": end.get("pages"),
            "pages_not_read_in_image": fates,
            "unreadable_errnos": end.get("unreadable_errnos"),
            "stream_sha256": end.get("stream_sha256"),
            "stream_bytes": end.get("stream_bytes"),
            "blobs": sorted(memory.blobs),
            "missing_metadata": meta.get("missing_metadata"),
            "problems": memory.problems,
        }


def format_info(info: dict) -> str:
    """The human-readable form of :func:`image_info`."""
    lines = [f"image:    {info['image']} ({info['format']})"]
    if info["format"] != "collector":
        lines += [f"range:    {s:#x}-{e - 1:#x}" for s, e in info["ranges"]]
        lines += [f"blobs:    {', '.join(info['blobs']) or 'none'}"]
        lines += [f"problem:  {p}" for p in info["problems"]]
        return "\n".join(lines)
    host = info.get("host") or {}
    uname = host.get("uname") or {}
    state = "complete" if info["complete"] else "CUT SHORT"
    if info.get("stopped_by"):
        state += f", stopped: {info['stopped_by']}"
    lines += [
        f"state:    {state}",
        f"tool:     {(info.get('tool') or {}).get('name')} {(info.get('tool') or {}).get('version')}",
        f"profile:  {info.get('profile')}",
        f"host:     {host.get('hostname')}  {uname.get('release', '')} {uname.get('machine', '')}",
        f"boot id:  {host.get('boot_id')}",
        f"lockdown: {info.get('lockdown')}",
        f"time:     {info.get('start_time')} .. {info.get('end_time')}",
        f"command:  {' '.join(info.get('command_line') or [])}",
        f"pages:    {info['page_size']} bytes, chunks of {info['chunk_size']} bytes",
    ]
    for e in (info.get("plan") or {}).get("entries", []):
        src = e.get("source") or f"({e.get('fate')})"
        lines.append(f"plan:     {e['start']:#x}-{e['end'] - 1:#x} {src}: {e.get('reason')}")
    for s, e in info["ranges"]:
        lines.append(f"range:    {s:#x}-{e - 1:#x} ({(e - s) >> 10} KiB)")
    for s, e in info["missing_ranges"]:
        lines.append(f"missing:  {s:#x}-{e - 1:#x}")
    if info.get("pages"):
        lines.append("fates:    " + ", ".join(f"{k} {v}" for k, v in info["pages"].items()))
    for errno, count in (info.get("unreadable_errnos") or {}).items():
        lines.append(f"errno:    {os.strerror(int(errno))}: {count} pages")
    lines.append(f"sha256:   {info.get('stream_sha256')} (of `zstd -dc`)")
    lines.append(f"blobs:    {', '.join(info['blobs'])}")
    for k, v in (info.get("missing_metadata") or {}).items():
        lines.append(f"no {k}: {v}")
    lines += [f"problem:  {p}" for p in info["problems"]]
    return "\n".join(lines)
