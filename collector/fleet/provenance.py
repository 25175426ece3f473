"""Who an image is: its stream hash, host, kernel, boot and capture time, as the sweep stamps
on every row.

A collector image says all of it in its header and END record (what `collect info` shows).
Other formats (LiME, ELF cores, kdump, AVML) carry none of it: their hash is the file's own,
the host name and release are read from the captured kernel's ``init_uts_ns`` (the sysinfo
analysis), and boot id and capture time stay unknown.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from collector.errors import CollectorError

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel
    from collector.memory import PhysicalMemory
    from collector.plugin_manager import PluginManager

_HASH_BLOCK = 1 << 22


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _dict(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


def image_hash(path: str, memory: PhysicalMemory) -> str | None:
    """SHA-256 of the image's memory stream (see :data:`collector.fleet.schema.PROVENANCE`)."""
    from collector.image.reader import NativeImage

    if isinstance(memory, NativeImage):
        return _str(_dict(memory.end).get("stream_sha256"))
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def header_identity(memory: PhysicalMemory) -> dict[str, str | None]:
    """Host name, release, boot id and capture start from a collector image's header; the
    same keys, all None, for other formats."""
    from collector.image.reader import NativeImage

    if not isinstance(memory, NativeImage):
        return dict.fromkeys(("hostname", "kernel_release", "boot_id", "captured_at"))
    meta = memory.metadata
    host = _dict(meta.get("host"))
    return {
        "hostname": _str(host.get("hostname")),
        "kernel_release": _str(_dict(host.get("uname")).get("release")),
        "boot_id": _str(host.get("boot_id")),
        "captured_at": _str(meta.get("start_time")),
    }


def fill_from_kernel(
    identity: dict[str, str | None], kernel: Kernel, manager: PluginManager
) -> None:
    """Fill an unknown host name or release from the kernel's own ``init_uts_ns``."""
    if identity["hostname"] is not None and identity["kernel_release"] is not None:
        return
    from collector.analyze import analyze_kernel

    uts: dict[str, Any] = {}
    try:
        result = analyze_kernel(kernel, "sysinfo", manager=manager)
        if isinstance(result.records, list) and result.records:
            uts = result.records[0]
    except CollectorError:
        pass  # the analysis itself says why when it runs; provenance just stays unknown
    for key, member, fallback in (
        ("hostname", "nodename", None),
        ("kernel_release", "release", lambda: kernel.release),
    ):
        if identity[key] is None:
            identity[key] = _str(uts.get(member)) or _quietly(fallback)


def _quietly(get: Callable[[], Any] | None) -> str | None:
    if get is None:
        return None
    try:
        return _str(get())
    except CollectorError:
        return None


def absolute(path: str) -> str:
    """The path every row names an image by: absolute, symlinks kept (a fleet's images are
    often links into a capture store, and the link's name is the one users know)."""
    return os.path.abspath(path)
