"""Run inside a test guest: what the guest's /proc says about its processes, modules, CPUs and
memory, and the kernel log as /dev/kmsg gives it.

Standard library only, written apart from the collector, so the helpers' tests compare the
collector's reading of a capture with the kernel's own account. Prints one JSON document.
Usage: ``python snapshot.py [PID ...]``: the PIDs whose memory maps to record as well.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import zlib

#: The /proc files the page tests compare with, read as text.
MEMORY_FILES = ("meminfo", "buddyinfo", "zoneinfo", "pagetypeinfo", "slabinfo", "vmstat")


def _read(path: str, mode: str = "r") -> str | bytes | None:
    try:
        with open(path, mode) as fh:
            return fh.read()
    except OSError:
        return None


def _frames(pid: int, start: int, end: int) -> list[int] | None:
    """The page frame numbers /proc/PID/pagemap gives for ``[start, end)`` (0: not present)."""
    if start >= end:
        return []
    frames = []
    try:
        with open(f"/proc/{pid}/pagemap", "rb") as fh:
            for page in range(start >> 12, (end - 1 >> 12) + 1):
                fh.seek(page * 8)
                entry = int.from_bytes(fh.read(8), "little")
                frames.append(entry & ((1 << 55) - 1) if entry >> 63 else 0)
    except OSError:
        return None
    return frames


def process(pid: int, with_maps: bool) -> dict | None:
    stat = _read(f"/proc/{pid}/stat")
    status = _read(f"/proc/{pid}/status")
    if not isinstance(stat, str) or not isinstance(status, str):
        return None  # gone meanwhile
    # comm may hold spaces and parentheses: it runs from the first "(" to the last ")".
    comm = stat[stat.index("(") + 1 : stat.rindex(")")]
    rest = stat[stat.rindex(")") + 2 :].split()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    uids = fields["Uid"].split()
    gids = fields["Gid"].split()
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = None
    try:
        threads = sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        threads = []
    cmdline = _read(f"/proc/{pid}/cmdline", "rb")
    # The page frames holding the arguments (arg_start..arg_end are the 48th and 49th fields
    # of /proc/PID/stat): a page the kernel moves while a capture runs (compaction) is read
    # from two moments, and its frame number says so.
    arg_start, arg_end = int(rest[45]), int(rest[46])
    out = {
        "pid": pid,
        "comm": comm,
        "state": rest[0],
        "ppid": int(rest[1]),
        "tgid": int(fields["Tgid"]),
        "uid": int(uids[0]),
        "euid": int(uids[1]),
        "gid": int(gids[0]),
        "flags": int(rest[6]),
        "starttime": int(rest[19]),
        "threads": threads,
        "exe": exe,
        "cmdline": cmdline.hex() if isinstance(cmdline, bytes) else None,
        "arg_frames": _frames(pid, arg_start, arg_end),
    }
    if with_maps:
        maps = _read(f"/proc/{pid}/maps")
        out["maps"] = maps.splitlines() if isinstance(maps, str) else None
    return out


def packed(path: str) -> str | None:
    """A binary /proc file (/proc/kpageflags: 8 bytes per PFN) as base64 of its zlib stream.

    Most PFNs share a few flag values, so 3 MiB of kpageflags packs into tens of KiB.
    """
    # kpageflags refuses reads whose size or offset is not a multiple of 8 (EINVAL), so it
    # is read in aligned blocks rather than with read()'s growing buffer.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    pack = zlib.compressobj(6)
    out = []
    try:
        while True:
            block = os.read(fd, 1 << 16)
            if not block:
                break
            out.append(pack.compress(block))
    except OSError:
        return None
    finally:
        os.close(fd)
    out.append(pack.flush())
    return base64.b64encode(b"".join(out)).decode()


def kmsg() -> list[dict] | None:
    """Every record /dev/kmsg holds (kernel/printk/printk.c's devkmsg_read): one read gives one
    record, ``prio,seq,usec,flags[,...];text`` then ``KEY=value`` lines, until EAGAIN."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    records = []
    try:
        while True:
            try:
                raw = os.read(fd, 1 << 16)
            except BlockingIOError:
                break
            except OSError as error:  # EPIPE: records were overwritten under the reader
                if error.errno == 32:
                    continue
                raise
            if not raw:
                break
            head, _, body = raw.decode("utf-8", "replace").partition(";")
            prio, seq, usec, *_ = head.split(",")
            text, *props = body.rstrip("\n").split("\n")
            records.append(
                {
                    "prio": int(prio),
                    "seq": int(seq),
                    "usec": int(usec),
                    "text": text,
                    "dict": [p.strip() for p in props],
                }
            )
    finally:
        os.close(fd)
    return records


def main(argv: list[str]) -> None:
    with_maps = {int(a) for a in argv}
    processes = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = process(int(name), int(name) in with_maps)
            if p is not None:
                processes[name] = p
    modules = _read("/proc/modules")
    cpuinfo = _read("/proc/cpuinfo")
    cpus = []
    for block in (cpuinfo or "").split("\n\n"):
        fields = {
            k.strip(): v.strip() for k, _, v in (line.partition(":") for line in block.splitlines())
        }
        if "processor" in fields:
            cpus.append(fields)
    stat = _read("/proc/stat")
    cpustat = {}
    for line in (stat or "").splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            cpustat[name[3:]] = [int(v) for v in values]
    online = _read("/sys/devices/system/cpu/online")
    possible = _read("/sys/devices/system/cpu/possible")
    json.dump(
        {
            "processes": processes,
            "modules": (modules or "").splitlines(),
            "cpus": cpus,
            "cpustat": cpustat,
            "online": (online or "").strip(),
            "possible": (possible or "").strip(),
            "memory": {name: _read(f"/proc/{name}") for name in MEMORY_FILES},
            "kpageflags": packed("/proc/kpageflags"),
            "kmsg": kmsg(),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
