"""The distribution installs one import root, ``collector``, holding every module of the tree."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import collector
from collector.plugin_manager import BUILTIN_PLUGINS

ROOT = Path(__file__).resolve().parents[1]


def test_the_checkout_is_what_tests_import() -> None:
    assert Path(collector.__file__).resolve() == ROOT / "collector" / "__init__.py"


def test_every_builtin_plugin_module_is_registered() -> None:
    # A plugin module dropped into collector/plugins/ but left out of BUILTIN_PLUGINS would
    # never run; one listed but missing would fail every start.
    on_disk = {
        f"collector.plugins.{p.stem}"
        for p in (ROOT / "collector" / "plugins").glob("*.py")
        if p.stem != "__init__"
    } | {
        f"collector.plugins.{p.parent.name}"
        for p in (ROOT / "collector" / "plugins").glob("*/__init__.py")
    }
    assert sorted(on_disk) == sorted(BUILTIN_PLUGINS)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", str(ROOT), "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (found,) = out.glob("collector-*.whl")
    return found


def test_the_wheel_has_one_top_level_package(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        (top_level,) = [n for n in names if n.endswith(".dist-info/top_level.txt")]
        assert whl.read(top_level).decode().split() == ["collector"]
    roots = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert roots == {"collector"}
    # Every module of the tree is in it, the built-in plugins and profiles included.
    tree = {
        p.relative_to(ROOT).as_posix()
        for p in (ROOT / "collector").rglob("*.py")
        if "__pycache__" not in p.parts
    }
    assert tree - set(names) == set()
    assert {"collector/plugins/sysinfo.py", "collector/profiles/x86_64.py"} <= set(names)
