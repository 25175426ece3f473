"""Fixtures for the real-kernel tests: one QEMU guest per Debian kernel per test session.

Where QEMU or a kernel cannot be had the tests skip with the reason, except under CI=true,
where a skipped vm test fails the run: CI must really boot the kernels.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator

import pytest

from tools.vm.guest import Guest, VMUnavailable
from tools.vm.kernels import KERNEL_KEYS

GUEST_MEMORY_MIB = 384

_skipped_vm: list[str] = []
_timings: list[str] = []


def _in_ci() -> bool:
    return os.environ.get("CI") == "true"


def vm_unavailable(reason: str) -> None:
    """Skip (or, under CI=true, fail) the current test because no guest can run."""
    if _in_ci():
        pytest.fail(f"vm test cannot run under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def boot(kernel: str, **options: object) -> Guest:
    """Boot a guest, or skip (fail under CI=true) when this machine cannot run one."""
    options.setdefault("memory_mib", GUEST_MEMORY_MIB)
    vm = Guest(kernel=kernel, **options)  # type: ignore[arg-type]
    try:
        vm.__enter__()
    except VMUnavailable as exc:
        vm_unavailable(str(exc))
    assert vm.kernel is not None
    _timings.append(f"{vm.kernel.version} ({vm.cpu}): booted in {vm.boot_seconds:.1f} s")
    return vm


@pytest.fixture(scope="session", params=KERNEL_KEYS, ids=[f"linux-{k}" for k in KERNEL_KEYS])
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    """A booted guest for one kernel, shared by every test of the session."""
    vm = boot(request.param)
    started = time.monotonic()
    try:
        yield vm
    finally:
        commands = vm.commands_started
        vm.close()
        _timings.append(
            f"{vm.kernel.version}: {commands} commands in {time.monotonic() - started:.1f} s"
        )


@pytest.fixture
def boot_guest() -> Iterator[Callable[..., Guest]]:
    """Boot extra guests with other options (``boot_guest("6.12", cpu=...)``) for one test."""
    booted: list[Guest] = []

    def start(kernel: str, **options: object) -> Guest:
        booted.append(boot(kernel, **options))
        return booted[-1]

    try:
        yield start
    finally:
        for vm in booted:
            vm.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("vm") and not hasattr(report, "wasxfail"):
        _skipped_vm.append(item.nodeid)
        if _in_ci():
            reason = report.longrepr
            if isinstance(reason, tuple):
                reason = reason[2]
            report.outcome = "failed"
            report.longrepr = f"vm test skipped under CI=true: {reason}"


def pytest_collectreport(report: pytest.CollectReport) -> None:
    if report.skipped:
        _skipped_vm.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    no_tests = pytest.ExitCode.NO_TESTS_COLLECTED
    if _in_ci() and _skipped_vm and session.exitstatus in (pytest.ExitCode.OK, no_tests):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter) -> None:
    if _timings:
        terminalreporter.section("vm guests")
        for line in _timings:
            terminalreporter.write_line(line)
    if _in_ci() and _skipped_vm:
        terminalreporter.write_line(
            f"CI=true: {len(_skipped_vm)} vm test(s) or modules skipped; failing the run",
            red=True,
        )
