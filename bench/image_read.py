"""Random single-page reads from a native image, cold and cached, against same-run baselines.

Cold: a page in a chunk not in the reader's cache (one frame read and decompressed).
Cached: a page in a chunk decompressed moments ago. Baselines: `os.pread` of one page from
an uncompressed file of the same bytes (the floor), and one bare python-zstandard
decompression of a chunk-sized frame (what a cold read cannot avoid).

    python bench/image_read.py [--size-mib 256] [--reads 2000]

Prints figures; never pass/fail.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import zstandard

from collector.image.reader import NativeImage
from collector.image.writer import ImageWriter

PAGE = 4096
CHUNK = 4 << 20
BASE = 1 << 20


def corpus(size: int, seed: int = 5) -> bytes:
    """Memory-like bytes: zero pages, repetitive pages and random pages, in a fixed mix."""
    rng = random.Random(seed)
    pages = []
    for _ in range(size // PAGE):
        kind = rng.random()
        if kind < 0.5:
            pages.append(bytes(PAGE))
        elif kind < 0.8:
            pages.append(rng.randbytes(64) * (PAGE // 64))
        else:
            pages.append(rng.randbytes(PAGE))
    return b"".join(pages)


def rate(n: int, seconds: float) -> str:
    return f"{n / seconds:>10,.0f} reads/s  ({seconds / n * 1e6:7.1f} µs each)"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mib", type=int, default=256)
    ap.add_argument("--reads", type=int, default=2000)
    args = ap.parse_args()
    data = corpus(args.size_mib << 20)
    with tempfile.TemporaryDirectory(prefix="collector-bench-") as tmp:
        raw = Path(tmp, "raw.bin")
        raw.write_bytes(data)
        image = Path(tmp, "m.lime.zst")
        with open(image, "wb") as f:
            w = ImageWriter(
                f, page_size=PAGE, chunk_size=CHUNK, metadata={"ranges": [[BASE, BASE + len(data)]]}
            )
            for off in range(0, len(data), CHUNK):
                bounds = (BASE, BASE + len(data)) if off == 0 else (None, None)
                w.add_chunk(BASE + off, data[off : off + CHUNK], [], *bounds)
            w.finish({})
        rng = random.Random(9)
        pages = [rng.randrange(len(data) // PAGE) * PAGE for _ in range(args.reads)]
        print(
            f"image: {args.size_mib} MiB of RAM in {image.stat().st_size >> 20} MiB, chunks of {CHUNK >> 20} MiB"
        )

        fd = os.open(raw, os.O_RDONLY)
        t0 = time.perf_counter()
        for p in pages:
            os.pread(fd, PAGE, p)
        t_pread = time.perf_counter() - t0
        os.close(fd)

        frame = zstandard.ZstdCompressor(level=1, write_checksum=True).compress(
            data[CHUNK : 2 * CHUNK]
        )
        d = zstandard.ZstdDecompressor()
        n = max(50, args.reads // 20)
        t0 = time.perf_counter()
        for _ in range(n):
            d.decompress(frame)
        t_frame = time.perf_counter() - t0

        t0 = time.perf_counter()
        img = NativeImage(image)
        t_open = time.perf_counter() - t0
        cold = sorted(pages, key=lambda p: (p // CHUNK) % 7)[:n]  # spread over many chunks
        t0 = time.perf_counter()
        for p in cold:
            img._cache.clear()  # force every read to fetch and decompress its chunk
            assert img.read(BASE + p, PAGE) == data[p : p + PAGE]
        t_cold = time.perf_counter() - t0
        img.read(BASE + pages[0], PAGE)
        near = [
            pages[0] // CHUNK * CHUNK + rng.randrange(CHUNK // PAGE) * PAGE
            for _ in range(args.reads)
        ]
        t0 = time.perf_counter()
        for p in near:
            img.read(BASE + p, PAGE)
        t_cached = time.perf_counter() - t0
        img.close()

        print(f"open (index + seek table)   {t_open * 1e3:8.2f} ms")
        print(f"baseline pread of a page    {rate(args.reads, t_pread)}")
        print(f"baseline bare 4 MiB frame   {rate(n, t_frame)}")
        print(
            f"cold page read              {rate(n, t_cold)}   {t_cold / t_frame:.2f}x a bare frame"
        )
        print(
            f"cached page read            {rate(args.reads, t_cached)}   {t_cached / t_pread:.1f}x a pread"
        )


if __name__ == "__main__":
    main()
