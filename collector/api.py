"""Everything a plugin author needs, in one import.

::

    from collector.api import Analysis, Field, hookimpl, for_each_process

    PSNAMES = Analysis(
        name="psnames",
        summary="process IDs and names",
        fields=(Field("pid", "int", "process ID"), Field("comm", "str", "task name")),
        run=lambda kernel, options: (
            {"pid": t.pid.value(), "comm": t.comm.text()} for t in for_each_process(kernel)
        ),
    )

    @hookimpl
    def collector_analyses():
        return [PSNAMES]

See docs/plugins.md for the guide.
"""

from __future__ import annotations

from collector.errors import BrokenStructure, CollectorError, ImageError, NotApplicable
from collector.helpers.fs import (
    PathTooLong,
    d_path,
    d_unlinked,
    dentry_path,
    dentry_path_raw,
    seq_path,
)
from collector.helpers.idr import idr_find, idr_for_each
from collector.helpers.list import (
    hlist_empty,
    hlist_for_each,
    hlist_for_each_entry,
    list_count,
    list_empty,
    list_first_entry,
    list_for_each,
    list_for_each_entry,
    list_for_each_entry_reverse,
    list_for_each_reverse,
    list_is_singular,
    validate_list,
)
from collector.helpers.maple_tree import mt_for_each, mtree_load
from collector.helpers.mm import (
    UserPageNotCaptured,
    UserPageNotPresent,
    access_process_vm,
    cmdline,
    environ,
    for_each_vma,
    get_gate_vma,
    page_address,
    page_to_pfn,
    page_to_phys,
    page_to_virt,
    pfn_to_page,
    pfn_to_virt,
    phys_to_virt,
    proc_cmdline,
    proc_environ,
    show_map_vma,
    virt_to_page,
    virt_to_pfn,
    virt_to_phys,
    vmalloc_to_page,
)
from collector.helpers.module import (
    for_each_module,
    module_address,
    module_core_size,
    module_flags_taint,
    module_init_size,
    module_memory,
    module_name,
    module_refcount,
    module_size,
    module_state,
    module_users,
    module_uses,
    taint_flags,
)
from collector.helpers.percpu import (
    for_each_online_cpu,
    for_each_possible_cpu,
    for_each_present_cpu,
    nr_cpu_ids,
    per_cpu,
    per_cpu_offset,
    per_cpu_ptr,
)
from collector.helpers.pid import find_pid, find_pid_ns, for_each_pid, pid_task
from collector.helpers.rbtree import (
    rb_first,
    rb_last,
    rb_next,
    rb_parent,
    rb_prev,
    rbtree_inorder_for_each,
    rbtree_inorder_for_each_entry,
)
from collector.helpers.sched import (
    ProcessEntry,
    find_task,
    for_each_process,
    for_each_process_entry,
    for_each_task,
    for_each_thread,
    is_kthread,
    task_cred_ids,
    task_state,
)
from collector.helpers.slab import (
    cpu_freelists,
    find_slabs,
    freelist_ptr_decode,
    slab_freelist,
    slab_objects,
)
from collector.helpers.vmalloc import (
    for_each_vmap_area,
    for_each_vmap_area_reverse,
    vmap_area_lists,
)
from collector.helpers.xarray import (
    radix_tree_for_each,
    radix_tree_lookup,
    xa_for_each,
    xa_is_value,
    xa_load,
    xa_to_value,
)
from collector.hookspecs import Analysis, Field, Option, hookimpl
from collector.kernel.kernel import Kernel
from collector.kernel.object import Object, ObjectError, Type, container_of
from collector.kernel.plausible import Implausible, plausible_int, plausible_text
from collector.kernel.variables import tk_core_timekeeper_offset
from collector.memory import Fate, PageNotCaptured

__all__ = [
    "Analysis",
    "BrokenStructure",
    "CollectorError",
    "Fate",
    "Field",
    "ImageError",
    "Implausible",
    "Kernel",
    "NotApplicable",
    "Object",
    "ObjectError",
    "Option",
    "PageNotCaptured",
    "PathTooLong",
    "ProcessEntry",
    "Type",
    "UserPageNotCaptured",
    "UserPageNotPresent",
    "access_process_vm",
    "cmdline",
    "container_of",
    "cpu_freelists",
    "d_path",
    "d_unlinked",
    "dentry_path",
    "dentry_path_raw",
    "environ",
    "find_pid",
    "find_pid_ns",
    "find_slabs",
    "find_task",
    "for_each_module",
    "for_each_online_cpu",
    "for_each_pid",
    "for_each_possible_cpu",
    "for_each_present_cpu",
    "for_each_process",
    "for_each_process_entry",
    "for_each_task",
    "for_each_thread",
    "for_each_vma",
    "for_each_vmap_area",
    "for_each_vmap_area_reverse",
    "freelist_ptr_decode",
    "get_gate_vma",
    "hlist_empty",
    "hlist_for_each",
    "hlist_for_each_entry",
    "hookimpl",
    "idr_find",
    "idr_for_each",
    "is_kthread",
    "list_count",
    "list_empty",
    "list_first_entry",
    "list_for_each",
    "list_for_each_entry",
    "list_for_each_entry_reverse",
    "list_for_each_reverse",
    "list_is_singular",
    "module_address",
    "module_core_size",
    "module_flags_taint",
    "module_init_size",
    "module_memory",
    "module_name",
    "module_refcount",
    "module_size",
    "module_state",
    "module_users",
    "module_uses",
    "mt_for_each",
    "mtree_load",
    "nr_cpu_ids",
    "page_address",
    "page_to_pfn",
    "page_to_phys",
    "page_to_virt",
    "per_cpu",
    "per_cpu_offset",
    "per_cpu_ptr",
    "pfn_to_page",
    "pfn_to_virt",
    "phys_to_virt",
    "pid_task",
    "plausible_int",
    "plausible_text",
    "proc_cmdline",
    "proc_environ",
    "radix_tree_for_each",
    "radix_tree_lookup",
    "rb_first",
    "rb_last",
    "rb_next",
    "rb_parent",
    "rb_prev",
    "rbtree_inorder_for_each",
    "rbtree_inorder_for_each_entry",
    "seq_path",
    "show_map_vma",
    "slab_freelist",
    "slab_objects",
    "taint_flags",
    "task_cred_ids",
    "task_state",
    "tk_core_timekeeper_offset",
    "validate_list",
    "virt_to_page",
    "virt_to_pfn",
    "virt_to_phys",
    "vmalloc_to_page",
    "vmap_area_lists",
    "xa_for_each",
    "xa_is_value",
    "xa_load",
    "xa_to_value",
]
