"""`collect sweep` over real captures on its own local cluster of two worker processes: the
guest's own capture (native), the 5-level guest's, the first exported to LiME (no metadata:
host and release read from memory), and a made-up host with one process more; rows against
`collect analyze`'s, provenance against the guest's own uname, boot id and capture output,
and `collect stack` against the guests' /proc/modules."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("distributed")
import pyarrow.parquet as pq

import collector
from collector.analyze import run_analysis
from collector.cli import main
from tests.fleet.fleet_images import PROCESSES, build
from tests.vm.conftest import Capture

pytestmark = pytest.mark.vm

ANALYSES = ("pslist", "lsmod")
PLUGINS = {"pslist": "tasks", "lsmod": "modules"}


def guest_view(capture: Capture) -> dict[str, Any]:
    """What the guest and the capture command said: host name, release, boot id, hash."""
    boot_id = capture.guest.run("cat /proc/sys/kernel/random/boot_id").check().stdout.strip()
    return {
        "hostname": capture.fact("uname-n").decode().strip(),
        "kernel_release": capture.fact("uname-r").decode().strip(),
        "boot_id": boot_id,
        "image_sha256": capture.summary["stream_sha256"],
    }


def header_start(image: Path) -> dt.datetime:
    info = subprocess.run(
        [sys.executable, "-m", "collector", "info", str(image), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return dt.datetime.fromisoformat(json.loads(info.stdout)["start_time"])


def expected(image: Path, analysis: str, provenance: dict[str, Any]) -> list[dict[str, Any]]:
    records = run_analysis(image, analysis).records
    assert isinstance(records, list) and records
    return [
        {**r, "image": str(image), **provenance, "plugin": PLUGINS[analysis],
         "plugin_version": collector.__version__}
        for r in records
    ]  # fmt: skip


def test_sweep_over_real_captures(
    capture: Capture,
    la57_capture: Capture,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    native = images / "guest.lime.zst"
    native.symlink_to(capture.image)
    la57 = images / "la57.lime.zst"
    la57.symlink_to(la57_capture.image)
    lime = images / "guest-export.lime"
    assert main(["export", str(capture.image), "--to", "lime", "-o", str(lime)]) == 0
    odd = build(images / "odd.lime.zst", "odd-host", 7, processes=[*PROCESSES, (4242, "xmrig")])
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["sweep", str(images), "--analysis", ",".join(ANALYSES), "-o", str(out),
                 "--workers", "2", "--json"])  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert (code, summary["workers"], summary["tasks"], summary["written"]) == (0, 2, 8, 8)
    assert summary["errors"] == []
    assert not (out / "errors").exists()

    view = guest_view(capture)
    provenance = {
        native: {**view, "captured_at": header_start(capture.image)},
        la57: {**guest_view(la57_capture), "captured_at": header_start(la57_capture.image)},
        # LiME keeps nothing but memory: the file's own hash, the name and release from
        # init_uts_ns, no boot id, no capture time.
        lime: {**view, "image_sha256": hashlib.sha256(lime.read_bytes()).hexdigest(),
               "boot_id": None, "captured_at": None},
    }  # fmt: skip
    for analysis in ANALYSES:
        rows = pq.read_table(out / analysis).to_pylist()
        assert [r for r in rows if r["image"] == str(odd.path)] == odd.rows(analysis)
        for image, known in provenance.items():
            got = [r for r in rows if r["image"] == str(image)]
            assert got == expected(image, analysis, known), (image, analysis)

    # Modules on fewer hosts first; a host named "(none)" (the guests set no name) is its image.
    hosts: dict[str, set[str]] = {}
    for image, cap in ((native, capture), (la57, la57_capture), (lime, capture)):
        name = view["hostname"] if cap is capture else guest_view(cap)["hostname"]
        host = str(image) if name == "(none)" else name
        for line in cap.before["modules"]:
            hosts.setdefault(line.split()[0], set()).add(host)
    for module in odd.lsmod:
        hosts.setdefault(module["name"], set()).add("odd-host")
    want = sorted(
        ({"name": n, "hosts": len(h), "host_names": ",".join(sorted(h))} for n, h in hosts.items()),
        key=lambda r: (r["hosts"], r["name"]),
    )
    assert main(["stack", str(out), "lsmod", "name", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == want
    assert main(["stack", str(out), "pslist", "comm", "--max-hosts", "1", "--format", "json"]) == 0
    assert {"comm": "xmrig", "hosts": 1, "host_names": "odd-host"} in json.loads(
        capsys.readouterr().out
    )
