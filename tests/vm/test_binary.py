"""The standalone build on real kernels, in a guest whose root filesystem is the busybox
initramfs alone: no Python, no C library, nothing of the host but the writable share.

``collect-x86_64 --profile x86_64 -o -`` streams the image into a file on the share; on the
host it must verify, hold the guest's System RAM as LiME ranges, and hold QEMU's own bytes of
the kernel's code; in the guest, the filesystem must hold nothing new afterwards.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from collector.image.reader import NativeImage
from tests.vm.conftest import Capture, iomem_entries, session_guest
from tests.vm.test_collect import (
    assert_kernel_bytes,
    host_collect,
    ram_ranges,
    verify,
    zstd_stream,
)
from tools.vm.guest import Guest
from tools.vm.kernels import KERNEL_KEYS

pytestmark = [pytest.mark.vm, pytest.mark.binary]

BINARY = "/bin/collect-x86_64"
# Everything on the initramfs root (the share, /proc, /sys and /dev are other mounts), /tmp
# included: where the binary unpacks.
LISTING = "find / -xdev | sort"


@pytest.fixture(scope="module", params=KERNEL_KEYS, ids=[f"linux-{k}" for k in KERNEL_KEYS])
def bare_guest(request: pytest.FixtureRequest, standalone_binary: Path) -> Iterator[Guest]:
    """A guest booted from the bare initramfs with the binary at /bin/collect-x86_64; one
    CPU, the bench's usual memory. Its root, and so /tmp where the binary unpacks, is the
    initramfs, which the kernel caps at half the RAM (146 MiB of 384 MiB)."""
    yield from session_guest(request.param, " (bare)", bare_files={BINARY: standalone_binary})


@dataclass
class BareCapture:
    capture: Capture
    before: list[str]
    after: list[str]
    stderr: str
    seconds: float


@pytest.fixture(scope="module")
def bare_capture(bare_guest: Guest) -> BareCapture:
    guest = bare_guest
    out = guest.out_dir / "bare"
    out.mkdir()
    inside = guest.to_guest(out)
    before = guest.run(LISTING).check().stdout.splitlines()
    guest.run(f"cat /proc/iomem > {inside}/iomem && cat /proc/kallsyms > {inside}/kallsyms").check()
    started = time.monotonic()
    result = guest.run(
        f"{BINARY} --profile x86_64 -o - --json > {inside}/image.lime.zst", timeout=900
    )
    seconds = time.monotonic() - started
    qemu = {}
    iomem = (out / "iomem").read_text()
    (start, end), *_ = iomem_entries(iomem, "Kernel code")
    dump = out / "qemu-kernel-code.bin"
    guest.qmp.pmemsave(start, end - start, str(dump))
    qemu["Kernel code"] = (start, end, dump.read_bytes())
    after = guest.run(LISTING).check().stdout.splitlines()
    assert result.returncode == 0, result.stderr
    capture = Capture(guest, out / "image.lime.zst", json.loads(result.stderr), iomem, out, qemu)
    return BareCapture(capture, before, after, result.stderr, seconds)


def test_the_guest_has_no_python_and_no_c_library(bare_guest: Guest) -> None:
    listing = bare_guest.run(LISTING).check().stdout.splitlines()
    assert BINARY in listing
    assert not [p for p in listing if "python" in p or "/libc" in p or "ld-linux" in p]
    assert bare_guest.run("test -e /host/usr || test -e /usr/bin").returncode == 1


def test_the_streamed_image_verifies_and_hashes_as_it_says(bare_capture: BareCapture) -> None:
    image = bare_capture.capture.image
    rc, report = verify(image)
    assert (rc, report["status"], report["errors"], report["missing"]) == (0, "intact", [], [])
    _, sha256, length = zstd_stream(image, parse_lime=False)
    assert sha256 == report["stream_sha256"] == bare_capture.capture.summary["stream_sha256"]
    assert length == report["stream_bytes"]


def test_lime_ranges_are_the_guests_system_ram(bare_capture: BareCapture) -> None:
    capture = bare_capture.capture
    lime, _, _ = zstd_stream(capture.image, parse_lime=True)
    assert lime == [(s, e - 1) for s, e in ram_ranges(capture.iomem)]
    with NativeImage(capture.image) as img:
        assert img.captured_ranges() == ram_ranges(capture.iomem)


def test_kernel_code_equals_qemus_physical_memory(bare_capture: BareCapture) -> None:
    capture = bare_capture.capture
    start, end, qemu = capture.qemu["Kernel code"]
    assert len(qemu) == end - start > 1 << 20
    with NativeImage(capture.image) as img:
        assert assert_kernel_bytes(img, capture, "Kernel code") == end - start


def test_the_guest_filesystem_holds_nothing_new(bare_capture: BareCapture) -> None:
    # The image went to the share, which is another mount; the unpacked runtime is gone.
    assert bare_capture.after == bare_capture.before
    unpacked = ("collect-", "staticx-", "_MEI")
    assert not [p for p in bare_capture.after if p != BINARY and any(u in p for u in unpacked)]


def test_the_binary_analyses_the_image_as_the_python_build_does(
    bare_capture: BareCapture, standalone_binary: Path
) -> None:
    image = str(bare_capture.capture.image)
    for plugin in ("sysinfo", "pslist"):
        got = subprocess.run(
            [str(standalone_binary), "analyze", image, plugin, "--format", "json"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        want = host_collect("analyze", image, plugin, "--format", "json")
        assert (got.returncode, got.stdout) == (want.returncode, want.stdout) == (0, want.stdout)
    records = json.loads(want.stdout)
    assert any(r.get("comm") == "init" for r in records)


def test_sigterm_closes_the_image_and_leaves_nothing(
    bare_guest: Guest, bare_capture: BareCapture
) -> None:
    guest = bare_guest
    out = guest.out_dir / "sigterm"
    out.mkdir()
    inside = guest.to_guest(out)
    image = out / "image.lime.zst"
    job = guest.run_background(
        f"{BINARY} --profile x86_64 -o - --json > {inside}/image.lime.zst & "
        f"echo $! > {inside}/pid; wait $!"
    )
    deadline = time.monotonic() + 300
    while not image.exists() or image.stat().st_size < 4 << 20:
        assert job.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    pid = (out / "pid").read_text().strip()
    guest.run(f"kill -TERM {pid}").check()
    result = job.wait(300)
    assert result.returncode == 143, result.stderr
    # With -o - the summary goes to stderr.
    summary = json.loads(result.stderr[result.stderr.index("{") : result.stderr.rindex("}") + 1])
    assert summary["stopped_by"] == "interrupted by SIGTERM"
    rc, report = verify(image)
    assert (rc, report["errors"], report["ram_errors"]) == (
        {"intact": 0, "incomplete": 3}[report["status"]],
        [],
        [],
    )
    with NativeImage(image) as img:
        assert img.end is not None and img.end["clean"] is False
    assert guest.run(LISTING).check().stdout.splitlines() == bare_capture.before
