"""`collect sweep`'s rate over real images with 1 and 2 worker processes, against
`collect analyze` run in a shell loop over the same (image, analysis) pairs, in one run.

The images are linked ``--copies`` times each into a temporary folder so there are enough
tasks to spread; every sweep writes a fresh dataset (nothing skipped), and its time includes
starting and stopping its local cluster, as a user waits for it. The loop runs one
``python -m collector analyze IMAGE NAME --format csv`` per pair, output to /dev/null.

    python bench/sweep.py IMAGE_OR_DIR... [--analysis pslist,lsmod] [--copies 3]

Prints images a minute, the scaling efficiency from 1 to 2 workers and the ratios to the
loop; never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from collector.fleet.sweep import find_images  # noqa: E402


def loop(images: list[str], analyses: list[str], env: dict[str, str]) -> float:
    """Seconds for the shell loop over every pair."""
    script = (
        f"for i in {' '.join(map(shlex.quote, images))}; do"
        f" for a in {' '.join(analyses)}; do"
        f' {shlex.quote(sys.executable)} -m collector analyze "$i" "$a" --format csv'
        ' > /dev/null || echo "failed: $i $a" >&2; done; done'
    )
    started = time.perf_counter()
    subprocess.run(["sh", "-c", script], env=env, check=True)
    return time.perf_counter() - started


def sweep(folder: Path, analyses: list[str], workers: int, out: Path, env: dict) -> float:
    """Seconds for `collect sweep --workers N` into a new dataset."""
    command = [sys.executable, "-m", "collector", "sweep", str(folder), "--analysis",
               ",".join(analyses), "-o", str(out), "--workers", str(workers), "--json"]  # fmt: skip
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    summary = json.loads(result.stdout)
    if summary["failed"] or summary["workers"] != workers:
        raise SystemExit(f"sweep with {workers} workers: {summary}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    parser.add_argument("--analysis", default="pslist,lsmod")
    parser.add_argument("--copies", type=int, default=3, help="links to each image (default 3)")
    args = parser.parse_args()
    analyses = args.analysis.split(",")
    originals = find_images(args.images)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="sweep-bench-") as tmp:
        folder = Path(tmp, "images")
        folder.mkdir()
        images = []
        for n in range(args.copies):
            for k, image in enumerate(originals):
                link = folder / f"{n}-{k}-{Path(image).name}"
                link.symlink_to(image)
                images.append(str(link))
        pairs = len(images) * len(analyses)
        print(f"{len(images)} images ({len(originals)} x {args.copies} links), {pairs} tasks:"
              f" {', '.join(analyses)}; {os.cpu_count()} cores")  # fmt: skip
        shell = loop(images, analyses, env)
        one = sweep(folder, analyses, 1, Path(tmp, "out-1"), env)
        two = sweep(folder, analyses, 2, Path(tmp, "out-2"), env)

    def rate(seconds: float) -> float:
        return len(images) * 60 / seconds

    print(f"collect analyze loop:  {shell:6.1f} s  {rate(shell):6.1f} images/min")
    print(f"collect sweep, 1 wkr:  {one:6.1f} s  {rate(one):6.1f} images/min"
          f"  ({shell / one:.2f}x the loop)")  # fmt: skip
    print(f"collect sweep, 2 wkrs: {two:6.1f} s  {rate(two):6.1f} images/min"
          f"  ({shell / two:.2f}x the loop)")  # fmt: skip
    print(f"scaling 1 -> 2 workers: {one / two:.2f}x, efficiency {one / two / 2:.0%}")


if __name__ == "__main__":
    main()
