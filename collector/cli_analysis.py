"""The `collect analyze` and `collect plugins` subcommands: argument parsing and output only."""

from __future__ import annotations

import argparse
import io
import sys
from typing import Any

from collector.analyze import run_analysis
from collector.errors import CollectorError
from collector.output import FORMATS, write_records, write_result
from collector.plugin_manager import ENTRY_POINT, Field, PluginManager, RegisteredAnalysis

_PLUGIN_FIELDS = (
    Field("name", "str", "the plugin's name"),
    Field("version", "str", "the plugin's version"),
    Field("source", "str", "builtin, or the entry point's distribution"),
    Field("analysis", "str", "an analysis the plugin offers"),
    Field("summary", "str", "what the analysis does"),
)


def register(subparsers: Any) -> None:
    """Add the ``analyze`` and ``plugins`` subcommands; each sets ``handler(args) -> int``."""
    analyze = subparsers.add_parser(
        "analyze",
        help="run an analysis plugin on an image",
        description="Run an analysis on an image and print its records."
        " `collect plugins` lists the analyses;"
        " `collect analyze IMAGE ANALYSIS --help` shows one's options and fields.",
    )
    analyze.add_argument("--format", choices=FORMATS, help="output format (default: table)")
    analyze.add_argument(
        "image", metavar="IMAGE", help="a .lime.zst, LiME, ELF core or kdump-compressed image"
    )
    from collector.cli import add_image_options

    add_image_options(analyze)
    analyze.add_argument("analysis", metavar="ANALYSIS", help="the analysis to run")
    analyze.add_argument(
        "options",
        nargs=argparse.REMAINDER,
        metavar="OPTION",
        help="the analysis' own options, e.g. --match foo",
    )
    analyze.set_defaults(handler=run_analyze)

    plugins = subparsers.add_parser(
        "plugins",
        help="list plugins and their analyses",
        description="List every loaded plugin (name, version, source) and its analyses,"
        " or describe one analysis' options and fields.",
    )
    plugins.add_argument("analysis", nargs="?", metavar="ANALYSIS", help="describe one analysis")
    plugins.add_argument("--format", choices=FORMATS, default="table", help="(default: table)")
    plugins.set_defaults(handler=run_plugins)


def run_analyze(args: argparse.Namespace) -> int:
    """``collect analyze IMAGE ANALYSIS [OPTION...]``: exit 0, or 1 if the records stop early."""
    from collector.cli import image_source

    manager = PluginManager()
    registered = manager.analysis(args.analysis)
    parsed = analysis_parser(registered).parse_args(args.options)
    image_format, memory_map = image_source(args)
    # Only what differs from opening by the file's magic is passed on.
    opening: dict[str, Any] = {}
    if image_format != "auto":
        opening["image_format"] = image_format
    if memory_map is not None:
        opening["memory_map"] = memory_map
    options = {o.name: getattr(parsed, o.name) for o in registered.analysis.options}
    _tolerant(sys.stdout)
    fmt = parsed.format or args.format or "table"
    result = run_analysis(
        args.image,
        args.analysis,
        options,
        manager=manager,
        consume=lambda r: write_result(sys.stdout, r, fmt),
        **opening,
    )
    error = result.final_error()
    if error is not None:
        sys.stdout.flush()
        print(f"collect: {error}", file=sys.stderr)
        return 1
    return 0


def run_plugins(args: argparse.Namespace) -> int:
    """``collect plugins [ANALYSIS]``: the plugin list, or one analysis' help."""
    manager = PluginManager()
    _tolerant(sys.stdout)
    if args.analysis is not None:
        sys.stdout.write(analysis_parser(manager.analysis(args.analysis)).format_help())
        return 0
    by_plugin: dict[str, list[RegisteredAnalysis]] = {p.name: [] for p in manager.plugins}
    for registered in manager.analyses():
        by_plugin[registered.plugin.name].append(registered)
    records = []
    for info in manager.plugins:
        source = info.source
        if info.source == ENTRY_POINT and info.distribution:
            source = f"{ENTRY_POINT} ({info.distribution})"
        common = {"name": info.name, "version": info.version, "source": source}
        for registered in by_plugin[info.name] or [None]:
            analysis = registered.analysis if registered else None
            records.append(
                {
                    **common,
                    "analysis": analysis.name if analysis else None,
                    "summary": analysis.summary if analysis else None,
                }
            )
    write_records(sys.stdout, records, _PLUGIN_FIELDS, args.format)
    return 0


class _OptionParser(argparse.ArgumentParser):
    """An analysis' option parser: a bad option is one CollectorError line, not a usage dump."""

    def __init__(self, analysis: str, **kwargs: Any) -> None:
        super().__init__(prog=f"collect analyze IMAGE {analysis}", **kwargs)
        self.analysis = analysis

    def error(self, message: str) -> None:  # type: ignore[override]
        raise CollectorError(f"{self.analysis}: {message} (see `{self.prog} --help`)", exit_code=2)


def analysis_parser(registered: RegisteredAnalysis) -> argparse.ArgumentParser:
    """The parser for one analysis' options; its ``--help`` also documents the fields."""
    analysis = registered.analysis
    plugin = registered.plugin
    width = max((len(f.name) + len(f.type) + 3 for f in analysis.fields), default=0)
    epilog = "fields:\n" + "".join(
        f"  {f'{f.name} ({f.type})':<{width}}  {f.description}\n" for f in analysis.fields
    )
    parser = _OptionParser(
        analysis.name,
        description=f"{analysis.summary} (plugin {plugin.name} {plugin.version}, {plugin.source})",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--format", choices=FORMATS, help="output format (default: table)")
    for option in analysis.options:
        flag = "--" + option.name.replace("_", "-")
        default = "" if option.default is None else f" (default: {option.default})"
        if option.type is bool:
            parser.add_argument(
                flag,
                dest=option.name,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=option.help + default,
            )
        else:
            parser.add_argument(
                flag,
                dest=option.name,
                type=_parse_int if option.type is int else str,
                metavar="N" if option.type is int else "TEXT",
                default=None,
                help=option.help + default,
            )
    return parser


def _parse_int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def _tolerant(stream: Any) -> None:
    """Never fail on a character the terminal's encoding lacks: write an escape instead."""
    if isinstance(stream, io.TextIOWrapper):
        stream.reconfigure(errors="backslashreplace")
