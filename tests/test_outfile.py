"""Output files of captures and exports: always a new 0600 file owned by the user running
collect, an old file replaced by rename and never written into, nothing through a symlink,
and no partial export left behind."""

from __future__ import annotations

import os
import signal
import stat
import subprocess

import pytest

from collector.acquire import session
from collector.cli import main
from collector.errors import ImageError
from collector.image import export
from collector.image.reader import NativeImage
from collector.signals import Interrupted
from tests.acquire.fakehost import FakeHost

OTHER_UID = 4321


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def strict(tmp_path):
    with FakeHost(tmp_path / "host", strict_devmem=True) as fake:
        yield fake


@pytest.fixture
def image(strict, tmp_path):
    path = tmp_path / "src.lime.zst"
    assert capture(strict, path) == 0
    return path


@pytest.fixture
def umask0():
    old = os.umask(0)
    yield
    os.umask(old)


def capture(fake: FakeHost, out, *extra: str) -> int:
    return main(["--profile", "x86_64", "--sysroot", str(fake.root), "-o", str(out), *extra])


def world_readable(path, data: bytes = b"old contents\n"):
    """A file another user owns, mode 0666, with a second hard link to it."""
    path.write_bytes(data)
    os.chmod(path, 0o666)
    if os.geteuid() == 0:
        os.chown(path, OTHER_UID, OTHER_UID)
    link = path.with_name(path.name + ".link")
    os.link(path, link)
    return os.stat(path), link


def assert_new_private_file(path, old: os.stat_result) -> None:
    st = os.stat(path)
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (st.st_uid, st.st_gid) == (os.geteuid(), os.getegid())
    assert st.st_ino != old.st_ino


def leftovers(directory) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".partial"))


def test_force_replaces_a_world_readable_file_with_a_new_private_one(
    strict, tmp_path, umask0, capsys
):
    out = tmp_path / "mem.lime.zst"
    old, link = world_readable(out)
    assert capture(strict, out, "--force") == 0
    assert_new_private_file(out, old)
    # The old file was replaced, not written into: its other name still holds it.
    assert link.read_bytes() == b"old contents\n"
    assert stat.S_IMODE(link.stat().st_mode) == 0o666
    with NativeImage(out) as img:
        assert img.verify().ok
    assert leftovers(tmp_path) == []
    # Without --force, and umask 0 notwithstanding, a new file is 0600 too.
    new = tmp_path / "new.lime.zst"
    assert capture(strict, new) == 0
    assert stat.S_IMODE(new.stat().st_mode) == 0o600


def test_force_replaces_only_regular_files(strict, tmp_path, capsys):
    directory = tmp_path / "dir.lime.zst"
    directory.mkdir()
    fifo = tmp_path / "fifo.lime.zst"
    os.mkfifo(fifo)
    for target in (directory, fifo):
        assert capture(strict, target, "--force") == 1
        assert one_line(capsys.readouterr().err) == (
            f"collect: {target} is not a regular file; --force replaces only regular files"
        )
    assert directory.is_dir() and stat.S_ISFIFO(fifo.lstat().st_mode)
    existing = tmp_path / "exists.lime.zst"
    existing.write_bytes(b"keep")
    assert capture(strict, existing) == 1
    assert one_line(capsys.readouterr().err) == (
        f"collect: {existing} already exists; use --force to replace it"
    )
    assert leftovers(tmp_path) == []


def test_a_forced_capture_cut_short_leaves_the_new_image_in_place(strict, tmp_path):
    out = tmp_path / "cut.lime.zst"
    assert capture(strict, out) == 0
    with NativeImage(out) as img:
        first = img.header.uuid
    options = session.CaptureOptions(
        profile="x86_64", output=str(out), sysroot=str(strict.root), chunk_size=1 << 20, force=True
    )

    def progress(p):
        if p.chunks == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    summary, status = session.run(options, progress)
    assert status == 143 and summary["clean"] is False
    # The name holds the capture that was stopped, never the older complete one.
    with NativeImage(out) as img:
        assert img.header.uuid != first
        assert img.end["stopped_by"] == "interrupted by SIGTERM"
        assert img.missing_ranges()
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert leftovers(tmp_path) == []


def test_export_force_replaces_by_rename(image, tmp_path, umask0, capsys):
    out = tmp_path / "out.lime"
    old, link = world_readable(out)
    assert main(["export", str(image), "--to", "lime", "-o", str(out), "--force"]) == 0
    assert_new_private_file(out, old)
    zstd = subprocess.run(["zstd", "-dc", str(image)], capture_output=True, check=True).stdout
    assert out.read_bytes() == zstd
    assert link.read_bytes() == b"old contents\n"
    assert leftovers(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    yield small
    subprocess.run(["umount", "-l", str(small)], check=False)


def test_a_failed_export_removes_its_partial_file_and_names_the_path(image, small_disk, capsys):
    out = small_disk / "out.lime"
    assert main(["export", str(image), "--to", "lime", "-o", str(out)]) == 1
    assert one_line(capsys.readouterr().err) == (
        # The tmpfs holds 2 MiB: the write that fills it is short, the next one fails there.
        f"collect: {out}: write failed at byte {2 << 20}: No space left on device; the partial "
        "file was removed"
    )
    assert list(small_disk.iterdir()) == []
    # With --force over an existing file, that file stays as it was.
    out.write_bytes(b"previous export\n")
    assert main(["export", str(image), "--to", "lime", "-o", str(out), "--force"]) == 1
    assert one_line(capsys.readouterr().err) == (
        # The old file keeps one 4 KiB page of the tmpfs.
        f"collect: {out}: write failed at byte {(2 << 20) - 4096}: No space left on device; "
        f"the partial file was removed and {out} left as it was"
    )
    assert list(small_disk.iterdir()) == [out] and out.read_bytes() == b"previous export\n"


def test_an_export_stopped_by_a_signal_or_a_damaged_image_leaves_nothing(
    image, tmp_path, monkeypatch, capsys
):
    real = export.export_lime
    out = tmp_path / "out.lime"

    def stopped(memory, f):
        f.write(b"some of it")
        raise Interrupted(signal.SIGTERM)

    monkeypatch.setattr(export, "export_lime", stopped)
    assert main(["export", str(image), "--to", "lime", "-o", str(out)]) == 143
    assert one_line(capsys.readouterr().err) == (
        "collect: interrupted by SIGTERM; the partial file was removed"
    )
    assert not out.exists() and leftovers(tmp_path) == []

    def damaged(memory, f):
        f.write(b"some of it")
        raise ImageError(f"{image}: chunk 3 at 0x100000: checksum mismatch")

    monkeypatch.setattr(export, "export_lime", damaged)
    assert main(["export", str(image), "--to", "lime", "-o", str(out)]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"collect: {image}: chunk 3 at 0x100000: checksum mismatch; the partial file was removed"
    )
    assert not out.exists() and leftovers(tmp_path) == []

    def raced(memory, f):
        out.write_bytes(b"someone else's\n")
        return real(memory, f)

    monkeypatch.setattr(export, "export_lime", raced)
    assert main(["export", str(image), "--to", "lime", "-o", str(out)]) == 1
    assert one_line(capsys.readouterr().err) == (
        f"collect: {out} appeared while it was being written; it was left as it was"
    )
    assert out.read_bytes() == b"someone else's\n" and leftovers(tmp_path) == []
