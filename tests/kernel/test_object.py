"""Typed kernel objects over BTF, on synthetic kernels whose bytes the tests wrote themselves."""

from __future__ import annotations

import struct

import pytest

from collector.errors import NotApplicable
from collector.kernel.object import Object, ObjectError, container_of
from collector.memory import Fate, PageNotCaptured
from collector.testing import SyntheticKernel

TYPES = """
struct list_head { struct list_head *next, *prev; };
typedef struct { int counter; } atomic_t;
enum pid_type { PIDTYPE_PID, PIDTYPE_TGID, PIDTYPE_PGID, PIDTYPE_SID };
enum big { SMALL = 1, HUGE = 0x123456789 };
struct mm_struct { unsigned long start_code, end_code; int map_count; };
struct task_struct {
    volatile long __state;
    unsigned int flags;
    int pid;
    char comm[16];
    struct list_head tasks;
    struct mm_struct *mm;
    union {
        atomic_t usage;
        struct { unsigned short low, high; };
    };
    unsigned int in_execve:1, in_iowait:1;
    int nice:5;
    enum pid_type kind;
    enum big which;
    char *name;
    int scores[3];
    struct task_struct *children[2];
    u64 stamp;
    _Bool alive;
};
"""


@pytest.fixture
def sk() -> SyntheticKernel:
    return SyntheticKernel(TYPES)


def test_members_read_what_was_written(sk: SyntheticKernel) -> None:
    mm = sk.new("struct mm_struct", start_code=0x400000, end_code=0x401234, map_count=-2)
    name = sk.alloc(32)
    sk.write(name, b"witness\0garbage")
    task = sk.global_(
        "init_task",
        "struct task_struct",
        __state=1,
        flags=0x00200040,
        pid=4242,
        comm=b"kworker/0:1",
        mm=mm,
        in_execve=1,
        in_iowait=0,
        nice=-7,
        kind="PIDTYPE_SID",
        which="HUGE",
        name=name,
        stamp=0xFEDCBA9876543210,
        alive=True,
    )
    sk.set(task, "struct task_struct", "scores[1]", -5)
    sk.set(task, "struct task_struct", "usage.counter", 0x00020001)
    kernel = sk.kernel()
    t = kernel.variable("init_task")
    assert t.address == task == kernel.symbol("init_task")
    assert t.pid.value() == 4242 and t["pid"].value() == 4242 and t.member("pid").value() == 4242
    assert t.member("__state").value() == 1
    assert t.flags.value() == 0x00200040
    assert t.comm.string() == b"kworker/0:1" and t.comm.text() == "kworker/0:1"
    assert t.comm.value() == b"kworker/0:1" + bytes(5)
    # Anonymous union and struct members are reached as C reaches them.
    assert t.usage.counter.value() == 0x00020001
    assert (t.low.value(), t.high.value()) == (1, 2)
    # Bitfields, signed and unsigned.
    assert (t.in_execve.value(), t.in_iowait.value(), t.nice.value()) == (1, 0, -7)
    # Enums, 32 and 64 bits.
    assert t.kind.value() == 3 and t.kind.enumerator() == "PIDTYPE_SID"
    assert t.which.value() == 0x123456789 and t.which.enumerator() == "HUGE"
    assert t.stamp.value() == 0xFEDCBA9876543210
    assert t.alive.value() is True
    # Arrays and strings behind pointers.
    assert t.scores.value() == [0, -5, 0] and len(t.scores) == 3 and t.scores[1].value() == -5
    assert [s.value() for s in t.scores] == [0, -5, 0]
    assert t.name.string() == b"witness" and t.name.string(3) == b"wit"
    # Pointers keep their target type; members are followed through them as -> does.
    assert str(t.mm.type) == "struct mm_struct *"
    assert t.mm.value() == mm and int(t.mm) == mm
    assert t.mm.deref().address == mm
    assert (t.mm.start_code.value(), t.mm.end_code.value()) == (0x400000, 0x401234)
    assert t.mm.map_count.value() == -2
    assert t.mm[0] == t.mm.deref()
    assert t.member("mm.end_code").value() == 0x401234
    whole = t.mm.deref().value()  # the whole struct, only when asked for
    assert (whole.start_code, whole.end_code, whole.map_count) == (0x400000, 0x401234, -2)


def test_only_the_member_asked_for_is_read(sk: SyntheticKernel) -> None:
    task = sk.global_("init_task", "struct task_struct", pid=7)
    kernel = sk.kernel()
    reads: list[tuple[int, int]] = []
    real = kernel.read_virt

    def spy(vaddr: int, size: int) -> bytes:
        reads.append((vaddr, size))
        return real(vaddr, size)

    kernel.read_virt = spy  # type: ignore[method-assign]
    t = kernel.variable("init_task")
    assert reads == []  # nothing read to make the object
    assert t.pid.value() == 7
    assert reads == [(task + sk.offsetof("struct task_struct", "pid"), 4)]


def test_types_are_spelled_as_c_spells_them(sk: SyntheticKernel) -> None:
    sk.global_("init_task", "struct task_struct")
    kernel = sk.kernel()
    t = kernel.variable("init_task")
    assert str(t.type) == "struct task_struct"
    assert str(t.comm.type) == "char [16]"
    assert str(t.children.type) == "struct task_struct *[2]"
    assert str(t.usage.type) == "atomic_t"
    assert str(t.kind.type) == "enum pid_type"
    assert str(t.stamp.type) == "u64"
    assert str(t.name.type) == "char *"
    assert str(kernel.type("struct task_struct **")) == "struct task_struct **"
    assert str(kernel.type("unsigned long [4]")) == "long unsigned int [4]"
    assert kernel.type("struct task_struct *[2]") == t.children.type
    assert kernel.type("struct task_struct *[2]").size == 16
    with pytest.raises(ObjectError, match="no struct nosuch"):
        kernel.type("struct nosuch")
    with pytest.raises(ObjectError, match="has no member 'nosuch'"):
        t.member("nosuch")
    with pytest.raises(AttributeError, match="nosuch"):
        _ = t.nosuch


def test_equality_container_of_and_lists(sk: SyntheticKernel) -> None:
    tasks = sk.offsetof("struct task_struct", "tasks")
    first = sk.global_("init_task", "struct task_struct", pid=0)
    second = sk.new("struct task_struct", pid=1)
    sk.set(first, "struct task_struct", "tasks.next", second + tasks)
    sk.set(second, "struct task_struct", "tasks.next", first + tasks)
    kernel = sk.kernel()
    init = kernel.variable("init_task")
    nxt = init.tasks.next  # struct list_head *
    entry = container_of(nxt, "struct task_struct", "tasks")
    assert entry.address == second and entry.pid.value() == 1
    assert entry == kernel.object("struct task_struct", second)
    assert entry != kernel.object("struct mm_struct", second)  # same place, other type
    assert container_of(entry.tasks, "struct task_struct", "tasks") == entry  # from the member
    assert nxt.container_of("struct task_struct", "tasks") == entry
    assert len({entry, kernel.object("struct task_struct", second)}) == 1
    # Indexing a pointer is not bounds-checked; an array is.
    assert init.children[1].address == first + sk.offsetof("struct task_struct", "children") + 8
    with pytest.raises(IndexError):
        _ = init.children[2]
    assert not init.mm and init.mm.is_null()
    assert kernel.object("struct task_struct *", first + tasks).cast("unsigned long").value() == (
        second + tasks
    )


def test_a_page_the_image_lacks_raises_with_its_fate(sk: SyntheticKernel) -> None:
    mm = sk.new("struct mm_struct", start_code=1)
    sk.global_("init_task", "struct task_struct", mm=mm)
    sk.drop(mm, Fate.UNREADABLE)
    kernel = sk.kernel()
    t = kernel.variable("init_task")
    assert t.mm.value() == mm  # the pointer itself was captured
    with pytest.raises(PageNotCaptured, match="unreadable") as info:
        t.mm.start_code.value()
    assert info.value.fate is Fate.UNREADABLE


def test_variable_types_come_from_the_table_and_are_checked(sk: SyntheticKernel) -> None:
    sk.global_("init_task", "struct task_struct")
    kernel = sk.kernel()
    with pytest.raises(NotApplicable, match="struct uts_namespace"):
        sk2 = SyntheticKernel(TYPES)
        sk2.global_("init_uts_ns", "struct task_struct")
        sk2.kernel().variable("init_uts_ns")  # this kernel's BTF has no uts_namespace
    # A type larger than the room before the next symbol is refused, never guessed.
    small = SyntheticKernel(TYPES)
    small.global_("init_task", "struct mm_struct")  # 24 bytes where 128+ are declared
    small.global_("after", "struct mm_struct")
    with pytest.raises(NotApplicable, match="does not fit"):
        small.kernel().variable("init_task")
    with pytest.raises(NotApplicable, match="GLOBALS has no entry"):
        sk3 = SyntheticKernel(TYPES)
        sk3.global_("mystery", "struct mm_struct")
        sk3.kernel().variable("mystery")
    assert isinstance(kernel.variable("init_task"), Object)


def test_unsized_global_arrays_take_the_room_the_symbols_leave() -> None:
    sk = SyntheticKernel("struct pglist_data { int node_id; };")
    nodes = sk.global_("node_data", "u64", 4 * 8)
    sk.global_("after_node_data", "u64")
    node = sk.new("struct pglist_data", node_id=3)
    sk.write(nodes + 8, struct.pack("<Q", node))
    kernel = sk.kernel()
    node_data = kernel.variable("node_data")
    assert str(node_data.type) == "struct pglist_data *[4]"
    assert node_data[1].node_id.value() == 3
    assert node_data[0].is_null()


def test_a_flexible_char_array_reads_to_its_nul() -> None:
    sk = SyntheticKernel("struct anon_vma_name { int kref; char name[]; };")
    at = sk.alloc(64)
    sk.write(at, b"\x01\0\0\0" + b"[anon:heap]\0trailing")
    kernel = sk.kernel()
    name = kernel.object("struct anon_vma_name", at).name
    assert str(name.type) == "char [0]"
    assert name.string() == b"[anon:heap]" and name.string(5) == b"[anon"


def test_a_kernel_and_what_its_objects_cached_are_freed_with_it(sk: SyntheticKernel) -> None:
    """Member lookups and construct definitions are cached per BTF. A process that opens
    image after image (a fleet sweep's worker) must not keep every image's types alive: the
    caches hold Types that refer to their BTF, so they live on the BTF, not in a module-level
    map keyed by it."""
    import gc
    import weakref

    sk.global_("init_task", "struct task_struct", pid=7)
    kernel = sk.kernel()
    task = kernel.variable("init_task")
    assert task.pid.value() == 7 and task.tasks.next.value() == 0
    assert kernel.read_struct("task_struct", task.address).pid == 7
    btf = weakref.ref(kernel.btf)
    del kernel, task
    gc.collect()
    assert btf() is None
