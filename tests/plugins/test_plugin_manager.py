"""The plugin manager and the analysis runner: loading, validation, dispatch, the plugin's edge."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import textwrap
import types
from pathlib import Path

import construct
import pytest

import collector
from collector import cli_analysis
from collector.analyze import analyze_kernel, resolve_options
from collector.errors import CollectorError, NotApplicable
from collector.memory import Fate, PageNotCaptured
from collector.plugin_manager import (
    DISABLE_AUTOLOAD_ENV,
    Analysis,
    Field,
    Option,
    PluginInfo,
    PluginManager,
    hookimpl,
)

DEMO = Analysis(
    "demo",
    "numbers and words",
    (Field("n", "int", "a number"), Field("word", "str", "a word")),
    (Option("count", int, 2, "how many"), Option("loud", bool, False, "shout")),
)


def make_plugin(name: str = "demo_plugin", **hooks) -> types.ModuleType:
    module = types.ModuleType(name)
    for hook, function in hooks.items():
        setattr(module, hook, function)
    return module


def demo_plugin(records=None, analysis: Analysis = DEMO) -> types.ModuleType:
    """A plugin offering ``analysis``; its records are ``records(options)``."""

    @hookimpl
    def collector_analyses():
        return [analysis]

    @hookimpl
    def collector_analyze(name, kernel, options):
        if name != analysis.name:
            return None
        if records is not None:
            return records(options)
        return (
            {"n": i, "word": "HI" if options["loud"] else "hi"} for i in range(options["count"])
        )

    return make_plugin(collector_analyses=collector_analyses, collector_analyze=collector_analyze)


def bare_manager(*plugins: types.ModuleType) -> PluginManager:
    manager = PluginManager(builtins=(), autoload=False)
    for i, plugin in enumerate(plugins):
        manager.register(plugin, name=f"p{i}", version=f"{i}.0")
    return manager


def install_distribution(
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    dist: str,
    version: str,
    entry_points: dict,
    sources: dict,
) -> None:
    """Make ``dist`` importable and discoverable as pip would leave it: modules + dist-info."""
    for module, source in sources.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[collector]\n{lines}")
    monkeypatch.syspath_prepend(str(root))
    for module in sources:
        monkeypatch.delitem(sys.modules, module, raising=False)


THIRD_PARTY = """
    from collector.plugin_manager import Analysis, Field, hookimpl

    @hookimpl
    def collector_analyses():
        return [Analysis("third", "from elsewhere", (Field("x", "int", "x"),))]

    @hookimpl
    def collector_analyze(name):
        return [{"x": 7}] if name == "third" else None
"""


@pytest.fixture
def third_party(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(DISABLE_AUTOLOAD_ENV, raising=False)
    install_distribution(
        tmp_path,
        monkeypatch,
        "collector-third",
        "3.1.4",
        {"third": "third_party_mod"},
        {"third_party_mod": THIRD_PARTY},
    )


# -- loading -------------------------------------------------------------------------------


#: The built-in plugins in loading order, each with its analyses (written out here, apart from
#: BUILTIN_PLUGINS, so that a plugin added, lost or reordered shows).
BUILTINS: list[tuple[str, list[str]]] = [
    ("sysinfo", ["sysinfo"]),
    ("kallsyms", ["kallsyms"]),
    ("pages", ["buddyinfo", "pages"]),
    ("tasks", ["psaux", "pslist", "pstree"]),
    ("maps", ["maps"]),
    ("modules", ["lsmod"]),
    ("dmesg", ["dmesg"]),
    ("hidden_tasks", ["hidden_tasks"]),
    ("hidden_modules", ["hidden_modules"]),
]


def test_builtins_load_in_order_with_the_collector_version() -> None:
    manager = PluginManager(autoload=False)
    assert manager.plugins == [
        PluginInfo(name, collector.__version__, "builtin") for name, _ in BUILTINS
    ]
    assert [(r.analysis.name, r.plugin.name) for r in manager.analyses()] == sorted(
        (analysis, plugin) for plugin, analyses in BUILTINS for analysis in analyses
    )


def test_entry_point_plugin_loads_with_its_distribution_version(third_party) -> None:
    manager = PluginManager()
    assert manager.plugins[-1] == PluginInfo("third", "3.1.4", "entry point", "collector-third")
    assert manager.analysis("third").plugin.name == "third"
    assert analyze_kernel(object(), "third", manager=manager).records == [{"x": 7}]


@pytest.mark.parametrize(
    ("value", "loaded"), [("1", False), ("yes", False), ("0", True), ("", True)]
)
def test_environment_variable_turns_entry_points_off(
    third_party, monkeypatch: pytest.MonkeyPatch, value: str, loaded: bool
) -> None:
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, value)
    names = [p.name for p in PluginManager().plugins]
    builtins = [name for name, _ in BUILTINS]
    assert names == ([*builtins, "third"] if loaded else builtins)


class FakeEntryPoint:
    def __init__(self, name: str, value: str, target, dist=None) -> None:
        self.name, self.value, self._target, self.dist = name, value, target, dist

    def load(self):
        if isinstance(self._target, Exception):
            raise self._target
        return self._target


def test_entry_points_come_from_importlib_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    asked = []

    def entry_points(group):
        asked.append(group)
        return [FakeEntryPoint("fake", "fake_mod", demo_plugin(), None)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    manager = PluginManager(builtins=(), autoload=True)
    assert asked == ["collector"]
    assert manager.plugins == [PluginInfo("fake", "unknown", "entry point", None)]


def test_a_plugin_that_fails_to_import_is_one_line_naming_the_way_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broken = FakeEntryPoint("broken", "broken_mod", ImportError("No module named 'numpy2'"))
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [broken])
    with pytest.raises(CollectorError) as e:
        PluginManager(builtins=(), autoload=True)
    assert str(e.value) == (
        "plugin 'broken' (broken_mod) failed to load: ImportError: No module named 'numpy2'"
        " (set COLLECTOR_DISABLE_PLUGIN_AUTOLOAD=1 to load built-in plugins only)"
    )


# -- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize("marked", [True, False])
def test_check_pending_catches_a_misspelled_hook(marked: bool) -> None:
    def collector_analyse():
        return [DEMO]

    typo = make_plugin(
        collector_analyse=hookimpl(collector_analyse) if marked else collector_analyse
    )
    manager = PluginManager(builtins=(), autoload=False)
    with pytest.raises(CollectorError) as e:
        manager.register(typo, name="typo", version="1")
    assert str(e.value) == (
        "plugin 'typo' implements unknown hook collector_analyse"
        " (known hooks: collector_analyses, collector_analyze)"
    )
    assert manager.plugins == []
    manager.check_pending()  # nothing was left registered


def test_an_argument_the_hook_does_not_offer_is_refused() -> None:
    @hookimpl
    def collector_analyze(name, kernal):
        return None

    manager = PluginManager(builtins=(), autoload=False)
    with pytest.raises(CollectorError, match=r"^plugin 'bad' \(builtin\): .*kernal") as e:
        manager.register(make_plugin(collector_analyze=collector_analyze), name="bad", version="1")
    assert "\n" not in str(e.value)


def test_two_plugins_cannot_declare_one_analysis() -> None:
    manager = bare_manager(demo_plugin())
    with pytest.raises(CollectorError) as e:
        manager.register(demo_plugin(), name="again", version="9")
    assert str(e.value) == (
        "plugin 'again' (builtin): analysis 'demo' is already declared by plugin 'p0' (builtin)"
    )
    assert [p.name for p in manager.plugins] == ["p0"]


def test_two_plugins_cannot_share_a_name() -> None:
    manager = bare_manager(demo_plugin())
    other = demo_plugin(analysis=Analysis("other", "x", ()))
    with pytest.raises(CollectorError, match="the name 'p0' is already taken by plugin 'p0'"):
        manager.register(other, name="p0", version="1")


@pytest.mark.parametrize("returned", [DEMO, "demo", [DEMO, "demo"]])
def test_collector_analyses_must_return_a_list_of_analyses(returned) -> None:
    plugin = make_plugin(collector_analyses=hookimpl(lambda: returned))
    with pytest.raises(CollectorError, match="collector_analyses returned"):
        bare_manager(plugin)


def test_a_failing_collector_analyses_leaves_nothing_registered() -> None:
    def collector_analyses():
        raise RuntimeError("boom\nsecond line")

    manager = PluginManager(builtins=(), autoload=False)
    with pytest.raises(CollectorError) as e:
        manager.register(make_plugin(collector_analyses=collector_analyses), name="x", version="1")
    assert str(e.value) == (
        "plugin 'x' (builtin): collector_analyses failed: RuntimeError: boom; second line"
    )
    assert manager.plugins == [] and manager.analyses() == []


def test_declarations_are_checked_when_written() -> None:
    with pytest.raises(ValueError, match="reserved"):
        Field("plugin", "str", "")
    with pytest.raises(ValueError, match="type 'float'"):
        Field("x", "float", "")
    with pytest.raises(ValueError, match="duplicate field 'x'"):
        Analysis("a", "", (Field("x", "int", ""), Field("x", "str", "")))
    with pytest.raises(ValueError, match="must match"):
        Analysis("Bad-Name", "", ())
    with pytest.raises(ValueError, match="'format' is reserved"):
        Analysis("a", "", (), (Option("format"),))


# -- dispatch and the plugin's edge ------------------------------------------------------------


def test_only_the_plugin_that_declared_an_analysis_runs_it() -> None:
    calls = []

    @hookimpl
    def collector_analyze(name):
        calls.append(name)
        return [{"n": -1, "word": "hijacked"}]

    greedy = make_plugin(collector_analyze=collector_analyze)
    manager = bare_manager(demo_plugin(), greedy)
    result = analyze_kernel(object(), "demo", manager=manager)
    assert calls == []
    assert result.records == [{"n": 0, "word": "hi"}, {"n": 1, "word": "hi"}]
    assert (result.plugin, result.plugin_version, result.error) == ("p0", "0.0", None)


def test_options_reach_the_plugin_converted() -> None:
    manager = bare_manager(demo_plugin())
    result = analyze_kernel(object(), "demo", {"count": "0x3", "loud": "yes"}, manager=manager)
    assert [r["word"] for r in result.records] == ["HI", "HI", "HI"]
    assert result.options == {"count": 3, "loud": True}


def test_records_get_every_field_in_declared_order() -> None:
    manager = bare_manager(demo_plugin(lambda o: [{"word": "w"}, {"word": "v", "n": 5}]))
    records = analyze_kernel(object(), "demo", manager=manager).records
    assert [list(r.items()) for r in records] == [
        [("n", None), ("word", "w")],
        [("n", 5), ("word", "v")],
    ]


@pytest.mark.parametrize(
    ("records", "message"),
    [
        (lambda o: [{"n": 1, "size": 2}], "record 0 has undeclared field 'size'"),
        (lambda o: [{"n": "1"}], "record 0 field 'n' is str, declared int"),
        (lambda o: [{"n": True}], "record 0 field 'n' is bool, declared int"),
        (lambda o: [{"n": 1}, ("n", 1)], "record 1 is tuple, not a dict"),
    ],
)
def test_records_that_break_their_declaration_are_a_plugin_bug(records, message) -> None:
    manager = bare_manager(demo_plugin(records))
    with pytest.raises(CollectorError) as e:
        analyze_kernel(object(), "demo", manager=manager)
    assert str(e.value) == f"plugin 'p0', analysis 'demo': {message}"


def test_a_page_not_captured_ends_the_records_with_one_error_line() -> None:
    def records(options):
        yield {"n": 1}
        yield {"n": 2}
        raise PageNotCaptured(0x5000, Fate.UNREADABLE, 5)

    result = analyze_kernel(object(), "demo", manager=bare_manager(demo_plugin(records)))
    assert result.records == [{"n": 1, "word": None}, {"n": 2, "word": None}]
    assert result.error == (
        "demo: stopped after 2 records: physical page 0x5000 was not captured: unreadable (errno 5)"
    )


def test_a_construct_error_ends_the_records_in_one_line() -> None:
    def records(options):
        construct.Struct("a" / construct.Int64ul).parse(b"\x01\x02")
        yield {}

    result = analyze_kernel(object(), "demo", manager=bare_manager(demo_plugin(records)))
    assert result.records == []
    assert result.error.startswith("demo: stopped after 0 records: ")
    assert "\n" not in result.error and "stream read less than specified amount" in result.error


def test_not_applicable_says_why_and_propagates() -> None:
    def records(options):
        raise NotApplicable("the image has no BTF")

    with pytest.raises(NotApplicable) as e:
        analyze_kernel(object(), "demo", manager=bare_manager(demo_plugin(records)))
    assert str(e.value) == "demo does not apply to this image: the image has no BTF"


def test_a_plugin_crash_is_one_line_naming_the_plugin() -> None:
    def records(options):
        yield {"n": 1}
        raise KeyError("flags")

    with pytest.raises(CollectorError) as e:
        analyze_kernel(object(), "demo", manager=bare_manager(demo_plugin(records)))
    assert str(e.value) == (
        "analysis 'demo' (plugin p0 0.0) failed after 1 records: KeyError: 'flags'"
    )
    assert isinstance(e.value.__cause__, KeyError)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (None, "declares analysis 'demo' but its collector_analyze returned None for it"),
        ({"n": 1}, "collector_analyze must return an iterable of records, not dict"),
        (5, "collector_analyze must return an iterable of records, not int"),
    ],
)
def test_what_collector_analyze_returns_is_checked(returned, message) -> None:
    plugin = make_plugin(
        collector_analyses=hookimpl(lambda: [DEMO]),
        collector_analyze=hookimpl(lambda name: returned),
    )
    with pytest.raises(CollectorError) as e:
        analyze_kernel(object(), "demo", manager=bare_manager(plugin))
    assert str(e.value) == f"plugin 'p0'{':' if returned is not None else ''} {message}"


def test_an_unknown_analysis_lists_the_known_ones() -> None:
    with pytest.raises(CollectorError) as e:
        analyze_kernel(object(), "nope", manager=bare_manager(demo_plugin()))
    assert str(e.value) == "no analysis called 'nope' (available: demo)"
    assert e.value.exit_code == 2


def test_resolve_options() -> None:
    assert resolve_options(DEMO, None) == {"count": 2, "loud": False}
    assert resolve_options(DEMO, {"count": 5, "loud": None}) == {"count": 5, "loud": False}
    assert resolve_options(DEMO, {"loud": "false"}) == {"count": 2, "loud": False}
    for given, message in [
        ({"colour": 1}, "demo: unknown option 'colour' (options: count, loud)"),
        ({"count": "ten"}, "demo: option 'count' must be int, not 'ten'"),
        ({"count": True}, "demo: option 'count' must be int, not bool"),
        ({"loud": "maybe"}, "demo: option 'loud' must be bool, not 'maybe'"),
    ]:
        with pytest.raises(CollectorError) as e:
            resolve_options(DEMO, given)
        assert (str(e.value), e.value.exit_code) == (message, 2)


# -- the command line ------------------------------------------------------------------------


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="collect")
    cli_analysis.register(parser.add_subparsers())
    return parser.parse_args(argv)


@pytest.fixture
def demo_cli(monkeypatch: pytest.MonkeyPatch):
    """`collect analyze` with the demo plugin, on a stand-in kernel instead of an image."""
    manager = bare_manager(demo_plugin())
    monkeypatch.setattr(cli_analysis, "PluginManager", lambda: manager)

    def run_analysis(image, name, options, manager, consume=None):
        result = analyze_kernel(
            object(), name, options, manager=manager, image_path=image, stream=bool(consume)
        )
        if consume is not None:
            consume(result)
        return result

    monkeypatch.setattr(cli_analysis, "run_analysis", run_analysis)


def test_analyze_passes_options_after_the_analysis_name(demo_cli, capsys) -> None:
    args = parse(["analyze", "img", "demo", "--count", "1", "--loud", "--format", "jsonl"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out == (
        '{"n": 0, "word": "HI", "plugin": "p0", "plugin_version": "0.0"}\n'
    )
    args = parse(["analyze", "--format", "csv", "img", "demo", "--no-loud"])
    assert args.handler(args) == 0
    assert capsys.readouterr().out == "n,word,plugin,plugin_version\n0,hi,p0,0.0\n1,hi,p0,0.0\n"


def test_analyze_rejects_a_bad_option_in_one_line(demo_cli) -> None:
    args = parse(["analyze", "img", "demo", "--colour", "red"])
    with pytest.raises(CollectorError) as e:
        args.handler(args)
    assert str(e.value) == (
        "demo: unrecognized arguments: --colour red (see `collect analyze IMAGE demo --help`)"
    )
    assert e.value.exit_code == 2


def test_analyze_exits_1_after_printing_partial_records(monkeypatch, capsys) -> None:
    def records(options):
        yield {"n": 1}
        raise PageNotCaptured(0x2000, Fate.EXCLUDED)

    manager = bare_manager(demo_plugin(records))
    monkeypatch.setattr(cli_analysis, "PluginManager", lambda: manager)

    def run_analysis(image, name, options, manager, consume=None):
        result = analyze_kernel(object(), name, options, manager=manager, stream=bool(consume))
        if consume is not None:
            consume(result)
        return result

    monkeypatch.setattr(cli_analysis, "run_analysis", run_analysis)
    args = parse(["analyze", "img", "demo"])
    assert args.handler(args) == 1
    out, err = capsys.readouterr()
    assert out == "demo: 1 record, plugin p0 0.0\nn     1\nword  -\n"
    assert err == (
        "collect: demo: stopped after 1 records: physical page 0x2000 was not captured: excluded\n"
    )


def test_plugins_lists_each_plugin_with_version_source_and_analyses(
    third_party, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = parse(["plugins"])
    assert args.handler(args) == 0
    v = collector.__version__
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "version", "source", "analysis", "summary"]
    builtin = [
        [plugin, v, "builtin", analysis] for plugin, analyses in BUILTINS for analysis in analyses
    ]
    assert len(lines) == 2 + len(builtin) + 1
    assert [line.split()[:4] for line in lines[2:-1]] == builtin
    assert lines[-1].split() == [
        "third",
        "3.1.4",
        "entry",
        "point",
        "(collector-third)",
        "third",
        "from",
        "elsewhere",
    ]


def test_plugins_describes_one_analysis(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DISABLE_AUTOLOAD_ENV, "1")
    args = parse(["plugins", "kallsyms"])
    assert args.handler(args) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: collect analyze IMAGE kallsyms")
    assert "--match TEXT" in out and "--name TEXT" in out
    assert "\nfields:\n  address (hex)" in out
