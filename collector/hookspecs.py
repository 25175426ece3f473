"""Every plugin hook, in the order the hooks fire, and the records that describe an analysis.

A plugin implements some of these functions (same name, any subset of the arguments) and
marks them with :data:`hookimpl`. Arguments can be added to a hook later, never renamed.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

#: The pluggy project name: hook functions start with ``collector_``.
PROJECT = "collector"
HOOK_PREFIX = "collector_"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: How a record field is typed, stored and shown. ``hex`` is an integer (an address, an
#: offset, a mask) that JSON and CSV keep as a number and tables show in hexadecimal.
FIELD_TYPES = {"str": (str,), "int": (int,), "hex": (int,), "bool": (bool,)}

#: Option value types; on the command line ``int`` accepts ``0x`` prefixes.
OPTION_TYPES = (str, int, bool)

#: Fields every output adds to each record to say which plugin produced it.
PROVENANCE_FIELDS = ("plugin", "plugin_version")

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


@dataclass(frozen=True)
class Field:
    """One documented field of an analysis' flat records.

    :param name: the key in every record (lower case, digits, underscores).
    :param type: one of :data:`FIELD_TYPES`; any field may also be ``None`` (unknown).
    :param description: one sentence: what the value is and where it comes from.
    """

    name: str
    type: str
    description: str

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"field name {self.name!r} must match {_NAME.pattern}")
        if self.name in PROVENANCE_FIELDS:
            raise ValueError(f"field name {self.name!r} is reserved for provenance")
        if self.type not in FIELD_TYPES:
            raise ValueError(f"field {self.name!r}: type {self.type!r} not in {set(FIELD_TYPES)}")


@dataclass(frozen=True)
class Option:
    """One option of an analysis, given as ``--name value`` on the command line.

    :param name: the key in ``options`` (``--name`` with ``_`` written ``-`` on the command line).
    :param type: ``str``, ``int`` or ``bool`` (a ``bool`` option is a ``--name/--no-name`` flag).
    :param default: the value when the option is not given (``None``: not given).
    :param help: one line for ``--help``.
    """

    name: str
    type: type = str
    default: Any = None
    help: str = ""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"option name {self.name!r} must match {_NAME.pattern}")
        if self.type not in OPTION_TYPES:
            raise ValueError(f"option {self.name!r}: type must be one of str, int, bool")


@dataclass(frozen=True)
class Analysis:
    """What an analysis is called, what it does, the fields it returns and its options.

    :param name: the name given to ``collect analyze IMAGE NAME``; unique among all plugins.
    :param summary: one line for ``collect plugins``.
    :param fields: every field its records carry, in display order.
    :param options: the options it accepts.
    :param run: what computes the records: called as ``run(kernel, options)`` and returning
        an iterable of records, as :func:`collector_analyze` would. With it the plugin needs
        no ``collector_analyze``; without it, ``collector_analyze`` is called.
    :param fields_for: for an analysis whose options choose between views (``pages --by``):
        called as ``fields_for(options)``, it names the fields the records carry for those
        options, a subset of ``fields`` in display order. Without it every record carries
        every field.
    """

    name: str
    summary: str
    fields: tuple[Field, ...]
    options: tuple[Option, ...] = ()
    run: Callable[[Kernel, dict[str, Any]], Iterable[dict[str, Any]]] | None = field(
        default=None, compare=False, repr=False
    )
    fields_for: Callable[[dict[str, Any]], Iterable[str]] | None = field(
        default=None, compare=False, repr=False
    )

    def selected_fields(self, options: dict[str, Any]) -> tuple[Field, ...]:
        """The fields records carry when run with ``options`` (see ``fields_for``)."""
        if self.fields_for is None:
            return self.fields
        by_name = {f.name: f for f in self.fields}
        return tuple(by_name[name] for name in self.fields_for(options))

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"analysis name {self.name!r} must match {_NAME.pattern}")
        object.__setattr__(self, "fields", tuple(self.fields))
        object.__setattr__(self, "options", tuple(self.options))
        for kind, names in (
            ("field", [f.name for f in self.fields]),
            ("option", [o.name for o in self.options]),
        ):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"analysis {self.name!r}: duplicate {kind} {dupes[0]!r}")
        if "format" in (o.name for o in self.options):
            raise ValueError(f"analysis {self.name!r}: option name 'format' is reserved")
        if self.run is not None and not callable(self.run):
            raise ValueError(f"analysis {self.name!r}: run must be callable")


# ---------------------------------------------------------------------------------------------
# Discovery: fired once per plugin when the plugin manager registers it, before any image is
# opened. `collect plugins` shows what it returns.
# ---------------------------------------------------------------------------------------------


@hookspec
def collector_analyses() -> list[Analysis]:
    """Declare the analyses this plugin offers.

    Called once per plugin at registration; the declarations are checked then (unique names,
    documented fields), so a broken plugin fails before any image is opened.

    :returns: the plugin's :class:`Analysis` declarations (an empty list for none).
    """


# ---------------------------------------------------------------------------------------------
# Analysis: fired once per `collect analyze IMAGE NAME`, after the image is opened and its
# kernel (translation, symbols, BTF, VMCOREINFO) is set up.
# ---------------------------------------------------------------------------------------------


@hookspec(firstresult=True)
def collector_analyze(
    name: str, kernel: Kernel, options: dict[str, Any]
) -> Iterable[dict[str, Any]] | None:
    """Run the analysis called ``name`` on one kernel and return its flat records.

    Only the plugin that declared ``name`` in :func:`collector_analyses` is called, and only
    when its :class:`Analysis` has no ``run`` of its own. Raise
    :class:`~collector.errors.NotApplicable` with the reason when the analysis does not apply
    to this image. Errors from reading the image (a page not captured, a construct error)
    may propagate: the caller keeps the records produced so far and reports one error line.
    Stops at the first non-None result.

    :param name: the analysis to run, one of the names this plugin declared; must not be
        changed.
    :param kernel: the kernel in the image (:class:`collector.kernel.kernel.Kernel`); read
        through it, do not change it.
    :param options: the analysis' options by name, every declared option present (its default
        when not given) and already converted to its type; must not be changed.
    :returns: an iterable (a generator is fine) of dicts whose keys are among the declared
        fields (a missing key means ``None``), or ``None`` when ``name`` is not this plugin's.
    """
