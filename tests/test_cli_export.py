"""`collect export` end to end on a fake host's capture: a write that fails at any point (a
file size limit, a full disk, a closed pipe) ends in one line naming the output and where it
stopped, exit status 1 and no file left behind; and what an export writes reads back, page
for page, as the image holds it."""

from __future__ import annotations

import errno
import os
import re
import resource
import subprocess
import sys

import pytest

from collector.cli import main
from collector.image.elfcore import ElfCore
from collector.image.lime import LimeImage
from collector.image.reader import NativeImage
from collector.memory import Fate, PageNotCaptured
from tests.acquire.fakehost import FakeHost
from tests.test_cli import PAGE, capture, one_line


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A native image of the strict fake host (one kernel-zero page below 1 MiB)."""
    tmp = tmp_path_factory.mktemp("export")
    with FakeHost(tmp / "host", strict_devmem=True) as fake:
        path = tmp / "src.lime.zst"
        assert capture(fake, path) == 0
        yield path


def collect(*args: str, limit: int | None = None, **kw) -> subprocess.CompletedProcess:
    """`python -m collector ARGS` in a child, under ``ulimit -f`` when ``limit`` is given."""

    def preexec() -> None:
        if limit is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = dict(os.environ, PYTHONPATH=os.getcwd())
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        preexec_fn=preexec,
        env=env,
        timeout=120,
        **{"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **kw},
    )


#: The fake host's highest RAM range: a raw export is a 4 GiB sparse file ending there.
HIGH = 0x100000000


def last_byte_written(image, fmt: str, tmp_path) -> int:
    """The size of a whole export; for a raw file (whose zeros are holes, never written),
    the end of its last non-zero byte."""
    out = tmp_path / f"whole.{fmt}"
    assert main(["export", str(image), "--to", fmt, "-o", str(out)]) == 0
    if fmt != "raw":
        return out.stat().st_size
    with open(out, "rb") as f:
        f.seek(HIGH)
        return HIGH + len(f.read().rstrip(b"\0"))


@pytest.mark.parametrize("fmt", ["lime", "raw", "elf"])
def test_a_file_size_limit_is_an_error_never_a_short_file(image, fmt, tmp_path):
    # 7 bytes short of the last byte written: the last write is cut short without an error
    # (Python ignores SIGXFSZ); the export writes the rest again and gets EFBIG. Before,
    # this LiME export was reported written, 7 bytes short.
    limit = last_byte_written(image, fmt, tmp_path) - 7
    out = tmp_path / f"cut.{fmt}"
    proc = collect("export", str(image), "--to", fmt, "-o", str(out), limit=limit)
    assert proc.returncode == 1
    assert proc.stdout == b""
    assert one_line(proc.stderr.decode()) == (
        f"collect: {out}: write failed at byte {limit}: File too large; "
        "the partial file was removed"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"whole.{fmt}"]


def test_a_failed_export_leaves_the_file_it_was_to_replace(image, tmp_path):
    out = tmp_path / "old.lime"
    out.write_bytes(b"old")
    proc = collect("export", str(image), "--to", "lime", "-o", str(out), "--force", limit=100)
    assert proc.returncode == 1
    assert one_line(proc.stderr.decode()) == (
        f"collect: {out}: write failed at byte 100: File too large; the partial file was "
        f"removed and {out} left as it was"
    )
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["old.lime"]


@pytest.mark.parametrize("fmt", ["lime", "raw", "elf"])
def test_a_full_disk_is_an_error(image, fmt, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = small / f"full.{fmt}"
        proc = collect("export", str(image), "--to", fmt, "-o", str(out))
        assert proc.returncode == 1 and proc.stdout == b""
        line = one_line(proc.stderr.decode())
        m = re.fullmatch(
            rf"collect: {re.escape(str(out))}: write failed at byte (\d+): No space left on "
            r"device; the partial file was removed",
            line,
        )
        assert m, line
        # The disk holds 1 MiB: the export stopped there, or (raw, whose holes cost nothing)
        # where its data outgrew the blocks left.
        assert int(m.group(1)) <= (1 << 20) if fmt != "raw" else int(m.group(1)) >= 1 << 20
        assert list(small.iterdir()) == []
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


@pytest.mark.parametrize("fmt", ["lime", "elf"])
def test_a_closed_pipe_is_an_error(image, fmt):
    proc = subprocess.Popen(
        [sys.executable, "-m", "collector", "export", str(image), "--to", fmt, "-o", "-"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=dict(os.environ, PYTHONPATH=os.getcwd()),
    )
    assert proc.stdout is not None and proc.stderr is not None
    head = proc.stdout.read(100)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1
    assert len(head) == 100
    assert re.fullmatch(
        r"collect: standard output: write failed at byte \d+: Broken pipe", one_line(err)
    ), err


def test_full_dev_full_is_an_error(image):
    with open("/dev/full", "wb") as full:
        proc = collect("export", str(image), "--to", "lime", "-o", "-", stdout=full)
    assert proc.returncode == 1
    assert one_line(proc.stderr.decode()) == (
        "collect: standard output: write failed at byte 0: No space left on device"
    )


def pages(memory, start: int, end: int):
    for page in range(start - start % PAGE, end, PAGE):
        lo, hi = max(page, start), min(page + PAGE, end)
        yield lo, hi


@pytest.mark.parametrize("fmt", ["lime", "elf"])
def test_round_trip_gives_every_captured_page_back(image, fmt, tmp_path):
    out = tmp_path / f"rt.{fmt}"
    assert main(["export", str(image), "--to", fmt, "-o", str(out)]) == 0
    with NativeImage(image) as src:
        back = LimeImage(out) if fmt == "lime" else ElfCore(out)
        try:
            assert back.problems == []
            assert back.ranges() == src.ranges()
            not_read = 0
            for start, end in src.ranges():
                for lo, hi in pages(src, start, end):
                    fate = src.fate(lo)
                    if fate.fate == Fate.READ:
                        assert back.read(lo, hi - lo) == src.read(lo, hi - lo), hex(lo)
                        continue
                    not_read += 1
                    if fmt == "lime":  # LiME cannot say so: the page is zeros
                        assert back.read(lo, hi - lo) == bytes(hi - lo)
                    else:  # the ELF export's page-fates note says so
                        assert back.fate(lo) == fate
                        with pytest.raises(PageNotCaptured):
                            back.read(lo, hi - lo)
            assert not_read == 1  # the kernel-zero page at 0x9f000
            if fmt == "elf":
                assert back.blob("vmcoreinfo") == src.blob("vmcoreinfo")
                assert back.blob("btf") == src.blob("btf")
                assert back.blob("kallsyms") == src.blob("kallsyms")
        finally:
            back.close()


def test_errno_names_are_the_systems():
    # The lines above spell the reasons as strerror() does here.
    assert os.strerror(errno.EFBIG) == "File too large"
    assert os.strerror(errno.ENOSPC) == "No space left on device"


def test_an_isf_export_checks_its_write_too(tmp_path, monkeypatch, capsys):
    from tests.interop.test_isf import synthetic

    sk = synthetic()
    monkeypatch.setattr("collector.image.open.open_image", lambda path, *_: sk.memory())
    out = tmp_path / "k.json"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # In this process: Python ignores SIGXFSZ, so the table's one large write comes back
    # short at the limit and the rest fails with EFBIG.
    resource.setrlimit(resource.RLIMIT_FSIZE, (5000, hard))
    try:
        status = main(["export", "image", "--to", "isf", "-o", str(out)])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert status == 1
    assert one_line(capsys.readouterr().err) == (
        f"collect: {out}: write failed at byte 5000: File too large; the partial file was removed"
    )
    assert list(tmp_path.iterdir()) == []
