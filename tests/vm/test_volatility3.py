"""Volatility 3 on a capture: `collect export --to lime` and `--to isf`, then the real
volatility3 package's Linux plugins, compared with the guest's own /proc and /dev/kmsg.

The only symbol table Volatility is given is the one built from the image: it must find the
banner, the KASLR shift and the page tables with it, and read processes, modules and the
kernel log as the guest showed them.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collector.cli import main
from tests.vm.conftest import KMSG_MARKER, Capture, _timings
from tests.vm.helpers.conftest import stable_processes

pytestmark = pytest.mark.vm

#: TASK_COMM_LEN (include/linux/sched.h) less its NUL: what task_struct.comm holds.
COMM_CHARS = 15
#: A Volatility run on a 384 MiB LiME file takes 5-30 s here; far beyond that it is stuck.
VOL_TIMEOUT = 600
#: Volatility's lines for a record's dictionary (kmsg.py get_dict_lines()).
DICT_KEYS = ("SUBSYSTEM=", "DEVICE=")


class Volatility:
    """A capture exported to LiME and ISF, and Volatility 3 run on them."""

    def __init__(self, capture: Capture, where: Path) -> None:
        self.capture = capture
        self.where = where
        self.lime = where / "mem.lime"
        self.symbols = where / "symbols"
        self.cache = where / "cache"
        self.symbols.mkdir()
        self.cache.mkdir()
        self.label = capture.guest.kernel.version if capture.guest.kernel else "?"
        self._export("lime", self.lime)
        self._export("isf", self.symbols / "kernel.json.xz")

    def _export(self, to: str, path: Path) -> None:
        started = time.monotonic()
        assert main(["export", str(self.capture.image), "--to", to, "-o", str(path)]) == 0
        _timings.append(f"{self.label}: export --to {to} in {time.monotonic() - started:.1f} s")

    def run(self, plugin: str) -> subprocess.CompletedProcess:
        """``vol -f mem.lime -s symbols PLUGIN`` with JSON output, as a separate process."""
        command = [
            sys.executable,
            "-c",
            "import sys; sys.argv[0] = 'vol'; from volatility3.cli import main; sys.exit(main())",
            "-q",
            "--offline",
            "--cache-path",
            str(self.cache),
            "-r",
            "json",
            "-f",
            str(self.lime),
            "-s",
            str(self.symbols),
            plugin,
        ]
        started = time.monotonic()
        result = subprocess.run(command, capture_output=True, text=True, timeout=VOL_TIMEOUT)
        _timings.append(f"{self.label}: vol {plugin} in {time.monotonic() - started:.1f} s")
        return result

    def rows(self, plugin: str) -> list[dict]:
        result = self.run(plugin)
        assert result.returncode == 0, f"vol {plugin} failed:\n{result.stderr[-3000:]}"
        return json.loads(result.stdout)


@pytest.fixture(scope="module")
def vol(capture: Capture, tmp_path_factory: pytest.TempPathFactory) -> Volatility:
    return Volatility(capture, tmp_path_factory.mktemp("volatility3"))


def _comm_matches(task_comm: str, proc_comm: str) -> bool:
    """/proc shows more than task->comm: a kthread's full name (6.4+: kthread's full_name)
    and a kworker's current work queue ("kworker/0:1-events", wq_worker_comm())."""
    return task_comm == proc_comm[:COMM_CHARS] or proc_comm.startswith(task_comm + "-")


def _flatten(tree: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for node in tree:
        out[node["PID"]] = node
        out.update(_flatten(node["__children"]))
    return out


def test_pslist_and_pstree_show_the_guests_processes(vol: Volatility) -> None:
    # pslist runs first on a fresh cache: Volatility validates the whole table against its
    # schema once, then matches it to the memory file by the banner.
    listed = {row["PID"]: row for row in vol.rows("linux.pslist.PsList")}
    stable = stable_processes(vol.capture)
    assert listed, "pslist found no process"
    for pid, p in stable.items():
        row = listed.get(pid)
        assert row is not None, f"pid {pid} ({p['comm']}) is missing from pslist"
        assert (row["PPID"], row["UID"], row["TID"]) == (p["ppid"], p["uid"], pid), (pid, row)
        assert _comm_matches(row["COMM"], p["comm"]), (pid, row["COMM"], p["comm"])
    # Others were started or ended around the capture (collect, the shell running it) or
    # renamed (a kworker's work queue): they still hang from listed parents.
    for pid, row in listed.items():
        assert row["PPID"] == 0 or row["PPID"] in listed, (pid, row)
    tree = _flatten(vol.rows("linux.pstree.PsTree"))
    assert tree.keys() == listed.keys()
    for pid, p in stable.items():
        assert tree[pid]["PPID"] == p["ppid"]
        assert _comm_matches(tree[pid]["COMM"], p["comm"])


def test_lsmod_shows_proc_modules(vol: Volatility) -> None:
    rows = vol.rows("linux.lsmod.Lsmod")
    before = [line.split()[:2] for line in vol.capture.before["modules"]]
    assert [[r["Module Name"], str(r["Code Size"])] for r in rows] == before
    assert [line.split()[:2] for line in vol.capture.after["modules"]] == before


def _kmsg_lines(records: list[dict]) -> list[str]:
    """What Volatility prints for /dev/kmsg records: each text line (/dev/kmsg escapes bytes
    as \\xNN), then the SUBSYSTEM and DEVICE dictionary entries, each led by a space."""
    out = []
    for r in records:
        text = re.sub(r"\\x([0-9a-f]{2})", lambda m: chr(int(m.group(1), 16)), r["text"])
        out += text.splitlines()
        out += [" " + d for d in r["dict"] if d.startswith(DICT_KEYS)]
    return out


def test_kmsg_shows_the_guests_log_but_the_newest_record(vol: Volatility) -> None:
    lines = [row["line"] for row in vol.rows("linux.kmsg.Kmsg")]
    before, after = vol.capture.before["kmsg"], vol.capture.after["kmsg"]
    assert before[-1]["text"] == KMSG_MARKER
    assert after[: len(before)] == before
    # Volatility 3 (kmsg.py, ABCKmsg.run: `while cur_id != end_id`) stops before the record
    # at desc_ring.head_id, the newest one, so it shows every record the ring held at the
    # capture but the last. The marker, written last before the capture, is that record
    # unless the guest logged again before collect read the ring.
    shown = next((k for k in range(len(after) + 1) if _kmsg_lines(after[:k]) == lines), None)
    assert shown is not None, "Volatility's kmsg is no prefix of the guest's log"
    assert shown >= len(before) - 1
    if shown == len(before) - 1:
        assert KMSG_MARKER not in lines
    else:
        assert KMSG_MARKER in lines


def test_vmcoreinfo_is_the_guests(vol: Volatility) -> None:
    rows = {row["Key"]: row["Value"] for row in vol.rows("linux.vmcoreinfo.VMCoreInfo")}
    assert rows["OSRELEASE"] == vol.capture.fact("uname-r").decode().strip()
    kallsyms = {
        line.split()[2]: int(line.split()[0], 16)
        for line in vol.capture.fact("kallsyms").decode().splitlines()
        if len(line.split()) == 3
    }
    assert int(rows["SYMBOL(init_top_pgt)"], 16) == kallsyms["init_top_pgt"]
    # x86_64 links _stext at 0xffffffff81000000 (CONFIG_PHYSICAL_START 16 MiB); KASLR moved it.
    assert int(rows["KERNELOFFSET"], 16) == kallsyms["_stext"] - 0xFFFFFFFF81000000


def test_boottime_is_the_guests_btime(vol: Volatility) -> None:
    """linux.boottime reads tk_core, a static anonymous struct before 6.13 that BTF has no
    record of: the table types it (collector/interop/isf.py, _tk_core). /proc/stat's btime is
    the same getboottime64() in whole seconds."""
    from datetime import datetime

    (row,) = vol.rows("linux.boottime.Boottime")
    boot = datetime.fromisoformat(row["Boot Time"]).timestamp()
    btime = int(vol.capture.fact("btime").decode().split()[1])
    assert int(boot) == btime, (row, btime)
