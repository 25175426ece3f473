"""Hostile kernel memory through every analysis: the structures themselves are mutated.

tests/fuzz/test_fuzz.py damages the image around the RAM (records, headers, sizes); the
synthetic RAM it carries holds no kernel structures, so the analyses stop early there as not
applicable. Here the inputs are the synthetic kernels the plugins' own unit tests build (tasks
with threads and address spaces, modules with sysfs and vmap areas, printk's ring, memory maps
of each layout era, processes' maple trees), and each example overwrites a few bytes of their
memory: a flipped byte, a NULL, a pointer to itself or into another object, a huge or negative
count. A live capture reads a changing kernel, and an image can be forged, so any such value
can reach a plugin. Each analysis must then:

- produce records, or stop with one line (NotApplicable, or an error of the image or of the
  kernel's data: a page not captured, an address not mapped, a broken list, an implausible
  value), never with a Python error of its own (a TypeError, an IndexError, a KeyError...), which
  `collect analyze` reports as a failed plugin;
- give every record the declared field types;
- finish within the limits of tests/fuzz/limits.py (time, and growth of the process's memory).

CI runs a fixed set of examples per kernel; ``python -m tests.fuzz --examples N`` runs more.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from functools import cache

import pytest
from construct import ConstructError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.analyze import analyze_kernel
from collector.errors import CollectorError
from collector.image.sparse import SparseMemory
from collector.kernel.kernel import Kernel
from collector.plugin_manager import PluginManager
from collector.testing.kernel import PAGE_OFFSET
from tests.fuzz.limits import EXAMPLES, bounded

PAGE = 4096


def _tasks() -> Kernel:
    from tests.plugins.test_tasks import standard

    world, _ = standard()
    return world.kernel()


def _tasks_old_layout() -> Kernel:
    from tests.plugins.test_tasks import standard

    world, _ = standard("old")
    return world.kernel()


def _maps() -> Kernel:
    from tests.plugins.test_maps import NEW, machine

    return machine(NEW).kernel()


def _maps_vm_next() -> Kernel:
    from tests.plugins.test_maps import OLD, machine

    return machine(OLD).kernel()


def _modules() -> Kernel:
    from tests.plugins.test_modules import three_modules

    kernel, _ = three_modules()
    return kernel


def _hidden_modules() -> Kernel:
    from tests.plugins.test_hidden_modules import World

    world = World("mem", "nodes")
    world.builtin("printk")
    world.module("virtio")
    world.module("9p")
    world.area(0x200000, "bpf_prog_pack_alloc")
    return world.kernel()


def _hidden_tasks() -> Kernel:
    from tests.plugins.test_hidden_tasks import build

    machine, _ = build("6.12")
    return machine.kernel()


def _dmesg() -> Kernel:
    from tests.plugins.test_dmesg import _ring_with

    sk, _ = _ring_with(6)
    return sk.kernel()


def _pages(era: str) -> Callable[[], Kernel]:
    def make() -> Kernel:
        from tests.kernel.test_pages import build

        memory_map, _ = build(era)
        return memory_map.kernel()

    return make


#: name -> (how to build the kernel, the analyses that read what it holds, with ``--all`` for
#: an analysis that reports only differences by default)
KERNELS: dict[str, tuple[Callable[[], Kernel], tuple[str, ...]]] = {
    "tasks": (_tasks, ("pslist", "pstree", "psaux")),
    "tasks-old-layout": (_tasks_old_layout, ("pslist", "psaux")),
    "maps": (_maps, ("maps",)),
    "maps-vm_next": (_maps_vm_next, ("maps",)),
    "modules": (_modules, ("lsmod",)),
    "hidden_modules": (_hidden_modules, ("hidden_modules --all",)),
    "hidden_tasks": (_hidden_tasks, ("hidden_tasks",)),
    "dmesg": (_dmesg, ("dmesg",)),
    "pages-6.1": (_pages("6.1"), ("pages", "buddyinfo")),
    "pages-6.12": (_pages("6.12"), ("pages", "buddyinfo")),
    "pages-6.18": (_pages("6.18"), ("pages", "buddyinfo")),
}


@cache
def pristine(name: str) -> Kernel:
    return KERNELS[name][0]()


@cache
def manager() -> PluginManager:
    return PluginManager(autoload=False)


# -- mutations ----------------------------------------------------------------------------------

#: Values a hostile or torn structure may hold where a pointer, count or index belongs.
ABSURD = (0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 1 << 63, (1 << 64) - 1, 0xDEAD000000000000)


@st.composite
def edits(draw: st.DrawFn, memory: SparseMemory) -> list[tuple[int, bytes]]:
    """A few writes of (physical address, bytes) into the kernel's memory."""
    ranges = memory.ranges()
    direct_map = PAGE_OFFSET[4]  # every kernel here is a 4-level SyntheticKernel
    out = []
    for _ in range(draw(st.integers(1, 6))):
        start, end = draw(st.sampled_from(ranges))
        kind = draw(st.sampled_from(("byte", "pointer", "self", "absurd", "zeros")))
        at = draw(st.integers(start, end - 1))
        if kind == "byte":
            out.append((at, bytes([draw(st.integers(0, 255))])))
            continue
        at -= at % 8
        if at + 8 > end:
            continue
        if kind == "pointer":
            other_start, other_end = draw(st.sampled_from(ranges))
            target = draw(st.integers(other_start, other_end - 1))
            value = direct_map + target
        elif kind == "self":
            value = direct_map + at
        elif kind == "absurd":
            value = draw(st.sampled_from(ABSURD))
        else:
            out.append((at, bytes(min(draw(st.integers(8, PAGE)), end - at))))
            continue
        out.append((at, value.to_bytes(8, "little")))
    return out


def mutated(kernel: Kernel, writes: list[tuple[int, bytes]]) -> Kernel:
    """The same kernel with ``writes`` applied to a copy of its memory."""
    memory = kernel.memory
    assert isinstance(memory, SparseMemory)
    ranges = {s: bytearray(d) for s, d in zip(memory._starts, memory._data, strict=True)}
    for at, data in writes:
        for start, buf in ranges.items():
            if start <= at < start + len(buf):
                end = min(len(buf), at - start + len(data))
                buf[at - start : end] = data[: end - (at - start)]
                break
    return Kernel(
        SparseMemory(
            ranges,
            fates=memory._fates,
            blobs=memory._blobs,
            metadata=memory.metadata,
        )
    )


# -- the property -----------------------------------------------------------------------------


def analyses(name: str) -> Iterator[tuple[str, dict[str, bool]]]:
    for spec in KERNELS[name][1]:
        analysis, *flags = spec.split()
        yield analysis, {"all": True} if "--all" in flags else {}


def run_analyses(name: str, kernel: Kernel) -> None:
    for analysis, options in analyses(name):
        what = f"{analysis} on the {name} kernel"
        try:
            with bounded(what):
                analyze_kernel(kernel, analysis, options, manager=manager())
        except CollectorError as e:
            # One line, and not a plugin's own Python error (analyze_kernel turns those into
            # "failed after N records: TypeError: ...", with the error as the cause).
            cause = e.__cause__
            if cause is not None and not isinstance(cause, CollectorError | ConstructError):
                raise AssertionError(f"{what}: the plugin failed: {e}") from cause
            assert "\n" not in str(e), (what, str(e))
            assert "declared" not in str(e), (what, str(e))  # a record of the wrong type


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_the_pristine_kernels_give_records(name: str) -> None:
    """Each kernel, unmutated, is one its analyses read: records, no error."""
    for analysis, options in analyses(name):
        result = analyze_kernel(pristine(name), analysis, options, manager=manager())
        assert result.records and result.error is None, (name, analysis, result.error)


def fuzz_settings(ci_examples: int) -> settings:
    return settings(
        max_examples=EXAMPLES or ci_examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=not EXAMPLES,
        database=None,
    )


@pytest.mark.parametrize("name", sorted(KERNELS))
@fuzz_settings(60)
@given(data=st.data())
def test_mutated_kernel_memory(name: str, data: st.DataObject) -> None:
    kernel = pristine(name)
    writes = data.draw(edits(kernel.memory))
    run_analyses(name, mutated(kernel, writes))


def test_random_bytes_over_whole_pages() -> None:
    """Heavier damage, seeded: whole pages of a kernel overwritten with random bytes."""
    rng = random.Random(7)
    for name in sorted(KERNELS):
        kernel = pristine(name)
        ranges = kernel.memory.ranges()
        for _ in range(5):
            writes = []
            for _ in range(3):
                start, end = rng.choice(ranges)
                at = rng.randrange(start, end)
                writes.append((at - at % PAGE, rng.randbytes(PAGE)))
            run_analyses(name, mutated(kernel, writes))
