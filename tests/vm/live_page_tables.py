"""Run inside a guest: classify the live struct page array twice, through /proc/kcore's
vmemmap segments and through the kernel's page tables (the path `collect` takes where kcore
is refused but /dev/mem allows RAM; no Debian kernel allows that, so the page-table walk is
forced here, over the same physical reads), and print both counts as JSON."""

from __future__ import annotations

import json
import time

from collector.acquire import live
from collector.acquire.session import CaptureOptions, build_plan
from collector.kernel import pages as kpages
from collector.kernel.btf import BTF
from collector.kernel.vmcoreinfo import VmcoreInfo


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
        out = {}
        for via in ("kcore", "page tables"):
            t0 = time.perf_counter()
            memory = live.LiveMemory(plan, blobs)
            kernel = live.LiveKernel(
                memory,
                VmcoreInfo.parse(blobs["vmcoreinfo"]),
                BTF.parse(blobs["btf"]),
                plan.kcore if via == "kcore" else None,
            )
            spans = [(-(-r.start // 4096), r.end // 4096) for r in plan.ram_ranges]
            # Without the per-CPU lists: both ways read nothing but struct pages (and the
            # page tables on the way), so they must agree but for pages that changed between.
            walker = kpages.PageWalker(kernel, with_pcp=False, spans=spans)
            pages = live.LivePages(walker, memory)
            usage = pages.usage()
            out[via] = {
                "pages": usage.pages,
                "bytes_read": usage.bytes_read,
                "seconds": round(time.perf_counter() - t0, 3),
                "vmemmap_base": pages.walker.vmemmap,
            }
        print(json.dumps(out))


if __name__ == "__main__":
    main()
