"""Facts about the live host that shape a capture: lockdown, privileges, CPU, identity.

Everything is read through a :class:`~collector.sysroot.Sysroot`, so tests describe a fake
host with files. A fact that cannot be read is recorded with the reason, never fatal.
"""

from __future__ import annotations

import errno
import os
import stat
import zlib

from collector.errors import CollectorError
from collector.sysroot import Sysroot

LOCKDOWN_STATES = ("none", "integrity", "confidentiality")

# A kernel .config is a few hundred KiB; anything far larger is not one.
MAX_CONFIG_BYTES = 8 << 20
MAX_SMALL_FILE = 1 << 20
# MAX_PHYSMEM_BITS of x86-64 with 5-level paging and of arm64 with 52-bit PAs.
MAX_PHYS_BITS = 52


def as_sysroot(sysroot: Sysroot | str | os.PathLike[str] | None) -> Sysroot:
    if isinstance(sysroot, Sysroot):
        return sysroot
    return Sysroot("/" if sysroot is None else sysroot)


def _read_small(sysroot: Sysroot, path: str, limit: int = MAX_SMALL_FILE) -> bytes:
    return read_limited(sysroot, path, limit, truncate=True)


def read_limited(sysroot: Sysroot, path: str, limit: int, *, truncate: bool = False) -> bytes:
    """Read a /proc, /sys or /etc file of at most ``limit`` bytes.

    The file is opened without blocking and must be a regular file (as /proc and /sys files
    are), so a FIFO or a device planted in a sysroot cannot hang the read or feed it forever.

    :param truncate: return the first ``limit`` bytes of a larger file instead of failing.
    :raises OSError: the file cannot be read; EFBIG when it is larger than ``limit``, EINVAL
        when it is not a regular file.
    """
    fd = os.open(sysroot.path(path), os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{path} is not a regular file")
        parts: list[bytes] = []
        got = 0
        # /proc files report size 0: read until end of file, one byte past the limit at most.
        while got <= limit:
            part = os.read(fd, min(1 << 20, limit + 1 - got))
            if not part:
                break
            parts.append(part)
            got += len(part)
    finally:
        os.close(fd)
    data = b"".join(parts)
    if len(data) > limit:
        if truncate:
            return data[:limit]
        raise OSError(errno.EFBIG, f"{path} is larger than {limit} bytes")
    return data


def phys_address_bits(sysroot: Sysroot | str | None = None) -> tuple[int, str]:
    """The width of physical addresses on this machine, and where it comes from.

    x86 prints the CPU's width in /proc/cpuinfo (``address sizes : 46 bits physical, 48 bits
    virtual``, from CPUID leaf 0x80000008). Without it, the largest any supported
    architecture has: 52 bits (x86-64 with 5-level paging and arm64 both have
    MAX_PHYSMEM_BITS 52).

    :returns: ``(bits, evidence)``.
    """
    root = as_sysroot(sysroot)
    try:
        text = _read_small(root, "/proc/cpuinfo", 4 << 20).decode("utf-8", "replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "address sizes":
            words = value.split()
            if len(words) >= 3 and words[0].isdigit() and words[2].startswith("physical"):
                bits = int(words[0])
                if 12 <= bits <= MAX_PHYS_BITS:
                    return bits, f"{bits} bits physical in /proc/cpuinfo"
            break
    return MAX_PHYS_BITS, f"{MAX_PHYS_BITS} bits, the largest physical address width Linux has"


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def lockdown_state(sysroot: Sysroot | str | None = None) -> str:
    """The kernel lockdown level: ``none``, ``integrity``, ``confidentiality``, ``absent``
    (no lockdown LSM, or securityfs not mounted) or ``unknown`` (unreadable or unparsable).

    security/lockdown/lockdown.c prints every level and brackets the active one:
    ``none [integrity] confidentiality``.
    """
    root = as_sysroot(sysroot)
    try:
        text = _read_small(root, "/sys/kernel/security/lockdown").decode("ascii", "replace")
    except FileNotFoundError:
        return "absent"
    except OSError:
        return "unknown"
    for word in text.split():
        if word.startswith("[") and word.endswith("]") and word[1:-1] in LOCKDOWN_STATES:
            return word[1:-1]
    return "unknown"


def require_root(sysroot: Sysroot | str | None = None) -> None:
    """Refuse to capture a live machine without root; a fake sysroot needs no privileges.

    :raises CollectorError: when the effective user is not root on a live host.
    """
    root = as_sysroot(sysroot)
    if not root.is_live:
        return
    if os.geteuid() != 0:
        raise CollectorError(
            "collect must run as root (reading physical memory needs CAP_SYS_RAWIO)"
        )


def cpu_flags(sysroot: Sysroot | str | None = None) -> list[str]:
    """The CPU feature flags of the first processor in /proc/cpuinfo (``flags`` on x86,
    ``Features`` on arm64), sorted; empty when the file is missing or has neither line."""
    root = as_sysroot(sysroot)
    try:
        text = _read_small(root, "/proc/cpuinfo", 4 << 20).decode("utf-8", "replace")
    except OSError:
        return []
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return sorted(set(value.split()))
    return []


def machine(sysroot: Sysroot | str | None = None) -> str:
    """The machine architecture as ``uname -m`` prints it (``x86_64``); empty if unknown.

    A live host answers through uname(2); a sysroot through /proc/sys/kernel/arch.
    """
    root = as_sysroot(sysroot)
    if root.is_live:
        return os.uname().machine
    try:
        return _read_small(root, "/proc/sys/kernel/arch", 256).decode("ascii", "replace").strip()
    except OSError:
        return ""


def uname() -> dict[str, str]:
    """The running kernel's uname fields (of this process's host, not of a sysroot)."""
    u = os.uname()
    return {
        "sysname": u.sysname,
        "nodename": u.nodename,
        "release": u.release,
        "version": u.version,
        "machine": u.machine,
    }


def page_size(sysroot: Sysroot | str | None = None) -> int:
    """The page size of the host: the running kernel's on a live host, 4096 for a sysroot
    (callers that know better, e.g. from VMCOREINFO's PAGESIZE, should use that)."""
    root = as_sysroot(sysroot)
    if root.is_live:
        return os.sysconf("SC_PAGE_SIZE")
    return 4096


def host_identity(sysroot: Sysroot | str | None = None) -> dict:
    """Who the host is, for the image header.

    :returns: ``hostname``, ``uname`` (sysname, nodename, release, version, machine),
        ``boot_id``, ``cmdline``, ``machine_id``; an item that could not be read is None and
        ``missing`` maps its name to the reason.
    """
    root = as_sysroot(sysroot)
    missing: dict[str, str] = {}

    def text(key: str, path: str) -> str | None:
        try:
            return _read_small(root, path).decode("utf-8", "replace").strip("\n").strip()
        except OSError as exc:
            missing[key] = f"{path}: {_reason(exc)}"
            return None

    hostname = text("hostname", "/proc/sys/kernel/hostname")
    fields = {
        "sysname": text("uname.sysname", "/proc/sys/kernel/ostype"),
        "nodename": hostname,
        "release": text("uname.release", "/proc/sys/kernel/osrelease"),
        "version": text("uname.version", "/proc/sys/kernel/version"),
        "machine": None,
    }
    if root.is_live:
        fields["machine"] = os.uname().machine
    else:
        fields["machine"] = text("uname.machine", "/proc/sys/kernel/arch")
    identity = {
        "hostname": hostname,
        "uname": fields,
        "boot_id": text("boot_id", "/proc/sys/kernel/random/boot_id"),
        "cmdline": text("cmdline", "/proc/cmdline"),
        "machine_id": text("machine_id", "/etc/machine-id"),
    }
    identity["missing"] = missing
    return identity


def kernel_config(sysroot: Sysroot | str | None = None) -> tuple[dict[str, str], str] | None:
    """The running kernel's build configuration, if the host exposes it.

    Looks at /proc/config.gz (CONFIG_IKCONFIG_PROC) and then /boot/config-<release>.

    :returns: ``({"CONFIG_STRICT_DEVMEM": "y", ...}, where)``, with ``"n"`` for options the
        file lists as "is not set"; None when neither file is readable.
    """
    root = as_sysroot(sysroot)
    candidates = ["/proc/config.gz"]
    try:
        release = _read_small(root, "/proc/sys/kernel/osrelease").decode().strip()
        if release and "/" not in release:
            candidates.append(f"/boot/config-{release}")
    except (OSError, UnicodeDecodeError):
        pass
    for path in candidates:
        try:
            raw = _read_small(root, path, MAX_CONFIG_BYTES)
            if path.endswith(".gz"):
                # Bounded, so a hostile or corrupt file cannot inflate without limit.
                raw = zlib.decompressobj(wbits=31).decompress(raw, MAX_CONFIG_BYTES)
        except (OSError, zlib.error):
            continue
        return _parse_config(raw.decode("utf-8", "replace")), path
    return None


def _parse_config(text: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("CONFIG_") and "=" in line:
            key, value = line.split("=", 1)
            options[key] = value.strip('"')
        elif line.startswith("# CONFIG_") and line.endswith(" is not set"):
            options[line[2 : -len(" is not set")]] = "n"
    return options
