"""`collect export` against `zstd -dc` of the same image, in one run: times, ratios, peak RSS.

A native image's DATA frames decompress to a LiME file, so `zstd -dc` is the floor of a LiME
export: the same decompression and the same bytes written. Each command runs as a child
process, several times; the best wall time of each is printed with its ratio to the
baseline writing to the same place, and the peak RSS of the children (getrusage).

    python bench/export.py [IMAGE] [--runs 3] [--dir DIR]

IMAGE defaults to /work/images/6.12/image.lime.zst. Outputs go to a temporary directory
in DIR (default: the system's temporary directory) and are removed. Exports to a file
include their fsync (an export is put in place only once it is on disk); `zstd -dc > FILE`
does not sync, so the table also shows `zstd -dc > FILE && sync FILE`. Prints figures;
never pass/fail.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_IMAGE = "/work/images/6.12/image.lime.zst"


def run(cmd: str, env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (KiB) of one shell command run as a child."""
    # ru_maxrss of RUSAGE_CHILDREN is the largest of all children waited for so far: run
    # each command under its own intermediate process so the figure is this command's.
    probe = (
        "import resource, subprocess, sys, time; t = time.monotonic(); "
        "subprocess.run(sys.argv[1], shell=True, check=True, stdout=subprocess.DEVNULL); "
        "print(time.monotonic() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, cmd], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    return float(out[0]), int(out[1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("image", nargs="?", default=DEFAULT_IMAGE)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default=None)
    ap.add_argument(
        "--code", default=str(ROOT), help="the collector source tree to run (default: this one)"
    )
    args = ap.parse_args()
    image = shlex.quote(os.path.abspath(args.image))
    env = dict(os.environ, PYTHONPATH=os.path.abspath(args.code))
    collect = f"{shlex.quote(sys.executable)} -m collector export {image}"
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        out = shlex.quote(os.path.join(tmp, "out"))
        cases = [
            ("zstd -dc > /dev/null", f"zstd -qdc {image} > /dev/null", None),
            ("zstd -dc > FILE", f"zstd -qdc {image} > {out}", None),
            ("zstd -dc > FILE && sync FILE", f"zstd -qdc {image} > {out} && sync {out}", None),
        ]
        for fmt in ("lime", "elf"):
            cases.append(
                (f"export --to {fmt} -o - > /dev/null", f"{collect} --to {fmt} -o - > /dev/null", 0)
            )
        for fmt in ("lime", "raw", "elf"):
            cases.append((f"export --to {fmt} -o FILE", f"{collect} --to {fmt} -o {out}", 1))
        results = []
        for name, cmd, _base in cases:
            best, rss = float("inf"), 0
            for _ in range(args.runs):
                if os.path.exists(os.path.join(tmp, "out")):
                    os.unlink(os.path.join(tmp, "out"))
                seconds, peak = run(cmd + " 2>/dev/null", env)
                best, rss = min(best, seconds), max(rss, peak)
            results.append((name, best, rss))
        print(
            f"image: {args.image} ({os.path.getsize(args.image) / 2**20:.1f} MiB), code: {args.code}"
        )
        print(f"best of {args.runs} runs; ratio to zstd writing to the same place")
        print(f"{'command':<36} {'seconds':>8} {'ratio':>7} {'peak RSS':>10}")
        for (name, seconds, rss), (_, _, base) in zip(results, cases, strict=True):
            ref = results[base][1] if base is not None else results[0][1]
            print(f"{name:<36} {seconds:8.3f} {seconds / ref:6.2f}x {rss / 1024:8.1f} MiB")


if __name__ == "__main__":
    main()
