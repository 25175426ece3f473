"""`--hash blake3` and parallel readers on a fake host: the image records the hash `b3sum`
gives of `zstd -dc`, `collect verify` checks it, and several readers write the same image."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import threading

import pytest

from collector.acquire import sources
from collector.cli import main
from collector.image import format as fmt
from collector.image.reader import NativeImage
from tests.acquire.fakehost import FakeHost

needs_b3sum = pytest.mark.skipif(
    shutil.which("b3sum") is None, reason="b3sum (Debian package b3sum) is not installed"
)


@pytest.fixture
def fake(tmp_path):
    with FakeHost(tmp_path / "host", strict_devmem=True) as host:
        yield host


def capture(fake: FakeHost, out, *extra: str) -> int:
    return main(["--profile", "x86_64", "--sysroot", str(fake.root), "-o", str(out), *extra])


def stream_of(path) -> bytes:
    return subprocess.run(["zstd", "-dc", str(path)], capture_output=True, check=True).stdout


def b3sum(data: bytes) -> str:
    out = subprocess.run(["b3sum", "--no-names"], input=data, capture_output=True, check=True)
    return out.stdout.decode().split()[0]


@needs_b3sum
def test_blake3_image_records_what_b3sum_gives_and_verifies(fake, tmp_path, capsys):
    out = tmp_path / "b3.lime.zst"
    assert capture(fake, out, "--hash", "blake3", "--chunk-size", "1M", "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    expected = b3sum(stream_of(out))
    assert summary["stream_hash"] == "blake3" and summary["stream_blake3"] == expected
    assert "stream_sha256" not in summary
    with NativeImage(out) as img:
        # Older readers refuse version 3 instead of calling a BLAKE3 digest a bad SHA-256.
        assert img.version == 3 and img.metadata["stream_hash"] == "blake3"
    assert main(["verify", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["stream_hash"] == "blake3" and report["stream_digest"] == expected
    assert main(["info", str(out)]) == 0
    assert f"blake3:   {expected} (`zstd -dc IMAGE | b3sum`)" in capsys.readouterr().out


@needs_b3sum
def test_verify_finds_a_blake3_image_whose_ram_changed(fake, tmp_path, capsys):
    out = tmp_path / "b3.lime.zst"
    assert capture(fake, out, "--hash", "blake3") == 0
    capsys.readouterr()
    data = bytearray(out.read_bytes())
    # Replace the recorded digest with another valid one (a resealed END): only the RAM walk
    # can tell it is not this stream's.
    with NativeImage(out) as img:
        end = dict(img.end)
    old = fmt.encode_end(end, 3)
    end["stream_blake3"] = b3sum(b"not this stream")
    new = fmt.encode_end(end, 3)
    assert len(old) == len(new)
    at = bytes(data).index(old)
    data[at : at + len(old)] = new
    out.write_bytes(bytes(data))
    assert main(["verify", str(out)]) == 1
    assert "whole-stream BLAKE3 does not match" in capsys.readouterr().out


def test_default_stays_sha256_and_version_2(fake, tmp_path, capsys):
    out = tmp_path / "sha.lime.zst"
    assert capture(fake, out, "--json") == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["stream_sha256"] == hashlib.sha256(stream_of(out)).hexdigest()
    assert "stream_hash" not in summary
    with NativeImage(out) as img:
        assert img.version == 2


def test_several_readers_write_the_same_stream_from_several_threads(
    fake, tmp_path, capsys, monkeypatch
):
    one, four = tmp_path / "one.lime.zst", tmp_path / "four.lime.zst"
    assert capture(fake, one, "--chunk-size", "256K", "--readers", "1", "--threads", "2") == 0
    threads: set[str] = set()
    real = sources.pread_exact

    def pread_exact(fd: int, size: int, offset: int, what: str = "") -> bytes:
        threads.add(threading.current_thread().name)
        return real(fd, size, offset, what)

    monkeypatch.setattr(sources, "pread_exact", pread_exact)
    assert capture(fake, four, "--chunk-size", "256K", "--readers", "4", "--threads", "2") == 0
    capsys.readouterr()
    assert stream_of(one) == stream_of(four)
    assert len({t for t in threads if t.startswith("read")}) > 1
    with NativeImage(one) as a, NativeImage(four) as b:
        assert list(a.fate_runs()) == list(b.fate_runs())


def test_readers_out_of_bounds_is_a_usage_error(fake, tmp_path, capsys):
    assert capture(fake, tmp_path / "x.lime.zst", "--readers", "0") == 2
    assert "--readers must be between 1 and 64" in capsys.readouterr().err
