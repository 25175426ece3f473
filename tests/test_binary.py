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
    assert (
        "one new private directory (mode 0700) under $TMPDIR (default /tmp), collect-XXXXXX" in text
    )
    assert "_MEIXXXXXX" in text
    assert "only SIGKILL of the first process can leave it behind" in text


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


def _session(top: int) -> dict[int, int]:
    """The processes of the session ``top`` leads, each with its parent's PID."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[3]) == top:  # field 6, session id
                found[int(entry.name)] = int(fields[1])  # field 4, parent
    return found


def _chain(top: int) -> list[int]:
    """The guardian ``top``, PyInstaller's launcher and Python, in the order each started
    the next."""
    parents = _session(top)
    chain = [top]
    while child := [pid for pid, parent in parents.items() if parent == chain[-1]]:
        chain += child
    return chain


def _default_signals() -> None:
    # A shell that starts the suite in the background leaves SIGINT and SIGQUIT ignored,
    # and the binary keeps what its caller ignores.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, signal.SIG_DFL)


def _start(binary: Path, tmpdir: Path, *args: str) -> subprocess.Popen[str]:
    """The binary with ``args``, unpacking into ``tmpdir``, in a session of its own."""
    return subprocess.Popen(
        [str(binary), *args],
        env={"TMPDIR": str(tmpdir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=_default_signals,
    )


def _plan(binary: Path, fake: FakeHost, tmpdir: Path) -> subprocess.Popen[str]:
    return _start(binary, tmpdir, "plan", "--profile", "x86_64", "--sysroot", str(fake.root))


def test_while_running_it_holds_one_private_directory(standalone_binary, fake, unpack_dir):
    fake.slow["mem"] = 2.0
    proc = _plan(standalone_binary, fake, unpack_dir)
    try:
        assert fake.slow_read.wait(120), "the binary never read the fake's /dev/mem"
        (private,) = unpack_dir.iterdir()
        assert private.name.startswith("collect-") and len(private.name) == len("collect-") + 6
        assert stat.S_IMODE(private.stat().st_mode) == 0o700
        held = {p.name: p for p in private.iterdir()}
        # staticx's archive (the program, its loader and C library), unpacked by the
        # guardian, and PyInstaller's directory beside it.
        (mei,) = [p for name, p in held.items() if name.startswith("_MEI")]
        assert mei.is_dir() and stat.S_IMODE(mei.stat().st_mode) == 0o700
        program = held[".staticx.prog"].resolve()
        assert program == held["collect-x86_64-dynamic"] and program.is_file()
        assert held[".staticx.interp"].resolve() == held["ld-linux-x86-64.so.2"]
        assert "libc.so.6" in held
        # The guardian, PyInstaller's launcher and Python.
        chain = _chain(proc.pid)
        assert len(chain) == len(_session(proc.pid)) == 3
        assert Path(f"/proc/{chain[1]}/exe").resolve() == program
        environ = Path(f"/proc/{chain[-1]}/environ").read_bytes().split(b"\0")
        assert f"TMPDIR={private}".encode() in environ
        assert f"COLLECT_USER_TMPDIR={unpack_dir}".encode() in environ
    finally:
        stdout, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and stdout
    assert list(unpack_dir.iterdir()) == []


# When a signal comes, in milliseconds after the binary started, or once Python runs.
MOMENTS = (0, 5, 20, 50, 100, 200, 400, "python")
SIGNAL_CASES = [
    (signum, to_group, moment)
    for signum in (signal.SIGINT, signal.SIGTERM)
    for to_group in (False, True)
    for moment in MOMENTS
] + [
    (signum, to_group, moment)
    for signum in (signal.SIGHUP, signal.SIGQUIT)
    for to_group in (False, True)
    for moment in (20, 100, 400, "python")
]


def test_a_signal_at_any_moment_of_the_start_up_leaves_nothing(standalone_binary, fake, tmp_path):
    """Each case has its own empty TMPDIR. SIGINT and SIGTERM that reach Python end it with
    130/143; earlier, the launcher or guardian they reach dies of them (-signum here, 130/143
    in a shell). collect does not handle SIGHUP and SIGQUIT: it always dies of them."""
    fake.slow["mem"] = 0.5
    got, want = [], []
    for signum, to_group, moment in SIGNAL_CASES:
        case = f"{signum.name}-{'group' if to_group else 'pid'}-{moment}"
        tmpdir = tmp_path / case
        tmpdir.mkdir()
        fake.slow_read.clear()
        proc = _plan(standalone_binary, fake, tmpdir)
        if moment == "python":
            assert fake.slow_read.wait(120), case
        else:
            time.sleep(moment / 1000)
        (os.killpg if to_group else os.kill)(proc.pid, signum)
        _, stderr = proc.communicate(timeout=120)
        status = proc.returncode
        if signum in (signal.SIGINT, signal.SIGTERM):
            handled = 128 + signum
            if moment == "python":
                assert stderr == f"collect: interrupted by {signum.name}\n", case
            elif status == -signum:
                status = handled  # either is right before Python handles signals
        else:
            handled = -signum
        got.append((case, status, sorted(p.name for p in tmpdir.rglob("*"))))
        want.append((case, handled, []))
    assert got == want


def test_a_signal_before_it_starts_means_it_never_starts(standalone_binary, unpack_dir):
    # Blocked and pending before exec, SIGTERM is there when the guardian first looks.
    def pending_sigterm() -> None:
        _default_signals()
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM])
        os.kill(os.getpid(), signal.SIGTERM)

    result = subprocess.run(
        [str(standalone_binary), "--version"],
        env={"TMPDIR": str(unpack_dir)},
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=pending_sigterm,
    )
    assert (result.returncode, result.stdout, result.stderr) == (-signal.SIGTERM, "", "")
    assert list(unpack_dir.iterdir()) == []


@pytest.mark.parametrize("victim", [1, 2], ids=["pyinstaller", "python"])
def test_sigkill_of_any_inner_process_leaves_nothing(standalone_binary, fake, unpack_dir, victim):
    # The guardian is a subreaper: what a killed launcher leaves orphaned becomes its child,
    # gets SIGKILL from it too, and is waited for before the directory goes.
    fake.slow["mem"] = 2.0
    proc = _plan(standalone_binary, fake, unpack_dir)
    assert fake.slow_read.wait(120)
    chain = _chain(proc.pid)
    assert len(chain) == 3
    os.kill(chain[victim], signal.SIGKILL)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert list(unpack_dir.iterdir()) == []
    assert _session(proc.pid) == {}


def test_sigkill_of_the_guardian_leaves_only_what_it_unpacked(standalone_binary, fake, unpack_dir):
    fake.slow["mem"] = 2.0
    proc = _plan(standalone_binary, fake, unpack_dir)
    assert fake.slow_read.wait(120)
    (private,) = unpack_dir.iterdir()
    unpacked = sorted(p.name for p in private.iterdir() if not p.name.startswith("_MEI"))
    proc.kill()
    proc.communicate(timeout=120)
    # PyInstaller's launcher gets SIGTERM when its parent dies: Python stops, and the
    # launcher removes its own directory.
    deadline = time.monotonic() + 60
    while _session(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _session(proc.pid) == {}
    assert list(unpack_dir.iterdir()) == [private]
    assert sorted(p.name for p in private.iterdir()) == unpacked
    assert "collect-x86_64-dynamic" in unpacked


def test_an_unusable_tmpdir_is_one_line_and_status_1(standalone_binary, tmp_path):
    missing = tmp_path / "missing"
    result = run(standalone_binary, "--version", env={"TMPDIR": str(missing)})
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        f"collect: error: cannot create a private directory in {missing} (No such file or "
        "directory): set TMPDIR to a writable directory, e.g. TMPDIR=/dev/shm\n"
    )


def test_a_tmpdir_too_long_for_the_loader_path_is_one_line_and_status_1(
    standalone_binary, tmp_path
):
    # staticx leaves 256 bytes for the loader's path, "/collect-XXXXXX/.staticx.interp" in it.
    deep = tmp_path / ("d" * 200) / ("d" * 100)
    deep.mkdir(parents=True)
    result = run(standalone_binary, "--version", env={"TMPDIR": str(deep)})
    assert (result.returncode, result.stdout) == (1, "")
    room = 256 - len("/collect-XXXXXX/.staticx.interp")
    assert result.stderr == (
        f"collect: error: TMPDIR is too long: its real path has {len(str(deep))} bytes, and "
        f"the program has room for {room}\n"
    )
    assert list(deep.iterdir()) == []


def test_a_truncated_file_says_so(standalone_binary, tmp_path):
    part = tmp_path / "part"
    part.write_bytes(standalone_binary.read_bytes()[: 4 << 20])
    part.chmod(0o700)
    result = run(part, "--version", env={"TMPDIR": str(tmp_path)})
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == (
        "collect: error: this file carries no program: it is not a complete standalone build\n"
    )
    assert sorted(tmp_path.iterdir()) == [part]


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
    proc = _start(
        standalone_binary,
        unpack_dir,
        *("--profile", "x86_64", "--sysroot", str(fake.root), "-o", str(out), "--json"),
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
    proc = _plan(standalone_binary, fake, unpack_dir)
    assert fake.slow_read.wait(120)
    os.killpg(proc.pid, signum)
    stdout, stderr = proc.communicate(timeout=120)
    assert (proc.returncode, stdout) == (status, "")
    assert stderr == f"collect: interrupted by {signal.Signals(signum).name}\n"
    assert list(unpack_dir.iterdir()) == []
