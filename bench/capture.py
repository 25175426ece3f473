"""Capture throughput and peak memory, against `zstd -1 -T<n>` and a plain read of the same bytes.

The corpus is replayed real memory: the RAM of an idle Debian guest (taken with QEMU's
pmemsave through the VM bench, cached) followed by shared libraries and binaries from this
machine (dense, no zero pages), at least 1 GiB in all. It is served as /dev/mem of a sysroot
whose /proc/iomem lists it as System RAM, so `collect` runs its real read path.

    python bench/capture.py [--size-mib 1024] [--threads N] [--level 1]

Prints figures and ratios; never pass/fail. Then a cost table: core-seconds per GiB of RAM
for each stage of the pipeline (read, compress, hash with SHA-256 or BLAKE3, write, and the
zero-page check `--skip zero` adds in the reader threads), each measured alone on one core
over the same corpus, and the throughput those costs allow at 2, 16 and 64 cores, naming the
stage that bounds it.

    python bench/capture.py --stages-only   # the cost table alone, without the timed runs
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tools.vm, from the checkout

CACHE = Path(os.environ.get("COLLECTOR_BENCH_CACHE", Path.home() / ".cache/collector/bench"))
BASE = 1 << 20  # the corpus starts at 1 MiB, as RAM above the low megabyte does


def guest_ram(mib: int) -> Path | None:
    """An idle guest's RAM from QEMU's own view (pmemsave), cached; None if QEMU cannot run."""
    path = CACHE / f"guest-ram-{mib}m.bin"
    if path.exists():
        return path
    try:
        from tools.vm.guest import Guest
    except ImportError:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    try:
        with Guest(kernel="6.1", memory_mib=mib) as guest:
            guest.run("python3 -c 'import json, zstandard' ; sync", timeout=300)
            guest.qmp.pmemsave(0, mib << 20, str(path))
    except Exception as e:  # the bench goes on without it, and says so
        print(f"note: no guest RAM ({e}); using binaries only", file=sys.stderr)
        return None
    return path


def binaries(limit: int) -> list[Path]:
    """Shared libraries and executables of this machine, dense and incompressible-ish."""
    out, total = [], 0
    for root in ("/usr/lib/x86_64-linux-gnu", "/usr/lib", "/usr/bin", "/usr/libexec"):
        for dirpath, _, files in os.walk(root):
            for name in sorted(files):
                p = Path(dirpath, name)
                if p.is_symlink() or not p.is_file():
                    continue
                size = p.stat().st_size
                if size < 4096:
                    continue
                out.append(p)
                total += size
                if total >= limit:
                    return out
    return out


def build_corpus(workdir: Path, size: int) -> tuple[Path, Path, str]:
    """Write the corpus, a sysroot serving it, and describe its parts."""
    corpus = workdir / "corpus.bin"
    parts = []
    with open(corpus, "wb") as out:
        ram = guest_ram(512)
        if ram is not None:
            with open(ram, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
            parts.append(f"guest RAM {ram.stat().st_size >> 20} MiB")
        have = out.tell()
        for p in binaries(size - have):
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
            if out.tell() >= size:
                break
        parts.append(f"binaries {(out.tell() - have) >> 20} MiB")
        out.truncate(min(out.tell(), size) // 4096 * 4096)
    length = corpus.stat().st_size
    root = workdir / "sysroot"
    for d in ("proc/sys/kernel", "proc/sys/kernel/random", "sys/kernel", "dev"):
        (root / d).mkdir(parents=True, exist_ok=True)
    (root / "proc/iomem").write_text(
        f"00000000-000fffff : Reserved\n{BASE:08x}-{BASE + length - 1:08x} : System RAM\n"
    )
    (root / "proc/sys/kernel/arch").write_text("x86_64\n")
    (root / "proc/sys/kernel/hostname").write_text("bench\n")
    (root / "proc/cpuinfo").write_text("processor\t: 0\nflags\t\t: fpu sse2 lm\n\n")
    with open(root / "dev/mem", "wb") as mem:
        mem.truncate(BASE)
        mem.seek(BASE)
        with open(corpus, "rb") as f:
            shutil.copyfileobj(f, mem, 1 << 20)
    return corpus, root, " + ".join(parts)


def timed(cmd: list[str], **kw) -> tuple[float, int, subprocess.CompletedProcess]:
    """Wall time and peak RSS (KiB) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    out, err = proc.stdout.read(), proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    done = subprocess.CompletedProcess(cmd, proc.returncode, out, err)
    if proc.returncode:
        raise SystemExit(f"{cmd[0]} failed: {err.decode(errors='replace').strip()}")
    return elapsed, usage.ru_maxrss, done


def plain_read(path: Path) -> float:
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    pos = 0
    while block := os.pread(fd, 4 << 20, pos):
        pos += len(block)
    os.close(fd)
    return time.perf_counter() - t0


def sha256_alone(path: Path) -> float:
    """One core hashing the same bytes: the serial stage the format's stream hash costs."""
    import hashlib

    t0 = time.perf_counter()
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    pos = 0
    while block := os.pread(fd, 4 << 20, pos):
        h.update(block)
        pos += len(block)
    os.close(fd)
    return time.perf_counter() - t0


GIB = 1 << 30


def _cpu_per_gib(work, blocks: list[bytes] | None, path: Path | None = None) -> float:
    """Core-seconds per GiB of input that ``work(block)`` costs on this thread.

    Thread CPU time (user and system) rather than wall time: a figure per core that other
    load on the machine does not inflate.
    """
    t0 = time.thread_time()
    n = 0
    if blocks is not None:
        for block in blocks:
            work(block)
            n += len(block)
    else:
        fd = os.open(path, os.O_RDONLY)
        try:
            while block := os.pread(fd, 4 << 20, n):
                work(block)
                n += len(block)
        finally:
            os.close(fd)
    return (time.thread_time() - t0) / (n / GIB)


def stage_costs(corpus: Path, level: int, out_dir: Path) -> dict[str, float]:
    """Core-seconds per GiB of RAM for each stage, one at a time on one core."""
    import hashlib

    import blake3
    import xxhash
    import zstandard

    from collector.image import format as fmt

    size = corpus.stat().st_size
    take = min(size, 512 << 20)  # enough for steady figures; the blocks stay in memory
    blocks = []
    with open(corpus, "rb") as f:
        while len(blocks) * (4 << 20) < take and (b := f.read(4 << 20)):
            blocks.append(b)
    costs = {"read": _cpu_per_gib(lambda b: None, None, corpus)}
    c = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
    frames: list[bytes] = []

    def compress(b: bytes) -> None:
        frame = c.compress(b)
        xxhash.xxh3_64_intdigest(frame)  # the worker hashes its frame for the DESC
        frames.append(frame)

    costs["compress"] = _cpu_per_gib(compress, blocks)
    from collector.acquire.capture import zero_runs

    costs["zero check"] = _cpu_per_gib(lambda b: zero_runs(b, BASE, 4096), blocks)
    # Its two extremes: RAM with no zero page (every page compared up to its first non-zero
    # byte) and RAM of zeros only (64 KiB blocks compared whole).
    dense = [b for b in blocks if not zero_runs(b, BASE, 4096)][:32] or blocks[:1]
    costs["zero check, dense RAM"] = _cpu_per_gib(lambda b: zero_runs(b, BASE, 4096), dense)
    zeros = [bytes(4 << 20)] * 32
    costs["zero check, zero RAM"] = _cpu_per_gib(lambda b: zero_runs(b, BASE, 4096), zeros)
    h = hashlib.sha256()
    costs["hash sha256"] = _cpu_per_gib(h.update, blocks)
    b3 = blake3.blake3()  # one thread: its cost per core
    costs["hash blake3"] = _cpu_per_gib(b3.update, blocks)
    # The ordered writer: DESC records and the compressed frames, to a file.
    fd = os.open(out_dir / "stage-write.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    zero = bytes(4 << 20)
    t0 = time.thread_time()
    for i, (block, frame) in enumerate(zip(blocks, frames, strict=True)):
        _ = block == zero  # the all-zero check add_chunk makes
        os.write(fd, fmt.Desc(i, i << 22, len(block), len(frame), 0, 0).encode())
        os.write(fd, frame)
    os.close(fd)
    costs["write"] = (time.thread_time() - t0) / (sum(map(len, blocks)) / GIB)
    return costs


#: Stages that run on one thread whatever the core count, with each hash choice.
SERIAL = {"sha256": ("hash sha256", "write"), "blake3": ("write",)}


def projection(costs: dict[str, float], hash_name: str, cores: int) -> tuple[float, str]:
    """GiB/s the stage costs allow on ``cores`` cores, and the stage that bounds it.

    Every stage's work shares the cores; a serial stage also can go no faster than one core
    runs it. The bound is whichever limit is lower.
    """
    stages = ["read", "compress", f"hash {hash_name}", "write"]
    total = sum(costs[s] for s in stages)
    best = cores / total
    bound = f"all cores ({max(stages, key=costs.get)} the largest share)"
    for s in SERIAL[hash_name]:
        if 1 / costs[s] < best:
            best, bound = 1 / costs[s], f"{s} (serial, one core)"
    return best, bound


def print_costs(costs: dict[str, float]) -> None:
    print("\nstage costs, core-seconds per GiB of RAM (each measured alone on one core):")
    for name, cost in costs.items():
        serial = " (serial with --hash sha256)" if name in SERIAL["sha256"] else ""
        if name == "write":
            serial = " (serial: one ordered writer)"
        if name.startswith("zero check"):
            serial = " (--skip zero only; in the reader threads, not in the projection)"
        print(f"  {name:<22} {cost:6.3f}{serial}")
    print("projected throughput from those costs:")
    print(f"  cores  {'--hash sha256':<58} --hash blake3")
    for cores in (2, 16, 64):
        cells = []
        for h in ("sha256", "blake3"):
            gib, bound = projection(costs, h, cores)
            cells.append(f"{gib * GIB / 1e9:6.2f} GB/s, bound: {bound}")
        print(f"  {cores:>5}  {cells[0]:<58} {cells[1]}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--level", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--stages-only", action="store_true", help="print the cost table only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="collector-bench-") as tmp:
        work = Path(tmp)
        corpus, root, parts = build_corpus(work, args.size_mib << 20)
        size = corpus.stat().st_size
        if args.stages_only:
            print(f"corpus: {size >> 20} MiB ({parts}); level {args.level}")
            print_costs(stage_costs(corpus, args.level, work))
            return
        plain_read(corpus), plain_read(root / "dev/mem")  # warm the page cache for all
        print(f"corpus: {size >> 20} MiB ({parts}); {args.threads} threads, level {args.level}")
        best = {"read": 1e9, "zstd": 1e9, "collect": 1e9, "collect-b3": 1e9, "sha256": 1e9}
        rss = {"zstd": 0, "collect": 0, "collect-b3": 0}
        ratio = {}
        for _ in range(args.repeat):
            best["read"] = min(best["read"], plain_read(corpus))
            best["sha256"] = min(best["sha256"], sha256_alone(corpus))
            out = work / "z.zst"
            t, r, _ = timed(
                [
                    "zstd",
                    "-q",
                    "-f",
                    f"-{args.level}",
                    f"-T{args.threads}",
                    str(corpus),
                    "-o",
                    str(out),
                ]
            )
            best["zstd"], rss["zstd"] = min(best["zstd"], t), max(rss["zstd"], r)
            ratio["zstd"] = size / out.stat().st_size
            img = work / "c.lime.zst"
            for key, extra in (("collect", []), ("collect-b3", ["--hash", "blake3"])):
                t, r, _ = timed(
                    [
                        sys.executable,
                        "-m",
                        "collector",
                        "--profile",
                        "x86_64",
                        "--sysroot",
                        str(root),
                        "-o",
                        str(img),
                        "--force",
                        "--no-progress",
                        "--json",
                        f"--threads={args.threads}",
                        f"--level={args.level}",
                        *extra,
                    ]
                )
                best[key], rss[key] = min(best[key], t), max(rss[key], r)
                ratio[key] = size / img.stat().st_size
        gbps = {k: size / v / 1e9 for k, v in best.items()}
        print(f"plain read          {gbps['read']:6.2f} GB/s")
        print(
            f"sha256, one core    {gbps['sha256']:6.2f} GB/s  (the image's whole-stream hash; serial)"
        )
        print(
            f"zstd -{args.level} -T{args.threads}        {gbps['zstd']:6.2f} GB/s  ratio {ratio['zstd']:.2f}  peak RSS {rss['zstd'] >> 10} MiB"
        )
        print(
            f"collect             {gbps['collect']:6.2f} GB/s  ratio {ratio['collect']:.2f}  peak RSS {rss['collect'] >> 10} MiB"
        )
        print(
            f"collect --hash blake3 {gbps['collect-b3']:4.2f} GB/s  ratio {ratio['collect-b3']:.2f}  peak RSS {rss['collect-b3'] >> 10} MiB"
        )
        print(f"collect / zstd CLI  {gbps['collect'] / gbps['zstd']:6.2f}   (target >= 0.90)")
        print(f"collect --hash blake3 / zstd CLI {gbps['collect-b3'] / gbps['zstd']:5.2f}")
        print(f"collect / plain read {gbps['collect'] / gbps['read']:5.2f}")
        # The stream hash is serial work on top of compression: with T cores busy at zstd's
        # speed it adds about sha256_time / T of wall time, whatever the pipeline does.
        ceiling = best["zstd"] / (best["zstd"] + best["sha256"] / args.threads)
        print(f"ceiling of collect / zstd CLI with a SHA-256 of the stream: {ceiling:.2f}")
        print_costs(stage_costs(corpus, args.level, work))


if __name__ == "__main__":
    main()
