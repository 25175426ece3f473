"""Run one analysis on one image: open it, set up its kernel, call the plugin, check its records.

This is the plugin's edge: errors from reading the image end the records with one error line,
a plugin's own bug becomes one :class:`CollectorError`, and no traceback reaches the user.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from construct import ConstructError

from collector.errors import CollectorError, NotApplicable, UsageError
from collector.hookspecs import FIELD_TYPES, Analysis, Field
from collector.plugin_manager import PluginManager, RegisteredAnalysis

if TYPE_CHECKING:
    from collector.kernel.kernel import Kernel

T = TypeVar("T")


@dataclass(frozen=True)
class ImageInfo:
    """Which image and kernel an analysis ran on (``None`` where unknown)."""

    path: str | None
    release: str | None
    build_id: str | None


@dataclass(frozen=True)
class AnalysisResult:
    """The records of one analysis and what produced them.

    :param analysis: the analysis' declaration (name, summary, fields, options).
    :param records: flat dicts, each with exactly the declared fields, in declared order.
    :param plugin: the name of the plugin that produced them.
    :param plugin_version: its version.
    :param image: the image and kernel they describe.
    :param options: the options the analysis ran with, defaults filled in.
    :param error: why the records stop early (one line), or ``None`` if they are complete.
        For streamed records, see :meth:`final_error`.
    """

    analysis: Analysis
    records: list[dict[str, Any]] | RecordStream
    plugin: str
    plugin_version: str
    image: ImageInfo
    options: dict[str, Any]
    error: str | None = None

    @property
    def fields(self) -> tuple[Field, ...]:
        """The fields of every record (for the options it ran with)."""
        return self.analysis.selected_fields(self.options)

    def final_error(self) -> str | None:
        """Why the records stopped early; for streamed records, known once they are read."""
        if isinstance(self.records, RecordStream):
            return self.records.error
        return self.error


class RecordStream:
    """Records checked one at a time as they are read, never all held in memory (millions of
    per-page records); :attr:`error` says why they stopped early, once they are read."""

    def __init__(
        self, registered: RegisteredAnalysis, fields: tuple[Field, ...], produced: Iterable[Any]
    ) -> None:
        self._registered = registered
        self._fields = fields
        self._produced = produced
        self.count = 0
        self.error: str | None = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        name = self._registered.analysis.name
        try:
            iterator = _guard(self._registered, 0, lambda: iter(self._produced))
            while True:
                record = _guard(self._registered, self.count, lambda: next(iterator, _END))
                if record is _END:
                    return
                checked = _check_record(self._registered, self.count, record, self._fields)
                self.count += 1
                yield checked
        except _ImageReadError as e:
            self.error = f"{name}: stopped after {self.count} records: {e}"


def resolve_options(analysis: Analysis, given: Mapping[str, Any] | None) -> dict[str, Any]:
    """Check ``given`` against the analysis' options, convert strings, fill in defaults.

    :raises CollectorError: (exit status 2) an unknown option or a value of the wrong type.
    """
    given = dict(given or {})
    declared = {o.name: o for o in analysis.options}
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(declared) or "none"
        raise CollectorError(
            f"{analysis.name}: unknown option {unknown[0]!r} (options: {known})", exit_code=2
        )
    resolved = {}
    for option in analysis.options:
        value = given.get(option.name)
        if value is None:
            value = option.default
        elif isinstance(value, str) and option.type is not str:
            value = _parse_option(analysis.name, option.name, option.type, value)
        if value is not None and (
            not isinstance(value, option.type) or (option.type is int and isinstance(value, bool))
        ):
            raise CollectorError(
                f"{analysis.name}: option {option.name!r} must be {option.type.__name__},"
                f" not {type(value).__name__}",
                exit_code=2,
            )
        resolved[option.name] = value
    return resolved


def _parse_option(analysis: str, name: str, kind: type, text: str) -> Any:
    if kind is int:
        try:
            return int(text, 0)
        except ValueError:
            pass
    elif kind is bool and text.lower() in ("1", "true", "yes", "0", "false", "no"):
        return text.lower() in ("1", "true", "yes")
    raise CollectorError(
        f"{analysis}: option {name!r} must be {kind.__name__}, not {text!r}", exit_code=2
    )


def analyze_kernel(
    kernel: Kernel,
    name: str,
    options: Mapping[str, Any] | None = None,
    *,
    manager: PluginManager | None = None,
    image_path: str | os.PathLike | None = None,
    stream: bool = False,
) -> AnalysisResult:
    """Run the analysis ``name`` on an already set-up kernel.

    :param stream: hand back the records as a :class:`RecordStream` that computes them as it
        is read (the caller reads it while the image is open), instead of a list.
    :raises NotApplicable: the analysis does not apply to this image (the message says why).
    :raises CollectorError: unknown analysis or option, or a bug in the plugin (one line).
    """
    manager = manager or PluginManager()
    registered = manager.analysis(name)
    resolved = resolve_options(registered.analysis, options)
    fields = registered.analysis.selected_fields(resolved)
    records: list[dict[str, Any]] | RecordStream = []
    error = None
    try:
        produced = _guard(
            registered, 0, lambda: manager.analyze(name=name, kernel=kernel, options=dict(resolved))
        )
        produced = _check_iterable(registered, produced)
        if stream:
            records = RecordStream(registered, fields, produced)
        else:
            assert isinstance(records, list)
            iterator = iter(produced)
            while True:
                record = _guard(registered, len(records), lambda: next(iterator, _END))
                if record is _END:
                    break
                records.append(_check_record(registered, len(records), record, fields))
    except _ImageReadError as e:
        error = f"{name}: stopped after {len(records)} records: {e}"
    return AnalysisResult(
        analysis=registered.analysis,
        records=records,
        plugin=registered.plugin.name,
        plugin_version=registered.plugin.version,
        image=ImageInfo(
            path=None if image_path is None else os.fspath(image_path),
            release=_quietly(lambda: kernel.release),
            build_id=_quietly(lambda: kernel.build_id),
        ),
        options=resolved,
        error=error,
    )


def run_analysis(
    image_path: str | os.PathLike,
    name: str,
    options: Mapping[str, Any] | None = None,
    *,
    manager: PluginManager | None = None,
    consume: Callable[[AnalysisResult], None] | None = None,
    image_format: str = "auto",
    memory_map: list[tuple[int, int]] | None = None,
) -> AnalysisResult:
    """Open the image at ``image_path``, set up its kernel and run the analysis ``name``.

    The analysis and its options are checked before the image is opened, so a typo fails fast.

    :param consume: called with the result while the image is still open; its records are
        then streamed (a :class:`RecordStream`), so millions of records never sit in memory.
    :param image_format: and ``memory_map``: how to open the file, as
        :func:`collector.image.open.open_image` takes them.

    :raises NotApplicable: the analysis does not apply to this image (the message says why).
    :raises CollectorError: the image cannot be opened, or as :func:`analyze_kernel`.
    """
    # Imported here: the image and kernel layers are heavy and not needed to list plugins.
    from collector.image.open import open_image
    from collector.kernel.kernel import Kernel

    manager = manager or PluginManager()
    resolve_options(manager.analysis(name).analysis, options)
    memory = open_image(image_path, image_format, memory_map)
    try:
        kernel = Kernel(memory)
        result = analyze_kernel(
            kernel,
            name,
            options,
            manager=manager,
            image_path=image_path,
            stream=consume is not None,
        )
        if consume is not None:
            consume(result)
        return result
    finally:
        memory.close()


_END = object()


class _ImageReadError(Exception):
    """Reading the image failed part-way: ends the records, does not discard them."""


def _guard(registered: RegisteredAnalysis, count: int, step: Callable[[], T]) -> T:
    """Run one step of a plugin, sorting what it raises into the three kinds of failure."""
    name = registered.analysis.name
    try:
        return step()
    except NotApplicable as e:
        raise NotApplicable(f"{name} does not apply to this image: {e}", e.exit_code) from None
    except UsageError:
        raise
    except (CollectorError, ConstructError) as e:
        # Page not captured, corrupt chunk, unmapped address, short or garbled structure.
        raise _ImageReadError(_one_line(e)) from e
    except Exception as e:
        raise CollectorError(
            f"analysis {name!r} (plugin {registered.plugin.name}"
            f" {registered.plugin.version}) failed after {count} records:"
            f" {type(e).__name__}: {_one_line(e)}"
        ) from e


def _check_iterable(registered: RegisteredAnalysis, produced: object) -> Iterable[Any]:
    if produced is None:
        raise CollectorError(
            f"plugin {registered.plugin.name!r} declares analysis {registered.analysis.name!r}"
            " but its collector_analyze returned None for it"
        )
    if isinstance(produced, Mapping | str | bytes) or not isinstance(produced, Iterable):
        raise CollectorError(
            f"plugin {registered.plugin.name!r}: collector_analyze must return an iterable of"
            f" records, not {type(produced).__name__}"
        )
    return produced


def _check_record(
    registered: RegisteredAnalysis, index: int, record: object, fields: tuple[Field, ...]
) -> dict[str, Any]:
    """Return the record with every selected field, in order; refuse undeclared or mistyped."""
    where = f"plugin {registered.plugin.name!r}, analysis {registered.analysis.name!r}"
    if not isinstance(record, Mapping):
        raise CollectorError(f"{where}: record {index} is {type(record).__name__}, not a dict")
    extra = set(record) - {f.name for f in fields}
    if extra:
        raise CollectorError(f"{where}: record {index} has undeclared field {sorted(extra)[0]!r}")
    out = {}
    for field in fields:
        value = record.get(field.name)
        if value is not None and (
            not isinstance(value, FIELD_TYPES[field.type])
            or (field.type != "bool" and isinstance(value, bool))
        ):
            raise CollectorError(
                f"{where}: record {index} field {field.name!r} is {type(value).__name__},"
                f" declared {field.type}"
            )
        out[field.name] = value
    return out


def _quietly(get: Callable[[], Any]) -> Any:
    try:
        value = get()
    except (CollectorError, ConstructError, AttributeError):
        return None
    if isinstance(value, bytes):
        return value.hex()
    return None if value is None else str(value)


def _one_line(e: BaseException) -> str:
    text = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    return text or type(e).__name__
