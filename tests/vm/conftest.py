"""Fixtures for the real-kernel tests: one QEMU guest per Debian kernel per test session.

Where QEMU or a kernel cannot be had the tests skip with the reason, except under CI=true,
where a skipped vm test fails the run: CI must really boot the kernels.
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from collector.image.open import open_image
from collector.kernel.kernel import Kernel
from tests.conftest import in_ci
from tools.vm.guest import Guest, VMUnavailable
from tools.vm.kernels import KERNEL_KEYS

GUEST_MEMORY_MIB = 384

_timings: list[str] = []


def vm_unavailable(reason: str) -> None:
    """Skip (or, under CI=true, fail) the current test because no guest can run."""
    if in_ci():
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


def session_guest(kernel: str, label: str = "", **options: object) -> Iterator[Guest]:
    """Boot a guest for a session fixture; on teardown close it and note how it was used."""
    vm = boot(kernel, **options)
    started = time.monotonic()
    try:
        yield vm
    finally:
        commands = vm.commands_started
        vm.close()
        _timings.append(
            f"{vm.kernel.version}{label}: {commands} commands in {time.monotonic() - started:.1f} s"
        )


@pytest.fixture(scope="session", params=KERNEL_KEYS, ids=[f"linux-{k}" for k in KERNEL_KEYS])
def guest(request: pytest.FixtureRequest) -> Iterator[Guest]:
    """A booted guest for one kernel, shared by every test of the session; two CPUs, so
    per-CPU data has more than one copy."""
    yield from session_guest(request.param, cpus=2)


@dataclass
class Capture:
    """One `collect --profile x86_64` run inside a guest, with what the guest and QEMU showed.

    ``facts`` holds the guest's own files copied right before the capture (iomem, kallsyms,
    BTF, vmcoreinfo location, uname, btime); ``qemu`` holds QEMU's pmemsave of the guest's
    "Kernel code" and "Kernel rodata" ranges, taken right after the capture.
    """

    guest: Guest
    image: Path
    summary: dict
    iomem: str
    facts: Path
    qemu: dict[str, tuple[int, int, bytes]]
    #: tests/vm/snapshot.py's view of /proc right before and right after the capture.
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    #: The PID of a process started for the tests (see :data:`WITNESS`), alive throughout.
    witness: int = 0

    def fact(self, name: str) -> bytes:
        return (self.facts / name).read_bytes()

    @property
    def collect_rss_anon(self) -> int:
        """The most resident anonymous memory collect had while capturing, in bytes."""
        kib = [int(line.split()[1]) for line in self.fact("collect-rss").decode().splitlines()]
        return max(kib, default=0) * 1024


def iomem_entries(text: str, name: str) -> list[tuple[int, int]]:
    """``[start, end)`` of every /proc/iomem line named ``name`` (any nesting)."""
    out = []
    for line in text.splitlines():
        span, _, what = line.strip().partition(" : ")
        if what == name:
            start, end = span.split("-")
            out.append((int(start, 16), int(end, 16) + 1))
    return out


#: A process the helpers' tests look for in the capture: two threads, a known command line
#: (with an argument holding a space), the host's Python as its executable.
WITNESS = (
    "import threading, time; "
    "threading.Thread(target=time.sleep, args=(86400,), daemon=True).start(); "
    "time.sleep(86400)"
)
WITNESS_ARGS = ("collector-witness", "two words", "")

#: A line written to /dev/kmsg right before each capture, at KERN_WARNING (4); /dev/kmsg
#: gives lines written there the user facility (1).
KMSG_MARKER = "collector-test: a line written to /dev/kmsg before the capture"
KMSG_LEVEL = 4


def start_witness(guest: Guest) -> int:
    """Start the :data:`WITNESS` process in the guest; its PID once its thread runs."""
    args = " ".join(shlex.quote(a) for a in WITNESS_ARGS)
    result = guest.run(
        f"python -c {shlex.quote(WITNESS)} {args} </dev/null >/dev/null 2>&1 & echo $!"
    ).check()
    pid = int(result.stdout.split()[0])
    for _ in range(100):
        if guest.run(f"ls /proc/{pid}/task | wc -l").stdout.strip() == "2":
            return pid
        time.sleep(0.1)
    raise AssertionError("the witness process did not start its thread")


def snapshot(guest: Guest, *pids: int) -> dict:
    """tests/vm/snapshot.py run in the guest: /proc's processes, modules and CPUs."""
    script = Path(__file__).with_name("snapshot.py")
    result = guest.run(f"python {script} {' '.join(map(str, pids))}").check()
    return json.loads(result.stdout)


def capture_guest(guest: Guest) -> Capture:
    """Capture ``guest`` with the automatic plan, as the ``capture`` fixture does."""
    out = guest.out_dir / "capture"
    out.mkdir(exist_ok=True)
    facts = guest.to_guest(out)
    witness = start_witness(guest)
    guest.run(
        f"cat /proc/iomem > {facts}/iomem && cat /proc/kallsyms > {facts}/kallsyms && "
        f"cat /sys/kernel/btf/vmlinux > {facts}/btf && cat /sys/kernel/vmcoreinfo > "
        f"{facts}/vmcoreinfo-location && uname -a > {facts}/uname-a && "
        f"uname -r > {facts}/uname-r && uname -n > {facts}/uname-n && "
        f"grep btime /proc/stat > {facts}/btime && "
        f"echo '<{KMSG_LEVEL}>{KMSG_MARKER}' > /dev/kmsg"
    ).check()
    before = snapshot(guest, witness)
    # While collect runs, its resident anonymous memory is sampled: the capture's own
    # allocations, which the page tests take out of the guest's free memory.
    sampler = Path(__file__).with_name("sample_rss.py")
    result = guest.run(
        f"collect --profile x86_64 -o {facts}/auto.lime.zst --json & pid=$!; "
        f"python {sampler} $pid {facts}/collect-rss; wait $pid",
        timeout=600,
    )
    after = snapshot(guest, witness)
    qemu = {}
    iomem = (out / "iomem").read_text()
    for name in ("Kernel code", "Kernel rodata"):
        (start, end), *_ = iomem_entries(iomem, name)
        dump = out / f"qemu-{name.replace(' ', '-').lower()}.bin"
        guest.qmp.pmemsave(start, end - start, str(dump))
        qemu[name] = (start, end, dump.read_bytes())
    result.check()
    return Capture(
        guest,
        out / "auto.lime.zst",
        json.loads(result.stdout),
        iomem,
        out,
        qemu,
        before=before,
        after=after,
        witness=witness,
    )


@pytest.fixture(scope="session")
def capture(guest: Guest) -> Capture:
    """The guest captured once per session with the automatic plan."""
    return capture_guest(guest)


_kernels: dict[Path, Kernel] = {}


def capture_kernel(capture: Capture) -> Kernel:
    """The kernel of a capture, opened once for the whole session and shared by every test
    module that reads it (an image is read-only; its Kernel only caches)."""
    if capture.image not in _kernels:
        _kernels[capture.image] = Kernel(open_image(capture.image))
    return _kernels[capture.image]


@pytest.fixture(scope="module")
def kernel(capture: Capture) -> Kernel:
    """The kernel of the shared capture."""
    return capture_kernel(capture)


@pytest.fixture(scope="module")
def la57_kernel(la57_capture: Capture) -> Kernel:
    """The kernel of the 5-level guest's shared capture."""
    return capture_kernel(la57_capture)


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


def pytest_terminal_summary(terminalreporter) -> None:
    if _timings:
        terminalreporter.section("vm guests")
        for line in _timings:
            terminalreporter.write_line(line)


# -- a 5-level-paging guest, shared by the tests that need one --------------------------------


@pytest.fixture(scope="session")
def la57_guest() -> Iterator[Guest]:
    """Debian 6.12 on a CPU with LA57, so the kernel runs 5-level paging; booted once."""
    from tools.vm.guest import DEFAULT_CPU

    yield from session_guest("6.12", " (la57)", cpu=DEFAULT_CPU + ",+la57")


@pytest.fixture(scope="session")
def la57_capture(la57_guest: Guest) -> Capture:
    """The 5-level guest captured once per session with the automatic plan."""
    return capture_guest(la57_guest)
