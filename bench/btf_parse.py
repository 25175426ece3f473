"""Benchmark: parse the kernel's BTF, build struct definitions, read 100k struct pages.

Prints figures and ratios measured in one run against a plain struct.iter_unpack baseline.
Run as root: ``python bench/btf_parse.py [path-to-btf]``. Not a pass/fail test.
"""

from __future__ import annotations

import os
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from collector.kernel.btf import BTF
from collector.kernel.bulk import bulk_view, dtype_for
from collector.kernel.constructs import parse_struct, struct_definition

PAGES = 100_000


def best(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """The fastest of ``repeat`` runs, in seconds, and the last result."""
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else "/sys/kernel/btf/vmlinux"
    with open(path, "rb") as f:
        blob = f.read()
    print(f"{path}: {len(blob) / 1e6:.1f} MB")

    unpack_all = struct.Struct("<III")
    t_base, _ = best(lambda: sum(1 for _ in unpack_all.iter_unpack(blob[: len(blob) // 12 * 12])))
    t_parse, btf = best(lambda: BTF.parse(blob), repeat=5)
    print(
        f"BTF.parse: {t_parse * 1e3:.1f} ms for {len(btf)} types "
        f"(baseline: iter_unpack of every 12 bytes {t_base * 1e3:.1f} ms, ratio {t_parse / t_base:.2f})"
    )

    def first_find() -> int:
        fresh = BTF.parse(blob)
        start = time.perf_counter()
        fresh.find("page")
        return time.perf_counter() - start

    print(
        f"first find() (builds the name index): {min(first_find() for _ in range(3)) * 1e3:.1f} ms"
    )

    for name in ("page", "task_struct"):

        def build(name: str = name) -> Any:
            fresh = BTF.parse(blob)
            fresh.find(name)
            start = time.perf_counter()
            defn = struct_definition(fresh, name)
            return time.perf_counter() - start, defn

        t_build = min(build()[0] for _ in range(3))
        defn = build()[1]
        print(
            f"struct {name}: definition built in {t_build * 1e3:.1f} ms "
            f"({len(defn.fields)} fields, {defn.size} bytes)"
        )

    page = struct_definition(btf, "page")
    size = page.sizeof()
    data = os.urandom(size * PAGES)

    def with_construct() -> int:
        n = 0
        for i in range(PAGES):
            n += parse_struct(page, data, i * size)["mapping"] & 1
        return n

    def with_numpy() -> int:
        view = bulk_view(data, page, PAGES)
        return int((view["mapping"] & 1).sum())

    words = size // 8
    flat = struct.Struct(f"<{words}Q")

    def with_iter_unpack() -> int:
        return sum(record[3] & 1 for record in flat.iter_unpack(data))

    t_construct, a = best(with_construct, repeat=1)
    t_numpy, b = best(with_numpy)
    t_iter, c = best(with_iter_unpack)
    assert a == b == c, "the three readers disagree"
    print(
        f"{PAGES} struct pages (one field used), dtype built from the same definition "
        f"(itemsize {dtype_for(page).itemsize}):"
    )
    for label, t in (
        ("construct (CStruct)", t_construct),
        ("numpy view", t_numpy),
        ("iter_unpack", t_iter),
    ):
        print(
            f"  {label:20} {t * 1e3:9.1f} ms  {PAGES / t:14,.0f} pages/s  "
            f"{t / t_iter:8.3f} x iter_unpack"
        )


if __name__ == "__main__":
    main()
