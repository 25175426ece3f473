"""The example third-party plugin in docs/example_plugin loads through its entry point and passes
its own tests; the guide shows it as it is."""

from __future__ import annotations

import importlib.util
import sys
import tomllib
from pathlib import Path

import pytest

from collector.analyze import analyze_kernel
from collector.plugin_manager import (
    DISABLE_AUTOLOAD_ENV,
    ENTRY_POINT_GROUP,
    PluginInfo,
    PluginManager,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "example_plugin"
GUIDE = EXAMPLE.parent / "plugins.md"
PROJECT = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]


def load_example_tests():
    spec = importlib.util.spec_from_file_location(
        "test_collector_cmdline", EXAMPLE / "test_collector_cmdline.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The example as `pip install docs/example_plugin` leaves it: its module importable and
    a dist-info whose entry_points.txt is generated from its pyproject.toml."""
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    dist = PROJECT["name"]
    info = tmp_path / f"{dist.replace('-', '_')}-{PROJECT['version']}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {dist}\nVersion: {PROJECT['version']}\n"
    )
    entry_points = PROJECT["entry-points"][ENTRY_POINT_GROUP]
    lines = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
    (info / "entry_points.txt").write_text(f"[{ENTRY_POINT_GROUP}]\n{lines}")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.delitem(sys.modules, "collector_cmdline", raising=False)


def test_the_example_declares_its_entry_point_in_the_collector_group() -> None:
    assert PROJECT["entry-points"] == {"collector": {"cmdline": "collector_cmdline"}}


def test_the_example_loads_through_its_entry_point(installed) -> None:
    manager = PluginManager()
    assert manager.plugins[-1] == PluginInfo("cmdline", "1.0.0", "entry point", "collector-cmdline")
    assert manager.analysis("cmdline").plugin.name == "cmdline"
    assert Path(sys.modules["collector_cmdline"].__file__) == EXAMPLE / "collector_cmdline.py"
    tests = load_example_tests()
    kernel, string = tests.a_kernel()
    result = analyze_kernel(kernel, "cmdline", manager=manager)
    assert result.records == [
        {
            "address": string,
            "cmdline": "BOOT_IMAGE=/vmlinuz-6.1.0-56-amd64 root=UUID=1234 ro quiet",
        }
    ]
    assert (result.plugin, result.plugin_version) == ("cmdline", "1.0.0")


def test_the_example_passes_its_own_tests(installed) -> None:
    tests = load_example_tests()
    names = sorted(n for n in vars(tests) if n.startswith("test_"))
    assert names == [
        "test_a_page_that_was_not_captured_is_one_error_line",
        "test_reads_the_command_line",
        "test_without_the_symbol_it_says_why_it_does_not_apply",
    ]
    for name in names:
        getattr(tests, name)()


@pytest.mark.parametrize(
    "file", ["pyproject.toml", "collector_cmdline.py", "test_collector_cmdline.py"]
)
def test_the_guide_shows_the_example_as_it_is(file: str) -> None:
    assert (EXAMPLE / file).read_text() in GUIDE.read_text()
