"""SIGINT and SIGTERM relayed by the standalone build's launchers count once.

Each case runs in a child interpreter, since it ends processes with signals; ``sys.frozen``
is what PyInstaller sets in the standalone build.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def child(source: str, frozen: bool) -> subprocess.CompletedProcess[str]:
    prelude = "import sys\n" + ("sys.frozen = True\n" if frozen else "")
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(source)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


DEFERRED = """
import os, signal, time
from collector import signals
with signals.handled() as state:
    stop = state.defer()
    for _ in range(3):  # the signal itself and the guardian's and the launcher's copies
        os.kill(os.getpid(), signal.SIGTERM)
    print("stopped once" if stop.is_set() and stop.signum == signal.SIGTERM else "not stopped")
    sys.stdout.flush()
    time.sleep(signals.RELAY_WINDOW + 0.2)
    os.kill(os.getpid(), signal.SIGTERM)  # a second signal, well after the first
    time.sleep(5)
    print("still alive")
"""


def test_copies_within_the_window_stop_a_capture_once_and_a_later_one_ends_it():
    result = child(DEFERRED, frozen=True)
    assert (result.returncode, result.stdout) == (-signal.SIGTERM, "stopped once\n")


def test_without_launchers_a_second_signal_ends_the_capture_at_once():
    result = child(DEFERRED, frozen=False)
    assert (result.returncode, result.stdout) == (-signal.SIGTERM, "")


@pytest.mark.parametrize("frozen", [True, False], ids=["standalone", "python"])
def test_copies_of_an_interrupting_signal_do_not_interrupt_the_cleanup(frozen):
    result = child(
        """
        import os, signal
        from collector import signals
        with signals.handled():
            try:
                os.kill(os.getpid(), signal.SIGINT)
            except signals.Interrupted as e:
                print(f"interrupted by {e.signum}")
                try:
                    os.kill(os.getpid(), signal.SIGINT)  # a copy, while cleaning up
                    print("cleanup finished")
                except signals.Interrupted:
                    print("cleanup interrupted")
        """,
        frozen=frozen,
    )
    expected = "cleanup finished" if frozen else "cleanup interrupted"
    assert (result.returncode, result.stdout) == (0, f"interrupted by 2\n{expected}\n")


RESTORE = """
import os, signal
from collector import cli
cli.restore_standalone_environment()
print(os.environ.get("TMPDIR", "<unset>"), "COLLECT_PRIVATE_DIR" in os.environ,
      "COLLECT_USER_TMPDIR" in os.environ,
      "interrupt_once" if signal.getsignal(signal.SIGINT) is cli.interrupt_once else "SIG_DFL")
"""


@pytest.mark.parametrize(
    ("env", "frozen", "expected"),
    [
        ({"COLLECT_USER_TMPDIR": "/srv/tmp"}, True, "/srv/tmp False False interrupt_once"),
        ({}, True, "<unset> False False interrupt_once"),
        # The Python build leaves all of it alone.
        ({"COLLECT_USER_TMPDIR": "/srv/tmp"}, False, "/private True True SIG_DFL"),
    ],
    ids=["standalone-caller-tmpdir", "standalone-no-tmpdir", "python-build-untouched"],
)
def test_the_standalone_build_gives_python_the_callers_tmpdir_and_sigint_handler(
    env, frozen, expected
):
    # As tools/guardian.c and tools/pyi_rth_collect.py leave the Python process.
    source = "import signal\nsignal.signal(signal.SIGINT, signal.SIG_DFL)\n" + RESTORE
    environ = {k: v for k, v in os.environ.items() if k not in ("TMPDIR", "COLLECT_USER_TMPDIR")}
    environ |= {"TMPDIR": "/private", "COLLECT_PRIVATE_DIR": "/private", **env}
    prelude = "import sys\n" + ("sys.frozen = True\n" if frozen else "")
    result = subprocess.run(
        [sys.executable, "-c", prelude + source],
        cwd=REPO,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, expected + "\n", "")


def test_outside_a_capture_the_standalone_build_takes_one_sigint_and_ignores_its_copies():
    result = child(
        """
        import os, signal
        from collector import cli
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # as the runtime hook leaves it
        cli.restore_standalone_environment()
        try:
            os.kill(os.getpid(), signal.SIGINT)
        except KeyboardInterrupt:
            os.kill(os.getpid(), signal.SIGINT)  # the launcher's copy, while reporting
            print("reported")
        """,
        frozen=True,
    )
    assert (result.returncode, result.stdout) == (0, "reported\n")
