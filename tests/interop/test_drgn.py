"""collector.interop.drgn on a synthetic kernel: BTF to drgn types, kallsyms, memory, objects."""

from __future__ import annotations

import sys

import pytest

from collector.errors import CollectorError
from collector.kernel.btf import BTF
from collector.testing import SyntheticKernel
from collector.testing.btf_encoder import INT_SIGNED, Encoder
from collector.testing.kernel import START_KERNEL_MAP

drgn = pytest.importorskip("drgn")

from drgn import Qualifiers, TypeEnumerator, TypeKind  # noqa: E402
from drgn.helpers.linux.list import list_for_each_entry  # noqa: E402
from drgn.helpers.linux.percpu import per_cpu  # noqa: E402

from collector.interop import drgn as interop  # noqa: E402

# Laid out by hand with the x86_64 SysV rules, independently of collector.testing.cdecl:
#   __state   0..4
#   flags:3   bit 32, sticky:1 bit 35 (both in the unsigned int at 4)
#   union     8..16 (aligned to its long)
#   pid       16..20, comm 20..36, tasks 40..56 (aligned to 8), type 56..60,
#   callback  64..72, parent 72..80, name[] at 80: sizeof 80
DECLARATIONS = """
struct list_head { struct list_head *next, *prev; };
enum pid_type { PIDTYPE_PID, PIDTYPE_TGID, PIDTYPE_MAX };
enum delta { BELOW = -2, ABOVE = 3 };
struct task_struct {
    unsigned int __state;
    unsigned int flags:3, sticky:1;
    union { int a; long b; };
    pid_t pid;
    char comm[16];
    struct list_head tasks;
    enum pid_type type;
    void (*callback)(struct task_struct *, int);
    struct task_struct *parent;
    char name[];
};
struct counter { unsigned long hits; };
DEFINE_PER_CPU(struct counter, counter);
"""


@pytest.fixture(scope="module")
def sk() -> SyntheticKernel:
    sk = SyntheticKernel(DECLARATIONS)
    tasks = sk.offsetof("struct task_struct", "tasks")
    init = sk.global_("init_task", "struct task_struct", pid=0, comm=b"swapper/0", flags=5)
    child = sk.new("struct task_struct", pid=1, comm=b"init", sticky=1, type=1)
    sk.set(init, "struct task_struct", "tasks.next", child + tasks)
    sk.set(init, "struct task_struct", "tasks.prev", child + tasks)
    sk.set(child, "struct task_struct", "tasks.next", init + tasks)
    sk.set(child, "struct task_struct", "tasks.prev", init + tasks)
    sk.set(child, "struct task_struct", "parent", init)
    sk.symbol("schedule", START_KERNEL_MAP + 0x1000040, "T")
    sk.symbol("counter", 0x2000)  # a per-CPU offset, as kallsyms lists them
    offsets = sk.global_("__per_cpu_offset", "u64", 2 * 8)
    sk.global_("after_offsets", "u64")
    for cpu in (0, 1):
        area = sk.alloc(0x3000, 4096)
        sk.write_u64(offsets + 8 * cpu, area)
        sk.set(area + 0x2000, "struct counter", "hits", 100 + cpu)
    return sk


@pytest.fixture(scope="module")
def prog(sk: SyntheticKernel):
    return interop.program(sk.memory())


def test_the_program_is_a_linux_kernel(prog) -> None:
    assert prog.flags & drgn.ProgramFlags.IS_LINUX_KERNEL
    assert prog.platform.arch == drgn.Architecture.X86_64


def test_struct_with_bitfields_anonymous_union_and_flexible_array(prog) -> None:
    t = prog.type("struct task_struct")
    assert t.kind == TypeKind.STRUCT and t.tag == "task_struct" and t.size == 80
    assert [(m.name, m.bit_offset, m.bit_field_size) for m in t.members] == [
        ("__state", 0, None),
        ("flags", 32, 3),
        ("sticky", 35, 1),
        (None, 64, None),
        ("pid", 128, None),
        ("comm", 160, None),
        ("tasks", 320, None),
        ("type", 448, None),
        ("callback", 512, None),
        ("parent", 576, None),
        ("name", 640, None),
    ]
    union = t.members[3].type
    assert union.kind == TypeKind.UNION and union.tag is None and union.size == 8
    assert [(m.name, m.bit_offset, str(m.type)) for m in union.members] == [
        ("a", 0, "int"),
        ("b", 0, "long"),  # the name BTF gives it
    ]
    assert str(t.members[1].type) == "unsigned int"
    # A flexible array member is an incomplete array; a sized one keeps its length.
    assert t.members[10].type.length is None
    comm = t.members[5].type
    assert comm.kind == TypeKind.ARRAY and comm.length == 16 and str(comm.type) == "char"


def test_enum_typedef_pointer_and_function_pointer(prog) -> None:
    e = prog.type("enum pid_type")
    assert e.enumerators == (
        TypeEnumerator("PIDTYPE_PID", 0),
        TypeEnumerator("PIDTYPE_TGID", 1),
        TypeEnumerator("PIDTYPE_MAX", 2),
    )
    assert (e.type.size, e.type.is_signed) == (4, False)
    d = prog.type("enum delta")
    assert d.enumerators == (TypeEnumerator("BELOW", -2), TypeEnumerator("ABOVE", 3))
    assert d.type.is_signed
    pid_t = prog.type("pid_t")
    assert pid_t.kind == TypeKind.TYPEDEF and pid_t.type.name == "int" and pid_t.type.size == 4
    t = prog.type("struct task_struct")
    callback = t.member("callback").type
    assert callback.kind == TypeKind.POINTER and callback.size == 8
    assert callback.type.kind == TypeKind.FUNCTION and callback.type.type.kind == TypeKind.VOID
    assert str(t.member("parent").type) == "struct task_struct *"
    assert str(prog.type("unsigned long long")) == "unsigned long long"


def test_hand_made_btf_functions_old_bitfields_forward_declarations_and_tags() -> None:
    # What collector.testing.cdecl does not write: parameters, '...', kind_flag 0 bitfields.
    e = Encoder()
    i32 = e.int("int", 4, INT_SIGNED)
    u8 = e.int("unsigned char", 1, bits=2, offset=3)  # a 2-bit field 3 bits into its byte
    fwd = e.fwd("later")
    ptr_fwd = e.ptr(fwd)
    proto = e.func_proto(i32, [("fmt", ptr_fwd), ("level", i32), ("", 0)])
    e.func("printk", proto)
    e.struct("old", 4, [("low", i32, 0), ("bits", u8, 8)])
    later = e.struct("later", 8, [("x", i32, 0), ("y", i32, 32)])
    tagged = e.ptr(e.type_tag("rcu", later))
    e.typedef("later_rcu_t", tagged)
    e.float("double", 8)
    const_int = e.const(i32)
    platform = drgn.Platform(
        drgn.Architecture.X86_64,
        drgn.PlatformFlags.IS_64_BIT | drgn.PlatformFlags.IS_LITTLE_ENDIAN,
    )
    prog = drgn.Program(platform)
    types = interop.BtfTypes(drgn, prog, BTF.parse(e.encode()))
    prog.register_type_finder("btf", types.find, enable_index=0)
    fn = types.type(proto)
    assert fn.kind == TypeKind.FUNCTION and fn.is_variadic and fn.type.name == "int"
    assert [(p.name, str(p.type)) for p in fn.parameters] == [
        ("fmt", "struct later *"),
        ("level", "int"),
    ]
    # The forward declaration is the complete struct, found by name.
    assert fn.parameters[0].type.type.size == 8
    old = prog.type("struct old")
    assert [(m.name, m.bit_offset, m.bit_field_size) for m in old.members] == [
        ("low", 0, None),
        ("bits", 11, 2),
    ]
    # A type tag is an annotation: the pointer is to the struct itself.
    pointee = prog.type("later_rcu_t").type.type
    assert (pointee.kind, pointee.tag, pointee.size) == (TypeKind.STRUCT, "later", 8)
    const = types.type(const_int)
    assert const.qualifiers == Qualifiers.CONST and str(const) == "const int"
    assert prog.type("double").kind == TypeKind.FLOAT


def test_symbols_come_from_kallsyms(sk: SyntheticKernel, prog) -> None:
    init = next(a for n, _k, a in sk.symbols if n == "init_task")
    sym = prog.symbol("init_task")
    assert (sym.name, sym.address) == ("init_task", init)
    assert sym.binding == drgn.SymbolBinding.GLOBAL and sym.kind == drgn.SymbolKind.OBJECT
    assert prog.symbol(init + 8).name == "init_task"
    assert prog.symbol("schedule").kind == drgn.SymbolKind.FUNC
    # A per-CPU offset is no address: nothing is named at 0x2000.
    with pytest.raises(LookupError):
        prog.symbol(0x2000)


def test_init_task_is_read_through_the_image(sk: SyntheticKernel, prog) -> None:
    init = prog["init_task"]
    assert init.address_ == sk.symbols[[n for n, _k, _a in sk.symbols].index("init_task")][2]
    assert init.comm.string_() == b"swapper/0"
    assert init.pid.value_() == 0 and init.flags.value_() == 5 and init.sticky.value_() == 0
    tasks = list(list_for_each_entry("struct task_struct", init.tasks.address_of_(), "tasks"))
    assert [(t.pid.value_(), t.comm.string_(), t.sticky.value_()) for t in tasks] == [
        (1, b"init", 1)
    ]
    assert tasks[0].parent.value_() == init.address_
    assert tasks[0].type.format_(type_name=False) == "PIDTYPE_TGID"


def test_constants_and_per_cpu_variables(prog) -> None:
    assert prog["PIDTYPE_TGID"].value_() == 1
    assert prog["BELOW"].value_() == -2
    counter = prog["counter"]
    assert counter.type_.tag == "counter" and counter.address_ == 0x2000
    # per_cpu() adds __per_cpu_offset[cpu] (a GLOBALS array sized by the next symbol).
    assert prog["__per_cpu_offset"].type_.length == 2
    assert per_cpu(counter, 1).hits.value_() == 101


def test_an_unknown_name_is_not_found(prog) -> None:
    with pytest.raises(LookupError):
        prog["no_such_variable"]
    with pytest.raises(LookupError):
        prog.type("struct no_such_struct")


def test_missing_drgn_is_one_line(monkeypatch: pytest.MonkeyPatch, sk: SyntheticKernel) -> None:
    monkeypatch.setitem(sys.modules, "drgn", None)  # import drgn now raises ImportError
    with pytest.raises(CollectorError, match=r"^drgn is not installed: pip install"):
        interop.program(sk.memory())


def test_run_executes_code_with_drgn_globals(prog, capsys: pytest.CaptureFixture[str]) -> None:
    interop.run(
        prog,
        code="import sys\nprint(prog['init_task'].comm.string_().decode(), sys.argv)\n"
        "for t in list_for_each_entry('struct task_struct', prog['init_task'].tasks.address_of_(),"
        " 'tasks'): print(t.pid.value_())",
        args=["x"],
    )
    assert capsys.readouterr().out == "swapper/0 ['-e', 'x']\n1\n"
