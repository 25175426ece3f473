"""Member reads and task-list walks through typed Objects, against same-run baselines.

One member (``task->pid``) read three ways: a raw ``kernel.read_u32(task + offset)`` with the
offset worked out once (the floor), ``kernel.object(...).pid.value()`` (a new Object each time,
as a plugin writes it, and on Objects made beforehand), and ``kernel.read_struct`` of the whole
``struct task_struct`` followed by taking ``.pid``. Then whole walks of ``init_task.tasks``:
with Objects (``container_of``, ``tasks.next``) against raw pointer reads.

The synthetic kernel has 10,000 tasks whose ``struct task_struct`` is padded to a real one's
size; an image path given on the command line is measured too (its own tasks, its own BTF,
reads through the image's compressed chunks).

    python bench/objects.py [IMAGE] [--tasks 10000] [--seconds 1.0]

Prints rates and ratios measured in one run; never pass/fail.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from collector.errors import CollectorError
from collector.kernel.kernel import Kernel
from collector.kernel.object import Object
from collector.testing import SyntheticKernel

# A struct task_struct with the members read here, padded to the size of Debian 6.1's
# (9,792 bytes). The padding is a few arrays where the real one has hundreds of members, so a
# whole-struct parse costs far less here than on a real image: measure one to see that cost.
DECLARATIONS = """
struct list_head { struct list_head *next, *prev; };
struct mm_struct;
struct task_struct {
    unsigned int __state;
    void *stack;
    int usage;
    unsigned int flags;
    unsigned long pad0[110];
    struct list_head tasks;
    struct mm_struct *mm;
    struct mm_struct *active_mm;
    unsigned long pad1[40];
    int pid;
    int tgid;
    unsigned long pad2[60];
    char comm[16];
    unsigned long pad3[1004];
};
"""
MAX_TASKS = 1_000_000


def build(count: int) -> Kernel:
    """A synthetic kernel whose ``init_task.tasks`` links ``count`` more tasks."""
    sk = SyntheticKernel(DECLARATIONS)
    tasks_at = sk.offsetof("struct task_struct", "tasks")
    init = sk.global_("init_task", "struct task_struct", pid=0, comm=b"swapper/0")
    addresses = [init] + [
        sk.new("struct task_struct", pid=i, tgid=i, comm=b"task%d" % i) for i in range(1, count + 1)
    ]
    for here, there in zip(addresses, addresses[1:] + addresses[:1], strict=True):
        sk.write_u64(here + tasks_at, there + tasks_at)  # tasks.next
        sk.write_u64(there + tasks_at + 8, here + tasks_at)  # tasks.prev
    return sk.kernel()


def walk_objects(kernel: Kernel, limit: int = MAX_TASKS) -> list[Object]:
    """``for_each_process`` by hand: up to ``limit`` tasks after init_task, as Objects."""
    init = kernel.variable("init_task")
    head = init.tasks.address
    out = []
    node = init.tasks.next.value()
    for _ in range(limit):
        if node == head:
            return out
        task = kernel.object("struct list_head", node).container_of("struct task_struct", "tasks")
        out.append(task)
        node = task.tasks.next.value()
    if limit < MAX_TASKS:
        return out
    raise RuntimeError("init_task.tasks does not close")


def sound_prefix(kernel: Kernel) -> tuple[int, str]:
    """How many tasks the list holds before it closes or tears, and what ended it.

    A live capture is not atomic: a process that exits while memory is read can leave a
    ``tasks.next`` pointing at freed memory. Both walks then stop where the tear starts.
    """
    try:
        return len(walk_objects(kernel)), "closes"
    except CollectorError:
        pass
    count = 0
    while True:
        try:
            walk_objects(kernel, count + 1)
        except CollectorError:
            return count, "is torn (a process exited while memory was read)"
        count += 1


def walk_raw(kernel: Kernel, init: int, tasks_at: int, limit: int = MAX_TASKS) -> int:
    """The same walk with raw pointer reads and offsets worked out beforehand."""
    head = init + tasks_at
    node = kernel.read_pointer(head)
    n = 0
    while node != head and n < limit:
        n += 1
        node = kernel.read_pointer(node)
    return n


def rate(fn: Callable[[int], object], items: Iterable[int], seconds: float) -> float:
    items = list(items)
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for item in items:
            fn(item)
        done += len(items)
    return done / (time.perf_counter() - start)


def measure(label: str, kernel: Kernel, seconds: float, sample: int) -> None:
    count, ending = sound_prefix(kernel)
    tasks = walk_objects(kernel, count) if ending != "closes" else walk_objects(kernel)
    addresses = [t.address for t in tasks][:sample]
    t = kernel.type("struct task_struct")
    pid_at = t.member("pid")[0] // 8
    tasks_at = t.member("tasks")[0] // 8
    made = [kernel.object(t, a) for a in addresses]
    # The struct parse is slow on a real task_struct: fewer of them per round.
    few = addresses[: max(1, len(addresses) // 20)]

    print(f"\n{label}: {len(tasks):,} tasks, struct task_struct is {t.size:,} bytes")
    if ending != "closes":
        print(f"  init_task.tasks {ending} after {count:,} tasks: both walks stop there")
    reads = [
        ("kernel.read_u32(task + offset) (baseline)", rate(
            lambda a: kernel.read_u32(a + pid_at), addresses, seconds)),
        ("kernel.object(task).pid.value()", rate(
            lambda a: kernel.object(t, a).pid.value(), addresses, seconds)),
        ("task.pid.value() on Objects made beforehand", rate(
            lambda i: made[i].pid.value(), range(len(made)), seconds)),
        ("kernel.read_struct('task_struct', task).pid", rate(
            lambda a: kernel.read_struct("task_struct", a).pid, few, seconds)),
    ]  # fmt: skip
    base = reads[0][1]
    for name, per_second in reads:
        print(f"  {name:<46} {per_second:>12,.0f}/s  {per_second / base:7.3f}x baseline")

    init = kernel.symbol("init_task")
    walks = [
        ("walk with raw pointer reads (baseline)", rate(
            lambda _: walk_raw(kernel, init, tasks_at, len(tasks)), [0], seconds)),
        ("walk with Objects (container_of, tasks.next)", rate(
            lambda _: walk_objects(kernel, len(tasks)), [0], seconds)),
    ]  # fmt: skip
    base = walks[0][1]
    for name, per_second in walks:
        print(
            f"  {name:<46} {per_second * len(tasks):>12,.0f} tasks/s"
            f"  {per_second / base:7.3f}x baseline"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Prints rates measured in one run; never pass/fail.",
    )
    parser.add_argument("image", nargs="?", help="also measure on this image's own tasks")
    parser.add_argument("--tasks", type=int, default=10_000, help="tasks in the synthetic kernel")
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--sample", type=int, default=2000, help="tasks read per round")
    opts = parser.parse_args()

    started = time.perf_counter()
    kernel = build(opts.tasks)
    print(
        f"synthetic kernel of {opts.tasks:,} tasks built in {time.perf_counter() - started:.1f} s"
    )
    measure("synthetic", kernel, opts.seconds, opts.sample)
    if opts.image:
        from collector.image.open import open_image

        try:
            memory = open_image(opts.image)
        except CollectorError as exc:
            sys.exit(f"objects.py: {exc}")
        try:
            measure(opts.image, Kernel(memory), opts.seconds, opts.sample)
        finally:
            memory.close()


if __name__ == "__main__":
    main()
