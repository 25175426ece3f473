"""The `collect sweep` and `collect stack` subcommands: argument parsing and output only.

Building the parser imports nothing of the fleet extra; each command checks for what it
needs when it runs and names the extra in one line if it is missing.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from collector.fleet import require

SWEEP_EPILOG = """\
output, under OUTDIR:
  ANALYSIS/NAME-HASH.parquet          one file per (image, analysis): the analysis' fields
                                      and, on every row, image, image_sha256, hostname,
                                      kernel_release, boot_id, captured_at, plugin, plugin_version
  errors/ANALYSIS/NAME-HASH.parquet   one row per pair that failed or stopped early: image,
                                      analysis, kind, exit_code, error (collect analyze's line)
  (NAME: the image's file name; HASH: a hash of its full path)
Running the same command again skips the pairs already written for the same image hash and
plugin version, and retries the failed ones; --force redoes every pair.

exit status: 0 every pair written or skipped whole, 1 some failed or stopped early (as
`collect analyze` would exit on them; see OUTDIR/errors), 2 usage.
Needs the fleet extra: pip install 'collector[fleet]'.
"""


def register(subparsers: Any) -> None:
    """Add the ``sweep`` and ``stack`` subcommands; each sets ``handler(args) -> int``."""
    sweep = subparsers.add_parser(
        "sweep",
        help="run analyses over many images on dask.distributed into a Parquet dataset",
        description="Run each analysis on each image as one task on dask.distributed: a"
        " local cluster of worker processes (one per core), or a running scheduler"
        " (--scheduler) whose workers see the images and OUTDIR at the same paths. Each task"
        " writes its own Parquet file.",
        epilog=SWEEP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE_OR_DIR",
        help="images, or directories searched for files that start like an image",
    )
    sweep.add_argument(
        "--analysis",
        required=True,
        metavar="NAME[,NAME...]",
        help="the analyses to run (see `collect plugins`)",
    )
    sweep.add_argument("-o", "--output", required=True, metavar="OUTDIR", help="dataset folder")
    sweep.add_argument(
        "--scheduler", metavar="tcp://HOST:PORT", help="a running dask scheduler to use"
    )
    sweep.add_argument(
        "--workers",
        type=_positive,
        metavar="N",
        help="worker processes of the local cluster (default: one per core)",
    )
    sweep.add_argument("--force", action="store_true", help="redo pairs already written")
    sweep.add_argument("--json", action="store_true", help="print a JSON summary")
    sweep.set_defaults(handler=run_sweep_command)

    stack = subparsers.add_parser(
        "stack",
        help="least frequency of occurrence: which values few hosts of a sweep share",
        description="For each distinct value of FIELD[,FIELD...] in a sweep's ANALYSIS"
        " results, on how many hosts it appears and which, rarest first (a query with"
        " DuckDB over OUTDIR/ANALYSIS/*.parquet). A host is its host name, or the image's"
        " path when the capture did not know the name.",
    )
    stack.add_argument("outdir", metavar="OUTDIR", help="a `collect sweep` output folder")
    stack.add_argument("analysis", metavar="ANALYSIS")
    stack.add_argument("fields", metavar="FIELD[,FIELD...]")
    stack.add_argument(
        "--max-hosts", type=_positive, metavar="N", help="only values seen on at most N hosts"
    )
    from collector.output import FORMATS

    stack.add_argument("--format", choices=FORMATS, default="table", help="(default: table)")
    stack.set_defaults(handler=run_stack_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    """``collect sweep``: 0 when every pair is written or skipped whole, 1 when some failed
    or stopped early."""
    if args.scheduler is not None and args.workers is not None:
        from collector.errors import UsageError

        raise UsageError("sweep: --workers sizes the local cluster; a --scheduler has its own")
    require("sweep")
    from collector.fleet.sweep import check_analyses, find_images, run_sweep, terminal

    analyses = check_analyses(_names(args.analysis))
    images = find_images(args.images)
    summary = run_sweep(
        images,
        analyses,
        args.output,
        scheduler=args.scheduler,
        workers=args.workers,
        force=args.force,
        progress=None if args.json else terminal(sys.stderr),
    )
    if args.json:
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(
            f"{summary.tasks} tasks ({summary.images} images x {len(analyses)} analyses) on"
            f" {summary.workers} workers in {summary.seconds:.1f} s: {summary.written} written,"
            f" {summary.skipped} skipped, {summary.failed} failed; {summary.records} rows"
            f" under {summary.outdir}"
        )
        from collector.text import escape_text

        for error in summary.errors:
            line = error["error"]
            # Opening failures already start with the path; analysis failures do not.
            if not line.startswith(error["image"]):
                line = f"{error['image']}: {line}"
            print(escape_text(f"  {line}"), file=sys.stderr)
    return 1 if summary.errors else 0


def run_stack_command(args: argparse.Namespace) -> int:
    """``collect stack OUTDIR ANALYSIS FIELD[,FIELD...]``."""
    require("stack")
    from collector.fleet.stack import stack
    from collector.output import write_records

    fields = _names(args.fields)
    records, shown, total = stack(args.outdir, args.analysis, fields, args.max_hosts)
    write_records(
        sys.stdout,
        records,
        shown,
        args.format,
        title=lambda count: (
            f"{args.analysis} {','.join(fields)}: {len(records)} values"
            f" over {total} hosts, rarest first"
        ),
    )
    return 0


def _names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        from collector.errors import UsageError

        raise UsageError(f"expected NAME[,NAME...], not {text!r}")
    return names


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"not a positive integer: {text!r}")
    return value
