"""collector.helpers.mm on real kernels, against the guest's /proc and QEMU's page walks.

The witness sleeps throughout the capture, so its maps read right before the capture are
what the image holds (the test checks they did not change by right after). The command line
of every process alive across the capture is compared byte for byte with /proc/PID/cmdline
read right before it; the witness's executable mapping with the file on the host (the guest
runs the host's own Python over 9p); struct pages and the direct map with QEMU's
``gva2gpa``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from collector.helpers.fs import d_path
from collector.helpers.maple_tree import mtree_load
from collector.helpers.mm import (
    access_process_vm,
    cmdline,
    environ,
    for_each_vma,
    page_to_pfn,
    page_to_virt,
    pfn_to_page,
    proc_cmdline,
    show_map_vma,
    virt_to_page,
    virt_to_phys,
)
from collector.helpers.sched import for_each_process, for_each_thread, is_kthread
from collector.kernel.kernel import Kernel
from collector.kernel.object import Object
from tests.vm.conftest import WITNESS, WITNESS_ARGS, Capture, iomem_entries
from tests.vm.helpers.conftest import unchanged
from tests.vm.test_analysis import (
    core_symbol,
    gva2gpa,
    qemu_pointer,
    qemu_vmcoreinfo,
    stopped_in_kernel,
)
from tools.vm.guest import guest_path_env

pytestmark = pytest.mark.vm

# -- VMAs -----------------------------------------------------------------------------------------


def parse_maps(lines: list[str]) -> list[dict]:
    out = []
    for line in lines:
        fields = line.split(None, 5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        out.append(
            {
                "start": start,
                "end": end,
                "perms": fields[1],
                "offset": int(fields[2], 16),
                "dev": (major, minor),
                "inode": int(fields[4]),
                "name": fields[5].strip() if len(fields) > 5 else None,
            }
        )
    return out


def test_for_each_vma_matches_proc_maps(
    capture: Capture, kernel: Kernel, witness_task: Object
) -> None:
    pid = str(capture.witness)
    before = capture.before["processes"][pid]["maps"]
    assert before == capture.after["processes"][pid]["maps"], "the witness's maps changed"
    want = parse_maps(before)
    entries = [show_map_vma(vma) for vma in for_each_vma(witness_task.mm)]
    got = [
        {
            "start": e.start,
            "end": e.end,
            "perms": e.perms,
            "offset": e.offset,
            "dev": (e.major, e.minor),
            "inode": e.inode,
            # a file's path as /proc printed it for the snapshot, which ran under the
            # witness's root (the host's root, chrooted): d_path up to that root
            "name": (
                d_path(e.file.f_path, root=witness_task.fs.root).decode()
                if e.file is not None
                else e.name
            ),
        }
        for e in entries
    ]
    assert len(entries) == len(want)
    assert got == want
    # mtree_load() finds each VMA by any address in it, and nothing in the gaps between
    mt = witness_task.mm.mm_mt.address_of()
    vmas = [vma.address for vma in for_each_vma(witness_task.mm)]
    gaps = 0
    for i, e in enumerate(entries):
        assert mtree_load(mt, e.start).value() == vmas[i]
        assert mtree_load(mt, e.end - 1).value() == vmas[i]
        if i + 1 < len(entries) and entries[i + 1].start > e.end:
            assert mtree_load(mt, e.end).value() == 0
            gaps += 1
    files = sum(e.file is not None for e in entries)
    named = sorted(e.name for e in entries if e.name)
    print(
        f"{kernel.release}: {len(entries)} VMAs of PID {pid} match /proc/{pid}/maps"
        f" ({files} file mappings; named: {', '.join(named)}); mtree_load found each, and"
        f" NULL in {gaps} gaps"
    )


# -- command lines, user memory, struct pages ------------------------------------------------------


def processes(kernel: Kernel) -> dict[int, Object]:
    """The image's processes (thread-group leaders) by PID."""
    return {task.pid.value(): task for task in for_each_process(kernel)}


PAGE = 4096


def arguments_moved(capture: Capture, pid: int) -> bool:
    """Whether the kernel moved a page of the process's arguments to another frame while the
    capture ran (compaction migrates movable pages under memory pressure, and collect is
    pressure): the image then holds its page tables and its pages from different moments."""
    before = capture.before["processes"][str(pid)]["arg_frames"]
    after = capture.after["processes"][str(pid)]["arg_frames"]
    return before != after or not before or 0 in before


def test_the_witness_command_line(capture: Capture, kernel: Kernel) -> None:
    if arguments_moved(capture, capture.witness):
        pytest.skip("the witness's argument page moved while the capture ran")
    task = processes(kernel)[capture.witness]
    argv = cmdline(task)
    assert argv[1:] == [b"-c", WITNESS.encode(), *(a.encode() for a in WITNESS_ARGS)]
    snapshot = capture.before["processes"][str(capture.witness)]
    assert proc_cmdline(task) == bytes.fromhex(snapshot["cmdline"])


def test_the_witness_threads_and_environment(capture: Capture, kernel: Kernel) -> None:
    task = processes(kernel)[capture.witness]
    snapshot = capture.before["processes"][str(capture.witness)]
    found = list(for_each_thread(task))
    assert sorted(int(t.pid) for t in found) == snapshot["threads"]
    # Every thread shares the process's memory, so each reads the same command line.
    moved = arguments_moved(capture, capture.witness)
    for thread in found:
        assert moved or proc_cmdline(thread) == bytes.fromhex(snapshot["cmdline"])
    # The guest's command runner exports these before it starts any command.
    env = environ(task)
    repo = str(capture.guest.repo).encode()
    for entry in (b"HOME=/tmp", b"LANG=C.UTF-8", b"PYTHONDONTWRITEBYTECODE=1"):
        assert entry in env
    assert b"PYTHONPATH=" + repo in env
    assert b"PATH=" + guest_path_env().encode() in env


def test_every_command_line_matches_proc(capture: Capture, kernel: Kernel) -> None:
    tasks = processes(kernel)
    want = unchanged(capture, "cmdline")
    compared = user = 0
    moved = []
    for pid, p in want.items():
        task = tasks.get(pid)
        assert task is not None, f"pid {pid} ({p['comm']}) lived across the capture"
        if not is_kthread(task) and arguments_moved(capture, pid):
            moved.append(pid)
            continue
        assert proc_cmdline(task) == bytes.fromhex(p["cmdline"]), (pid, p["comm"])
        compared += 1
        user += not is_kthread(task)
    print(
        f"command lines compared: {compared} processes, {user} of them user processes;"
        f" arguments moved during the capture: {moved}"
    )
    assert user + len(moved) >= 2  # at least the guest's init and the witness
    assert user >= 1


def test_the_witness_executable_mapping_holds_the_file(capture: Capture, kernel: Kernel) -> None:
    task = processes(kernel)[capture.witness]
    snapshot = capture.before["processes"][str(capture.witness)]
    exe = snapshot["exe"]
    # /proc/PID/maps: "start-end perms offset dev inode path"; the mapping at file offset 0.
    starts = [
        int(line.split("-")[0], 16)
        for line in snapshot["maps"]
        if line.split()[-1] == exe and int(line.split()[2], 16) == 0
    ]
    assert starts, snapshot["maps"]
    # The guest runs the host's root read-only over 9p: the same file is here.
    head = Path(exe).read_bytes()[:PAGE]
    assert access_process_vm(task, starts[0], PAGE) == head
    assert head[:4] == b"\x7fELF"
    stack = [line for line in snapshot["maps"] if line.endswith("[stack]")]
    start, end = (int(x, 16) for x in stack[0].split()[0].split("-"))
    mm = task.mm
    assert start <= int(mm.arg_start) < int(mm.arg_end) <= int(mm.env_end) <= end


def test_struct_pages_and_the_direct_map_agree_with_qemu(capture: Capture, kernel: Kernel) -> None:
    guest = capture.guest
    witness = processes(kernel)[capture.witness]
    oracle = qemu_vmcoreinfo(capture)
    size_of_page = int(oracle["SIZE(page)"])
    init_task = core_symbol(capture, "init_task")
    # A task_struct is slab memory in the direct map; init_task lives in the kernel image.
    addresses = {"init_task": init_task, "witness": witness.address, "pgd": witness.mm.pgd.value()}
    with stopped_in_kernel(guest) as qmp:
        vmemmap_base = qemu_pointer(guest, qmp, core_symbol(capture, "vmemmap_base"))
        physical = {name: gva2gpa(qmp, address) for name, address in addresses.items()}
        page_of_init = kernel.pfn_to_page(physical["init_task"] // PAGE)
        struct_page_paddr = gva2gpa(qmp, page_of_init)
    for name, address in addresses.items():
        assert virt_to_phys(kernel, address) == physical[name], name
        page = virt_to_page(kernel, address)
        assert str(page.type) == "struct page *"
        assert page.value() == vmemmap_base + physical[name] // PAGE * size_of_page, name
        assert page_to_pfn(page) == physical[name] // PAGE, name
    assert page_to_virt(virt_to_page(kernel, witness.address)) == witness.address & ~(PAGE - 1)
    assert kernel.translate(virt_to_page(kernel, init_task).value()).paddr == struct_page_paddr

    # Round trips over every System RAM range's first and last page; the flags read through
    # the typed pointer agree with the whole struct parsed from BTF.
    checked = 0
    for start, end in iomem_entries(capture.iomem, "System RAM"):
        for pfn in {(start + PAGE - 1) // PAGE, end // PAGE - 1}:
            page = pfn_to_page(kernel, pfn)
            assert page_to_pfn(page) == pfn
            assert page_to_pfn(page.deref()) == pfn
            parsed = kernel.read_struct("page", page.value())
            # v6.18 "mm: introduce memdesc_flags_t" wraps the flags in a struct.
            if page.deref().type.has_member("flags.f"):
                assert page.flags.f.value() == parsed.flags.f
            else:
                assert page.flags.value() == parsed.flags
            checked += 1
    print(f"struct pages round-tripped: {checked}")
    assert checked >= 2


def test_kernel_threads_have_no_command_line(capture: Capture, kernel: Kernel) -> None:
    threads = [t for t in processes(kernel).values() if is_kthread(t)]
    assert threads
    for task in threads:
        assert cmdline(task) == []
        assert re.fullmatch(rb"[\x20-\x7e]+", task.comm.string())
