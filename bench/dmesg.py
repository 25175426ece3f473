"""dmesg's records a second on a real image, against a same-run baseline of raw reads.

The baseline walks the same descriptors from tail to head with one ``kernel.read_virt`` call
per field (state_var, the two lpos values, seq, ts_nsec, text_len and the level bytes,
caller_id, then the block's ID and text), with the offsets worked out beforehand from
VMCOREINFO: what a reader written without batching would cost. dmesg reads descriptors and
infos in batches and the data ring through 64 KiB windows.

    python bench/dmesg.py IMAGE [--seconds 2.0]

Prints rates and their ratio, measured in one run; never pass/fail.
"""

from __future__ import annotations

import argparse
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector.image.open import open_image
from collector.kernel.kernel import Kernel
from collector.plugins.dmesg import DESC_ID_MASK, PrintkRingbuffer, dmesg


def baseline(kernel: Kernel, rb: PrintkRingbuffer) -> int:
    """The same records, every field a read_virt of its own; returns how many were read."""
    read = kernel.read_virt
    n = 0
    total = ((rb.head_id - rb.tail_id) & DESC_ID_MASK) + 1
    for k in range(total):
        id_ = (rb.tail_id + k) & DESC_ID_MASK
        index = id_ & (rb.count - 1)
        desc = rb.descs + index * rb.desc_size
        info = rb.infos + index * rb.info_size
        state_var = struct.unpack("<Q", read(desc + rb.state_var, 8))[0]
        if state_var & DESC_ID_MASK != id_ or state_var >> 62 not in (1, 2):
            continue
        begin = struct.unpack("<Q", read(desc + rb.begin, 8))[0]
        next_ = struct.unpack("<Q", read(desc + rb.next, 8))[0]
        struct.unpack("<Q", read(info + rb.seq, 8))
        struct.unpack("<Q", read(info + rb.ts_nsec, 8))
        text_len = struct.unpack("<H", read(info + rb.text_len, 2))[0]
        read(info + rb.facility, 2)
        read(info + rb.caller_id, 4)
        if begin & 1:
            continue
        start = begin & (rb.data_size - 1)
        if (begin >> rb.size_bits) != ((next_ - 1) >> rb.size_bits):
            start = 0
        read(rb.data + start, 8)
        read(rb.data + start + 8, text_len).decode("utf-8", "backslashreplace")
        n += 1
    return n


def plugin(kernel: Kernel) -> int:
    return sum(1 for r in dmesg(kernel) if r["seq"] is not None)


def rate(fn: Callable[[], int], seconds: float) -> tuple[float, int]:
    done = rounds = 0
    start = time.perf_counter()
    while True:
        done += fn()
        rounds += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "image",
        help="a native image of a real kernel (python -m tools.vm try --kernel 6.12 makes one)",
    )
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args()
    memory = open_image(args.image)
    kernel = Kernel(memory)
    rb = PrintkRingbuffer(kernel, kernel.vmcoreinfo)
    records = plugin(kernel)
    assert baseline(kernel, rb) == records, "the baseline reads other records than dmesg"
    print(
        f"{args.image}: {kernel.release}, {records} records in a ring of {rb.count}"
        f" descriptors and {rb.data_size} bytes of text"
    )
    # Warm: both read the same pages, which the image reader then has decompressed.
    raw, raw_rounds = rate(lambda: baseline(kernel, rb), args.seconds)
    ours, our_rounds = rate(lambda: plugin(kernel), args.seconds)
    print(f"raw read_virt per field : {raw:12,.0f} records/s ({raw_rounds} walks)")
    print(f"dmesg (records, decoded): {ours:12,.0f} records/s ({our_rounds} walks)")
    print(f"dmesg / raw             : {ours / raw:12.2f}x")
    memory.close()


if __name__ == "__main__":
    main()
