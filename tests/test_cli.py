"""`collect` end to end on fake hosts: the image holds the fake's own bytes, every page's fate
is right, and every fault a user can meet ends in one clear line and the right exit status."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys

import pytest

from collector import cli
from collector.acquire import session
from collector.cli import main
from collector.image.lime import iter_lime_ranges
from collector.image.reader import NativeImage
from collector.memory import Fate
from tests.acquire.fakehost import IOMEM_GUEST, FakeHost

PAGE = 4096
TAIL = 0x9F000  # the sub-page tail of 0x1000-0x9fbff that kcore does not map


def capture(fake: FakeHost, out, *extra: str) -> int:
    return main(["--profile", "x86_64", "--sysroot", str(fake.root), "-o", str(out), *extra])


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def strict(tmp_path):
    with FakeHost(tmp_path / "host", strict_devmem=True) as fake:
        yield fake


def test_automatic_capture_holds_the_fakes_bytes(strict, tmp_path, capsys):
    out = tmp_path / "auto.lime.zst"
    assert capture(strict, out, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    with NativeImage(out) as img:
        assert img.ranges() == strict.ram_ranges
        for start, end in strict.ram_ranges:
            stop = TAIL if start == 0x1000 else end
            assert img.read(start, stop - start) == strict.ram_bytes(start, stop)
        assert img.fate(TAIL).fate == Fate.KERNEL_ZERO
        assert img.blob("btf") == (strict.root / "sys/kernel/btf/vmlinux").read_bytes()
        assert img.blob("kallsyms") == (strict.root / "proc/kallsyms").read_bytes()
        assert img.blob("vmcoreinfo").decode() == strict.vmcoreinfo
        assert img.metadata["iomem"] == IOMEM_GUEST
        entries = img.metadata["plan"]["entries"]
        assert [e["source"] for e in entries] == [
            "/proc/kcore",
            "/dev/mem",
            "/proc/kcore",
            "/proc/kcore",
        ]
        assert "EPERM" in entries[2]["reason"]
    pages = sum((e - s + PAGE - 1) // PAGE for s, e in strict.ram_ranges)
    assert summary["pages"]["read"] == pages - 1 and summary["pages"]["kernel-zero"] == 1
    lime = subprocess.run(["zstd", "-dc", str(out)], capture_output=True, check=True).stdout
    assert hashlib.sha256(lime).hexdigest() == summary["stream_sha256"]


def test_forced_dev_mem_records_eperm_and_fabricated_zeros(strict, tmp_path):
    out = tmp_path / "mem.lime.zst"
    assert capture(strict, out, "--source", "/dev/mem") == 0
    with NativeImage(out) as img:
        assert img.fate(0x100000) == img.fate(0x100000000)
        assert (img.fate(0x100000).fate, img.fate(0x100000).errno) == (Fate.UNREADABLE, errno.EPERM)
        assert img.fate(0x1000).fate == Fate.KERNEL_ZERO
        high = sum((e - s) // PAGE for s, e in strict.ram_ranges if s >= 0x100000)
        assert img.end["pages"]["unreadable"] == high
        assert img.end["unreadable_errnos"] == {str(errno.EPERM): high}
        assert img.end["clean"] is True


def test_failing_pages_cost_one_page_each(tmp_path):
    bad = {0x200000: errno.EIO, 0x201000: errno.EFAULT}
    with FakeHost(tmp_path / "host", strict_devmem=False, bad_pages=bad, kcore=False) as fake:
        out = tmp_path / "bad.lime.zst"
        assert capture(fake, out) == 0
        with NativeImage(out) as img:
            assert {p: img.fate(p).errno for p in bad} == bad
            assert img.read(0x100000, 0x100000) == fake.ram_bytes(0x100000, 0x200000)
            assert img.read(0x202000, 0x3FE000) == fake.ram_bytes(0x202000, 0x600000)
            assert img.end["pages"]["unreadable"] == 2


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_chunk_and_closes_the_image(strict, tmp_path, signum, status):
    out = tmp_path / "sig.lime.zst"
    options = session.CaptureOptions(
        profile="x86_64", output=str(out), sysroot=str(strict.root), chunk_size=1 << 20
    )
    sent = []

    def progress(p):
        if p.chunks == 2 and not sent:
            sent.append(os.kill(os.getpid(), signum))

    summary, code = session.run(options, progress)
    assert code == status and summary["clean"] is False
    assert summary["stopped_by"] == f"interrupted by {signal.Signals(signum).name}"
    with NativeImage(out) as img:
        assert img.indexed and img.verify().ok
        # Two chunks read, then the open range 0x100000-0x5fffff finished with padding.
        assert [c.paddr for c in img.chunks] == [0x1000, *range(0x100000, 0x600000, 1 << 20)]
        assert img.missing_ranges() == [(0x200000, 0x600000), (0x100000000, 0x100200000)]
        assert img.fate(0x200000).fate == Fate.MISSING and img.fate(0x5FF000).fate == Fate.MISSING
        assert img.read(0x100000, 0x100000) == strict.ram_bytes(0x100000, 0x200000)
        assert img.end["pages"]["missing"] == 0x400
    # `zstd -dc` stays a valid LiME file: the started ranges are whole, the last one absent.
    lime = subprocess.run(["zstd", "-dc", str(out)], capture_output=True, check=True).stdout
    ranges = [(r.start, r.end) for r in iter_lime_ranges(io.BytesIO(lime))]
    assert ranges == [(0x1000, 0x9FBFF), (0x100000, 0x5FFFFF)]


def test_existing_output_and_planted_symlink_are_refused(strict, tmp_path, capsys):
    existing = tmp_path / "exists.lime.zst"
    existing.write_bytes(b"keep")
    assert capture(strict, existing) == 1
    assert "already exists; use --force" in one_line(capsys.readouterr().err)
    assert existing.read_bytes() == b"keep"
    target = tmp_path / "target"
    target.write_bytes(b"precious")
    link = tmp_path / "link.lime.zst"
    link.symlink_to(target)
    for extra in ((), ("--force",)):
        assert capture(strict, link, *extra) == 1
        assert "symbolic link" in one_line(capsys.readouterr().err)
    assert target.read_bytes() == b"precious"
    assert capture(strict, existing, "--force") == 0
    assert NativeImage(existing).verify().ok


def test_stdout_output(strict, tmp_path):
    out = tmp_path / "piped.lime.zst"
    with open(out, "wb") as f:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "collector",
                "--profile",
                "x86_64",
                "--sysroot",
                str(strict.root),
                "-o",
                "-",
            ],
            stdout=f,
            stderr=subprocess.PIPE,
            timeout=120,
        )
    assert proc.returncode == 0, proc.stderr
    with NativeImage(out) as img:
        assert img.verify().ok and img.ranges() == strict.ram_ranges
        assert img.read(0x100000, 0x500000) == strict.ram_bytes(0x100000, 0x600000)


def test_not_root(monkeypatch, capsys):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert main(["--profile", "x86_64", "-o", "/nonexistent/x"]) == 1
    assert "root" in one_line(capsys.readouterr().err)


def test_lockdown_confidentiality_leaves_no_source(tmp_path, capsys):
    with FakeHost(tmp_path / "host", lockdown="confidentiality") as fake:
        assert capture(fake, tmp_path / "x.lime.zst") == 1
    line = one_line(capsys.readouterr().err)
    assert line.startswith("collect: no readable source:") and "lockdown" in line
    assert not (tmp_path / "x.lime.zst").exists()


def test_unprivileged_iomem(tmp_path, capsys):
    zeroed = "\n".join(
        "00000000-00000000 : " + line.split(" : ", 1)[1] for line in IOMEM_GUEST.splitlines()
    )
    with FakeHost(tmp_path / "host") as fake:
        (fake.root / "proc/iomem").write_text(zeroed + "\n")
        assert capture(fake, tmp_path / "x.lime.zst") == 1
    assert "root" in one_line(capsys.readouterr().err)


def test_profile_is_checked_against_the_machine(strict, tmp_path, capsys):
    (strict.root / "proc/sys/kernel/arch").write_text("aarch64\n")
    assert capture(strict, tmp_path / "x.lime.zst") == 1
    assert "aarch64" in one_line(capsys.readouterr().err)
    assert main(["--profile", "sparc", "--sysroot", str(strict.root)]) != 0
    assert "sparc" in one_line(capsys.readouterr().err)


def test_dry_run_reads_only_probe_pages(strict, tmp_path, capsys):
    strict.clear_reads()
    assert main(["--profile", "x86_64", "--sysroot", str(strict.root), "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["entries"][0]["source"] == "/proc/kcore"
    assert strict.bytes_read() <= 4 * PAGE * len(strict.ram_ranges) * 2
    assert not list(tmp_path.glob("*.lime.zst"))


def test_full_disk_keeps_a_valid_truncated_image(strict, tmp_path, capsys):
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(small)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        out = small / "full.lime.zst"
        assert capture(strict, out, "--chunk-size", "1M", "--level", "1") == 1
        line = one_line(capsys.readouterr().err)
        assert "No space left on device" in line and "valid up to its last complete chunk" in line
        with NativeImage(out) as img:
            report = img.verify()
            assert report.ok and not report.complete and report.missing
            high = [c for c in img.chunks if c.paddr >= 0x100000]
            assert high, "at least one chunk of RAM above 1 MiB fits before the disk fills"
            for c in high:
                assert img.read(c.paddr, c.ram_bytes) == strict.ram_bytes(c.paddr, c.end)
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def test_profiles_and_help(capsys):
    assert main(["profiles"]) == 0
    assert "x86_64" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "collect plan" in capsys.readouterr().out


def test_default_output_name(strict):
    name = session.default_output_name(strict.sysroot)
    host = (strict.root / "proc/sys/kernel/hostname").read_text().strip()
    assert re.fullmatch(re.escape(host) + r"-\d{8}T\d{6}Z\.lime\.zst", name), name


def test_excluded_ranges_are_recorded_and_never_read(strict, tmp_path):
    out = tmp_path / "ex.lime.zst"
    strict.clear_reads()
    assert (
        capture(strict, out, "--exclude", "0x200000+1M", "--exclude", "0x100000000-0x100000fff")
        == 0
    )
    excluded = [(0x200000, 0x300000), (0x100000000, 0x100001000)]
    for read in strict.reads:
        for s, e in read.spans:
            assert all(e <= xs or s >= xe for xs, xe in excluded), (read, excluded)
    with NativeImage(out) as img:
        assert img.ranges() == strict.ram_ranges  # the LiME ranges do not shrink
        for xs, xe in excluded:
            assert {img.fate(p).fate for p in range(xs, xe, PAGE)} == {Fate.EXCLUDED}
        assert img.end["pages"]["excluded"] == 256 + 1
        assert img.read(0x300000, 0x100000) == strict.ram_bytes(0x300000, 0x400000)


def test_progress_bar_shows_bytes_rate_eta_and_unreadable_pages():
    from collector.acquire.capture import Progress
    from collector.cli import ProgressBar

    stream = io.StringIO()
    bar = ProgressBar(stream)
    bar.t0 -= 2.0  # two seconds in
    bar(Progress(total_bytes=8 << 20, done_bytes=4 << 20, unreadable_pages=3, chunks=1))
    line = stream.getvalue()
    assert line.startswith("\r 50.0% 4.0 MiB/8.0 MiB ")
    assert "unreadable pages 3" in line
    rate, eta = line.split(" MiB/8.0 MiB ")[1].split("/s ETA ")
    assert 1.9 <= float(rate.split()[0]) <= 2.1 and rate.endswith("MiB")
    assert 1 <= int(eta.split("s")[0]) <= 3


def test_no_progress_bar_when_stderr_is_not_a_terminal(strict, tmp_path, capsys):
    assert capture(strict, tmp_path / "quiet.lime.zst") == 0
    assert capsys.readouterr().err == ""


def test_export_lime_raw_and_elf(strict, tmp_path, capsys):
    image = tmp_path / "src.lime.zst"
    assert capture(strict, image) == 0
    capsys.readouterr()
    lime = tmp_path / "out.lime"
    assert main(["export", str(image), "--to", "lime", "-o", str(lime)]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"wrote {lime}: lime, 3 ranges")
    # The one kernel-zero page cannot be told apart in LiME: the user is warned, once.
    assert (
        one_line(err)
        == "collect: warning: 1 page was not captured and written as zeros (1 kernel-zero)"
    )
    zstd = subprocess.run(["zstd", "-dc", str(image)], capture_output=True, check=True).stdout
    assert lime.read_bytes() == zstd
    assert stat.S_IMODE(lime.stat().st_mode) == 0o600

    raw = tmp_path / "out.raw"
    assert main(["export", str(image), "--to", "raw", "-o", str(raw), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["pages_not_captured"] == {"kernel-zero": 1} and doc["ranges"] == 3
    with open(raw, "rb") as f:
        for start, end in strict.ram_ranges:
            stop = TAIL if start == 0x1000 else end
            f.seek(start)
            assert f.read(stop - start) == strict.ram_bytes(start, stop)
    assert raw.stat().st_size == strict.ram_ranges[-1][1]

    elf = tmp_path / "out.elf"
    assert main(["export", str(image), "--to", "elf", "-o", str(elf)]) == 0
    from collector.image.open import open_image

    with open_image(elf) as core:
        assert core.ranges() == strict.ram_ranges
        assert core.read(0x100000, 0x500000) == strict.ram_bytes(0x100000, 0x600000)
        assert core.blob("vmcoreinfo").decode() == strict.vmcoreinfo
    capsys.readouterr()
    assert main(["export", str(image), "--to", "lime", "-o", str(lime)]) == 1
    assert "already exists" in one_line(capsys.readouterr().err)
    assert main(["export", str(image), "--to", "raw", "-o", "-"]) == 2


@pytest.mark.parametrize(
    ("argv", "address", "pfn", "json_"),
    [
        (["IMG", "init_task"], "init_task", None, False),
        (["IMG", "--json", "init_task"], "init_task", None, True),
        (["--json", "IMG", "0xffffffff81000000"], "0xffffffff81000000", None, True),
        (["IMG", "--image-format", "native", "init_task", "--json"], "init_task", None, True),
        (["IMG", "--pfn", "0x10"], None, 16, False),
    ],
)
def test_translate_takes_its_options_anywhere(monkeypatch, argv, address, pfn, json_) -> None:
    """`collect translate IMAGE --json ADDRESS` once stopped at 'unrecognized arguments':
    argparse matches an optional positional after the image only before any option."""
    seen = []
    monkeypatch.setattr(cli, "cmd_translate", lambda args: seen.append(args) or 0)
    assert cli.main(["translate", *argv]) == 0
    (args,) = seen
    assert (args.image, args.address, args.pfn, args.json) == ("IMG", address, pfn, json_)
