"""Shared pytest configuration: the rule that CI really boots the real kernels.

Tests marked `vm` boot Debian kernels under QEMU. Where QEMU cannot run they skip with the
reason, except under CI=true, where a skipped `vm` test (or a skipped module holding one)
fails the run.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

_skipped_vm: list[str] = []


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("vm") and not hasattr(report, "wasxfail"):
        _skipped_vm.append(item.nodeid)
        if in_ci():
            reason = report.longrepr
            if isinstance(reason, tuple):
                reason = reason[2]
            report.outcome = "failed"
            report.longrepr = f"vm test skipped under CI=true: {reason}"


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped and "vm" in report.nodeid.split("/"):
        _skipped_vm.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    no_tests = pytest.ExitCode.NO_TESTS_COLLECTED
    if in_ci() and _skipped_vm and session.exitstatus in (pytest.ExitCode.OK, no_tests):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    for line in _binary_timings:
        terminalreporter.write_line(line)
    if in_ci() and _skipped_vm:
        terminalreporter.write_line(
            f"CI=true: {len(_skipped_vm)} vm test(s) or modules skipped; failing the run",
            red=True,
        )


# -- the standalone build ----------------------------------------------------------------------

_binary_timings: list[str] = []


@pytest.fixture(scope="session")
def standalone_binary() -> Path:
    """``dist/collect-x86_64``, built once per session by ``python -m tools.binary`` from this
    checkout (PyInstaller and staticx from PyPI). ``COLLECTOR_BINARY=PATH`` names one built
    already, for work on the tests themselves; CI always builds."""
    given = os.environ.get("COLLECTOR_BINARY")
    if given and not in_ci():
        return Path(given).resolve()
    repo = Path(__file__).resolve().parents[1]
    for tool in ("PyInstaller", "staticx"):
        if importlib.util.find_spec(tool) is None:
            message = f"{tool} is not installed (pip install -e '.[binary]')"
            if in_ci():
                pytest.fail(message, pytrace=False)
            pytest.skip(message)
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "tools.binary"],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    _binary_timings.append(f"python -m tools.binary: {time.monotonic() - started:.0f} s")
    return repo / "dist" / "collect-x86_64"
