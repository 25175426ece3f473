"""The long fuzz run: ``python -m tests.fuzz --examples 50000 [pytest options]``.

Runs tests/fuzz with that many examples per input kind, each run freshly randomized (CI's
short run replays the same examples every time).
"""

from __future__ import annotations

import argparse
import os
import sys

import pytest


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzz", description=__doc__)
    ap.add_argument("--examples", type=int, default=50_000, help="examples per input kind")
    args, rest = ap.parse_known_args()
    os.environ["COLLECTOR_FUZZ_EXAMPLES"] = str(args.examples)
    here = os.path.dirname(os.path.abspath(__file__))
    return pytest.main([here, "-q", "-p", "no:cacheprovider", *rest])


if __name__ == "__main__":
    sys.exit(main())
