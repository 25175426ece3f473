"""Module usage, taints and region sizes on synthetic kernels laid out like 6.1 and 6.12."""

from __future__ import annotations

import struct

from collector.helpers.module import (
    TAINT_FLAGS,
    for_each_module,
    module_core_size,
    module_flags_taint,
    module_init_size,
    module_name,
    module_size,
    module_users,
    module_uses,
    taint_flags,
)
from collector.testing import SyntheticKernel

MODULES = """
struct list_head { struct list_head *next, *prev; };
enum module_state { MODULE_STATE_LIVE, MODULE_STATE_COMING, MODULE_STATE_GOING, MODULE_STATE_UNFORMED };
enum mod_mem_type { MOD_TEXT = 0, MOD_DATA, MOD_RODATA, MOD_RO_AFTER_INIT, MOD_INIT_TEXT,
    MOD_INIT_DATA, MOD_INIT_RODATA, MOD_MEM_NUM_TYPES, MOD_INVALID = -1 };
typedef struct { int counter; } atomic_t;
struct module_memory { void *base; unsigned int size; };
struct module {
    enum module_state state;
    struct list_head list;
    char name[56];
    struct module_memory mem[7];
    unsigned long taints;
    struct list_head source_list;
    struct list_head target_list;
    atomic_t refcnt;
};
struct module_use {
    struct list_head source_list;
    struct list_head target_list;
    struct module *source, *target;
};
struct taint_flag { char c_true; char c_false; bool module; const char *desc; };
"""


def link(sk: SyntheticKernel, head: int, nodes: list[int]) -> None:
    """A circular list_head list: ``head`` then ``nodes``, in that order."""
    ring = [head, *nodes]
    for k, node in enumerate(ring):
        sk.write(node, struct.pack("<QQ", ring[(k + 1) % len(ring)], ring[k - 1]))


def three_modules() -> tuple[SyntheticKernel, dict[str, int]]:
    """virtio_ring used by virtio and virtio_pci; virtio used by virtio_pci."""
    sk = SyntheticKernel(MODULES)
    head = sk.global_("modules", "struct list_head")
    sk.global_("after_modules", "u64")
    names = ("virtio_pci", "virtio", "virtio_ring")
    mods = {n: sk.new("struct module", name=n.encode()) for n in names}
    off = sk.offsetof("struct module", "list")
    link(sk, head, [mods[n] + off for n in names])
    source = sk.offsetof("struct module", "source_list")
    target = sk.offsetof("struct module", "target_list")
    use_target = sk.offsetof("struct module_use", "target_list")
    uses: dict[str, list[int]] = {n: [] for n in names}  # a module's source_list entries
    used: dict[str, list[int]] = {n: [] for n in names}  # its target_list entries
    # add_module_usage(a, b) does list_add (at the head): the newest user comes first.
    for user, target_name in (("virtio_pci", "virtio"), ("virtio", "virtio_ring"),
                              ("virtio_pci", "virtio_ring")):  # fmt: skip
        use = sk.new("struct module_use", source=mods[user], target=mods[target_name])
        uses[target_name].insert(0, use)
        used[user].insert(0, use + use_target)
    for n in names:
        link(sk, mods[n] + source, uses[n])
        link(sk, mods[n] + target, used[n])
    return sk, mods


def test_users_and_uses_follow_module_use_entries() -> None:
    sk, _ = three_modules()
    got = {
        module_name(m): ([module_name(u) for u in module_users(m)],
                         [module_name(u) for u in module_uses(m)])
        for m in for_each_module(sk.kernel())
    }  # fmt: skip
    assert got == {
        "virtio_pci": ([], ["virtio_ring", "virtio"]),
        "virtio": (["virtio_pci"], ["virtio_ring"]),
        "virtio_ring": (["virtio_pci", "virtio"], []),
    }


def test_ro_after_init_is_core_memory() -> None:
    sk, mods = three_modules()
    sk.fill(mods["virtio"], "struct module",
            {"mem[0].size": 0x3000, "mem[1].size": 0x1000, "mem[2].size": 0x1000,
             "mem[3].size": 0x1000, "mem[4].size": 0x2000, "mem[5].size": 0x1000,
             "mem[6].size": 0x1000})  # fmt: skip
    virtio = sk.kernel().object("struct module", mods["virtio"])
    assert (module_size(virtio), module_core_size(virtio), module_init_size(virtio)) == (
        0xA000,
        0x6000,
        0x4000,
    )


def test_taint_letters_from_the_built_in_table() -> None:
    sk, mods = three_modules()
    # TAINT_OOT_MODULE (12), TAINT_UNSIGNED_MODULE (13), TAINT_WARN (9, not for modules)
    # and TAINT_PROPRIETARY_MODULE (0).
    sk.set(mods["virtio"], "struct module", "taints", 1 << 12 | 1 << 13 | 1 << 9 | 1)
    kernel = sk.kernel()
    assert taint_flags(kernel) is TAINT_FLAGS  # no taint_flags symbol
    assert module_flags_taint(kernel.object("struct module", mods["virtio"])) == "POE"
    assert module_flags_taint(kernel.object("struct module", mods["virtio_pci"])) == ""


def test_taint_letters_from_the_image_table() -> None:
    sk, mods = three_modules()
    # A kernel whose table has a flag this code does not know: bit 2 is "Q", for modules.
    table = [("P", True), ("F", True), ("Q", True), ("R", False)]
    size = sk.sizeof("struct taint_flag")
    at = sk.global_("taint_flags", "struct taint_flag", size * len(table) + 16)  # + padding
    sk.global_("after_taint_flags", "u64")
    for i, (letter, for_modules) in enumerate(table):
        sk.fill(at + i * size, "struct taint_flag",
                {"c_true": ord(letter), "c_false": ord(" "), "module": for_modules})  # fmt: skip
    sk.set(mods["virtio"], "struct module", "taints", 0b1101)
    kernel = sk.kernel()
    assert taint_flags(kernel) == tuple(table)
    assert module_flags_taint(kernel.object("struct module", mods["virtio"])) == "PQ"


def test_a_table_of_binary_is_not_taken() -> None:
    sk, _ = three_modules()
    at = sk.global_("taint_flags", "struct taint_flag", 64)
    sk.global_("after_taint_flags", "u64")
    sk.write(at, b"\x07\xff\x01" + b"\x00" * 61)
    assert taint_flags(sk.kernel()) is TAINT_FLAGS
