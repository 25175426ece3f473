"""Write the small image the tests of old-format reading use; see README.md next to this file.

    python tests/data/image/make_small_image.py OUT

The bytes come from ``random.Random(SEED)`` so that a test can rebuild the expected RAM
without reading the image.
"""

from __future__ import annotations

import random
import sys

from collector.image.writer import ImageWriter
from collector.memory import Fate, FateRun

SEED = 2026
PAGE = 4096
CHUNK = 16 << 10
UNREADABLE = 0x100000 + 5 * PAGE  # EIO
VMCOREINFO = b"OSRELEASE=6.1.0-test\nPAGESIZE=4096\n"


def ram() -> dict[int, bytes]:
    """Low RAM ending in a partial page, and RAM above 1 MiB holding one all-zero chunk."""
    rng = random.Random(SEED)
    low = rng.randbytes(3 * PAGE + 0xC00)
    high = bytearray(rng.randbytes(5 * CHUNK))
    high[CHUNK : 2 * CHUNK] = bytes(CHUNK)
    high[UNREADABLE - 0x100000 : UNREADABLE - 0x100000 + PAGE] = bytes(PAGE)
    return {0x1000: low, 0x100000: bytes(high)}


def main(path: str) -> None:
    memory = ram()
    ranges = [[s, s + len(d)] for s, d in memory.items()]
    with open(path, "wb") as out:
        w = ImageWriter(
            out,
            page_size=PAGE,
            chunk_size=CHUNK,
            metadata={"ranges": ranges, "blobs": ["vmcoreinfo"], "host": {"hostname": "fixture"}},
            threads=1,
            capture_uuid=bytes(range(16)),
        )
        w.add_blob("vmcoreinfo", VMCOREINFO)
        for start, data in memory.items():
            pos = start
            while pos < start + len(data):
                end = min(start + len(data), (pos // CHUNK + 1) * CHUNK)
                runs = []
                if pos <= UNREADABLE < end:
                    runs.append(FateRun((UNREADABLE - pos) // PAGE, 1, Fate.UNREADABLE, 5))
                bounds = (start, start + len(data)) if pos == start else (None, None)
                w.add_chunk(pos, data[pos - start : end - start], runs, *bounds)
                pos = end
        w.finish({"end_time": "2026-11-29T00:00:00+00:00", "stopped_by": None})


if __name__ == "__main__":
    main(sys.argv[1])
