"""mm helpers on real kernels: the witness process's VMAs against its /proc/PID/maps.

The witness sleeps throughout the capture, so its maps read right before the capture are
what the image holds (the test checks they did not change by right after).
"""

from __future__ import annotations

import pytest

from collector.helpers.maple_tree import mtree_load
from collector.helpers.mm import for_each_vma, show_map_vma
from collector.kernel.kernel import Kernel
from collector.kernel.object import Object
from tests.vm.conftest import Capture

pytestmark = pytest.mark.vm


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
            # file paths come from d_path, not these helpers: compare the names of the rest
            "name": w["name"] if e.file is not None else e.name,
        }
        for e, w in zip(entries, want, strict=False)
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
