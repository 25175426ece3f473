"""The crash utility (Debian bookworm's crash 8.0.2) on the ELF export of a real capture, with
the kernel's DWARF vmlinux from Debian's -dbg package of the very build the guest booted.

What crash prints is compared with what the guest said of itself around the capture: uname,
/proc/version, /proc/modules, /proc/zoneinfo, /proc/cpuinfo, the processes in /proc and the
records of /dev/kmsg (tests/vm/snapshot.py). A makedumpfile-compressed dump of the export
must give crash the same answers. Only the 6.1 guest is opened: crash 8.0.2 predates the
structure layouts of 6.12 (docs/interop/crash.md says what it still reads there).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from collector.errors import CollectorError
from tests.vm.conftest import KMSG_MARKER, Capture, vm_unavailable
from tools.vm.kernels import fetch_debug_vmlinux

#: crash 8.0.2 cannot open Debian's 6.12 (docs/interop/crash.md): the 6.1 guest only. The
#: parameter equals the session fixture's own for 6.1, so pytest hands over the same booted
#: guest and capture as to every other vm test, and boots nothing more.
pytestmark = [
    pytest.mark.vm,
    pytest.mark.parametrize("guest", ["6.1"], indirect=True, ids=["linux-6.1"]),
]

CRASH_TIMEOUT = 600
PAGE = 4096
#: include/linux/sched.h: PF_WQ_WORKER.
PF_WQ_WORKER = 0x20
#: TASK_COMM_LEN - 1: the characters task_struct.comm holds.
COMM_CHARS = 15
#: Printed before each command's output, to split crash's output per command.
MARK = "==== crash-test "


def collect(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args], capture_output=True, text=True, timeout=600
    )


def run_crash(vmlinux: Path, dump: Path, commands: dict[str, str]) -> dict[str, str]:
    """One non-interactive crash session running ``commands``; each one's output by name.

    crash hands ``gdb echo`` to its embedded gdb, which prints the marker line as it is.
    """
    tool = shutil.which("crash")
    assert tool, "crash is not installed (.ci/install-debian-packages installs it)"
    script = dump.with_name(dump.name + ".crash")
    script.write_text(
        "".join(f"gdb echo {MARK}{name}\\n\n{command}\n" for name, command in commands.items())
        + "quit\n"
    )
    run = subprocess.run(
        [tool, "-s", str(vmlinux), str(dump), "-i", str(script)],
        capture_output=True,
        timeout=CRASH_TIMEOUT,
        stdin=subprocess.DEVNULL,
    )
    out = run.stdout.decode("utf-8", "replace")
    assert run.returncode == 0, out + run.stderr.decode("utf-8", "replace")
    sections = dict.fromkeys(commands, "")
    name = None
    for line in out.splitlines(keepends=True):
        if line.startswith(MARK):
            name = line[len(MARK) :].strip()
        elif name is not None:
            sections[name] += line
    assert all(sections[n] for n in commands), out
    return sections


@pytest.fixture(scope="session")
def vmlinux(capture: Capture) -> Path:
    """The DWARF vmlinux of the guest's kernel, from Debian's -dbg package (cached)."""
    assert capture.guest.kernel is not None
    try:
        return fetch_debug_vmlinux(capture.guest.kernel)
    except CollectorError as exc:
        vm_unavailable(f"no DWARF vmlinux for {capture.guest.kernel.package}: {exc}")
        raise


@dataclass
class Guest:
    """What the guest itself said, for the comparisons."""

    release: str
    nodename: str
    version: str
    banner: bytes


@pytest.fixture(scope="module")
def own(capture: Capture) -> Guest:
    result = capture.guest.run("cat /proc/version && uname -v").check()
    banner, version = result.stdout.split("\n")[:2]
    return Guest(
        release=capture.fact("uname-r").decode().strip(),
        nodename=capture.fact("uname-n").decode().strip(),
        version=version,
        banner=(banner + "\n").encode(),
    )


def commands(own: Guest) -> dict[str, str]:
    return {
        "sys": "sys",
        "mod": "mod",
        # The banner and its NUL, as bytes.
        "banner": f"rd -8 linux_banner {len(own.banner) + 1}",
        # crash 8.0.2 loses every task from the PID hash on these kernels (see the docs), so
        # the task list is walked by hand.
        "tasks": "list task_struct.tasks -s task_struct.pid,comm -h init_task",
        "log": "log -m",
    }


@pytest.fixture(scope="module")
def exported(capture: Capture) -> Path:
    out = capture.guest.out_dir / "crash"
    out.mkdir(exist_ok=True)
    elf = out / "capture.elf"
    result = collect("export", str(capture.image), "--to", "elf", "-o", str(elf), "--force")
    assert result.returncode == 0, result.stderr
    return elf


@pytest.fixture(scope="module")
def elf_session(exported: Path, vmlinux: Path, own: Guest) -> dict[str, str]:
    return run_crash(vmlinux, exported, commands(own))


@pytest.fixture(scope="module")
def kdump_session(exported: Path, vmlinux: Path) -> dict[str, str]:
    """crash on makedumpfile's compressed, filtered (-d 31) dump of the ELF export."""
    tool = shutil.which("makedumpfile")
    assert tool, "makedumpfile is not installed (.ci/install-debian-packages installs it)"
    dump = exported.with_name("capture.kdump")
    dump.unlink(missing_ok=True)
    made = subprocess.run(
        [tool, "-c", "-d", "31", str(exported), str(dump)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    return run_crash(vmlinux, dump, {"sys": "sys", "mod": "mod"})


# -- what the guest said ----------------------------------------------------------------------


def guest_memory(capture: Capture) -> str:
    """MEMORY as crash prints it: the node's present pages (the sum of /proc/zoneinfo's
    ``present``), in MB with one decimal."""
    zoneinfo = capture.before["memory"]["zoneinfo"]
    pages = sum(int(n) for n in re.findall(r"^\s+present\s+(\d+)$", zoneinfo, re.M))
    assert pages
    size = f"{pages * PAGE / (1 << 20):.1f}"
    return size.removesuffix(".0") + " MB"


def guest_modules(snapshot: dict) -> dict[str, tuple[int, int]]:
    """/proc/modules: name -> (base address, size)."""
    out = {}
    for line in snapshot["modules"]:
        name, size, _refs, _deps, _state, base, *_ = line.split()
        out[name] = (int(base, 16), int(size))
    return out


def task_comm(process: dict) -> str:
    """task_struct.comm of a process as /proc showed it. /proc gives a kernel thread's full
    name (comm keeps 15 characters) and adds to a pool worker's name (``kworker/...``) its
    current work after ``-`` or ``+``; a rescuer worker is named after its workqueue, which
    may hold a ``-`` itself (``edac-poller``), and gets nothing added."""
    comm = process["comm"]
    if process["flags"] & PF_WQ_WORKER and comm.startswith("kworker/"):
        comm = re.split(r"[-+]", comm, maxsplit=1)[0]
    return comm[:COMM_CHARS]


def guest_processes(snapshot: dict) -> set[tuple[int, str]]:
    return {(p["pid"], task_comm(p)) for p in snapshot["processes"].values()}


def kmsg_lines(record: dict) -> list[str]:
    """A /dev/kmsg record as ``log -m`` prints it: ``[secs.usecs] <level>text``, continuation
    lines indented under the text. /dev/kmsg escapes control bytes and ``\\`` as ``\\xNN``."""
    raw = re.sub(
        rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), record["text"].encode()
    )
    prefix = f"[{record['usec'] // 10**6:5d}.{record['usec'] % 10**6:06d}] <{record['prio'] & 7}>"
    first, *rest = raw.decode("utf-8", "replace").split("\n")
    return [prefix + first] + [" " * len(prefix) + line for line in rest]


# -- what crash said --------------------------------------------------------------------------


def sys_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.partition(": ")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def mod_rows(text: str) -> dict[str, tuple[int, int]]:
    """``mod``: name -> (BASE, SIZE)."""
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["MODULE", "NAME", "BASE", "SIZE", "OBJECT"], lines[0]
    out = {}
    for line in lines[1:]:
        _module, name, base, size, *_ = line.split()
        out[name] = (int(base, 16), int(size))
    return out


def rd_bytes(text: str) -> bytes:
    """``rd -8``: 16 bytes a line in hex after the address, then the same as text."""
    out = bytearray()
    for line in text.splitlines():
        _address, _, rest = line.partition(":")
        out += bytes(int(t, 16) for t in rest.split()[:16] if re.fullmatch(r"[0-9a-f]{2}", t))
    return bytes(out)


def walked_tasks(text: str) -> list[tuple[int, str]]:
    """``list -s task_struct.pid,comm``: (pid, comm) per task, in list order."""
    tasks = []
    for pid, comm in re.findall(r"^  pid = (-?\d+),\n  comm = (.*),$", text, re.M):
        # gdb prints char[16] as a C string with its NULs as \000.
        tasks.append((int(pid), comm.strip('"').split("\\000")[0]))
    return tasks


# -- the tests --------------------------------------------------------------------------------


def test_sys_is_the_guests(capture: Capture, own: Guest, exported: Path, elf_session) -> None:
    fields = sys_fields(elf_session["sys"])
    assert fields["DUMPFILE"] == str(exported)
    assert fields["RELEASE"] == own.release
    assert fields["VERSION"] == own.version
    assert fields["NODENAME"] == own.nodename
    assert fields["MACHINE"].split()[0] == "x86_64"
    assert fields["CPUS"] == str(len(capture.before["cpus"])) == str(len(capture.after["cpus"]))
    assert fields["MEMORY"] == guest_memory(capture)


def test_mod_lists_the_guests_modules(capture: Capture, elf_session) -> None:
    want = guest_modules(capture.before)
    assert want == guest_modules(capture.after)
    assert mod_rows(elf_session["mod"]) == want


def test_linux_banner_is_proc_version(own: Guest, elf_session) -> None:
    assert rd_bytes(elf_session["banner"]) == own.banner + b"\0"


def test_log_holds_the_guests_kmsg_records(capture: Capture, elf_session) -> None:
    lines = elf_session["log"].splitlines()
    want = [line for record in capture.before["kmsg"] for line in kmsg_lines(record)]
    assert capture.before["kmsg"][-1]["text"] == KMSG_MARKER
    # Every record /dev/kmsg gave before the capture, in order; records logged while the
    # capture ran may follow.
    assert lines[: len(want)] == want
    assert any(line.endswith(f"<4>{KMSG_MARKER}") for line in lines)


def test_task_list_holds_the_guests_processes(capture: Capture, elf_session) -> None:
    walked = walked_tasks(elf_session["tasks"])
    assert walked[0] == (0, "swapper/0")
    before, after = guest_processes(capture.before), guest_processes(capture.after)
    stable = before & after
    assert (capture.witness, "python") in stable
    assert stable <= set(walked[1:])
    # Every other task is one the guest listed on one side of the capture, or one started
    # after the first listing (collect itself, its shell, the guest's command loop).
    newest = max(pid for pid, _ in before)
    others = [t for t in walked[1:] if t not in before | after and t[0] <= newest]
    # A live capture is not atomic: a task that exited while it ran may leave the list
    # pointing at its freed task_struct, which ends crash's walk there. Such a task was
    # created during the capture, so it comes last in the list, after every stable process.
    if "invalid list entry" in elf_session["tasks"]:
        assert others in ([], [walked[-1]]), others
    else:
        assert others == []


def test_makedumpfile_dump_gives_the_same_answers(
    capture: Capture, exported: Path, elf_session, kdump_session
) -> None:
    elf, kdump = sys_fields(elf_session["sys"]), sys_fields(kdump_session["sys"])
    # crash adds "[PARTIAL DUMP]": makedumpfile left pages out (-d 31).
    assert kdump["DUMPFILE"].split()[0] == str(exported.with_name("capture.kdump"))
    for field in ("RELEASE", "VERSION", "NODENAME", "CPUS", "MEMORY", "DATE", "UPTIME"):
        assert kdump[field] == elf[field], field
    assert mod_rows(kdump_session["mod"]) == mod_rows(elf_session["mod"])
    assert mod_rows(kdump_session["mod"]) == guest_modules(capture.before)
