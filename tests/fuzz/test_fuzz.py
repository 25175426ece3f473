"""Hostile images through every command: one clear error or identical data, never a
traceback, a hang or unbounded memory.

Each example mutates a good native image, LiME file, AVML file or ELF core (tests/fuzz/mutators.py) and
runs `collect info`, `verify`, `export` (to LiME, raw and ELF), `translate` and `analyze` on
it through the command-line entry point, in this process. What each must do:

- return an exit status, with any error as one ``collect: ...`` line on stderr (an exception
  escaping ``main`` is a traceback for the user, and fails the test);
- finish within :data:`~tests.fuzz.limits.SECONDS`, the process's peak memory never growing by more than
  :data:`~tests.fuzz.limits.MAX_MEMORY`;
- write no export larger than what the input holds plus its headers;
- for native images damaged (not forged), serve every page either as the bytes written or
  not at all.

CI runs 600 fixed examples. The long run is ``python -m tests.fuzz --examples 50000``
(or ``COLLECTOR_FUZZ_EXAMPLES=50000 python -m pytest tests/fuzz``).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collector.cli import main
from collector.errors import ImageError
from collector.image.reader import NativeImage
from collector.memory import PageNotCaptured
from tests.fuzz import mutators
from tests.fuzz.limits import EXAMPLES, bounded

COMMANDS: list[list[str]] = [
    ["info", "{image}"],
    ["info", "{image}", "--json"],
    ["verify", "{image}"],
    ["export", "{image}", "--to", "lime", "-o", "{out}", "--force"],
    ["export", "{image}", "--to", "raw", "-o", "{out}", "--force"],
    ["export", "{image}", "--to", "elf", "-o", "{out}", "--force"],
    ["translate", "{image}", "init_uts_ns"],
    ["analyze", "{image}", "sysinfo"],
    ["analyze", "{image}", "pages"],
    ["analyze", "{image}", "buddyinfo"],
    ["analyze", "{image}", "pslist"],
    ["analyze", "{image}", "pstree"],
    ["analyze", "{image}", "psaux"],
    ["analyze", "{image}", "maps"],
    ["analyze", "{image}", "lsmod"],
    ["analyze", "{image}", "dmesg"],
    ["analyze", "{image}", "hidden_tasks"],
    ["analyze", "{image}", "hidden_modules"],
]


def fuzz_settings(ci_examples: int) -> settings:
    return settings(
        max_examples=EXAMPLES or ci_examples,
        deadline=None,  # SECONDS is enforced by an alarm instead, whole example at once
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        derandomize=not EXAMPLES,  # CI: the same examples every run
        database=None,
    )


def run_commands(path: Path, out: Path, held: int) -> None:
    for template in COMMANDS:
        argv = [a.format(image=path, out=out) for a in template]
        stdout, stderr = io.StringIO(), io.StringIO()
        with (
            bounded(" ".join(argv)),
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
        ):
            code = main(argv)
        err = stderr.getvalue()
        assert isinstance(code, int), argv
        assert "Traceback" not in err
        lines = [x for x in err.splitlines() if x]
        assert all(x.startswith("collect: ") for x in lines), (argv, err)
        if code and argv[0] == "verify" and not lines:
            # verify's statuses 1, 3 and 4 are its report, on stdout; it says which.
            first = stdout.getvalue().splitlines()[0]
            assert first.startswith(f"{path}: ") and code in (1, 3, 4), (argv, first)
        elif code:
            assert len([x for x in lines if "warning" not in x]) == 1, (argv, err)
        if argv[0] == "export" and out.exists():
            # The data held, at most as much again in ELF alignment (only segments of a page
            # or more are aligned), and a LiME header or program header per range; every
            # range takes at least 32 bytes of the input. A raw file's gaps are holes: what
            # counts there is what the file system allocated.
            st = out.stat()
            written = st.st_blocks * 512 if argv[3] == "raw" else st.st_size
            assert written <= 2 * held + 64 * (held // 32 + 2) + (1 << 20), (argv, written)
            out.unlink()


def check_native_pages(path: Path) -> None:
    """Every page is the one written, or refused."""
    try:
        img = NativeImage(path)
    except ImageError:
        return
    with img:
        for start, data in mutators.ram().items():
            for page in range(start, start + len(data), mutators.PAGE):
                try:
                    got = img.read(page, min(mutators.PAGE, start + len(data) - page))
                except (ImageError, PageNotCaptured):
                    continue
                want = mutators.expected_page(page)
                assert want is not None and got == want[: len(got)], f"wrong bytes at {page:#x}"


@cache
def good(kind: str) -> bytes:
    return {
        "native": mutators.native_image,
        "lime": mutators.lime_file,
        "avml": mutators.avml_file,
        "elf": mutators.elf_core,
        "kdump": mutators.kdump_file,
    }[kind]()


def fuzz_one(
    tmp_path: Path, kind: str, mutate: Callable[[bytes, mutators.Draw], bytes], draw
) -> None:
    data = mutate(good(kind), draw)
    path = tmp_path / f"fuzzed.{kind}"
    path.write_bytes(data)
    with bounded(f"opening {kind}"):
        if kind == "native" and mutate not in mutators.FORGERIES:
            check_native_pages(path)
    # A native image holds at most the RAM written (its chunks cannot grow and pass their
    # checks); a LiME file or ELF core at most its own size; a kdump-compressed dump a page
    # per bit of its 1st bitmap (excluded pages are exported as zeros).
    held = sum(map(len, mutators.ram().values())) if kind == "native" else len(data)
    if kind == "kdump":
        held = len(data) * 8 * mutators.PAGE
    run_commands(path, tmp_path / "out", held=held)


@fuzz_settings(300)
@given(st.data())
def test_hostile_native_images(tmp_path: Path, data: st.DataObject) -> None:
    mutate = data.draw(st.sampled_from(mutators.NATIVE_MUTATORS))
    fuzz_one(tmp_path, "native", mutate, data.draw)


@fuzz_settings(120)
@given(st.data())
def test_hostile_lime_files(tmp_path: Path, data: st.DataObject) -> None:
    mutate = data.draw(st.sampled_from(mutators.LIME_MUTATORS))
    fuzz_one(tmp_path, "lime", mutate, data.draw)


@fuzz_settings(60)
@given(st.data())
def test_hostile_avml_files(tmp_path: Path, data: st.DataObject) -> None:
    mutate = data.draw(st.sampled_from(mutators.AVML_MUTATORS))
    fuzz_one(tmp_path, "avml", mutate, data.draw)


@fuzz_settings(120)
@given(st.data())
def test_hostile_elf_cores(tmp_path: Path, data: st.DataObject) -> None:
    mutate = data.draw(st.sampled_from(mutators.ELF_MUTATORS))
    fuzz_one(tmp_path, "elf", mutate, data.draw)


@fuzz_settings(120)
@given(st.data())
def test_hostile_kdump_files(tmp_path: Path, data: st.DataObject) -> None:
    mutate = data.draw(st.sampled_from(mutators.KDUMP_MUTATORS))
    fuzz_one(tmp_path, "kdump", mutate, data.draw)


@pytest.mark.parametrize("kind", ["native", "lime", "avml", "elf", "kdump"])
def test_the_good_inputs_pass_every_command(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"good.{kind}"
    path.write_bytes(good(kind))
    run_commands(path, tmp_path / "out", held=max(len(good(kind)), 1 << 20))
    if kind == "native":
        assert main(["verify", str(path)]) == 0
