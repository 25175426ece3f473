"""Run inside a guest: read the live struct page array two ways, through /proc/kcore's
vmemmap segments and through the kernel's page tables (the path `collect` takes where kcore
is refused but /dev/mem allows RAM; no Debian kernel allows that, so the page-table walk is
forced here, over the same physical reads), span after span, and print as JSON how many
struct pages the two reads of each span agree on, and the classes of each way."""

from __future__ import annotations

import json

import numpy as np

from collector.acquire import live
from collector.acquire.session import CaptureOptions, build_plan
from collector.kernel import pages as kpages
from collector.kernel.btf import BTF
from collector.kernel.vmcoreinfo import VmcoreInfo

SPAN = 1024  # struct pages per read: one 4 MiB chunk's


def main() -> None:
    plan, _ = build_plan(CaptureOptions(profile="x86_64"))
    with plan:
        assert plan.kcore is not None and plan.kcore.vmcoreinfo
        blobs = {"vmcoreinfo": plan.kcore.vmcoreinfo.encode()}
        # As a capture gathers them: BTF, and kallsyms, which names vmemmap_base (KASLR
        # moves it, and VMCOREINFO does not say where).
        for name, path in (("btf", "/sys/kernel/btf/vmlinux"), ("kallsyms", "/proc/kallsyms")):
            with open(path, "rb") as f:
                blobs[name] = f.read()
        spans = [(-(-r.start // 4096), r.end // 4096) for r in plan.ram_ranges]
        walkers = {}
        for via in ("kcore", "page tables"):
            memory = live.LiveMemory(plan, blobs)
            kernel = live.LiveKernel(
                memory,
                VmcoreInfo.parse(blobs["vmcoreinfo"]),
                BTF.parse(blobs["btf"]),
                plan.kcore if via == "kcore" else None,
            )
            walkers[via] = kpages.PageWalker(kernel, with_pcp=False, spans=spans)
        a, b = walkers["kcore"], walkers["page tables"]
        out = {"vmemmap_base": {v: w.vmemmap for v, w in walkers.items()}}
        same = total = 0
        counts = {v: np.zeros(len(kpages.CLASSES), dtype=np.int64) for v in walkers}
        for first, last in spans:
            lo = first
            while lo < last:
                # Chunks align to physical addresses, as a capture's do: a free block never
                # straddles two of them.
                hi = min(last, (lo // SPAN + 1) * SPAN)
                # The same struct pages, read one way right after the other.
                x, y = a.read(lo, hi - lo), b.read(lo, hi - lo)
                same += int((x == y).sum())
                total += hi - lo
                for via, w in walkers.items():
                    batch = w.classify_range(0, lo, hi, free_only=False)
                    counts[via] += np.bincount(batch.classes, minlength=len(kpages.CLASSES))
                lo = hi
        out["struct_pages"] = total
        out["equal"] = same
        out["classes"] = {
            via: {kpages.CLASSES[i]: int(n) for i, n in enumerate(c) if n}
            for via, c in counts.items()
        }
        out["bytes_read"] = {v: w.kernel.live_memory.bytes_read for v, w in walkers.items()}
        print(json.dumps(out))


if __name__ == "__main__":
    main()
