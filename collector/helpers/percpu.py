"""Per-CPU variables and CPU masks (include/linux/percpu-defs.h, include/linux/cpumask.h).

A per-CPU variable's symbol is an offset into the per-CPU area; CPU ``n``'s copy lives at
that offset plus ``__per_cpu_offset[n]`` (arch/x86/include/asm/percpu.h, SMP kernels).
Kernel BTF types every per-CPU variable, so ``per_cpu(kernel, "runqueues", 0)`` is typed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from collector.errors import BrokenStructure
from collector.kernel.btf import Kind
from collector.kernel.object import Object
from collector.kernel.variables import percpu_variable_type

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

#: ``NR_CPUS`` can be 8192 (CONFIG_MAXSMP); a mask wider than this is not a real one.
MAX_CPUS = 1 << 16


def nr_cpu_ids(kernel: Kernel) -> int:
    """``nr_cpu_ids``: one more than the highest possible CPU number."""
    n = kernel.variable("nr_cpu_ids").value()
    if not 0 < n <= MAX_CPUS:
        raise BrokenStructure(f"nr_cpu_ids is {n}, not a CPU count")
    return n


def per_cpu_offset(kernel: Kernel, cpu: int) -> int:
    """``per_cpu_offset(cpu)``: ``__per_cpu_offset[cpu]``."""
    offsets = kernel.variable("__per_cpu_offset")
    if not 0 <= cpu < len(offsets):
        raise IndexError(f"CPU {cpu} is beyond __per_cpu_offset's {len(offsets)} entries")
    return offsets[cpu].value()


def per_cpu_ptr(ptr: Object, cpu: int) -> Object:
    """``per_cpu_ptr(ptr, cpu)``: CPU ``cpu``'s copy of what the per-CPU pointer ``ptr``
    (``type __percpu *``) points to."""
    r = ptr.type.resolved()
    if r.kind is not Kind.PTR:
        raise TypeError(f"per_cpu_ptr needs a pointer, not {ptr.type}")
    kernel = ptr.kernel
    address = (ptr.value() + per_cpu_offset(kernel, cpu)) & 0xFFFFFFFFFFFFFFFF
    return Object(kernel, r.pointee, address)


def per_cpu(kernel: Kernel, name: str, cpu: int) -> Object:
    """``per_cpu(var, cpu)``: CPU ``cpu``'s copy of the per-CPU variable ``name``."""
    t = percpu_variable_type(kernel, name)
    address = (kernel.symbol(name) + per_cpu_offset(kernel, cpu)) & 0xFFFFFFFFFFFFFFFF
    return Object(kernel, t, address)


def cpumask_bits(mask: Object, limit: int) -> Iterator[int]:
    """The CPUs set in ``mask`` (``struct cpumask`` or a pointer to one), below ``limit``."""
    if mask.type.resolved().kind is Kind.PTR:
        mask = mask.deref()
    bits = mask.bits
    word = bits.type.resolved().pointee.size * 8
    for i in range(min(len(bits), -(-limit // word))):
        value = bits[i].value()
        while value:
            low = value & -value
            cpu = i * word + low.bit_length() - 1
            if cpu >= limit:
                return
            yield cpu
            value ^= low


def _for_each(kernel: Kernel, mask: str) -> Iterator[int]:
    yield from cpumask_bits(kernel.variable(mask), nr_cpu_ids(kernel))


def for_each_possible_cpu(kernel: Kernel) -> Iterator[int]:
    """``for_each_possible_cpu()``: the CPUs in ``cpu_possible_mask``."""
    return _for_each(kernel, "__cpu_possible_mask")


def for_each_online_cpu(kernel: Kernel) -> Iterator[int]:
    """``for_each_online_cpu()``: the CPUs that were online at capture time."""
    return _for_each(kernel, "__cpu_online_mask")


def for_each_present_cpu(kernel: Kernel) -> Iterator[int]:
    """``for_each_present_cpu()``: the CPUs in ``cpu_present_mask``."""
    return _for_each(kernel, "__cpu_present_mask")
