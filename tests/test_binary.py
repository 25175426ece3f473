"""The standalone build, ``dist/collect-x86_64``: a static executable that runs with an empty
environment, answers every command as the Python build does, and leaves nothing behind.

The binary is built once per session (the ``standalone_binary`` fixture); the Python build of
the same checkout, the fake host's own bytes and ``file``/``ldd``/``sha256sum`` are the oracles.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zstandard

import collector
from collector.image.reader import NativeImage
from tests.acquire.fakehost import FakeHost
from tests.acquire.test_hostile import HUGE, HUGE_END, planted

pytestmark = pytest.mark.binary

REPO = Path(__file__).resolve().parents[1]
SMALL_IMAGE = REPO / "tests" / "data" / "image" / "v1-small.lime.zst"
SIZE_TARGET = 40_000_000


def run(binary: Path, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", 300)
    return subprocess.run([str(binary), *args], capture_output=True, text=True, **kwargs)


def python_build(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "collector", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def fake(tmp_path):
    with FakeHost(tmp_path / "host", strict_devmem=True) as host:
        if host.mode != "fuse":
            # Emulated device files answer only inside this process, not the binary's.
            pytest.skip("the fake host's device files need FUSE for another process")
        yield host


@pytest.fixture
def unpack_dir(tmp_path) -> Path:
    """An empty directory for the binary's TMPDIR, to see what it unpacks and leaves."""
    path = tmp_path / "unpack"
    path.mkdir()
    return path


def test_file_and_ldd_show_a_static_executable(standalone_binary):
    described = subprocess.run(
        ["file", "-b", str(standalone_binary)], capture_output=True, text=True, check=True
    ).stdout
    assert described.startswith("ELF 64-bit LSB executable, x86-64"), described
    assert "statically linked" in described, described
    ldd = subprocess.run(["ldd", str(standalone_binary)], capture_output=True, text=True)
    assert ldd.returncode == 1
    assert "not a dynamic executable" in ldd.stdout + ldd.stderr
    assert standalone_binary.stat().st_size < SIZE_TARGET


def test_version_with_an_empty_environment_names_what_it_carries(standalone_binary, tmp_path):
    result = subprocess.run(
        ["env", "-i", str(standalone_binary), "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    libzstd = ".".join(map(str, zstandard.ZSTD_VERSION))
    expected = (
        f"collect {collector.__version__}, standalone build (Python "
        f"{platform.python_version()}, python-zstandard {zstandard.__version__}, "
        f"libzstd {libzstd})\n"
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, expected, "")
    assert list(tmp_path.iterdir()) == []


def test_help_says_what_it_unpacks_and_where(standalone_binary):
    result = run(standalone_binary, "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "standalone build:" in text
    assert "under $TMPDIR (default /tmp), staticx-XXXXXX" in text
    assert "_MEIXXXXXX" in text and "(mode 0700)" in text


def test_release_files_hash_and_list_what_is_bundled(standalone_binary):
    dist = standalone_binary.parent
    check = subprocess.run(
        ["sha256sum", "-c", "collect-x86_64.sha256"], cwd=dist, capture_output=True, text=True
    )
    assert (check.returncode, check.stdout) == (0, "collect-x86_64: OK\n")
    sbom = json.loads((dist / "collect-x86_64.sbom.json").read_text())
    assert sbom["python"] == platform.python_version()
    assert sbom["libzstd"] == ".".join(map(str, zstandard.ZSTD_VERSION))
    needed = ("collector", "zstandard", "xxhash", "construct", "pluggy", "numpy")
    assert {n: sbom["packages"].get(n) for n in needed} == {
        n: importlib.metadata.version(n) for n in needed
    }
    # Optional extras and test tooling stay out.
    assert not {"pillow", "drgn", "pytest", "volatility3", "cramjam"} & {
        n.lower() for n in sbom["packages"]
    }


@pytest.mark.parametrize(
    "args",
    [
        ("info", "{image}"),
        ("info", "{image}", "--json"),
        ("verify", "{image}", "--json"),
        ("analyze", "{image}", "sysinfo", "--format", "json"),
        ("plugins",),
        ("profiles",),
    ],
    ids=["info", "info-json", "verify", "analyze", "plugins", "profiles"],
)
def test_image_commands_answer_as_the_python_build_does(standalone_binary, args):
    words = [a.format(image=SMALL_IMAGE) for a in args]
    got, want = run(standalone_binary, *words, cwd=REPO), python_build(*words)
    assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr)
    assert want.returncode == 0 and want.stdout


def test_export_writes_the_same_lime_file(standalone_binary, tmp_path):
    ours, theirs = tmp_path / "binary.lime", tmp_path / "python.lime"
    assert (
        run(
            standalone_binary, "export", str(SMALL_IMAGE), "--to", "lime", "-o", str(ours)
        ).returncode
        == 0
    )
    assert (
        python_build("export", str(SMALL_IMAGE), "--to", "lime", "-o", str(theirs)).returncode == 0
    )
    assert ours.read_bytes() == theirs.read_bytes() and ours.stat().st_size > 0


def test_plan_and_capture_of_a_fake_host(standalone_binary, fake, tmp_path, unpack_dir):
    env = {"TMPDIR": str(unpack_dir)}
    root = str(fake.root)
    got = run(standalone_binary, "plan", "--profile", "x86_64", "--sysroot", root, env=env)
    want = python_build("plan", "--profile", "x86_64", "--sysroot", root)
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout) == (0, want.stdout)
    out = tmp_path / "fake.lime.zst"
    result = run(
        standalone_binary, "--profile", "x86_64", "--sysroot", root, "-o", str(out), env=env
    )
    assert result.returncode == 0, result.stderr
    with NativeImage(out) as img:
        assert img.verify().ok
        for start, end in img.captured_ranges():
            if start >= 0x100000:
                assert img.read(start, end - start) == fake.ram_bytes(start, end)
    assert list(unpack_dir.iterdir()) == []


def _session(top: int) -> list[int]:
    """The processes of the session ``top`` leads (the launchers and Python)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[3]) == top:  # field 6, session id
                pids.append(int(entry.name))
    return pids


def test_while_running_it_holds_two_private_directories(standalone_binary, fake, unpack_dir):
    fake.slow["mem"] = 2.0
    proc = subprocess.Popen(
        [str(standalone_binary), "plan", "--profile", "x86_64", "--sysroot", str(fake.root)],
        env={"TMPDIR": str(unpack_dir)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        assert fake.slow_read.wait(120), "the binary never read the fake's /dev/mem"
        held = sorted(unpack_dir.iterdir())
        assert [p.name.split("-")[0][:4] for p in held] == ["_MEI", "stat"], held
        assert [stat.S_IMODE(p.stat().st_mode) for p in held] == [0o700, 0o700]
        # staticx's launcher, PyInstaller's launcher and Python.
        assert len(_session(proc.pid)) == 3
    finally:
        assert proc.wait(120) == 0
    assert list(unpack_dir.iterdir()) == []


@pytest.mark.parametrize(
    ("signum", "to_group", "status"),
    [(signal.SIGTERM, False, 143), (signal.SIGINT, True, 130)],
    ids=["SIGTERM-to-the-launcher", "SIGINT-to-the-process-group"],
)
def test_a_signal_closes_the_image_and_removes_what_was_unpacked(
    standalone_binary, fake, tmp_path, unpack_dir, signum, to_group, status
):
    # As a terminal's Ctrl-C does, SIGINT goes to every process of the group: the launchers
    # relay their copies, and the capture still ends once, with its image closed.
    planted(fake, HUGE)
    fake.allow(0x100200000, HUGE_END)
    out = tmp_path / "huge.lime.zst"
    proc = subprocess.Popen(
        [
            str(standalone_binary),
            "--profile",
            "x86_64",
            "--sysroot",
            str(fake.root),
            "-o",
            str(out),
            "--json",
        ],
        env={"TMPDIR": str(unpack_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 120
    while not out.exists() or out.stat().st_size < 64 << 10:
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    if to_group:
        os.killpg(proc.pid, signum)
    else:
        os.kill(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr
    summary = json.loads(stdout)
    assert summary["stopped_by"] == f"interrupted by {signal.Signals(signum).name}"
    with NativeImage(out) as img:
        assert img.indexed and img.verify().ok
    assert list(unpack_dir.iterdir()) == []


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_while_planning_ends_at_once_and_leaves_nothing(
    standalone_binary, fake, unpack_dir, signum, status
):
    fake.slow["mem"] = 2.0
    proc = subprocess.Popen(
        [str(standalone_binary), "plan", "--profile", "x86_64", "--sysroot", str(fake.root)],
        env={"TMPDIR": str(unpack_dir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert fake.slow_read.wait(120)
    os.killpg(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stdout) == (status, "")
    assert stderr == f"collect: interrupted by {signal.Signals(signum).name}\n"
    assert list(unpack_dir.iterdir()) == []
