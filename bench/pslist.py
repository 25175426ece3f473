"""pslist's rate on a real image, against the same walk through raw reads.

The baseline walks ``init_task.tasks`` with ``kernel.read_pointer`` and reads each process's
pid, tgid, comm, flags, state, start time, its parent's tgid and its credentials with
``kernel.read_virt`` / ``read_u32`` at offsets taken from BTF once: the floor for the
fields pslist gives, without its checks, notes or typed objects. Like pslist it stops at a
link it has seen (a live capture's list may not close) and follows no pointer of a process
reaped while the capture ran; it does not walk back from the head where the list broke. pslist is measured as the
plugin's generator (``pslist(kernel)``) and as ``collect analyze`` runs it (``analyze_kernel``,
which also checks every record against its declared fields).

    python bench/pslist.py IMAGE [--seconds 2.0]

Prints tasks a second and ratios measured in one run; never pass/fail.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector.analyze import analyze_kernel
from collector.errors import CollectorError
from collector.helpers.list import LIST_POISON2
from collector.image.open import open_image
from collector.kernel.kernel import Kernel
from collector.plugins.tasks import PID_MAX_LIMIT, pslist

MAX_TASKS = 1_000_000


def raw_walk(kernel: Kernel) -> Callable[[], int]:
    """The baseline: offsets from BTF once, then raw reads per process."""
    btf = kernel.btf
    off = {
        name: btf.offsetof("task_struct", name)
        for name in ("tasks", "pid", "tgid", "comm", "flags", "real_parent", "cred", "exit_state")
    }
    state = "__state" if btf.has_member("task_struct", "__state") else "state"
    off["state"] = btf.offsetof("task_struct", state)
    off["start"] = btf.offsetof("task_struct", "start_boottime")
    cred = {name: btf.offsetof("cred", f"{name}.val") for name in ("uid", "gid", "euid")}
    head = kernel.symbol("init_task") + off["tasks"]

    def walk() -> int:
        node = kernel.read_pointer(head)
        seen = {head}
        n = 0
        # Like pslist, stop at a link seen before or NULL, and follow no pointer of a process
        # reaped while the capture ran (prev poisoned) or with an impossible pid.
        while node not in seen and node and n < MAX_TASKS:
            seen.add(node)
            task = node - off["tasks"]
            pid = kernel.read_s32(task + off["pid"])
            kernel.read_u32(task + off["tgid"])
            kernel.read_virt(task + off["comm"], 16)
            n += 1
            if kernel.read_pointer(node + 8) == LIST_POISON2 or not 0 < pid < PID_MAX_LIMIT:
                node = kernel.read_pointer(node)
                continue
            kernel.read_u32(task + off["flags"])
            kernel.read_u32(task + off["state"])
            kernel.read_u32(task + off["exit_state"])
            kernel.read_u64(task + off["start"])
            parent = kernel.read_pointer(task + off["real_parent"])
            kernel.read_u32(parent + off["tgid"])
            c = kernel.read_pointer(task + off["cred"])
            for at in cred.values():
                kernel.read_u32(c + at)
            node = kernel.read_pointer(node)
        return n

    return walk


def rate(walk: Callable[[], int], seconds: float) -> tuple[float, int]:
    """Tasks a second over whole walks repeated for ``seconds``; and tasks per walk."""
    done = rounds = 0
    start = time.perf_counter()
    while True:
        done += walk()
        rounds += 1
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed, done // rounds


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Prints rates measured in one run; never pass/fail.",
    )
    parser.add_argument(
        "image",
        help="a native image of a real kernel (python -m tools.vm try --kernel 6.12 makes one)",
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement")
    opts = parser.parse_args()
    try:
        memory = open_image(opts.image)
    except (CollectorError, OSError) as exc:
        sys.exit(f"pslist.py: {exc}")
    try:
        kernel = Kernel(memory)
        baseline = raw_walk(kernel)
        baseline()  # warm the chunk cache and the BTF so every row starts alike

        def plugin() -> int:
            return sum(1 for _ in pslist(kernel))

        def analyze() -> int:
            result = analyze_kernel(kernel, "pslist")
            if result.error:
                raise SystemExit(f"pslist.py: {result.error}")
            return len(result.records)

        rows = [
            ("raw reads, offsets from BTF once (baseline)", rate(baseline, opts.seconds)),
            ("pslist(kernel), the plugin's generator", rate(plugin, opts.seconds)),
            ("analyze_kernel(kernel, 'pslist')", rate(analyze, opts.seconds)),
        ]
    finally:
        memory.close()
    print(f"{opts.image}: {kernel.release}")
    base = rows[0][1][0]
    for name, (per_second, tasks) in rows:
        print(
            f"  {name:<46} {per_second:>10,.0f} tasks/s  ({tasks} a walk)  {per_second / base:6.3f}x"
        )


if __name__ == "__main__":
    main()
