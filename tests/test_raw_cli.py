"""Raw memory files from the command line: --image-format raw, --memory-map, FILE.iomem."""

from __future__ import annotations

import json

import pytest

from collector.cli import main
from collector.image.lime import LimeImage

IOMEM = """\
00000000-00000fff : Reserved
00001000-00001fff : System RAM
00002000-00002fff : Reserved
00003000-00004fff : System RAM
  00003000-000037ff : Kernel code
"""


@pytest.fixture
def raw(tmp_path):
    """A padded raw file: page n holds bytes n+1, so each address's byte is known."""
    path = tmp_path / "mem.raw"
    path.write_bytes(b"".join(bytes([n + 1]) * 0x1000 for n in range(5)))
    return path


def _info(capsys, *argv):
    assert main(["info", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_without_a_map_the_whole_file_is_memory_from_0(raw, capsys):
    info = _info(capsys, str(raw), "--image-format", "raw")
    assert info["format"] == "raw"
    assert info["ranges"] == [[0, 0x5000]]


def test_a_map_given_as_ranges(raw, capsys):
    info = _info(capsys, str(raw), "--memory-map", "0x1000-0x1fff,0x3000+8K")
    assert info["ranges"] == [[0x1000, 0x2000], [0x3000, 0x5000]]


def test_a_map_given_as_an_iomem_file(raw, tmp_path, capsys):
    iomem = tmp_path / "guest-iomem.txt"
    iomem.write_text(IOMEM)
    info = _info(capsys, str(raw), "--image-format", "raw", "--memory-map", str(iomem))
    assert info["ranges"] == [[0x1000, 0x2000], [0x3000, 0x5000]]


def test_the_iomem_beside_the_file_is_the_default_map(raw, capsys):
    (raw.parent / "mem.raw.iomem").write_text(IOMEM)
    info = _info(capsys, str(raw), "--image-format", "raw")
    assert info["ranges"] == [[0x1000, 0x2000], [0x3000, 0x5000]]


def test_a_raw_file_is_not_sniffed(raw, capsys):
    assert main(["info", str(raw)]) == 6
    assert "a raw memory file needs --image-format raw" in capsys.readouterr().err


def test_export_keeps_only_the_mapped_ranges(raw, tmp_path, capsys):
    out = tmp_path / "out.lime"
    argv = ["export", str(raw), "--memory-map", "0x1000-0x1fff,0x3000-0x4fff"]
    assert main([*argv, "--to", "lime", "-o", str(out)]) == 0
    with LimeImage(out) as lime:
        assert lime.ranges() == [(0x1000, 0x2000), (0x3000, 0x5000)]
        assert lime.read(0x1000, 0x1000) == b"\x02" * 0x1000
        assert lime.read(0x3000, 0x2000) == b"\x04" * 0x1000 + b"\x05" * 0x1000


def test_a_bad_map_is_a_usage_error(raw, capsys):
    assert main(["info", str(raw), "--memory-map", "0x2000-0x1000"]) == 2
    assert capsys.readouterr().err == ("collect: bad range '0x2000-0x1000': end is below start\n")
