"""SLUB slab caches and the objects in their slabs (mm/slub.c, mm/slab.h,
include/linux/slub_def.h).

A slab is one page, or one compound page, of a ``struct kmem_cache``: ``slab->objects``
slots of ``s->size`` bytes from the page's start, each object ``s->red_left_pad`` bytes into
its slot (``fixup_red_left()``; the pad is 0 unless the cache has ``SLAB_RED_ZONE``). A free
object holds the next free object's address at ``s->offset``, encoded with
``CONFIG_SLAB_FREELIST_HARDENED`` (``freelist_ptr_decode()``). Free objects hang off
``slab->freelist``, and off each CPU's ``kmem_cache_cpu.freelist`` for the slab that CPU
allocates from (``c->slab``).

The slabs of a cache are found in the struct page array by the page classifier of
:mod:`collector.kernel.pages` (``slab->slab_cache``), so every walk here is bounded by the
pages a slab really spans.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np

from collector.errors import BrokenStructure, ImageError, NotApplicable
from collector.helpers.mm import PAGE_SIZE, pfn_to_page, pfn_to_virt
from collector.helpers.percpu import for_each_possible_cpu, per_cpu_ptr
from collector.kernel.object import Object, Value
from collector.memory import PageNotCaptured

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel
    from collector.kernel.pages import PageWalker

#: The longest cache name read (``kmem_cache->name``).
MAX_CACHE_NAME = 64
#: More distinct ``slab_cache`` pointers than any kernel has caches: an image past this is
#: not believed (a real one has a few hundred).
MAX_CACHES = 1 << 16
#: A slab slot larger than this is not believed (KMALLOC_MAX_CACHE_SIZE is two pages; the
#: largest named caches are a few pages).
MAX_OBJECT_SIZE = 1 << 20
#: ``MAX_OBJS_PER_PAGE`` (mm/slub.c): ``slab->objects`` is a 15-bit field.
MAX_OBJS_PER_SLAB = 32767


def slab_type(kernel: Kernel) -> str:
    """``struct slab`` (5.17 on, "mm: Split slab into its own type", d122019bf061), else
    ``struct page``, whose members the slab allocator used before."""
    try:
        kernel.type("struct slab")
    except ImageError:
        return "struct page"
    return "struct slab"


def slab_cache_name(cache: Object) -> str:
    """``kmem_cache->name`` of a ``struct kmem_cache *``."""
    return cache.name.text(MAX_CACHE_NAME)


def is_slub(kernel: Kernel) -> bool:
    """Whether the kernel's slab allocator is SLUB (``kmem_cache->cpu_slab``); SLAB, which
    6.8 removed, lays its slabs out otherwise and is not read here."""
    return kernel.type("struct kmem_cache").has_member("cpu_slab")


def find_slabs(
    kernel: Kernel, name: str, walker: PageWalker | None = None
) -> Iterator[tuple[Object, Object, int]]:
    """Every slab of the caches called ``name``, found in the struct page array.

    :param name: ``kmem_cache->name`` (``"task_struct"``); unmerged caches keep their name.
    :param walker: a page walker to reuse (one is made if None).
    :returns: ``(struct kmem_cache *, struct slab *, order)`` for each slab, in PFN order.
    :raises NotApplicable: the classifier cannot name slab caches (no BTF).
    :raises BrokenStructure: more distinct caches than :data:`MAX_CACHES`.
    """
    from collector.kernel.pages import CODE, PageWalker

    if walker is None:
        walker = PageWalker(kernel, with_pcp=False)
    if walker.format.slab_by == "" or "slab_cache" not in walker.format.dtype.names:
        raise NotApplicable("slab pages cannot be attributed to their caches without BTF")
    cache_ptr = kernel.type("struct kmem_cache *")
    slab_ptr = kernel.type(f"{slab_type(kernel)} *")
    names: dict[int, bool] = {}
    slab_code = CODE["slab"]
    for batch in walker.batches():
        heads = np.nonzero((batch.classes == slab_code) & (batch.head < 0))[0]
        if not len(heads):
            continue
        caches = batch.pages["slab_cache"][heads].tolist()
        orders = batch.order[heads].tolist()
        for i, cache, order in zip(heads.tolist(), caches, orders, strict=True):
            wanted = names.get(cache)
            if wanted is None:
                if len(names) >= MAX_CACHES:
                    raise BrokenStructure(
                        f"slab pages name more than {MAX_CACHES} distinct kmem_caches"
                    )
                try:
                    wanted = slab_cache_name(Value(kernel, cache_ptr, cache)) == name
                except (ImageError, PageNotCaptured, UnicodeDecodeError):
                    wanted = False
                names[cache] = wanted
            if wanted:
                page = pfn_to_page(kernel, batch.start + i)
                yield (
                    Value(kernel, cache_ptr, cache),
                    Value(kernel, slab_ptr, page.value()),
                    max(order, 0),
                )


def slab_address(slab: Object) -> int:
    """``slab_address()``: the direct-map address of the slab's first page."""
    from collector.helpers.mm import page_to_pfn

    return pfn_to_virt(slab.kernel, page_to_pfn(slab))


def slab_objects(cache: Object, slab: Object, order: int) -> list[int]:
    """``for_each_object()``: the address of every object slot of a slab, free or not.

    :param cache: ``struct kmem_cache *``
    :param slab: ``struct slab *`` (``struct page *`` before 5.17)
    :param order: the slab's order, as the page classifier found it: no slot beyond its
        ``PAGE_SIZE << order`` bytes is given, whatever ``slab->objects`` says.
    :raises BrokenStructure: the cache's object size is not believable.
    """
    size = cache.size.value()
    if not 8 <= size <= MAX_OBJECT_SIZE:
        raise BrokenStructure(f"kmem_cache at {cache.value():#x}: size {size}")
    pad = _red_left_pad(cache)
    room = PAGE_SIZE << order
    fit = (room - pad) // size
    objects = slab.objects.value() if slab.type.resolved().pointee.has_member("objects") else fit
    base = slab_address(slab)
    return [base + pad + i * size for i in range(min(objects, fit, MAX_OBJS_PER_SLAB))]


def _red_left_pad(cache: Object) -> int:
    # red_left_pad came with 4.6 ("mm, slub: add red_left_pad"); it is 0 without
    # SLAB_RED_ZONE (slub_debug=Z), so fixup_red_left() adding it always is exact.
    if cache.type.resolved().pointee.has_member("red_left_pad"):
        pad = cache.red_left_pad.value()
        if not 0 <= pad <= cache.size.value():
            raise BrokenStructure(f"kmem_cache at {cache.value():#x}: red_left_pad {pad}")
        return pad
    return 0


def _swab64(value: int) -> int:
    return int.from_bytes(value.to_bytes(8, "little"), "big")


def freelist_ptr_decode(cache: Object, stored: int, ptr_addr: int) -> int:
    """``freelist_ptr_decode()``: the free pointer kept at ``ptr_addr`` (``object +
    s->offset``) as an address.

    With ``CONFIG_SLAB_FREELIST_HARDENED`` (BTF then has ``kmem_cache.random``) the value is
    ``ptr ^ s->random ^ swab(ptr_addr)`` (5.7 on, "slub: improve bit diffusion for freelist
    ptr obfuscation", 1ad53d9fa3f6); without it, the address itself.
    """
    if not cache.type.resolved().pointee.has_member("random"):
        return stored
    return stored ^ cache.random.value() ^ _swab64(ptr_addr & 0xFFFFFFFFFFFFFFFF)


def slab_freelist(cache: Object, slab: Object, first: int, objects: list[int]) -> list[int]:
    """The free objects on a freelist that starts at ``first`` and lies in ``slab``.

    :param first: the first free object (``slab->freelist`` or a CPU's ``c->freelist``).
    :param objects: the slab's object addresses (:func:`slab_objects`): a link to anything
        else ends the walk with an error, as does a link reached twice.
    :raises BrokenStructure: a link outside the slab's objects, or a loop.
    """
    kernel = cache.kernel
    offset = cache.offset.value()
    size = cache.size.value()
    if not 0 <= offset <= size - 8:
        raise BrokenStructure(f"kmem_cache at {cache.value():#x}: free pointer offset {offset}")
    valid = set(objects)
    out: list[int] = []
    seen: set[int] = set()
    where = f"freelist of slab {slab.value():#x}"
    node = first
    while node:
        if node not in valid:
            raise BrokenStructure(f"{where}: {node:#x} is not one of its objects")
        if node in seen:
            raise BrokenStructure(f"{where}: {node:#x} is reached twice")
        seen.add(node)
        out.append(node)
        node = freelist_ptr_decode(cache, kernel.read_u64(node + offset), node + offset)
    return out


def cpu_freelists(cache: Object) -> Iterator[tuple[int, Object, int]]:
    """Each CPU's lockless freelist: ``(cpu, c->slab, c->freelist)`` for every possible CPU
    whose ``kmem_cache_cpu`` has a slab (``struct slab *``; ``c->page`` before 5.17)."""
    kernel = cache.kernel
    for cpu in for_each_possible_cpu(kernel):
        c = per_cpu_ptr(cache.cpu_slab, cpu)
        slab = c.slab if c.type.has_member("slab") else c.page
        if slab.is_null():
            continue
        yield cpu, slab, c.freelist.value()
