"""Run inside a test guest: the kernel's own count of free memory, right now, as JSON.

``memfree``: /proc/meminfo's MemFree in bytes (zone free counters: buddy and per-CPU lists).
``kpage_free``: page frames of System RAM that /proc/kpageflags and /proc/kpagecount show as
free: the head of a free buddy block (KPF_BUDDY), or no references and no flags at all (the
rest of a free block, or a page on a per-CPU list).
``pcp_count``: pages on the per-CPU free lists, the sum of /proc/zoneinfo's pageset counts.
Standard library only.
"""

from __future__ import annotations

import json
import struct

PAGE = 4096
KPF_BUDDY = 1 << 10
KPF_NOPAGE = 1 << 20


def ram_pfns() -> list[tuple[int, int]]:
    spans = []
    with open("/proc/iomem") as fh:
        for line in fh:
            if line.startswith(" ") or not line.rstrip().endswith(": System RAM"):
                continue
            lo, hi = (int(x, 16) for x in line.split(" : ")[0].split("-"))
            first, last = -(-lo // PAGE), (hi + 1) // PAGE
            if last > first:
                spans.append((first, last))
    return spans


def main() -> None:
    with open("/proc/meminfo") as fh:
        memfree = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("MemFree:"))
    free = 0
    with open("/proc/kpageflags", "rb") as flags_file, open("/proc/kpagecount", "rb") as counts:
        for first, last in ram_pfns():
            n = last - first
            flags_file.seek(first * 8)
            counts.seek(first * 8)
            flags = struct.unpack(f"<{n}Q", flags_file.read(n * 8))
            refs = struct.unpack(f"<{n}Q", counts.read(n * 8))
            for f, c in zip(flags, refs, strict=True):
                if f & KPF_NOPAGE:
                    continue
                if f & KPF_BUDDY or (f == 0 and c == 0):
                    free += 1
    with open("/proc/zoneinfo") as fh:
        # Each CPU's pageset of each zone: "    cpu: N", then "              count: N".
        pcp = sum(int(line.split()[1]) for line in fh if line.split()[:1] == ["count:"])
    print(json.dumps({"memfree": memfree, "kpage_free": free * PAGE, "pcp_count": pcp}))


if __name__ == "__main__":
    main()
