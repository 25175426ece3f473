"""SIGINT and SIGTERM end a command at any point with one line and exit status 130 or 143.

Outside a capture's RAM loop a signal raises :class:`Interrupted` where the program is, so
planning, probing and exports stop at once and their ``finally`` blocks clean up. While an
image is being written, a signal only asks the loop to stop: the chunk under way is completed
and the image is closed properly. A second signal then ends the process at once.

In the standalone build (tools/binary.py) the program runs under two processes that each
pass SIGINT and SIGTERM on: the guardian (tools/guardian.c) and PyInstaller's launcher. A
signal sent to the process group (``kill -TERM -PGID``) reaches all three, and the relays add
their copies, so the Python process receives the same signal up to three times within
milliseconds (Ctrl-C on a terminal up to twice: the guardian does not relay what the terminal
sent to the whole group). There, copies of a signal that arrive within :data:`RELAY_WINDOW`
of the first count as that one signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator

EXIT_STATUS = {signal.SIGINT: 130, signal.SIGTERM: 143}
#: Seconds within which a repeated signal is taken for a launcher's copy of the first one.
RELAY_WINDOW = 1.0


class Interrupted(KeyboardInterrupt):
    """A command stopped by SIGINT or SIGTERM before it could finish.

    A ``KeyboardInterrupt``, so no ``except Exception`` on the way swallows it.

    :param signum: the signal received.
    :param detail: what became of the command's output, for the one line printed.
    """

    def __init__(self, signum: int, detail: str = "") -> None:
        super().__init__(signum)
        self.signum = signum
        self.detail = detail

    @property
    def exit_code(self) -> int:
        return EXIT_STATUS.get(signal.Signals(self.signum), 130)

    def __str__(self) -> str:
        text = f"interrupted by {signal.Signals(self.signum).name}"
        return f"{text}; {self.detail}" if self.detail else text


class StopRequest(threading.Event):
    """Set by a signal once a capture has started writing; ``reason`` says which signal."""

    reason = "interrupted"
    signum = 0


class Signals:
    """The state of the installed handler (see :func:`handled`).

    :param relayed: whether copies of a signal may arrive from launcher processes (the
        standalone build): then a repeat within :data:`RELAY_WINDOW` is ignored.
    """

    def __init__(self, relayed: bool = False) -> None:
        self.stop: StopRequest | None = None
        self.relayed = relayed
        self._last: tuple[int, float] | None = None

    def defer(self) -> StopRequest:
        """From now on a signal only sets the returned event (and a second signal ends the
        process at once)."""
        if self.stop is None:
            self.stop = StopRequest()
        return self.stop

    def handle(self, signum: int, _frame: object) -> None:
        now = time.monotonic()
        if self.relayed and self._last is not None:
            last_signum, last_time = self._last
            if last_signum == signum and now - last_time < RELAY_WINDOW:
                return
        self._last = (signum, now)
        stop = self.stop
        if stop is None:
            raise Interrupted(signum)
        if stop.is_set():
            # A second signal: end at once, as the default action would.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stop.signum = signum
        stop.reason = f"interrupted by {signal.Signals(signum).name}"
        stop.set()
        if not self.relayed:
            for s in EXIT_STATUS:
                signal.signal(s, signal.SIG_DFL)


@contextlib.contextmanager
def handled() -> Iterator[Signals]:
    """Handle SIGINT and SIGTERM for the body of the ``with`` block.

    Off the main thread (where Python cannot install handlers) nothing is installed, and
    :meth:`Signals.defer` still returns an event a caller may set.
    """
    # PyInstaller marks its frozen programs with sys.frozen; its launchers relay signals.
    state = Signals(relayed=bool(getattr(sys, "frozen", False)))
    if threading.current_thread() is not threading.main_thread():
        yield state
        return
    old = {s: signal.signal(s, state.handle) for s in EXIT_STATUS}
    try:
        yield state
    finally:
        for s, h in old.items():
            signal.signal(s, h)
