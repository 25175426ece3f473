"""Every command that opens an image fails the same way, with the same line and exit status,
for each kind of failure (the table in docs/image-format.md)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from collector.cli import main
from collector.testing.kdump import write_kdump
from tests.image.test_open import LIME

PAGE = 4096


def _commands(path: Path, out: Path) -> dict[str, list[str]]:
    image = str(path)
    return {
        "info": ["info", image],
        "verify": ["verify", image],
        "analyze": ["analyze", image, "sysinfo"],
        "translate": ["translate", image, "0xffffffff81000000"],
        "export": ["export", image, "--to", "lime", "-o", str(out)],
    }


def _kdump(path: Path, **kwargs) -> Path:
    pages = {pfn: bytes([pfn]) * PAGE for pfn in range(1, 4)}
    write_kdump(path, pages, [(1, 4)], **kwargs)
    return path


def _missing(tmp: Path) -> Path:
    return tmp / "absent.lime"


def _directory(tmp: Path) -> Path:
    (tmp / "dir").mkdir()
    return tmp / "dir"


def _unreadable(tmp: Path) -> Path:
    path = tmp / "secret.lime"
    path.write_bytes(LIME)
    return path


def _random(tmp: Path) -> Path:
    path = tmp / "mem.bin"
    path.write_bytes(bytes.fromhex("23620b01deadbeef") + bytes(PAGE))
    return path


def _empty(tmp: Path) -> Path:
    path = tmp / "empty"
    path.write_bytes(b"")
    return path


def _truncated(tmp: Path) -> Path:
    path = _kdump(tmp / "cut.kdump")
    path.write_bytes(path.read_bytes()[:100])
    return path


def _truncated_native(tmp: Path) -> Path:
    path = tmp / "cut.lime.zst"
    # A HEADER skippable frame (0x184D2A50) that claims 1000 bytes, in a 20-byte file.
    path.write_bytes(bytes.fromhex("502a4d18") + (1000).to_bytes(4, "little") + bytes(12))
    return path


def _corrupted(tmp: Path) -> Path:
    path = _kdump(tmp / "bad.kdump")
    data = bytearray(path.read_bytes())
    data[428:432] = (1000).to_bytes(4, "little")  # disk_dump_header.block_size
    path.write_bytes(bytes(data))
    return path


def _lzo(tmp: Path) -> Path:
    return _kdump(tmp / "lzo.kdump", compression="lzo")


# kind -> (make the file, the line after "collect: " with {path}, exit status)
KINDS = {
    "missing": (_missing, "{path}: cannot open: No such file or directory", 5),
    "unreadable": (_unreadable, "{path}: cannot open: Permission denied", 5),
    "directory": (_directory, "{path}: cannot open: it is a directory, not an image file", 5),
    "not an image": (
        _random,
        "{path}: not a memory image: it starts with 23 62 0b 01 de ad be ef, the magic of no "
        "format read here (collector image, LiME, AVML, ELF core, kdump-compressed); a raw memory "
        "file needs --image-format raw",
        6,
    ),
    "empty": (_empty, "{path}: not a memory image: the file is empty", 6),
    "truncated": (
        _truncated,
        "{path}: truncated: the file ends at byte 100 inside the disk_dump_header "
        "(bytes 0x0-0x1cf)",
        3,
    ),
    "truncated native": (
        _truncated_native,
        "{path}: truncated: the file ends at byte 20 inside its HEADER record (1008 bytes)",
        3,
    ),
    "corrupted": (_corrupted, "{path}: corrupted: block_size 1000 is not a page size", 1),
    "unsupported compression": (
        _lzo,
        "{path}: unsupported: kdump-compressed pages compressed with lzo, which is not read "
        "here (read: zlib, zstd; makedumpfile -c writes zlib, -z zstd)",
        7,
    ),
}
COMMANDS = ["info", "verify", "analyze", "translate", "export"]


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("command", COMMANDS)
def test_one_message_and_status_per_kind(tmp_path, monkeypatch, capsys, command, kind):
    make, message, status = KINDS[kind]
    path = make(tmp_path)
    if kind == "unreadable":
        real_open = os.open

        def refuse(name, *args, **kwargs):
            if os.fspath(name) == str(path):
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return real_open(name, *args, **kwargs)

        # Root reads files whatever their mode, so the refusal is simulated.
        monkeypatch.setattr(os, "open", refuse)
    out = tmp_path / "out.lime"
    assert main(_commands(path, out)[command]) == status
    captured = capsys.readouterr()
    assert captured.err == f"collect: {message.format(path=path)}\n"
    assert captured.out == ""
    assert not out.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_usage_errors_exit_2(tmp_path, capsys, command):
    path = tmp_path / "x.lime"
    path.write_bytes(LIME)
    argv = _commands(path, tmp_path / "out.lime")[command]
    argv[1:1] = ["--image-format", "lime", "--memory-map", "0-0xfff"]
    assert main(argv) == 2
    assert capsys.readouterr().err == (
        "collect: --memory-map is for raw files, not --image-format lime\n"
    )


@pytest.mark.parametrize(
    ("fmt", "what"),
    [("lime", "a LiME file"), ("raw", "a raw memory file"), ("kdump", "a kdump-compressed dump")],
)
def test_verify_says_a_format_without_checksums_is_unsupported(tmp_path, capsys, fmt, what):
    """0 would claim checks verify cannot make, 1 damage it did not find: such a file is
    the unsupported kind (7), and `info` describes it."""
    path = tmp_path / "x"
    if fmt == "kdump":
        _kdump(path)
    else:
        path.write_bytes(LIME)
    argv = ["verify", str(path), *(["--image-format", "raw"] if fmt == "raw" else [])]
    assert main(argv) == 7
    assert capsys.readouterr().err == (
        f"collect: {path}: unsupported: {what} carries no checksums to verify; "
        "`collect info` lists its ranges and what is missing\n"
    )
    assert main(["info", str(path), *argv[2:]]) == 0
