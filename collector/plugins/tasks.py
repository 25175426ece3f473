"""Processes and threads: ``pslist``, ``pstree`` and ``psaux`` from ``struct task_struct``.

Covers include/linux/sched.h (``struct task_struct``, ``init_task.tasks``), sched/signal.h
(the thread list), fs/proc/array.c (what /proc/PID/stat and status show) and fs/proc/base.c
(/proc/PID/cmdline and exe). See docs/analyses/tasks.md.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from construct import ConstructError

from collector.api import (
    Analysis,
    CollectorError,
    Field,
    Implausible,
    Object,
    Option,
    UserPageNotCaptured,
    UserPageNotPresent,
    access_process_vm,
    d_path,
    for_each_thread,
    hookimpl,
    is_kthread,
    plausible_int,
    plausible_text,
    proc_cmdline,
    task_cred_ids,
    task_state,
)
from collector.helpers.sched import (
    PID_MAX_LIMIT,
    ProcessEntry,
    for_each_process_entry,
    torn_reason,
)
from collector.kernel.btf import Kind
from collector.plugins.sysinfo import getboottime64

if TYPE_CHECKING:
    from collector.api import Kernel

T = TypeVar("T")

#: ``TASK_COMM_LEN`` (include/linux/sched.h): comm's size, its NUL included.
TASK_COMM_LEN = 16
#: How many processes at the head of ``init_task.tasks`` are checked strictly: they are the
#: oldest (init, kthreadd and the first kernel threads) and never exit, so a value there that
#: no kernel holds means the image's types do not fit its memory.
STRICT_ENTRIES = 3
#: The most bytes of arguments read per process. execve() bounds them by a quarter of the stack
#: limit (8 MiB by default, so 2 MiB); a larger span in an image is cut here and said so.
MAX_CMDLINE = 2 * 1024 * 1024
PAGE_SIZE = 4096

#: The errors a single record's field can meet: a page the image lacks, an address no table
#: maps, a broken structure, bytes construct cannot parse.
_READ_ERRORS = (CollectorError, ConstructError)


# -- fields --------------------------------------------------------------------------------------

_PID = Field(
    "pid", "int", "process ID: the thread group's ID (task->tgid), as ps and /proc/PID show"
)
_PPID = Field(
    "ppid",
    "int",
    "parent's process ID: task->real_parent->tgid, as /proc/PID/stat shows it (0 for the"
    " children of the idle task: init and kthreadd)",
)
_COMM = Field("comm", "str", "task->comm: the name, at most 15 bytes (undecodable bytes as \\xNN)")
_ADDRESS = Field("address", "hex", "the struct task_struct's virtual address")
_NOTE = Field(
    "note",
    "str",
    "what is odd about this record and why: a process that exited while the capture ran, a"
    " torn record, a field that could not be read, where the task list broke",
)

PSLIST_FIELDS = (
    _PID,
    Field(
        "tid",
        "int",
        "with --threads: the thread's own ID (task->pid; ps -L's LWP, /proc/PID/task/TID);"
        " the leader's equals pid",
    ),
    Field("tgid", "int", "task->tgid as read: equal to pid in every consistent record"),
    _PPID,
    _COMM,
    Field("uid", "int", "real user ID (task->cred->uid)"),
    Field("gid", "int", "real group ID (task->cred->gid)"),
    Field("euid", "int", "effective user ID (task->cred->euid)"),
    Field(
        "state",
        "str",
        "the state letter /proc/PID/stat and ps show: R running, S sleeping, D disk sleep,"
        " T stopped, t tracing stop, X dead, Z zombie, P parked, I idle",
    ),
    Field("flags", "hex", "task->flags (PF_*: PF_KTHREAD 0x00200000, PF_EXITING 0x4...)"),
    Field(
        "start_time",
        "int",
        "nanoseconds from boot to the task's start, on CLOCK_BOOTTIME"
        " (task->start_boottime; real_start_time before 5.5): what /proc/PID/stat's starttime"
        " counts in clock ticks (starttime = start_time // 10,000,000 at USER_HZ 100)",
    ),
    Field(
        "started",
        "str",
        "UTC wall-clock start (ISO 8601, to the second): the boot time sysinfo derives"
        " (tk_core's offs_real - offs_boot) plus start_time, as ps computes STIME",
    ),
    Field("kthread", "bool", "a kernel thread (PF_KTHREAD)"),
    _ADDRESS,
    _NOTE,
)

PSTREE_FIELDS = (
    _PID,
    _PPID,
    Field("depth", "int", "how far below a root the process is: 0 for a root"),
    Field("tree", "str", "comm indented two spaces per level of depth, for reading"),
    _COMM,
    _ADDRESS,
    _NOTE,
)

PSAUX_FIELDS = (
    _PID,
    _PPID,
    Field("uid", "int", "real user ID (task->cred->uid)"),
    _COMM,
    Field(
        "cmdline",
        "str",
        "the arguments as ps shows them: /proc/PID/cmdline's NUL-separated strings joined by"
        " spaces; [comm] for a kernel thread or a process without memory; a page that cannot"
        " be read shows as [... N bytes at ADDRESS not captured|not in memory ...] (note says"
        " why)",
    ),
    Field(
        "exe",
        "str",
        "the executable (mm->exe_file) named from the process's own root, as /proc/PID/exe"
        " shows it to a reader in that root",
    ),
    Field(
        "root",
        "str",
        "the process's root directory (task->fs->root) named from the global root: '/'"
        " unless it runs in a chroot or a container",
    ),
    _ADDRESS,
    _NOTE,
)


def _pslist_fields(options: dict[str, Any]) -> list[str]:
    names = [f.name for f in PSLIST_FIELDS]
    if not options.get("threads"):
        names.remove("tid")
    return names


_PID_OPTION = Option("pid", int, None, "only the process with this process ID")

PSLIST = Analysis(
    name="pslist",
    summary="processes from init_task's list: IDs, parent, name, credentials, state, start",
    fields=PSLIST_FIELDS,
    options=(
        Option("threads", bool, False, "every thread of each process, each with its tid"),
        _PID_OPTION,
    ),
    run=lambda kernel, options: pslist(kernel, options.get("threads", False), options.get("pid")),
    fields_for=_pslist_fields,
)

PSTREE = Analysis(
    name="pstree",
    summary="processes as a tree: each under its parent, children in PID order",
    fields=PSTREE_FIELDS,
    run=lambda kernel, options: pstree(kernel),
)

PSAUX = Analysis(
    name="psaux",
    summary="each process's command line and executable, read from its own memory",
    fields=PSAUX_FIELDS,
    options=(_PID_OPTION,),
    run=lambda kernel, options: psaux(kernel, options.get("pid")),
)


@hookimpl
def collector_analyses() -> list[Analysis]:
    return [PSLIST, PSTREE, PSAUX]


# -- walking init_task.tasks ---------------------------------------------------------------------


def check_init_task(init_task: Object) -> None:
    """``init_task`` is the idle task: PID 0 in thread group 0, a printable name.

    :raises Implausible: it is not.
    """
    plausible_int(init_task.pid.value(), 0, 0, "init_task.pid")
    plausible_int(init_task.tgid.value(), 0, 0, "init_task.tgid")
    plausible_text(init_task.comm.value(), "init_task.comm")


def check_process(task: Object) -> None:
    """One of the first processes: a PID in range, its own thread group, a printable name.

    :raises Implausible: naming the task and the value.
    """
    what = f"process at {task.address:#x}"
    pid = plausible_int(task.pid.value(), 1, PID_MAX_LIMIT - 1, f"{what}: pid")
    tgid = task.tgid.value()
    if tgid != pid:
        raise Implausible(f"{what}: tgid", f"is {tgid}, not its pid {pid} (a thread-group leader)")
    plausible_text(task.comm.value(), f"{what} (pid {pid}): comm")


def processes(kernel: Kernel) -> Iterator[ProcessEntry]:
    """Every process on ``init_task.tasks`` with why it is torn, a list broken by a process
    that exited mid-capture bridged (:func:`~collector.helpers.sched.for_each_process_entry`),
    ``init_task`` and the first :data:`STRICT_ENTRIES` processes checked strictly.

    :raises Implausible: one of those holds values no kernel holds.
    """
    check_init_task(kernel.variable("init_task"))
    yield from for_each_process_entry(kernel, validate=check_process, validate_count=STRICT_ENTRIES)


# -- one record ----------------------------------------------------------------------------------


class Notes:
    """The notes of one record, and field reads that add to them instead of failing."""

    def __init__(self, *first: str | None) -> None:
        self.items = [n for n in first if n]

    def add(self, note: str) -> None:
        self.items.append(note)

    def attempt(self, what: str, get: Callable[[], T]) -> T | None:
        try:
            return get()
        except _READ_ERRORS as e:
            self.items.append(f"{what}: {e}")
            return None

    def text(self) -> str | None:
        return "; ".join(self.items) or None


def comm_of(task: Object, notes: Notes) -> str | None:
    """task->comm as text; a name that is not printable text is noted (a process can set any
    bytes with prctl(PR_SET_NAME)) and shown with \\xNN escapes."""
    raw = notes.attempt("comm", lambda: task.comm.value())
    if raw is None:
        return None
    raw = raw.split(b"\0", 1)[0]
    text = raw.decode("utf-8", "backslashreplace")
    if not text.isprintable():
        notes.add("comm is not printable text")
    return text


def start_member(task_type: Any) -> str | None:
    """The member holding the start time on CLOCK_BOOTTIME, in nanoseconds."""
    # v5.5 "time: Rename tsk->real_start_time to ->start_boottime" (cf25e24db61c); from 3.17
    # ("sched: Make task->real_start_time nanoseconds based") real_start_time was a u64 of ns.
    for name in ("start_boottime", "real_start_time"):
        if task_type.has_member(name):
            _bit, _width, member_type = task_type.resolved().member(name)
            if member_type.resolved().kind is Kind.INT:
                return name
    return None


def iso_utc(ns: int) -> str | None:
    """Nanoseconds since the epoch as ISO 8601 UTC, to the second; None when no date."""
    try:
        when = dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.UTC)
    except (OverflowError, ValueError, OSError):
        return None
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


class Context:
    """What every record of one run shares: the boot time, the start-time member."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        try:
            self.boot_ns: int | None = getboottime64(kernel)
        except _READ_ERRORS:
            self.boot_ns = None
        self.start = start_member(kernel.type("struct task_struct"))


def task_record(ctx: Context, task: Object, notes: Notes, torn: bool) -> dict[str, Any]:
    """The pslist record of one task (leader or thread). A torn task gives only what
    identifies it (its address, IDs and name): its pointers cannot be followed."""
    record: dict[str, Any] = {"address": task.address}
    record["pid"] = notes.attempt("tgid", lambda: task.tgid.value())
    record["tgid"] = record["pid"]
    record["comm"] = comm_of(task, notes)
    if torn:
        record["tid"] = notes.attempt("pid", lambda: task.pid.value())
        return record
    record["tid"] = task.pid.value()
    record["ppid"] = notes.attempt("ppid", lambda: task.real_parent.tgid.value())
    ids = notes.attempt("cred", lambda: task_cred_ids(task))
    if ids is not None:
        record.update(uid=ids["uid"], gid=ids["gid"], euid=ids["euid"])
    state = notes.attempt("state", lambda: task_state(task))
    record["state"] = state[0] if state else None
    flags = notes.attempt("flags", lambda: task.flags.value())
    record["flags"] = flags
    record["kthread"] = None if flags is None else notes.attempt("flags", lambda: is_kthread(task))
    if ctx.start is not None:
        start = notes.attempt("start time", lambda: task.member(ctx.start).value())
        record["start_time"] = start
        if start is not None and ctx.boot_ns is not None:
            record["started"] = iso_utc(ctx.boot_ns + start)
    return record


def _selected(entry: ProcessEntry, pid: int | None) -> bool:
    if pid is None:
        return True
    try:
        return entry.task.tgid.value() == pid
    except _READ_ERRORS:
        return False


# -- pslist --------------------------------------------------------------------------------------


def pslist(kernel: Kernel, threads: bool = False, pid: int | None = None) -> Iterator[dict]:
    """Every process on ``init_task.tasks`` (with ``threads``, every thread too)."""
    ctx = Context(kernel)
    for entry in processes(kernel):
        if not _selected(entry, pid):
            continue
        yield from _process_records(ctx, entry, threads)


def _process_records(ctx: Context, entry: ProcessEntry, threads: bool) -> Iterator[dict]:
    task = entry.task
    notes = Notes(entry.torn, entry.note)
    torn = entry.torn is not None
    others: list[Object] = []
    if threads and not torn:
        try:
            others = [t for t in for_each_thread(task) if t.address != task.address]
        except _READ_ERRORS as e:
            notes.add(f"threads: {e}")
    record = task_record(ctx, task, notes, torn)
    record["note"] = notes.text()
    if not threads:
        del record["tid"]
    yield record
    for thread in others:
        thread_notes = Notes()
        reason = torn_reason(thread, leader=record["pid"])
        if reason is not None:
            thread_notes.add(reason)
        r = task_record(ctx, thread, thread_notes, reason is not None)
        r["pid"] = record["pid"]  # the process's ID, whatever a torn thread says
        r["note"] = thread_notes.text()
        yield r


# -- pstree --------------------------------------------------------------------------------------


def pstree(kernel: Kernel) -> Iterator[dict]:
    """The processes as a tree, depth first, children in PID order.

    Processes are linked by ``ppid`` to the process with that PID. Roots are the children of
    the idle task (ppid 0: init and kthreadd). A process whose parent is not on the list, a
    torn or unlinked record (never anyone's parent) and a process in a loop of parents is
    shown at depth 0 with a note, so no process is lost and the walk always ends.
    """
    nodes: list[dict[str, Any]] = []
    by_pid: dict[int, dict[str, Any]] = {}
    for entry in processes(kernel):
        task = entry.task
        notes = Notes(entry.torn, entry.note)
        node: dict[str, Any] = {"address": task.address, "children": []}
        node["comm"] = comm_of(task, notes)
        node["pid"] = notes.attempt("pid", lambda t=task: t.tgid.value())
        node["ppid"] = None
        node["placed"] = entry.torn is None
        if node["placed"]:
            node["ppid"] = notes.attempt("ppid", lambda t=task: t.real_parent.tgid.value())
            if node["ppid"] is None:
                node["placed"] = False
            elif node["pid"] in by_pid:
                notes.add(f"a second process with pid {node['pid']} on the list")
                node["placed"] = False
            else:
                by_pid[node["pid"]] = node
        node["notes"] = notes
        nodes.append(node)

    roots: list[dict[str, Any]] = []
    for node in nodes:
        if not node["placed"]:
            continue
        parent = by_pid.get(node["ppid"])
        if node["ppid"] == 0:
            roots.append(node)
        elif parent is None:
            node["notes"].add(f"its parent (pid {node['ppid']}) is not on the task list")
            roots.append(node)
        else:
            parent["children"].append(node)
    visited: set[int] = set()

    def key(n: dict[str, Any]) -> tuple[int, int]:
        return (n["pid"] if n["pid"] is not None else -1, n["address"])

    def walk(root: dict[str, Any]) -> Iterator[dict]:
        stack = [(root, 0)]
        while stack:
            node, depth = stack.pop()
            if id(node) in visited:
                continue
            visited.add(id(node))
            yield _tree_record(node, depth)
            for child in sorted(node["children"], key=key, reverse=True):
                stack.append((child, depth + 1))

    for root in sorted((n for n in roots if n["ppid"] == 0), key=key):
        yield from walk(root)
    for root in sorted((n for n in roots if n["ppid"] != 0), key=key):
        yield from walk(root)
    # Whatever is left hangs under a loop of parents (pid A's parent B, B's parent A): a torn
    # view. Each is shown at depth 0 with its subtree.
    for node in sorted((n for n in nodes if n["placed"] and id(n) not in visited), key=key):
        node["notes"].add(f"its parents form a loop (parent pid {node['ppid']})")
        yield from walk(node)
    for node in nodes:
        if not node["placed"]:
            yield _tree_record(node, 0)


def _tree_record(node: dict[str, Any], depth: int) -> dict[str, Any]:
    comm = node["comm"] or ""
    return {
        "pid": node["pid"],
        "ppid": node["ppid"],
        "depth": depth,
        "tree": "  " * depth + comm,
        "comm": node["comm"],
        "address": node["address"],
        "note": node["notes"].text(),
    }


# -- psaux ---------------------------------------------------------------------------------------


def psaux(kernel: Kernel, pid: int | None = None) -> Iterator[dict]:
    """Each process's command line and executable."""
    for entry in processes(kernel):
        if not _selected(entry, pid):
            continue
        yield psaux_record(entry)


def psaux_record(entry: ProcessEntry) -> dict[str, Any]:
    task = entry.task
    notes = Notes(entry.torn, entry.note)
    record: dict[str, Any] = {"address": task.address}
    record["pid"] = notes.attempt("pid", lambda: task.tgid.value())
    record["comm"] = comm_of(task, notes)
    if entry.torn is not None:
        record["note"] = notes.text()
        return record
    record["ppid"] = notes.attempt("ppid", lambda: task.real_parent.tgid.value())
    ids = notes.attempt("cred", lambda: task_cred_ids(task))
    record["uid"] = None if ids is None else ids["uid"]
    kthread = notes.attempt("flags", lambda: is_kthread(task))
    mm = notes.attempt("mm", lambda: 0 if kthread else task.mm.value())
    if kthread or not mm:
        # ps shows a process without user memory (a kernel thread, a zombie) by its name.
        record["cmdline"] = f"[{record['comm']}]"
    else:
        record["cmdline"] = command_line(task, notes)
        exe_file = notes.attempt("exe", lambda: task.mm.exe_file)
        if exe_file is not None and not exe_file.is_null():
            record["exe"] = notes.attempt("exe", lambda: _path_text(exe_file, task))
    if not kthread:
        fs = notes.attempt("root", lambda: task.fs)
        if fs is not None and not fs.is_null():
            root = notes.attempt("root", lambda: d_path(fs.root))
            record["root"] = None if root is None else root.decode("utf-8", "backslashreplace")
    record["note"] = notes.text()
    return record


def _path_text(exe_file: Object, task: Object) -> str:
    fs = task.fs
    root = None if fs.is_null() else fs.root
    return d_path(exe_file.f_path, root=root).decode("utf-8", "backslashreplace")


def ps_args(data: bytes) -> str:
    """/proc/PID/cmdline bytes as ps shows them: the strings joined by spaces (the final NUL
    ends the last one), undecodable bytes as \\xNN."""
    if data.endswith(b"\0"):
        data = data[:-1]
    return data.replace(b"\0", b" ").decode("utf-8", "backslashreplace")


def command_line(task: Object, notes: Notes) -> str | None:
    """The command line of a process with user memory: exactly /proc/PID/cmdline's bytes
    when every page is there; else page by page, each page that cannot be read shown as a
    marker and said in the notes."""
    mm = task.mm
    span = notes.attempt("cmdline", lambda: (int(mm.arg_start), int(mm.arg_end)))
    if span is None:
        return None
    start, end = span
    if 0 <= end - start <= MAX_CMDLINE:
        try:
            return ps_args(proc_cmdline(task))
        except (UserPageNotPresent, UserPageNotCaptured):
            pass  # read what there is, page by page, below
        except _READ_ERRORS as e:
            notes.add(f"cmdline: {e}")
            return None
    if end <= start:
        return ""
    if end - start > MAX_CMDLINE:
        notes.add(f"cmdline: {end - start} bytes of arguments, cut at {MAX_CMDLINE}")
        end = start + MAX_CMDLINE
    parts: list[str] = []
    data = bytearray()
    address = start
    while address < end:
        size = min(end - address, PAGE_SIZE - address % PAGE_SIZE)
        try:
            data += access_process_vm(task, address, size)
        except (UserPageNotPresent, UserPageNotCaptured) as e:
            parts.append(ps_args(bytes(data) + b"\0") if data else "")
            data.clear()
            why = "not in memory" if isinstance(e, UserPageNotPresent) else "not captured"
            parts.append(f"[... {size} bytes at {address:#x} {why} ...]")
            notes.add(f"cmdline: {e}")
        except _READ_ERRORS as e:
            notes.add(f"cmdline: {e}")
            return None
        address += size
    if data:
        parts.append(ps_args(bytes(data)))
    return "".join(parts)
