"""The plugin manager: built-in plugins, third-party plugins from entry points, typed hook calls.

Plugin authors import what they need from :mod:`collector.api`
from here; see docs/plugins.md.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pluggy

import collector
from collector import hookspecs
from collector.errors import CollectorError
from collector.hookspecs import HOOK_PREFIX, PROJECT, Analysis, Field, Option, hookimpl

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

__all__ = [
    "BUILTIN_PLUGINS",
    "DISABLE_AUTOLOAD_ENV",
    "ENTRY_POINT_GROUP",
    "Analysis",
    "Field",
    "Option",
    "PluginInfo",
    "PluginManager",
    "RegisteredAnalysis",
    "hookimpl",
]

#: Modules registered first, in this order; they carry the collector's own version.
BUILTIN_PLUGINS: tuple[str, ...] = (
    "collector.plugins.sysinfo",
    "collector.plugins.kallsyms",
    "collector.plugins.pages",
    "collector.plugins.tasks",
    "collector.plugins.maps",
    "collector.plugins.modules",
    "collector.plugins.dmesg",
    "collector.plugins.hidden_tasks",
    "collector.plugins.hidden_modules",
)

#: Third-party plugins declare ``[project.entry-points.collector] name = "module"``.
ENTRY_POINT_GROUP = "collector"

#: Set to anything but "" or "0" to load built-in plugins only.
DISABLE_AUTOLOAD_ENV = "COLLECTOR_DISABLE_PLUGIN_AUTOLOAD"

BUILTIN = "builtin"
ENTRY_POINT = "entry point"


@dataclass(frozen=True)
class PluginInfo:
    """A registered plugin, as outputs name it.

    :param name: the plugin's name (a built-in's module name, an entry point's name).
    :param version: the collector's version for built-ins, the distribution's for entry points.
    :param source: ``"builtin"`` or ``"entry point"``.
    :param distribution: the distribution an entry-point plugin comes from, else ``None``.
    """

    name: str
    version: str
    source: str
    distribution: str | None = None


@dataclass(frozen=True)
class RegisteredAnalysis:
    """An analysis together with the plugin that declared it."""

    analysis: Analysis
    plugin: PluginInfo


class _Pluggy(pluggy.PluginManager):
    """Treats every ``collector_*`` function as a hook implementation, marked or not.

    An unmarked function would otherwise be ignored silently; this way a misspelled hook
    name is always caught by ``check_pending()``.
    """

    def parse_hookimpl_opts(self, plugin: Any, name: str) -> Any:
        opts = super().parse_hookimpl_opts(plugin, name)
        if (
            opts is None
            and name.startswith(HOOK_PREFIX)
            and inspect.isroutine(getattr(plugin, name, None))
        ):
            return {
                "wrapper": False,
                "hookwrapper": False,
                "optionalhook": False,
                "tryfirst": False,
                "trylast": False,
                "specname": None,
            }
        return opts


def autoload_disabled() -> bool:
    """Whether :data:`DISABLE_AUTOLOAD_ENV` asks for built-in plugins only."""
    return os.environ.get(DISABLE_AUTOLOAD_ENV, "") not in ("", "0")


class PluginManager:
    """Registers plugins and calls their hooks, one typed method per hook.

    :param builtins: module names to register first (default :data:`BUILTIN_PLUGINS`).
    :param autoload: load entry-point plugins; ``None`` means "unless
        :data:`DISABLE_AUTOLOAD_ENV` is set".
    :raises CollectorError: a plugin fails to import, implements an unknown hook, takes an
        argument its hook does not offer, or declares an analysis already declared.
    """

    def __init__(
        self, builtins: Sequence[str] = BUILTIN_PLUGINS, *, autoload: bool | None = None
    ) -> None:
        self._pm = _Pluggy(PROJECT)
        self._pm.add_hookspecs(hookspecs)
        self._infos: dict[str, PluginInfo] = {}
        self._analyses: dict[str, RegisteredAnalysis] = {}
        for module_name in builtins:
            module = importlib.import_module(module_name)
            self.register(
                module, name=module_name.rpartition(".")[2], version=collector.__version__
            )
        if autoload is None:
            autoload = not autoload_disabled()
        if autoload:
            self.load_entrypoints()
        self.check_pending()

    # -- registration ------------------------------------------------------------------------

    def register(
        self,
        plugin: object,
        *,
        name: str,
        version: str,
        source: str = BUILTIN,
        distribution: str | None = None,
    ) -> PluginInfo:
        """Register one plugin object (usually a module) and collect its analyses.

        :raises CollectorError: see the class; nothing stays registered on failure.
        """
        info = PluginInfo(name, version, source, distribution)
        where = _describe(info)
        if self._pm.has_plugin(name):
            other = _describe(self._infos[name])
            raise CollectorError(f"{where}: the name {name!r} is already taken by {other}")
        try:
            self._pm.register(plugin, name=name)
        except (pluggy.PluginValidationError, ValueError) as e:
            # ValueError: pluggy refuses the same object registered twice.
            raise CollectorError(f"{where}: {_one_line(e)}") from None
        try:
            self.check_pending()
            declared = self._collect_analyses(plugin, where)
            for analysis in declared:
                if analysis.name in self._analyses:
                    other = _describe(self._analyses[analysis.name].plugin)
                    raise CollectorError(
                        f"{where}: analysis {analysis.name!r} is already declared by {other}"
                    )
        except CollectorError:
            self._pm.unregister(plugin)
            raise
        self._infos[name] = info
        for analysis in declared:
            self._analyses[analysis.name] = RegisteredAnalysis(analysis, info)
        return info

    def load_entrypoints(self) -> list[PluginInfo]:
        """Register every plugin declared in the :data:`ENTRY_POINT_GROUP` entry-point group.

        :returns: the plugins registered, sorted by name.
        """
        loaded = []
        eps = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(eps, key=lambda ep: ep.name):
            dist = ep.dist
            dist_name = dist.name if dist is not None else None
            version = dist.version if dist is not None else "unknown"
            try:
                plugin = ep.load()
            except Exception as e:
                raise CollectorError(
                    f"plugin {ep.name!r} ({ep.value}"
                    + (f", from {dist_name} {version}" if dist_name else "")
                    + f") failed to load: {type(e).__name__}: {_one_line(e)}"
                    + f" (set {DISABLE_AUTOLOAD_ENV}=1 to load built-in plugins only)"
                ) from e
            loaded.append(
                self.register(
                    plugin,
                    name=ep.name,
                    version=version,
                    source=ENTRY_POINT,
                    distribution=dist_name,
                )
            )
        return loaded

    def check_pending(self) -> None:
        """Fail if a registered plugin implements a hook that does not exist (a typo).

        :raises CollectorError: naming the plugin and the unknown hook.
        """
        try:
            self._pm.check_pending()
        except pluggy.PluginValidationError as e:
            name = self._pm.get_name(e.plugin) or repr(e.plugin)
            hooks = ", ".join(sorted(_spec_names()))
            unknown = sorted(
                attr
                for attr in dir(e.plugin)
                if attr.startswith(HOOK_PREFIX) and attr not in _spec_names()
            )
            raise CollectorError(
                f"plugin {name!r} implements unknown hook {', '.join(unknown) or '?'}"
                f" (known hooks: {hooks})"
            ) from None

    # -- what is registered -----------------------------------------------------------------

    @property
    def plugins(self) -> list[PluginInfo]:
        """Every registered plugin, in registration order (built-ins first)."""
        return list(self._infos.values())

    def analyses(self) -> list[RegisteredAnalysis]:
        """Every declared analysis (the results of ``collector_analyses``), sorted by name."""
        return [self._analyses[name] for name in sorted(self._analyses)]

    def analysis(self, name: str) -> RegisteredAnalysis:
        """The analysis called ``name``.

        :raises CollectorError: (exit status 2) no plugin declares it; the message lists those
            that exist.
        """
        try:
            return self._analyses[name]
        except KeyError:
            known = ", ".join(sorted(self._analyses)) or "none"
            raise CollectorError(
                f"no analysis called {name!r} (available: {known})", exit_code=2
            ) from None

    # -- hook calls ----------------------------------------------------------------------------

    def analyze(
        self, name: str, kernel: Kernel, options: dict[str, Any]
    ) -> Iterable[dict[str, Any]] | None:
        """Run analysis ``name``: its own ``run``, else ``collector_analyze`` on the plugin that
        declared it (only that one).

        :returns: what the plugin returned: an iterable of records, or ``None``.
        """
        registered = self.analysis(name)
        if registered.analysis.run is not None:
            return registered.analysis.run(kernel, options)
        owner = self._pm.get_plugin(registered.plugin.name)
        return self._only(owner, "collector_analyze")(name=name, kernel=kernel, options=options)

    def _collect_analyses(self, plugin: object, where: str) -> list[Analysis]:
        try:
            result = self._only(plugin, "collector_analyses")()
        except Exception as e:
            raise CollectorError(
                f"{where}: collector_analyses failed: {type(e).__name__}: {_one_line(e)}"
            ) from e
        declared: list[Analysis] = []
        for batch in result:
            if not isinstance(batch, list | tuple):
                raise CollectorError(
                    f"{where}: collector_analyses returned {type(batch).__name__}, not a list"
                )
            for analysis in batch:
                if not isinstance(analysis, Analysis):
                    raise CollectorError(
                        f"{where}: collector_analyses returned {type(analysis).__name__},"
                        " not collector.plugin_manager.Analysis"
                    )
                declared.append(analysis)
        return declared

    def _only(self, plugin: object, hook: str) -> pluggy.HookCaller:
        others = [p for p in self._pm.get_plugins() if p is not plugin]
        return self._pm.subset_hook_caller(hook, remove_plugins=others)


def _describe(info: PluginInfo) -> str:
    if info.source == ENTRY_POINT:
        origin = f"entry point from {info.distribution or '?'} {info.version}"
    else:
        origin = info.source
    return f"plugin {info.name!r} ({origin})"


def _one_line(e: Exception) -> str:
    return "; ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _spec_names() -> set[str]:
    return {
        name
        for name, value in vars(hookspecs).items()
        if name.startswith(HOOK_PREFIX) and callable(value)
    }
