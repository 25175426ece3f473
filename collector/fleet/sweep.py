"""`collect sweep`: every (image, analysis) pair as one task on dask.distributed, each task
writing its own Parquet file (:mod:`collector.fleet.task`); progress and a summary here.

By default a local cluster of worker processes (one per core) is started and stopped with
the sweep; ``scheduler`` names a running one instead, whose workers must see the images and
OUTDIR at the same paths.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from collector.errors import CollectorError, UsageError
from collector.fleet import provenance, task


@dataclass
class SweepSummary:
    """What a sweep did: counts of pairs by outcome, and the failed pairs' errors."""

    outdir: str
    images: int
    analyses: list[str]
    tasks: int = 0
    written: int = 0
    skipped: int = 0
    failed: int = 0
    records: int = 0
    seconds: float = 0.0
    workers: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "outdir": self.outdir,
            "images": self.images,
            "analyses": self.analyses,
            "tasks": self.tasks,
            "written": self.written,
            "skipped": self.skipped,
            "failed": self.failed,
            "records": self.records,
            "seconds": round(self.seconds, 3),
            "workers": self.workers,
            "errors": self.errors,
        }


def find_images(arguments: Sequence[str]) -> list[str]:
    """The images to sweep, as absolute paths in a stable order.

    A file named is always swept (if it is no image, the errors table says so); a directory
    contributes the files under it, at any depth, that start with a known image format's
    magic, so the notes and sidecar files kept beside captures are passed over.

    :raises UsageError: an argument that does not exist.
    """
    from collector.image.open import SNIFF_BYTES, sniff

    found: list[str] = []
    for argument in arguments:
        path = Path(argument)
        if path.is_dir():
            for root, dirs, files in os.walk(path, followlinks=True):
                dirs.sort()
                for name in sorted(files):
                    candidate = os.path.join(root, name)
                    try:
                        with open(candidate, "rb") as f:
                            head = f.read(SNIFF_BYTES)
                    except OSError:
                        continue
                    if sniff(head) is not None:
                        found.append(provenance.absolute(candidate))
        elif path.exists() or path.is_symlink():
            found.append(provenance.absolute(argument))
        else:
            raise UsageError(f"sweep: {argument}: no such file or directory")
    return list(dict.fromkeys(found))


def check_analyses(names: Iterable[str]) -> list[str]:
    """The analyses, checked against the loaded plugins before any task starts.

    :raises CollectorError: an unknown analysis (the plugin manager's one line), or one named
        like the errors table.
    """
    pm = task.manager()
    out = []
    for name in names:
        if name == task.ERRORS:
            raise UsageError(f"sweep: an analysis named {name!r} would share the errors table")
        pm.analysis(name)
        if name not in out:
            out.append(name)
    return out


def run_sweep(
    images: Sequence[str],
    analyses: Sequence[str],
    outdir: str,
    *,
    scheduler: str | None = None,
    workers: int | None = None,
    force: bool = False,
    client: Any = None,
    progress: TextIO | None = None,
) -> SweepSummary:
    """Sweep ``analyses`` over ``images`` into ``outdir``.

    :param scheduler: a running scheduler's address (``tcp://HOST:PORT``); None starts a
        local cluster of ``workers`` processes (default: one per core).
    :param client: an already connected :class:`distributed.Client` (tests, notebooks).
    :param progress: a terminal to draw the progress line on (None: quiet).
    """
    from distributed import Client, LocalCluster

    outdir = provenance.absolute(outdir)
    Path(outdir).mkdir(parents=True, exist_ok=True)
    summary = SweepSummary(outdir, len(images), list(analyses))
    started = time.monotonic()
    cluster = None
    own_client = client is None
    if client is None:
        if scheduler is not None:
            try:
                client = Client(scheduler, timeout="10s")
            except OSError as e:
                raise CollectorError(f"sweep: cannot reach scheduler {scheduler}: {e}") from None
        else:
            cluster = LocalCluster(
                n_workers=workers or os.cpu_count() or 1,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.CRITICAL,
            )
            client = Client(cluster)
    try:
        summary.workers = len(client.scheduler_info(n_workers=-1).get("workers", {}))
        _run(client, images, analyses, outdir, force, summary, started, progress)
    finally:
        if own_client:
            client.close()
        if cluster is not None:
            cluster.close()
    summary.seconds = time.monotonic() - started
    return summary


def _run(
    client: Any,
    images: Sequence[str],
    analyses: Sequence[str],
    outdir: str,
    force: bool,
    summary: SweepSummary,
    started: float,
    progress: TextIO | None,
) -> None:
    from distributed import as_completed

    pairs = {}
    futures = []
    for image in images:
        for analysis in analyses:
            future = client.submit(
                task.run_pair,
                image,
                analysis,
                outdir,
                force,
                key=f"sweep-{analysis}-{task.stem(image)}",
                pure=False,
            )
            pairs[future.key] = (image, analysis)
            futures.append(future)
    summary.tasks = len(pairs)
    bar = Progress(summary.tasks, progress, started)
    for future in as_completed(futures):
        image, analysis = pairs[future.key]
        try:
            result = future.result()
        except Exception as e:
            # The worker died under the task more often than the scheduler allows
            # (distributed's KilledWorker), or the cluster went away: nothing was written.
            message = f"{type(e).__name__}: {e}".splitlines()[0]
            task.write_lost(outdir, image, analysis, message)
            result = {"status": task.FAILED, "records": 0, "error": message}
        status = result["status"]
        if status == task.WRITTEN:
            summary.written += 1
        elif status == task.SKIPPED:
            summary.skipped += 1
        else:
            summary.failed += 1
        summary.records += result["records"] or 0
        if result.get("error"):
            summary.errors.append({"image": image, "analysis": analysis, "error": result["error"]})
        bar.update(summary.written + summary.skipped + summary.failed, summary.failed)
        future.release()
    bar.close()
    # A task killed mid-write leaves its temporary file; every pair is finished now, so
    # any such file beside this sweep's outputs is a leftover.
    for image, analysis in pairs.values():
        for final in (task.output_path(outdir, analysis, image),
                      task.error_path(outdir, analysis, image)):  # fmt: skip
            for leftover in final.parent.glob(final.name + ".tmp-*"):
                leftover.unlink(missing_ok=True)


class Progress:
    """One line redrawn on a terminal: tasks done of all, failed, rate and time left."""

    def __init__(self, total: int, stream: TextIO | None, started: float) -> None:
        self.total = total
        self.stream = stream
        self.started = started
        self.last = 0.0
        self.update(0, 0)

    def update(self, done: int, failed: int) -> None:
        if self.stream is None:
            return
        now = time.monotonic()
        if done < self.total and now - self.last < 0.2:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-6)
        rate = done / elapsed
        eta = "--:--" if done == 0 else _clock((self.total - done) / rate)
        width = 24
        filled = width * done // max(self.total, 1)
        bar = "#" * filled + "." * (width - filled)
        self.stream.write(
            f"\rsweep [{bar}] {done}/{self.total} tasks, {failed} failed,"
            f" {rate * 60:.1f}/min, ETA {eta} "
        )
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "--:--"
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    text = f"{rest // 60:02d}:{rest % 60:02d}"
    return f"{hours}:{text}" if hours else text


def terminal(stream: TextIO = sys.stderr) -> TextIO | None:
    """``stream`` when it is a terminal, where a progress line belongs; else None."""
    try:
        return stream if stream.isatty() else None
    except (AttributeError, ValueError):
        return None
