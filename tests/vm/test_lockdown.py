"""Kernel lockdown on a real kernel (booted with lockdown=...): integrity refuses /dev/mem and
the capture comes from /proc/kcore; confidentiality refuses both, in one clear line."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from tests.vm.conftest import iomem_entries
from tools.vm.guest import Guest

pytestmark = pytest.mark.vm

PAGE = 4096


def test_integrity_lockdown_captures_through_kcore(boot_guest: Callable[..., Guest]) -> None:
    guest = boot_guest("6.1", append=("lockdown=integrity",))
    state = guest.run("cat /sys/kernel/security/lockdown").check().stdout.strip()
    assert state == "none [integrity] confidentiality"
    plan = json.loads(guest.run("collect plan --profile x86_64 --json").check().stdout)
    assert plan["lockdown"] == "integrity"
    assert plan["sources"]["/dev/mem"] == "refused by lockdown (integrity)"
    assert plan["sources"]["/proc/kcore"] == "available"
    iomem = guest.run("cat /proc/iomem").check().stdout
    ram = iomem_entries(iomem, "System RAM")
    entries = [(e["start"], e["end"], e["source"], e["fate"]) for e in plan["entries"]]
    # Without /dev/mem nothing reads the sub-page tail kcore omits: it is not covered, not data.
    tails = [(e // PAGE * PAGE, e) for _, e in ram if e % PAGE]
    expected = []
    for start, end in ram:
        whole = end // PAGE * PAGE
        expected.append((start, whole, "/proc/kcore", "read"))
        if whole < end:
            expected.append((whole, end, None, "not-covered"))
    assert entries == expected
    out = guest.out_dir / "lockdown"
    out.mkdir(exist_ok=True)
    result = guest.run(
        f"collect --profile x86_64 -o {guest.to_guest(out)}/integrity.lime.zst --json", timeout=600
    ).check()
    summary = json.loads(result.stdout)
    pages = sum((e - 1) // PAGE - s // PAGE + 1 for s, e in ram)
    assert summary["pages"]["not-covered"] == len(tails)
    assert summary["pages"]["read"] == pages - len(tails)
    assert summary["clean"] is True


def test_confidentiality_lockdown_is_one_clear_line(boot_guest: Callable[..., Guest]) -> None:
    guest = boot_guest("6.1", append=("lockdown=confidentiality",))
    result = guest.run("collect plan --profile x86_64")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert lines[0].startswith("collect: no readable source:")
    assert "/dev/mem: refused by lockdown (confidentiality)" in lines[0]
    assert "/proc/kcore: refused by lockdown (confidentiality)" in lines[0]
