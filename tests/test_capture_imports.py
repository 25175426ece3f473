"""The capture path loads nothing that only analysis needs: not numpy, not construct, not the
BTF parser. The standalone build and a capture's start-up and memory depend on it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.acquire.fakehost import FakeHost

REPO = Path(__file__).resolve().parents[1]
ANALYSIS_ONLY = ("numpy", "construct", "collector.kernel.btf", "collector.kernel.btf_memory")

RUNNER = """\
import json, sys
from collector.cli import main
status = main(sys.argv[1:])
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
sys.exit(status)
"""


@pytest.fixture
def fake(tmp_path):
    with FakeHost(tmp_path / "host", strict_devmem=True) as host:
        yield host


def loaded_by(*args: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", RUNNER, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(result.stderr.splitlines()[-1]))


@pytest.mark.parametrize(
    "command",
    [("plan",), ("--dry-run",), ("-o", "{out}"), ("-o", "{out}", "--json")],
    ids=["plan", "dry-run", "capture", "capture-json"],
)
def test_capture_commands_import_no_analysis_module(fake, tmp_path, command):
    out = str(tmp_path / "image.lime.zst")
    words = [w.format(out=out) for w in command]
    if words[0] == "plan":
        args = ["plan", "--profile", "x86_64", "--sysroot", str(fake.root), *words[1:]]
    else:
        args = ["--profile", "x86_64", "--sysroot", str(fake.root), *words]
    modules = loaded_by(*args)
    # The run did real work: the capture wrote its image, the plan read the fake's iomem.
    assert "collector.acquire.plan" in modules
    if "-o" in words:
        assert Path(out).stat().st_size > 0 and "collector.image.writer" in modules
    loaded = sorted(m for m in modules if m.split(".")[0] in {"numpy", "construct"})
    loaded += [m for m in ANALYSIS_ONLY if m in modules]
    assert loaded == []


def test_version_imports_no_analysis_module():
    # --version leaves through argparse's exit, so the import log is read instead.
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "collector", "--version"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.startswith("collect ")
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()}
    assert "collector.cli" in imported
    assert not {m for m in imported if m.split(".")[0] in {"numpy", "construct"}}
    assert not imported & set(ANALYSIS_ONLY)
