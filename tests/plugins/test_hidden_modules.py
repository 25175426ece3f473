"""hidden_modules on synthetic kernels: modules linked (or not) into the module list and the
sysfs kset, their memory in module-area vmalloc areas, in the 6.4+ ``mem[]`` and the older
``core_layout`` module layouts and the 6.1 (one list) and 6.9+ (per-node lists) vmap layouts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pytest

from collector.analyze import analyze_kernel
from collector.errors import NotApplicable
from collector.plugin_manager import PluginManager
from collector.testing import SyntheticKernel
from collector.testing.kernel import IMAGE_VIRT, START_KERNEL_MAP
from collector.testing.trees import RBTREE

PAGE = 4096

COMMON = (
    RBTREE
    + """
struct list_head { struct list_head *next, *prev; };
typedef struct { unsigned int lock; } spinlock_t;
typedef struct { int counter; } atomic_t;
struct kref { atomic_t refcount; };
struct kset;
struct kobject {
    const char *name; struct list_head entry; struct kobject *parent; struct kset *kset;
    void *ktype; void *sd; struct kref kref; unsigned int state_initialized:1;
};
struct kset { struct list_head list; spinlock_t list_lock; struct kobject kobj; void *uevent_ops; };
struct module;
struct module_kobject {
    struct kobject kobj; struct module *mod; struct kobject *drivers_dir; void *mp;
    void *kobj_completion;
};
enum module_state { MODULE_STATE_LIVE, MODULE_STATE_COMING, MODULE_STATE_GOING,
    MODULE_STATE_UNFORMED };
struct vm_struct {
    struct vm_struct *next; void *addr; unsigned long size; unsigned long flags;
    void **pages; unsigned int page_order; unsigned int nr_pages; phys_addr_t phys_addr;
    const void *caller;
};
struct vmap_area {
    unsigned long va_start; unsigned long va_end; struct rb_node rb_node; struct list_head list;
    union { unsigned long subtree_max_size; struct vm_struct *vm; };
};
"""
)

#: include/linux/module.h from 6.4 ("module: replace module_layout with module_memory").
MEM = """
enum mod_mem_type { MOD_TEXT = 0, MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT, MOD_INIT_TEXT,
    MOD_INIT_DATA, MOD_INIT_RODATA, MOD_MEM_NUM_TYPES };
struct module_memory { void *base; unsigned int size; };
struct module {
    enum module_state state; struct list_head list; char name[56];
    struct module_kobject mkobj; struct module_memory mem[7]; atomic_t refcnt;
};
"""

#: Before 6.4: one core and one init allocation.
LAYOUT = """
struct module_layout { void *base; unsigned int size; unsigned int text_size; };
struct module {
    enum module_state state; struct list_head list; char name[56];
    struct module_kobject mkobj; struct module_layout core_layout;
    struct module_layout init_layout; atomic_t refcnt;
};
"""

#: mm/vmalloc.c from 6.9: busy areas per node.
NODES = """
struct rb_list { struct rb_root root; struct list_head head; spinlock_t lock; };
struct vmap_node { struct rb_list busy; struct rb_list lazy; unsigned long nr_purged; };
"""

MODULE_AREA = 0xFFFFFFFFC0000000
#: Where callers' functions are in the kernel image, and the return address inside each.
FUNCTIONS = {
    "load_module": IMAGE_VIRT + 0x100000,
    "bpf_prog_pack_alloc": IMAGE_VIRT + 0x200000,
    "__get_insn_slot": IMAGE_VIRT + 0x300000,
}
RETURN = 0x784
#: Where struct module lies in the data region that holds it.
STRUCT_AT = 0x340


@dataclass
class Module:
    """What a test built: where the struct module is and what its regions are."""

    address: int
    name: str
    regions: dict[str, tuple[int, int]]  # region -> (base, size)

    @property
    def text(self) -> int:
        return next(iter(self.regions.values()))[0]

    @property
    def size(self) -> int:
        return sum(size for _base, size in self.regions.values())


class World:
    """A synthetic kernel with modules, the sysfs module kset and the vmap areas.

    :param modules: ``mem`` (6.4 on) or ``layout`` (before).
    :param vmap: ``list`` (before 6.9: ``vmap_area_list``) or ``nodes`` (6.9 on, two nodes).
    """

    def __init__(self, modules: str = "mem", vmap: str = "list") -> None:
        self.kind = modules
        self.vmap = vmap
        decls = COMMON + (MEM if modules == "mem" else LAYOUT) + (NODES if vmap == "nodes" else "")
        sk = self.sk = SyntheticKernel(decls)
        for name, address in FUNCTIONS.items():
            sk.symbol(name, address, "T")
            sk.symbol(f"{name}_end", address + 0x1000, "T")
        self.modules_head = sk.global_("modules", "struct list_head")
        kset_pointer = sk.global_("module_kset", "u64")
        if vmap == "list":
            self.heads = [sk.global_("vmap_area_list", "struct list_head")]
        else:
            nodes = sk.new("struct vmap_node", 2)
            size = sk.sizeof("struct vmap_node")
            self.heads = [
                nodes + i * size + sk.offsetof("struct vmap_node", "busy.head") for i in range(2)
            ]
            sk.write_u64(sk.global_("vmap_nodes", "u64"), nodes)
            sk.write(sk.global_("nr_vmap_nodes", "u64"), struct.pack("<I", 2))
        sk.global_("after_the_globals", "u64")
        self.kset = sk.new("struct kset")
        sk.write_u64(kset_pointer, self.kset)
        self.listed: list[int] = []  # struct module addresses, list order
        self.kobjects: list[int] = []  # module_kobject addresses, kset order
        self.areas: list[tuple[int, int, int]] = []  # (start, end, struct vmap_area)
        self._next = MODULE_AREA + 0x100000

    # -- memory -----------------------------------------------------------------------------

    def area(self, size: int, caller: str | int = "load_module") -> int:
        """A module-area allocation of ``size`` bytes (a whole number of pages) plus its guard
        page, mapped and zeroed; its start."""
        sk = self.sk
        start = self._next
        self._next += size + PAGE + 0x10000  # leave holes, as the kernel's randomization does
        for page in range(start, start + size, PAGE):
            sk.tables.map(page, page - START_KERNEL_MAP)
            sk.write(page, bytes(PAGE))
        address = caller if isinstance(caller, int) else FUNCTIONS[caller] + RETURN
        vm = sk.new("struct vm_struct", addr=start, size=size + PAGE, flags=0x102, caller=address)
        va = sk.new("struct vmap_area", va_start=start, va_end=start + size + PAGE, vm=vm)
        self.areas.append((start, start + size + PAGE, va))
        return start

    def module(
        self,
        name: str,
        sizes: tuple[int, ...] = (0x3000, 0x2000, 0x1000),
        listed: bool = True,
        in_kset: bool = True,
        back_pointer: bool = True,
    ) -> Module:
        """A loaded module with regions of ``sizes`` (text, data, rodata with ``mem``; core
        with ``layout``, whose first size is used), its struct module inside its data."""
        sk = self.sk
        if self.kind == "mem":
            names = ("MOD_TEXT", "MOD_DATA", "MOD_RODATA")
            regions = {r: (self.area(s), s) for r, s in zip(names, sizes, strict=False)}
            holder = regions["MOD_DATA"][0]
        else:
            regions = {"core": (self.area(sizes[0]), sizes[0])}
            holder = regions["core"][0]
        mod = holder + STRUCT_AT
        kname = sk.alloc(len(name) + 1)
        sk.write(kname, name.encode() + b"\0")
        values = {"name": name.encode(), "state": "MODULE_STATE_LIVE", "refcnt.counter": 1}
        values["mkobj.kobj.name"] = kname
        values["mkobj.mod"] = mod if back_pointer else 0
        if self.kind == "mem":
            for i, (base, size) in enumerate(regions.values()):
                values[f"mem[{i}].base"] = base
                values[f"mem[{i}].size"] = size
        else:
            values["core_layout.base"], values["core_layout.size"] = regions["core"]
        sk.fill(mod, "struct module", values)
        if listed:
            self.listed.append(mod)
        if in_kset:
            self.kobjects.append(mod + sk.offsetof("struct module", "mkobj"))
        return Module(mod, name, regions)

    def builtin(self, name: str) -> None:
        """A built-in module's kobject: in the kset, with ``mod`` NULL."""
        kname = self.sk.alloc(len(name) + 1)
        self.sk.write(kname, name.encode() + b"\0")
        self.kobjects.append(self.sk.new("struct module_kobject", kobj__name=kname))

    # -- the kernel -------------------------------------------------------------------------

    def _ring(self, head: int, nodes: list[int]) -> None:
        ring = [head, *nodes]
        for k, node in enumerate(ring):
            self.sk.write(node, struct.pack("<QQ", ring[(k + 1) % len(ring)], ring[k - 1]))

    def kernel(self):
        sk = self.sk
        self._ring(
            self.modules_head, [m + sk.offsetof("struct module", "list") for m in self.listed]
        )
        self._ring(self.kset, [k + sk.offsetof("struct kobject", "entry") for k in self.kobjects])
        lists: list[list[int]] = [[] for _ in self.heads]
        # Spread the areas over the nodes (the kernel hashes by address), each list sorted.
        for i, (_s, _e, va) in enumerate(sorted(self.areas)):
            lists[i % len(lists)].append(va + sk.offsetof("struct vmap_area", "list"))
        for head, nodes in zip(self.heads, lists, strict=True):
            self._ring(head, nodes)
        return sk.kernel()


def run(world: World, **options) -> list[dict]:
    result = analyze_kernel(
        world.kernel(), "hidden_modules", options, manager=PluginManager(autoload=False)
    )
    assert result.error is None
    return result.records


def error(world: World) -> str | None:
    """The one line the analysis stops with."""
    result = analyze_kernel(world.kernel(), "hidden_modules", manager=PluginManager(autoload=False))
    assert result.records == []
    return result.error


WRONG = "hidden_modules: stopped after 0 records: the kernel metadata looks wrong for this image: "
CHECK = " (are the image's BTF and symbols those of the captured kernel?)"


def record(module: Module, seen: str, missing: str, kind: str = "module") -> dict:
    return {
        "kind": kind,
        "name": module.name,
        "module": module.address,
        "base": module.text,
        "size": module.size,
        "state": "Live",
        "seen_in": seen,
        "missing_from": missing,
        "caller": f"load_module+{RETURN:#x}",
    }


ALL3 = "module list, sysfs kset, module memory"
LAYOUTS = [("mem", "list"), ("mem", "nodes"), ("layout", "list"), ("layout", "nodes")]


@pytest.mark.parametrize(("modules", "vmap"), LAYOUTS)
def test_no_differences_no_records(modules: str, vmap: str) -> None:
    world = World(modules, vmap)
    world.builtin("printk")
    world.builtin("tcp_cubic")
    a = world.module("virtio")
    b = world.module("9p")
    world.area(0x200000, "bpf_prog_pack_alloc")  # a BPF prog pack
    world.area(0x1000, "__get_insn_slot")  # a kprobe instruction page
    assert run(world) == []
    assert a.text != b.text


@pytest.mark.parametrize(("modules", "vmap"), LAYOUTS)
def test_all_shows_every_module_and_the_other_allocations(modules: str, vmap: str) -> None:
    world = World(modules, vmap)
    world.builtin("printk")
    a = world.module("virtio")
    bpf = world.area(0x200000, "bpf_prog_pack_alloc")
    kprobe = world.area(0x1000, "__get_insn_slot")
    other = {"name": None, "module": None, "state": None, "seen_in": "module memory"}
    assert run(world, all=True) == [
        record(a, ALL3, ""),
        {"kind": "other allocation", **other, "base": bpf, "size": 0x201000,
         "missing_from": "", "caller": f"bpf_prog_pack_alloc+{RETURN:#x}"},
        {"kind": "other allocation", **other, "base": kprobe, "size": 0x2000,
         "missing_from": "", "caller": f"__get_insn_slot+{RETURN:#x}"},
    ]  # fmt: skip


@pytest.mark.parametrize(("modules", "vmap"), LAYOUTS)
def test_a_module_unlinked_from_the_module_list(modules: str, vmap: str) -> None:
    world = World(modules, vmap)
    world.module("virtio")
    hidden = world.module("rootkit", listed=False)
    world.module("9p")
    assert run(world) == [record(hidden, "sysfs kset, module memory", "module list")]


@pytest.mark.parametrize(("modules", "vmap"), LAYOUTS)
def test_a_module_unlinked_from_both_lists_is_recovered_from_its_memory(
    modules: str, vmap: str
) -> None:
    world = World(modules, vmap)
    world.module("virtio")
    hidden = world.module("rootkit", listed=False, in_kset=False)
    world.module("9p")
    world.area(0x200000, "bpf_prog_pack_alloc")
    assert run(world) == [
        record(hidden, "module memory", "module list, sysfs kset", kind="recovered module")
    ]


@pytest.mark.parametrize(("modules", "vmap"), LAYOUTS)
def test_memory_of_a_module_that_left_no_struct_module_is_unclaimed(
    modules: str, vmap: str
) -> None:
    world = World(modules, vmap)
    world.module("virtio")
    # mkobj.mod cleared: nothing in its memory says it holds a struct module.
    hidden = world.module("rootkit", listed=False, in_kset=False, back_pointer=False)
    world.module("9p")
    sizes = {"MOD_TEXT": 0x3000, "MOD_DATA": 0x2000, "MOD_RODATA": 0x1000, "core": 0x3000}
    assert run(world) == [
        {
            "kind": "unclaimed memory",
            "name": None,
            "module": None,
            "base": base,
            "size": sizes[region] + PAGE,
            "state": None,
            "seen_in": "module memory",
            "missing_from": "module list, sysfs kset",
            "caller": f"load_module+{RETURN:#x}",
        }
        for region, (base, _size) in hidden.regions.items()
    ]


def test_memory_from_an_unknown_caller_is_unclaimed_but_bpf_and_kprobes_are_not() -> None:
    world = World()
    world.module("virtio")
    world.module("9p")
    world.area(0x200000, "bpf_prog_pack_alloc")
    world.area(0x1000, "__get_insn_slot")
    stray = world.area(0x2000, caller=0xFFFFFFFFC0DEAD00)  # inside no symbol
    assert run(world) == [
        {
            "kind": "unclaimed memory",
            "name": None,
            "module": None,
            "base": stray,
            "size": 0x3000,
            "state": None,
            "seen_in": "module memory",
            "missing_from": "module list, sysfs kset",
            "caller": "0xffffffffc0dead00",
        }
    ]


def test_a_module_whose_memory_is_not_allocated() -> None:
    world = World()
    world.module("virtio")
    gone = world.module("9p")
    world.module("ext4")
    # 9p's rodata area was freed (it is no longer on the vmap list).
    rodata = gone.regions["MOD_RODATA"][0]
    world.areas = [a for a in world.areas if a[0] != rodata]
    assert run(world) == [record(gone, "module list, sysfs kset", "module memory")]


def test_a_module_missing_from_the_kset_only() -> None:
    world = World("layout", "nodes")
    world.builtin("printk")
    world.module("virtio")
    half = world.module("9p", in_kset=False)
    assert run(world) == [record(half, "module list, module memory", "sysfs kset")]


def test_a_first_module_with_a_binary_name_is_implausible() -> None:
    world = World()
    m = world.module("virtio")
    garbage = b"\x01\x02garbage\xff"
    world.sk.set(m.address, "struct module", "name", garbage)
    assert error(world) == (
        f"{WRONG}struct module {m.address:#x} name is not text: {garbage.hex()}{CHECK}"
    )


def test_a_kset_holding_none_of_the_listed_modules_is_implausible() -> None:
    world = World()
    world.builtin("printk")
    world.module("virtio", in_kset=False)
    world.module("9p", in_kset=False)
    assert (
        error(world) == f"{WRONG}module_kset holds none of the 2 modules of the module list{CHECK}"
    )


def test_vmap_areas_holding_none_of_the_listed_modules_are_implausible() -> None:
    world = World("mem", "nodes")
    world.module("virtio")
    world.module("9p")
    world.areas = []
    assert error(world) == (
        f"{WRONG}the vmap areas of the module area hold none of the 2 modules of the module"
        f" list{CHECK}"
    )


def test_a_misshapen_last_vmap_area_is_implausible() -> None:
    world = World()
    world.module("virtio")
    start, _end, va = world.areas[-1]
    world.sk.set(va, "struct vmap_area", "va_end", start - PAGE)
    head = world.heads[0]
    assert error(world) == (
        f"{WRONG}vmap_area {va:#x} on the list at {head:#x} spans {start:#x}-{start - PAGE:#x},"
        f" not a page-aligned range below 0xffffffffff000000{CHECK}"
    )


def test_without_vmap_symbols_it_says_why_it_does_not_apply() -> None:
    sk = SyntheticKernel(COMMON + MEM)
    modules = sk.global_("modules", "struct list_head")
    kset = sk.new("struct kset")
    sk.write_u64(sk.global_("module_kset", "u64"), kset)
    sk.global_("after", "u64")
    for head in (modules, kset):
        sk.write(head, struct.pack("<QQ", head, head))
    with pytest.raises(NotApplicable, match="vmap_area_list"):
        analyze_kernel(sk.kernel(), "hidden_modules", manager=PluginManager(autoload=False))
