"""Process memory maps as /proc/PID/maps shows them: every ``struct vm_area_struct`` of each
user process (include/linux/mm_types.h), named as fs/proc/task_mmu.c's ``show_map_vma()``
names it, processes listed as fs/proc/base.c's ``proc_pid_readdir()`` lists them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from collector.api import (
    Analysis,
    BrokenStructure,
    Field,
    ImageError,
    Implausible,
    NotApplicable,
    Object,
    ObjectError,
    Option,
    PageNotCaptured,
    find_task,
    for_each_pid,
    for_each_process,
    for_each_vma,
    hookimpl,
    is_kthread,
    pid_task,
)
from collector.errors import UsageError
from collector.helpers.fs import seq_path
from collector.helpers.mm import PAGE_SIZE, get_gate_vma, show_map_vma, task_size_max

if TYPE_CHECKING:
    from collector.api import Kernel

FIELDS = (
    Field("pid", "int", "the process ID (its thread group ID, the PID /proc lists)"),
    Field("comm", "str", "the process's name: task->comm"),
    Field("vma", "hex", "address of the struct vm_area_struct; null on a marker record"),
    Field("start", "hex", "vma->vm_start: the first address of the mapping"),
    Field("end", "hex", "vma->vm_end: the address after its last byte"),
    Field(
        "perms",
        "str",
        "r, w, x (VM_READ, VM_WRITE, VM_EXEC) or -, then s (VM_MAYSHARE) or p, as in /proc",
    ),
    Field("offset", "hex", "vma->vm_pgoff << PAGE_SHIFT for a file mapping, else 0"),
    Field("dev", "str", "major:minor (hex) of the file's file system, 00:00 without a file"),
    Field("inode", "int", "the file's inode number, 0 without a file"),
    Field(
        "path",
        "str",
        "the file (d_path of vma->vm_file from the process's root, newlines as \\012), or the"
        " name /proc gives: [heap], [stack], [vdso], [vvar], [vsyscall], [anon:NAME],"
        " [anon_shmem:NAME]; empty for other anonymous memory",
    ),
    Field("flags", "hex", "vma->vm_flags, every bit (include/linux/mm.h VM_*)"),
    Field("line", "str", "the exact /proc/PID/maps line, padding included"),
    Field(
        "error",
        "str",
        "null on a mapping; on a marker record, why the process's map stops there (its"
        " VMA tree was broken or torn by a change during the capture, or it has no map)",
    ),
)

MAPS = Analysis(
    name="maps",
    summary="memory maps of processes, like /proc/PID/maps: one record per VMA",
    fields=FIELDS,
    options=(
        Option(
            "pid",
            str,
            None,
            "only these processes: a PID or a comma-separated list (1,129); a thread ID"
            " gives its process's map, as /proc/TID/maps does",
        ),
    ),
    run=lambda kernel, options: maps(kernel, pids=parse_pids(options.get("pid"))),
)


@hookimpl
def collector_analyses() -> list[Analysis]:
    return [MAPS]


def parse_pids(text: str | None) -> list[int] | None:
    """The PIDs of ``--pid`` (``"1,129"``), in the order given, each once; None for all.

    :raises UsageError: not a list of PIDs.
    """
    if text is None:
        return None
    pids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or not 0 < int(part) < 1 << 22:
            raise UsageError(f"maps: --pid takes PIDs separated by commas, not {text!r}")
        if int(part) not in pids:
            pids.append(int(part))
    return pids


def maps(kernel: Kernel, pids: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """One record per VMA of each selected process, by PID and then by address.

    The first process whose map reads whole is the plausibility check: an absurd VMA there
    stops the run with :class:`Implausible`. With one process asked for, a broken map ends
    the run with its error line; with several, it ends that process's records with a marker
    record and the next process follows.
    """
    several = pids is None or len(pids) > 1
    strict = True
    for nr, task, why in _processes(kernel, pids):
        if task is None:
            if why is not None:
                yield _marker(nr, None, why)
            continue
        comm = _comm(task)
        try:
            mm = _user_mm(task)
            if mm is None:
                if pids is not None:
                    yield _marker(nr, comm, _no_map(task))
                continue
            yield from _process_maps(kernel, task, mm, nr, comm, strict)
            strict = False
        except (Implausible, ObjectError):
            raise  # the types do not fit the image: no other process would read better
        except (ImageError, PageNotCaptured) as exc:
            if not several:
                raise
            yield _marker(nr, comm, _one_line(exc))


def _processes(
    kernel: Kernel, pids: list[int] | None
) -> Iterator[tuple[int, Object | None, str | None]]:
    """``(pid, task, why)``: the processes to read, or a reason there is none for a PID."""
    if pids is not None:
        for nr in pids:
            try:
                task = find_task(kernel, nr)
            except (BrokenStructure, PageNotCaptured) as exc:
                if len(pids) == 1:
                    raise
                yield nr, None, f"pid {nr} could not be looked up: {_one_line(exc)}"
                continue
            if task is None:
                yield nr, None, f"no process with PID {nr} in the image"
            else:
                yield nr, task, None
        return
    # proc_pid_readdir() lists PIDs in order from the PID IDR (next_tgid(): find_ge_pid()
    # and pid_task(pid, PIDTYPE_TGID)), not from the task list: a process exiting during a
    # capture tears init_task.tasks, while its IDR slot stays or goes as one.
    try:
        pid_type = _tgid_type(kernel)
        numbered = for_each_pid(kernel)
        first = next(numbered, None)
    except NotApplicable:  # before 4.15 PIDs are hashed, not in an IDR
        for task in for_each_process(kernel):
            yield int(task.pid), task, None
        return
    if first is None:
        return
    for nr, pid in _chain(first, numbered):
        task = pid_task(pid, pid_type)
        if task.is_null():
            continue  # a thread's PID, or one no task uses any more
        task = task.deref()
        if pid_type == "PIDTYPE_PID" and int(task.tgid) != nr:
            continue  # before 4.19 every thread's PID leads to the thread itself
        found = int(task.pid)
        if found != nr:
            yield (
                nr,
                None,
                (
                    f"pid {nr}: its struct pid leads to task {task.address:#x} numbered {found}:"
                    " freed and reused during the capture"
                ),
            )
            continue
        yield nr, task, None


def _chain(first: tuple[int, Object], rest: Iterator[tuple[int, Object]]) -> Iterator:
    yield first
    yield from rest


def _tgid_type(kernel: Kernel) -> str:
    # 4.19 ("pids: Move the pgrp and session pid pointers from task_struct to
    # signal_struct") added PIDTYPE_TGID, which only a thread group's leader is listed under.
    names = {name for name, _ in kernel.type("enum pid_type").enumerators()}
    return "PIDTYPE_TGID" if "PIDTYPE_TGID" in names else "PIDTYPE_PID"


def _comm(task: Object) -> str | None:
    try:
        return task.comm.text(16)
    except (ImageError, PageNotCaptured):
        return None


def _user_mm(task: Object) -> Object | None:
    """``task->mm`` of a user process, None for a kernel thread or an exited process."""
    if is_kthread(task):
        return None
    mm = task.mm
    return None if mm.is_null() else mm.deref()


def _no_map(task: Object) -> str:
    if is_kthread(task):
        return f"pid {int(task.pid)} is a kernel thread: it has no memory map"
    return f"pid {int(task.pid)} has no mm: it exited (a zombie) and has no memory map"


def _process_maps(
    kernel: Kernel, task: Object, mm: Object, nr: int, comm: str | None, strict: bool
) -> Iterator[dict[str, Any]]:
    """The records of one process: its VMAs, then the vsyscall page where /proc shows it."""
    limit = task_size_max(kernel)
    root = _fs_root(task)
    previous_end = 0
    for vma in for_each_vma(mm):
        start, end = int(vma.vm_start), int(vma.vm_end)
        problem = _absurd(start, end, previous_end, limit)
        if problem:
            what = f"pid {nr} ({comm}) VMA {vma.address:#x}"
            if strict:
                raise Implausible(
                    what,
                    f"spans {start:#x}-{end:#x}, {problem} (checked: start < end, both"
                    f" multiples of {PAGE_SIZE}, in order, end within user space up to"
                    f" {limit:#x})",
                )
            raise BrokenStructure(f"{what} spans {start:#x}-{end:#x}, {problem}: torn")
        previous_end = end
        yield _record(vma, nr, comm, root)
    gate = get_gate_vma(mm)
    if gate is not None:
        yield _record(gate, nr, comm, root)


def _absurd(start: int, end: int, previous_end: int, limit: int) -> str:
    if start >= end:
        return "start >= end"
    if start % PAGE_SIZE or end % PAGE_SIZE:
        return f"not aligned to {PAGE_SIZE}"
    if end > limit:
        return f"above the end of user space {limit:#x}"
    if start < previous_end:
        return f"overlapping the VMA before it (ending {previous_end:#x})"
    return ""


def _fs_root(task: Object) -> Object | None:
    """``task->fs->root``: paths are named as the process itself sees them (as a reader
    sharing its root sees them in /proc/PID/maps); None (the root of the mount tree) when
    the process has left its fs_struct behind."""
    fs = task.fs
    return None if fs.is_null() else fs.root


def _record(vma: Object, nr: int, comm: str | None, root: Object | None) -> dict[str, Any]:
    record: dict[str, Any] = {"pid": nr, "comm": comm, "vma": vma.address}
    try:
        entry = show_map_vma(vma)
    except NotApplicable as exc:
        # A vm_ops->name method this reader cannot run: the mapping, without its name.
        return record | _bounds(vma) | {"error": str(exc)}
    path = entry.name
    error = None
    if entry.needs_path:
        assert entry.file is not None
        try:
            raw = seq_path(entry.file.f_path, b"\n", root=root)
            path = raw.decode("utf-8", "backslashreplace")
        except NotApplicable as exc:  # a d_dname method not rendered offline
            error = str(exc)
    record.update(
        start=entry.start,
        end=entry.end,
        perms=entry.perms,
        offset=entry.offset,
        dev=f"{entry.major:02x}:{entry.minor:02x}",
        inode=entry.inode,
        path="" if path is None and error is None else path,
        flags=entry.flags,
        line=None if error else entry.line(path),
        error=error,
    )
    return record


def _bounds(vma: Object) -> dict[str, Any]:
    return {"start": int(vma.vm_start), "end": int(vma.vm_end), "flags": int(vma.vm_flags)}


def _marker(nr: int, comm: str | None, why: str) -> dict[str, Any]:
    """The record that stands for a process whose map could not be read (or ends early)."""
    return {"pid": nr, "comm": comm, "error": why}


def _one_line(exc: BaseException) -> str:
    return "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
