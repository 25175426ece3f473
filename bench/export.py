"""`collect export` against `zstd -dc` of the same image, in one run: times, ratios, peak RSS.

A native image's DATA frames decompress to a LiME file, so `zstd -dc` is the floor of a LiME
export: the same decompression and the same bytes written. Each command runs under GNU
time (/usr/bin/time: the getrusage of its children), the commands taking turns, several
rounds; printed for each are its best wall time, its best CPU time (user + system: less
disturbed by other work on a shared machine than the wall time), both as ratios to
`zstd -dc` writing to the same place, and its peak RSS. GNU time's wall time has 10 ms
steps.

    python bench/export.py IMAGE [--runs 5] [--dir DIR] [--code TREE]

IMAGE is a native image (python -m tools.vm try makes one). Outputs go to a temporary directory
in DIR (default: the system's temporary directory) and are removed. An export to a file
ends with an fsync (it is put in place only once it is on disk), which `zstd -dc > FILE`
does not do: its baseline is `zstd -dc > FILE && sync FILE`. `--code` runs another source
tree (e.g. `git archive COMMIT | tar -x -C DIR` of an older commit) for before/after
figures; its __pycache__ folders are written on the first round. Prints figures; never
pass/fail.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: str, env: dict, report: str, cwd: str) -> tuple[float, float, int]:
    """Wall seconds, CPU seconds and peak RSS (KiB) of one shell command.

    GNU time runs it and reports the wait4() rusage of the shell, which holds its own and
    its children's. A child spawned straight from Python would count Python's own resident
    memory as its peak (Linux keeps the peak of the address space a process leaves at
    exec()); time is a small program.
    """
    status = subprocess.run(
        ["/usr/bin/time", "-o", report, "-f", "%e %U %S %M", "sh", "-c", cmd], env=env, cwd=cwd
    ).returncode
    if status:
        raise SystemExit(f"failed ({status}): {cmd}")
    wall, user, system, rss = Path(report).read_text().split()
    return float(wall), float(user) + float(system), int(rss)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("image", help="a native image of a real kernel")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument(
        "--code", default=str(ROOT), help="the collector source tree to run (default: this one)"
    )
    args = ap.parse_args()
    image = shlex.quote(os.path.abspath(args.image))
    # `python -m` puts the working directory first on sys.path: run in the tree measured.
    code = os.path.abspath(args.code)
    env = dict(os.environ, PYTHONPATH=code)
    # An installed package has its modules compiled; without bytecode each start compiles
    # them again, which is no cost of an export (the first round writes __pycache__).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    collect = f"{shlex.quote(sys.executable)} -m collector export {image}"
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = os.path.join(tmp, "out")
        out = shlex.quote(path)
        # (name, command, index of its baseline)
        cases = [
            ("zstd -dc > /dev/null", f"zstd -qdc {image} > /dev/null", 0),
            ("zstd -dc > FILE && sync FILE", f"zstd -qdc {image} > {out} && sync {out}", 1),
            ("export --to lime -o - > /dev/null", f"{collect} --to lime -o - > /dev/null", 0),
            ("export --to elf -o - > /dev/null", f"{collect} --to elf -o - > /dev/null", 0),
        ]
        for fmt in ("lime", "raw", "elf"):
            cases.append(
                (f"export --to {fmt} -o FILE", f"{collect} --to {fmt} -o {out} >/dev/null", 1)
            )
        walls: list[list[float]] = [[] for _ in cases]
        cpus: list[list[float]] = [[] for _ in cases]
        rss = [0] * len(cases)
        for _ in range(args.runs):
            for i, (_, cmd, _) in enumerate(cases):  # in turns: slow spells hit every command
                if os.path.exists(path):
                    os.unlink(path)
                wall, cpu, peak = run(cmd + " 2>/dev/null", env, os.path.join(tmp, "time"), code)
                walls[i].append(wall)
                cpus[i].append(cpu)
                rss[i] = max(rss[i], peak)
        size = os.path.getsize(args.image) / 2**20
        print(f"image: {args.image} ({size:.1f} MiB), code: {args.code}, {time.ctime()}")
        print(f"best of {args.runs} runs; ratios to the zstd line writing to the same place")
        print(
            f"{'command':<36} {'wall s':>7} {'ratio':>6} {'cpu s':>7} {'ratio':>6} {'peak RSS':>10}"
        )
        for i, (name, _, base) in enumerate(cases):
            wall, cpu = min(walls[i]), min(cpus[i])
            print(
                f"{name:<36} {wall:7.3f} {wall / min(walls[base]):5.2f}x {cpu:7.3f} "
                f"{cpu / min(cpus[base]):5.2f}x {rss[i] / 1024:7.1f} MiB"
            )


if __name__ == "__main__":
    main()
