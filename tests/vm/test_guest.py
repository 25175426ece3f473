"""The bench itself, and the facts about real kernels the collector relies on (KASLR on).

Each claim is read inside the guest by tests/vm/probe.py and checked against QEMU's own view of
guest RAM (QMP), which the guest cannot influence.
"""

from __future__ import annotations

import json
import os
import struct
import sys

import pytest

from tools.vm.guest import Guest

pytestmark = pytest.mark.vm

PROBE = "tests/vm/probe.py"
PT_LOAD = 1
PT_NOTE = 4
NO_PADDR = 0xFFFFFFFFFFFFFFFF


def probe(guest: Guest, *args: str) -> object:
    result = guest.run(" ".join(["python", PROBE, *args]), timeout=300).check()
    return json.loads(result.stdout)


def iomem(guest: Guest) -> list[dict]:
    return probe(guest, "iomem")  # type: ignore[return-value]


def named(entries: list[dict], name: str) -> list[dict]:
    return [e for e in entries if e["name"] == name]


def test_agent_runs_commands_in_the_hosts_root(guest: Guest) -> None:
    result = guest.run("pwd; id -u; echo out >&2; exit 3")
    assert result.returncode == 3
    assert result.stdout.splitlines() == [str(guest.repo), "0"]
    assert result.stderr == "out\n"


def test_guest_runs_the_hosts_python_and_this_checkout(guest: Guest) -> None:
    real = os.path.realpath(sys.executable)
    result = guest.run(
        "command -v python; command -v collect; "
        "python -c 'import collector, sys; print(collector.__file__); print(sys.executable)'"
    ).check()
    python, collect, module, executable = result.stdout.splitlines()
    bindir = os.path.dirname(real)
    assert os.path.dirname(python) == bindir
    assert os.path.dirname(collect) == bindir
    assert "shims" not in result.stdout
    assert module == str(guest.repo / "collector" / "__init__.py")
    assert os.path.realpath(executable) == real or os.path.dirname(executable) == bindir
    # The console script, run from elsewhere, imports this checkout too, not whichever
    # checkout the host's environment has installed.
    version = guest.run("cd / && collect --version").check().stdout
    assert version.split(" from ")[1].split(" (")[0] == str(guest.repo / "collector")


def test_guest_cpu_runs_the_collectors_dependencies(guest: Guest) -> None:
    # numpy 2 needs x86-64-v2 (SSE4.2, POPCNT); QEMU's plain qemu64 dies here with SIGILL.
    result = guest.run("python -c 'import numpy, zstandard, construct, pluggy; print(1)'")
    assert (result.returncode, result.stdout) == (0, "1\n"), result.stderr


def test_kernel_is_the_fetched_one_with_kaslr_on(guest: Guest) -> None:
    assert guest.kernel is not None
    result = guest.run("uname -r; cat /proc/cmdline").check()
    release, cmdline = result.stdout.splitlines()
    assert release == guest.kernel.version
    assert "nokaslr" not in cmdline.split()
    assert guest.kernel.config_value("CONFIG_RANDOMIZE_BASE") == "y"


def test_9p_modules_are_loaded(guest: Guest) -> None:
    assert guest.initramfs is not None
    result = guest.run("cut -d' ' -f1 /proc/modules; echo ---; cat /proc/filesystems").check()
    modules, filesystems = result.stdout.split("---\n")
    loaded = set(modules.split())
    assert set(guest.initramfs.modules) <= loaded
    assert "9p" in filesystems.split()
    for name in guest.initramfs.builtin:
        assert name in guest.kernel.builtin_modules()  # type: ignore[union-attr]


def test_iomem_has_system_ram(guest: Guest) -> None:
    entries = iomem(guest)
    ram = [e for e in named(entries, "System RAM") if e["depth"] == 0]
    assert ram, "no top-level System RAM in /proc/iomem"
    total = sum(e["end"] - e["start"] + 1 for e in ram)
    # All RAM but what the firmware reserves (a few hundred KiB).
    assert guest.memory_mib * 2**20 - 4 * 2**20 < total <= guest.memory_mib * 2**20
    (code,) = named(entries, "Kernel code")
    assert code["depth"] == 1
    assert any(r["start"] <= code["start"] and code["end"] <= r["end"] for r in ram)


def test_dev_mem_hides_ram(guest: Guest) -> None:
    # devtmpfs creates /dev/mem on these kernels; create it if a kernel ever stops doing so.
    guest.run("[ -e /dev/mem ] || mknod -m 600 /dev/mem c 1 1").check()
    entries = iomem(guest)
    low = [e for e in named(entries, "System RAM") if e["start"] <= 0x1000 <= e["end"]]
    high = [e for e in named(entries, "System RAM") if e["start"] <= 0x100000 <= e["end"]]
    assert low and high
    result = probe(guest, "devmem", "0x1000", "0x100000")
    assert result == {
        "0x1000": {"ok": True, "length": 4096, "all_zero": True},
        "0x100000": {"ok": False, "errno": "EPERM"},
    }


def test_kcore_text_segment_covers_kernel_code(guest: Guest) -> None:
    (code,) = named(iomem(guest), "Kernel code")
    headers = probe(guest, "kcore-headers")
    assert headers["e_type"] == 4 and headers["e_machine"] == 62  # ET_CORE, EM_X86_64
    assert headers["phdrs"][0]["type"] == PT_NOTE
    assert [n["name"] for n in headers["notes"]][-1] == "VMCOREINFO"
    inside = [
        ph
        for ph in headers["phdrs"]
        if ph["type"] == PT_LOAD and code["start"] <= ph["paddr"] <= code["end"]
    ]
    assert inside, "no PT_LOAD with p_paddr inside Kernel code"
    covered = code["start"]
    for ph in sorted(inside, key=lambda p: p["paddr"]):
        if ph["paddr"] <= covered:
            covered = max(covered, ph["paddr"] + ph["filesz"])
    assert covered > code["end"]


def test_kcore_kernel_code_equals_qemu_pmemsave(guest: Guest) -> None:
    (code,) = named(iomem(guest), "Kernel code")
    size = code["end"] - code["start"] + 1
    from_kcore = guest.out_dir / "kcore-code.bin"
    from_qemu = guest.out_dir / "qmp-code.bin"
    try:
        probe(guest, "kcore-read", hex(code["start"]), hex(size), guest.to_guest(from_kcore))
        guest.qmp.pmemsave(code["start"], size, from_qemu)
        a, b = from_kcore.read_bytes(), from_qemu.read_bytes()
        assert len(a) == len(b) == size
        differing = [
            hex(code["start"] + i)
            for i in range(0, size, 4096)
            if a[i : i + 4096] != b[i : i + 4096]
        ]
        assert not differing, f"kcore and QEMU disagree on pages {differing[:10]}"
    finally:
        from_kcore.unlink(missing_ok=True)
        from_qemu.unlink(missing_ok=True)


def test_qemu_translates_kernel_addresses_like_kcore(guest: Guest) -> None:
    (code,) = named(iomem(guest), "Kernel code")
    headers = probe(guest, "kcore-headers")
    direct = [ph for ph in headers["phdrs"] if ph["type"] == PT_LOAD and ph["paddr"] == 0x100000]
    assert len(direct) == 1
    text = guest.run("grep ' _text$' /proc/kallsyms").check().stdout.split()[0]
    # The CPU is stopped while the agent sleeps, so it sits in the kernel's idle loop (CPL 0)
    # and QEMU walks the kernel's page tables.
    guest.qmp.stop()
    try:
        assert guest.qmp.gva2gpa(int(text, 16)) == code["start"]
        assert guest.qmp.gva2gpa(direct[0]["vaddr"] + 0x5000) == 0x105000
    finally:
        guest.qmp.cont()


def vmcoreinfo_in_ram(guest: Guest) -> tuple[str, int]:
    """VMCOREINFO read by QEMU from where /sys/kernel/vmcoreinfo says it is, and its descsz."""
    address, size = guest.run("cat /sys/kernel/vmcoreinfo").check().stdout.split()
    # Both fields are hexadecimal, the size without a 0x prefix (kernel/ksysfs.c, "%pa %x").
    paddr, length = int(address, 16), int(size, 16)
    blob = guest.qmp.read_physical(paddr, length, guest.out_dir)
    namesz, descsz, ntype = struct.unpack_from("<III", blob)
    assert (blob[12 : 12 + namesz], ntype) == (b"VMCOREINFO\0", 0)
    return blob[12 + ((namesz + 3) & ~3) :][:descsz].decode(), descsz


def test_vmcoreinfo_note_is_in_ram_where_sysfs_says(guest: Guest) -> None:
    assert guest.kernel is not None
    desc, descsz = vmcoreinfo_in_ram(guest)
    assert f"OSRELEASE={guest.kernel.version}\n" in desc
    assert "KERNELOFFSET=" in desc
    assert "NUMBER(pgtable_l5_enabled)=0\n" in desc  # the default CPU has no LA57
    kcore_notes = probe(guest, "kcore-headers")["notes"]
    assert {"name": "VMCOREINFO", "type": 0, "descsz": descsz} in kcore_notes


def test_dump_guest_memory_carries_vmcoreinfo(guest: Guest) -> None:
    assert guest.kernel is not None
    assert guest.run("test -d /sys/firmware/qemu_fw_cfg").returncode == 0
    dump = guest.out_dir / "dump.elf"
    try:
        guest.qmp.dump_guest_memory(dump)
        with open(dump, "rb") as fh:
            ehdr = fh.read(64)
            e_phoff = struct.unpack_from("<Q", ehdr, 32)[0]
            e_phentsize, e_phnum = struct.unpack_from("<HH", ehdr, 54)
            fh.seek(e_phoff)
            table = fh.read(e_phentsize * e_phnum)
            notes = b""
            for i in range(e_phnum):
                p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(
                    "<IIQQQQ", table, i * e_phentsize
                )
                if p_type == PT_NOTE:
                    fh.seek(p_offset)
                    notes += fh.read(p_filesz)
        assert ehdr[:4] == b"\x7fELF"
        assert b"VMCOREINFO\0" in notes
        assert f"OSRELEASE={guest.kernel.version}\n".encode() in notes
    finally:
        dump.unlink(missing_ok=True)


def test_background_command_can_be_killed(guest: Guest) -> None:
    job = guest.run_background("echo started; sleep 1000 & wait")
    assert job.pid > 1
    assert job.poll() is None
    job.kill()
    result = job.wait(60)
    assert result.returncode == 128 + 9
    assert result.stdout == "started\n"
    # The whole process group went, the sleep included.
    assert "sleep 1000" not in guest.run("ps -eo args").check().stdout


def test_guest_still_answers(guest: Guest) -> None:
    assert guest.alive()
    assert guest.qmp.status() == "running"


def test_la57_cpu_gives_five_level_paging(la57_guest: Guest) -> None:
    vm = la57_guest
    desc, _ = vmcoreinfo_in_ram(vm)
    assert "NUMBER(pgtable_l5_enabled)=1\n" in desc
    assert "la57" in vm.run("grep -m1 ^flags /proc/cpuinfo").check().stdout.split()
