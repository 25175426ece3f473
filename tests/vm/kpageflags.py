"""Run inside a test guest: copy /proc/kpageflags for page frames [0, N) to a file.

``python kpageflags.py OUT N``: OUT gets N little-endian 64-bit words, one per page frame,
the kernel's own flags for it (Documentation/admin-guide/mm/pagemap.rst). Standard library.
"""

from __future__ import annotations

import sys


def main() -> None:
    out, count = sys.argv[1], int(sys.argv[2])
    with open("/proc/kpageflags", "rb") as flags, open(out, "wb") as f:
        remaining = count * 8
        while remaining:
            block = flags.read(min(remaining, 1 << 20))
            if not block:
                break
            f.write(block)
            remaining -= len(block)


if __name__ == "__main__":
    main()
