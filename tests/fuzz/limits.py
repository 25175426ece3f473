"""What every fuzz example is held to: a time limit, a memory bound and the example count."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
from collections.abc import Iterator

#: Examples per test; 0 keeps each test's fixed CI count (``python -m tests.fuzz`` sets it).
EXAMPLES = int(os.environ.get("COLLECTOR_FUZZ_EXAMPLES", "0"))
SECONDS = 10
MAX_MEMORY = 512 << 20


class Hang(BaseException):
    """Raised by the alarm: a command or analysis ran longer than SECONDS."""


#: The process's peak resident size before any example ran, in bytes.
_BASELINE = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10


@contextlib.contextmanager
def bounded(what: str) -> Iterator[None]:
    """Fail ``what`` if it runs longer than SECONDS, or if the process's peak resident size
    (which only grows) ever passes the baseline plus MAX_MEMORY."""

    def ring(*_: object) -> None:
        raise Hang(f"{what} ran longer than {SECONDS} s")

    old = signal.signal(signal.SIGALRM, ring)
    signal.alarm(SECONDS)
    try:
        yield
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss << 10
        assert peak - _BASELINE < MAX_MEMORY, f"{what}: peak RSS grew by {peak >> 20} MiB"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
