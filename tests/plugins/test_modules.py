"""lsmod on synthetic kernels laid out like 6.12 (``mem[]``) and 6.1 (``core_layout``)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from collector.analyze import analyze_kernel
from collector.api import Fate, Kernel, NotApplicable
from collector.plugin_manager import BUILTIN_PLUGINS, PluginManager
from collector.plugins import modules as plugin
from collector.testing import SyntheticKernel

COMMON = """
struct list_head { struct list_head *next, *prev; };
enum module_state { MODULE_STATE_LIVE, MODULE_STATE_COMING, MODULE_STATE_GOING, MODULE_STATE_UNFORMED };
typedef struct { int counter; } atomic_t;
struct module;
struct kernel_param_ops { unsigned int flags; int (*set)(char *, void *); int (*get)(char *, void *);
    void (*free)(void *); };
struct kparam_string { unsigned int maxlen; char *string; };
struct kparam_array { unsigned int max; unsigned int elemsize; unsigned int *num;
    struct kernel_param_ops *ops; void *elem; };
struct kernel_param {
    char *name;
    struct module *mod;
    struct kernel_param_ops *ops;
    u16 perm;
    s8 level;
    u8 flags;
    union { void *arg; struct kparam_string *str; struct kparam_array *arr; };
};
struct module_use {
    struct list_head source_list;
    struct list_head target_list;
    struct module *source, *target;
};
"""

#: kernel/module since 6.4: enum mod_mem_type and struct module_memory mem[].
NEW = (
    COMMON
    + """
enum mod_mem_type { MOD_TEXT = 0, MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT, MOD_INIT_TEXT,
    MOD_INIT_DATA, MOD_INIT_RODATA, MOD_MEM_NUM_TYPES, MOD_INVALID = -1 };
struct module_memory { void *base; unsigned int size; };
struct module {
    enum module_state state;
    struct list_head list;
    char name[56];
    struct kernel_param *kp;
    unsigned int num_kp;
    int (*init)(void);
    struct module_memory mem[7];
    unsigned long taints;
    struct list_head source_list;
    struct list_head target_list;
    void (*exit)(void);
    atomic_t refcnt;
};
"""
)

#: Before 6.4: struct module_layout core_layout, init_layout.
OLD = (
    COMMON
    + """
struct module_layout { void *base; unsigned int size; unsigned int text_size; };
struct module {
    enum module_state state;
    struct list_head list;
    char name[56];
    struct kernel_param *kp;
    unsigned int num_kp;
    int (*init)(void);
    struct module_layout core_layout;
    struct module_layout init_layout;
    unsigned long taints;
    struct list_head source_list;
    struct list_head target_list;
    void (*exit)(void);
    atomic_t refcnt;
};
"""
)

TEXT = 0xFFFFFFFFC0200000
INIT_FN, EXIT_FN = 0xFFFFFFFFC0300010, 0xFFFFFFFFC0200400
TAINT_OOT, TAINT_UNSIGNED, TAINT_PROPRIETARY = 12, 13, 0
PARAM_OPS = (
    "int",
    "uint",
    "ulong",
    "short",
    "ushort",
    "bool",
    "invbool",
    "hexint",
    "charp",
    "string",
)


def link(sk: SyntheticKernel, head: int, nodes: list[int]) -> None:
    """A circular list: ``head``, then ``nodes`` in order."""
    ring = [head, *nodes]
    for k, node in enumerate(ring):
        sk.write(node, struct.pack("<QQ", ring[(k + 1) % len(ring)], ring[k - 1]))


class Modules:
    """A synthetic kernel with a ``modules`` list; modules are added in list order."""

    def __init__(self, declarations: str = NEW) -> None:
        self.sk = SyntheticKernel(declarations)
        self.head = self.sk.global_("modules", "struct list_head")
        self.sk.global_("after_modules", "u64")
        self.ops = {}
        for kind in (*PARAM_OPS, "array"):
            name = "param_array_ops" if kind == "array" else f"param_ops_{kind}"
            self.ops[kind] = self.sk.global_(name, "struct kernel_param_ops")
        self.sk.global_("after_param_ops", "u64")
        self.mods: dict[str, int] = {}
        self.users: dict[str, list[str]] = {}

    def add(self, name: bytes | str, **values: Any) -> int:
        key = name if isinstance(name, str) else name.decode("latin-1")
        raw = name.encode() if isinstance(name, str) else name
        address = self.sk.new("struct module", name=raw)
        self.sk.fill(address, "struct module", {"refcnt.counter": 1, **values})
        self.mods[key] = address
        self.users[key] = []
        return address

    def use(self, user: str, target: str) -> None:
        """``add_module_usage(user, target)``: list_add, so the newest user is printed first."""
        self.users[target].insert(0, user)

    def params(self, module: str, params: list[tuple[str | int, str | int, int]]) -> None:
        """``module->kp``: (name or where it is, ops kind or the address of other ops, arg)."""
        size = self.sk.sizeof("struct kernel_param")
        kp = self.sk.alloc(size * len(params))
        for i, (name, ops, arg) in enumerate(params):
            text = name if isinstance(name, int) else self.string(name.encode())
            where = self.ops[ops] if isinstance(ops, str) else ops
            self.sk.fill(kp + i * size, "struct kernel_param",
                         {"name": text, "ops": where, "arg": arg, "perm": 0o644})  # fmt: skip
        self.sk.fill(self.mods[module], "struct module", {"kp": kp, "num_kp": len(params)})

    def value(self, fmt: str, value: Any) -> int:
        """A parameter's variable (in the direct map here, in the module's data really)."""
        at = self.sk.alloc(8)
        self.sk.write(at, struct.pack(fmt, value))
        return at

    def string(self, text: bytes) -> int:
        at = self.sk.alloc(len(text) + 1)
        self.sk.write(at, text + b"\0")
        return at

    def kernel(self, proc_modules: str | None = None) -> Kernel:
        off = self.sk.offsetof("struct module", "list")
        link(self.sk, self.head, [m + off for m in self.mods.values()])
        source = self.sk.offsetof("struct module", "source_list")
        target = self.sk.offsetof("struct module", "target_list")
        targets: dict[str, list[int]] = {name: [] for name in self.mods}
        for name, users in self.users.items():
            uses = []
            for user in users:
                use = self.sk.new(
                    "struct module_use", source=self.mods[user], target=self.mods[name]
                )
                uses.append(use)
                targets[user].append(use + self.sk.offsetof("struct module_use", "target_list"))
            link(self.sk, self.mods[name] + source, uses)
        for name, entries in targets.items():
            link(self.sk, self.mods[name] + target, entries)
        if proc_modules is not None:
            self.sk.blobs["modules"] = proc_modules.encode()
        return self.sk.kernel()


def run(kernel: Kernel) -> tuple[list[dict], str | None]:
    result = analyze_kernel(kernel, "lsmod", manager=manager())
    return result.records, result.error


def manager() -> PluginManager:
    pm = PluginManager(builtins=(), autoload=False)
    pm.register(plugin, name="modules", version="test")
    return pm


def record(**values: Any) -> dict[str, Any]:
    out = dict.fromkeys(f.name for f in plugin.FIELDS)
    out.update(values)
    return out


def three_modules(proc_modules: str | None = None) -> tuple[Kernel, dict[str, int]]:
    """ext_oot (out of tree, unsigned, parameters of every kind, no exit: permanent), virtio,
    virtio_ring (still loading, its init memory still there); ext_oot uses both, virtio uses
    virtio_ring."""
    m = Modules()
    m.add("ext_oot", state="MODULE_STATE_LIVE", init=INIT_FN, taints=1 << TAINT_OOT | 1 << TAINT_UNSIGNED | 1 << 9,
          **{"mem[0].base": TEXT, "mem[0].size": 0x9000, "mem[1].size": 0x3000, "mem[3].size": 0x1000})  # fmt: skip
    m.add("virtio", state="MODULE_STATE_LIVE", init=INIT_FN, exit=EXIT_FN,
          **{"refcnt.counter": 3, "mem[0].base": 0xFFFFFFFFC0100000, "mem[0].size": 0x4000,
             "mem[1].size": 0x1000})  # fmt: skip
    m.add("virtio_ring", state="MODULE_STATE_COMING",
          **{"mem[0].base": 0xFFFFFFFFC0000000, "mem[0].size": 0x2000, "mem[4].size": 0x1000})  # fmt: skip
    m.use("virtio", "virtio_ring")
    m.use("ext_oot", "virtio_ring")
    m.use("ext_oot", "virtio")
    lost = m.sk.alloc(4096, 4096)  # a page the capture lacks
    m.sk.drop(lost)
    label = m.sk.new("struct kparam_string", maxlen=8, string=m.string(b"hello world"))
    custom_ops = m.sk.new("struct kernel_param_ops")  # the module's own get/set
    m.params("ext_oot", [
        ("debug", "int", m.value("<i", -5)),
        ("count", "uint", m.value("<I", 7)),
        ("big", "ulong", m.value("<Q", 2**64 - 1)),
        ("small", "short", m.value("<h", -2)),
        ("enable", "bool", m.value("?", True)),
        ("quiet", "invbool", m.value("?", True)),
        ("mask", "hexint", m.value("<I", 0xFF)),
        ("zero", "hexint", m.value("<I", 0)),
        ("path", "charp", m.value("<Q", m.string(b'/lib/"fw"'))),
        ("none", "charp", m.value("<Q", 0)),
        ("label", "string", label),
        ("ids", "array", m.sk.new("struct kparam_array")),
        ("custom", custom_ops, m.value("<i", 1)),
        ("lost", "int", lost),
        (lost, "int", m.value("<i", 1)),  # its name in the page the capture lacks
    ])  # fmt: skip

    return m.kernel(proc_modules), m.mods


def expected_three(mods: dict[str, int]) -> list[dict[str, Any]]:
    return [
        record(name="ext_oot", address=TEXT, size=0xD000, core_size=0xD000, init_size=0,
               state="Live", refcount=0, users="[permanent],", taints="OE",
               parameters='debug=-5 count=7 big=18446744073709551615 small=-2 enable=Y'
               ' quiet=N mask=0x0000ff zero=00000000 path="/lib/\\"fw\\"" none=(null)'
               ' label="hello w" ids custom lost ?',
               module=mods["ext_oot"]),
        record(name="virtio", address=0xFFFFFFFFC0100000, size=0x5000, core_size=0x5000,
               init_size=0, state="Live", refcount=2, users="ext_oot,", taints="",
               parameters="", module=mods["virtio"]),
        record(name="virtio_ring", address=0xFFFFFFFFC0000000, size=0x3000, core_size=0x2000,
               init_size=0x1000, state="Loading", refcount=0, users="ext_oot,virtio,",
               taints="", parameters="", module=mods["virtio_ring"]),
    ]  # fmt: skip


def test_modules_since_6_4_read_from_mem() -> None:
    kernel, mods = three_modules()
    records, error = run(kernel)
    assert error is None
    assert records == expected_three(mods)  # no modules blob: proc_modules null


def test_modules_before_6_4_read_from_the_layouts() -> None:
    m = Modules(OLD)
    m.add("ext4", state="MODULE_STATE_GOING", init=INIT_FN, exit=EXIT_FN, taints=1 << TAINT_PROPRIETARY,
          **{"refcnt.counter": 1, "core_layout.base": 0xFFFFFFFFC0400000,
             "core_layout.size": 0x80000, "init_layout.size": 0x2000})  # fmt: skip
    m.add("jbd2", state="MODULE_STATE_LIVE", init=INIT_FN, exit=EXIT_FN,
          **{"refcnt.counter": 2, "core_layout.base": 0xFFFFFFFFC0380000,
             "core_layout.size": 0x30000})  # fmt: skip
    m.use("ext4", "jbd2")
    m.params("jbd2", [("jbd2_debug", "ushort", m.value("<H", 3))])
    records, error = run(m.kernel())
    assert error is None
    assert records == [
        record(name="ext4", address=0xFFFFFFFFC0400000, size=0x82000, core_size=0x80000,
               init_size=0x2000, state="Unloading", refcount=0, users="-", taints="P",
               parameters="", module=m.mods["ext4"]),
        record(name="jbd2", address=0xFFFFFFFFC0380000, size=0x30000, core_size=0x30000,
               init_size=0, state="Live", refcount=1, users="ext4,", taints="",
               parameters="jbd2_debug=3", module=m.mods["jbd2"]),
    ]  # fmt: skip


PROC_MODULES = """\
gone 8192 0 - Live 0xffffffffc0500000 (OE)
virtio 16384 2 ext_oot, Live 0xffffffffc0100000
virtio_ring 12288 0 virtio,ext_oot, Loading 0xffffffffc0000000
a line that is not one
"""


def test_set_beside_the_captured_proc_modules() -> None:
    kernel, mods = three_modules(PROC_MODULES)
    records, error = run(kernel)
    assert error is None
    ext_oot, virtio, virtio_ring = expected_three(mods)
    ext_oot.update(proc_modules="missing",
                   notes="not in /proc/modules when the capture began (loaded since?)")  # fmt: skip
    virtio.update(proc_modules="differs", notes="size 16384 in /proc/modules")
    virtio_ring.update(proc_modules="present")
    gone = record(
        name="gone", address=0xFFFFFFFFC0500000, size=8192, state="Live", refcount=0,
        users="-", taints="OE", proc_modules="missing-from-list",
        notes="in /proc/modules when the capture began but not on the modules list in memory"
        " (unloaded since, or taken off the list); the other fields are its /proc/modules line",
    )  # fmt: skip
    assert records == [ext_oot, virtio, virtio_ring, gone]


def test_hidden_addresses_in_proc_modules_are_not_compared() -> None:
    kernel, _ = three_modules(
        "ext_oot 53248 0 [permanent], Live 0x0000000000000000 (OE)\n"
        "virtio 20480 2 ext_oot, Live 0x0000000000000000\n"
        "virtio_ring 12288 0 virtio,ext_oot, Loading 0x0000000000000000\n"
    )
    records, _ = run(kernel)
    assert [(r["proc_modules"], r["notes"]) for r in records] == [("present", None)] * 3


def test_parse_proc_modules() -> None:
    parsed = plugin.parse_proc_modules(
        b"zfs 5865472 6 - Live 0xffffffffc0a00000 (POE)\n"
        b"xt_nat 16384 1 - Unloading 0xffffffffc0200000 (OE-)\n"
        b"nope 1 2 3\n"
        b"bad x 0 - Live 0x0\n"
        b"old 4096 - - Live 0xffffffffc0100000\n"
    )
    assert parsed == {
        "zfs": plugin.ProcModule("zfs", 5865472, 6, "-", "Live", 0xFFFFFFFFC0A00000, "POE"),
        "xt_nat": plugin.ProcModule("xt_nat", 16384, 1, "-", "Unloading", 0xFFFFFFFFC0200000, "OE"),
        "old": plugin.ProcModule("old", 4096, None, "-", "Live", 0xFFFFFFFFC0100000, ""),
    }


def test_module_record_is_usable_alone() -> None:
    kernel, mods = three_modules()
    one = plugin.module_record(kernel.object("struct module", mods["virtio"]))
    assert one == expected_three(mods)[1]


# -- hostile images ------------------------------------------------------------------------------


def two_modules(**second: Any) -> tuple[Kernel, dict[str, int]]:
    m = Modules()
    m.add("first", state="MODULE_STATE_LIVE", **{"mem[0].base": TEXT, "mem[0].size": 0x1000})
    values = {"state": "MODULE_STATE_LIVE", "mem[0].base": TEXT + 0x10000, "mem[0].size": 0x1000}
    values.update(second)
    name = values.pop("name", b"second")
    m.add(name, **values)
    return m.kernel(), m.mods


def test_a_binary_name_stops_the_walk() -> None:
    kernel, mods = two_modules(name=b"\x01\xfe\xff\x80")
    records, error = run(kernel)
    assert [r["name"] for r in records] == ["first"]
    assert error == (
        "lsmod: stopped after 1 records: the kernel metadata looks wrong for this image:"
        f" module {mods[chr(1) + chr(0xFE) + chr(0xFF) + chr(0x80)]:#x} name is not text:"
        " 01feff80" + "00" * 28 + " (are the image's BTF and symbols those of the captured kernel?)"
    )


@pytest.mark.parametrize(
    ("values", "detail"),
    [
        ({"mem[0].base": 0xFFFF888000100000},
         "address is 0xffff888000100000, outside the module area"
         " 0xffffffffa0000000..0xffffffffff000000"),
        ({"mem[0].size": 0xF0000000},
         f"size is {0xF0000000}, outside 1..{0xFFFFFFFFFF000000 - 0xFFFFFFFFA0000000}"),
        ({"mem[0].size": 0}, f"size is 0, outside 1..{0xFFFFFFFFFF000000 - 0xFFFFFFFFA0000000}"),
        ({"state": 7}, "state is 7, no enum module_state"),
        ({"num_kp": 100_000}, f"num_kp is 100000, outside 0..{plugin.MAX_PARAMS}"),
    ],
)  # fmt: skip
def test_implausible_fields_stop_the_walk(values: dict, detail: str) -> None:
    kernel, mods = two_modules(**values)
    records, error = run(kernel)
    assert [r["name"] for r in records] == ["first"]
    assert error == (
        "lsmod: stopped after 1 records: the kernel metadata looks wrong for this image:"
        f" module 'second' ({mods['second']:#x}) {detail}"
        " (are the image's BTF and symbols those of the captured kernel?)"
    )


def test_a_looping_list_is_a_broken_structure() -> None:
    m = Modules()
    for name in ("a", "b", "c"):
        m.add(name, state="MODULE_STATE_LIVE", **{"mem[0].base": TEXT, "mem[0].size": 0x1000})
    m.kernel()  # links the lists
    off = m.sk.offsetof("struct module", "list")
    # c's next goes back to b instead of to the head: a loop that never closes.
    m.sk.write_u64(m.mods["c"] + off, m.mods["b"] + off)
    records, error = run(m.sk.kernel())
    assert [r["name"] for r in records] == ["a", "b", "c"]
    assert error is not None and error.startswith("lsmod: stopped after 3 records: ")
    assert "loop" in error and f"{m.mods['b'] + off:#x}" in error


def test_a_struct_module_not_captured_is_one_line() -> None:
    m = Modules()
    m.add("first", state="MODULE_STATE_LIVE", **{"mem[0].base": TEXT, "mem[0].size": 0x1000})
    m.sk.drop(m.mods["first"], Fate.UNREADABLE)
    records, error = run(m.kernel())
    assert records == []
    assert error is not None and "was not captured: unreadable" in error


def test_without_the_modules_list_it_says_why() -> None:
    sk = SyntheticKernel(NEW)
    with pytest.raises(NotApplicable, match="symbol 'modules'"):
        analyze_kernel(sk.kernel(), "lsmod", manager=manager())


def test_registered_as_a_builtin() -> None:
    assert "collector.plugins.modules" in BUILTIN_PLUGINS
    assert PluginManager(autoload=False).analysis("lsmod").analysis is plugin.LSMOD
